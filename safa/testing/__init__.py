"""Testing helpers for safa: tiny random-weight diffusers pipelines built fully offline."""

from safa.testing.pipelines import *  # noqa: F401,F403  (the factories, see pipelines.__all__)
from safa.testing.pipelines import __all__  # noqa: F401
