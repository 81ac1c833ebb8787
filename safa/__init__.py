"""safa: training-free long-form generation by Latent Swap Joint Diffusion (SaFa).

>>> from safa import JointDiffusion            # doctest: +SKIP
>>> jd = JointDiffusion(pipe)                  # any supported diffusers pipeline  # doctest: +SKIP
>>> out = jd("rain on a tin roof", seconds=60, method="safa", loop=True)  # doctest: +SKIP
>>> out.audio.shape                            # (batch, samples)  # doctest: +SKIP

Imports are lazy so that ``import safa`` (and the CLI's ``--help``) stays fast.
"""
from __future__ import annotations

from typing import Any

__all__ = ["JointDiffusion", "JointDiffusionOutput", "METHODS"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import sampler
        return getattr(sampler, name)
    raise AttributeError(f"module 'safa' has no attribute {name!r}")
