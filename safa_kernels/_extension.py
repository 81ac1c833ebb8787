"""Loads the compiled kernels (``safa_kernels._C``), warning once when they are missing.

Importing the extension registers its ``TORCH_LIBRARY_IMPL`` kernels (``merge_cpp_`` on
CPU, ``merge_cuda_`` on CUDA when built with CUDA) for the ops defined in ``library.py``.
Without it the package still works: CPU tensors fall back to the pure-PyTorch reference
(and CUDA tensors to Triton when it is installed).
"""
from __future__ import annotations

import importlib
import importlib.util
import warnings

from . import library  # noqa: F401  (defines the ops the compiled kernels register for)

_NAME = f"{__package__}._C"

if importlib.util.find_spec(_NAME) is None:
    LOADED, ERROR = False, "not built"
else:
    try:
        importlib.import_module(_NAME)
        LOADED, ERROR = True, ""
    except ImportError as exc:  # built for another torch or Python, or a missing shared library
        LOADED, ERROR = False, f"present but failed to load ({exc})"

if not LOADED:
    warnings.warn(
        f"safa_kernels: the compiled extension {_NAME} is {ERROR}; the 'cpp' and 'cuda' backends are "
        "unavailable and CPU tensors use the pure-PyTorch reference. Build it with "
        "`pip install --no-build-isolation -e .` (or `make install`).",
        RuntimeWarning, stacklevel=2)
