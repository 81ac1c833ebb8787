"""safa: training-free long-form generation by Latent Swap Joint Diffusion (SaFa).

>>> from safa import JointDiffusion            # doctest: +SKIP
>>> jd = JointDiffusion(pipe)                  # any supported diffusers pipeline  # doctest: +SKIP
>>> out = jd("rain on a tin roof", seconds=60, method="safa", loop=True)  # doctest: +SKIP
>>> out.audio.shape                            # (batch, samples)  # doctest: +SKIP

Imports are lazy so that ``import safa`` (and the CLI's ``--help``) stays fast.
"""
from __future__ import annotations

from typing import Any

# The one version string: setup.py reads it, safa_kernels and ``safa --version`` import it.
__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access)
_EXPORTS = {
    "JointDiffusion": "sampler", "JointDiffusionOutput": "sampler",
    "METHODS": "methods", "Method": "methods", "SaFa": "methods", "SaFaStats": "methods", "SaFaSelfLoop": "methods",
    "MultiDiffusion": "methods", "MAD": "methods", "SyncDiffusion": "methods", "get_method": "methods",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'safa' has no attribute {name!r}")
