"""``safa evaluate``: registered here for :func:`safa.cli.build_parser`; the command is :mod:`safa.evaluate`."""
from safa.evaluate import add_parser, run

__all__ = ["add_parser", "run"]
