"""Loads the compiled kernels (``safa_kernels._C``), warning once when they are missing.

Importing the extension registers its ``TORCH_LIBRARY_IMPL`` kernels (``merge_cpp_`` on
CPU, ``merge_cuda_`` on CUDA when built with CUDA) for the ops defined in ``ops.py``.
"""
from __future__ import annotations

import warnings

try:
    from . import _C  # noqa: F401
    LOADED = True
    ERROR = ""
except ImportError as exc:  # not built (e.g. a plain source checkout): the reference still works
    LOADED = False
    ERROR = str(exc)
    warnings.warn(
        "safa_kernels: the compiled extension safa_kernels._C is missing "
        f"({exc}); the 'cpp' and 'cuda' backends are unavailable and CPU tensors use the pure-PyTorch "
        "reference. Build it with `pip install --no-build-isolation -e .`.",
        RuntimeWarning, stacklevel=2)
