"""Which backend runs a call: the ``backend=`` argument, else ``SAFA_BACKEND``, else automatic.

Automatic (``tuning.py``): on a GPU that benchmarks/gpu.sh measured, the backend it found
faster for the op; otherwise the first of :func:`available_backends`, the kernel backends
with a kernel registered for the device type in ``tuning.DEFAULT_ORDER``, and
``reference`` last (the only one on other devices). Importing this module loads the kernels
that could be built (the C++/CUDA extension, the Triton kernel), so the answer is fixed from
then on.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch

from . import _extension, triton_merge  # noqa: F401  (register the compiled and Triton kernels)
from . import tuning
from ._compile import constant_under_compile
from .library import BACKENDS

__all__ = ["available_backends", "has_kernel", "resolve_backend"]

ENVIRONMENT_VARIABLE = "SAFA_BACKEND"


def has_kernel(backend: str, device_type: str) -> bool:
    """Whether ``backend`` has a kernel registered for the device type's dispatch key."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"safa::merge_{backend}_", key)


def available_backends(device: torch.device | str = "cpu") -> Tuple[str, ...]:
    """Backends that can run on ``device``, fastest first; ``reference`` is always last."""
    return _available_backends(torch.device(device).type)


# Memoised, and a constant for torch.compile: the dispatcher query costs microseconds per
# call and is not traceable. (Not functools.lru_cache: dynamo warns on every compiled call
# through one.)
_BACKENDS_BY_DEVICE: Dict[str, Tuple[str, ...]] = {}


@constant_under_compile
def _available_backends(device_type: str) -> Tuple[str, ...]:
    found = _BACKENDS_BY_DEVICE.get(device_type)
    if found is None:
        preferred = tuning.DEFAULT_ORDER.get(device_type, ())
        found = tuple(b for b in preferred if has_kernel(b, device_type)) + ("reference",)
        _BACKENDS_BY_DEVICE[device_type] = found
    return found


_AUTO_BACKEND: Dict[Tuple[str, int, Optional[str]], str] = {}


@constant_under_compile
def _auto_backend(device_type: str, index: int, op: Optional[str]) -> str:
    """The automatic choice for ``op`` on a device (memoised, and a constant for torch.compile)."""
    key = (device_type, index, op)
    found = _AUTO_BACKEND.get(key)
    if found is None:
        available = _available_backends(device_type)
        found = available[0]
        if device_type == "cuda" and op is not None:
            props = torch.cuda.get_device_properties(index)
            measured = tuning.measured_backend(props.name, f"{props.major}.{props.minor}", op)
            if measured in available:
                found = measured
        _AUTO_BACKEND[key] = found
    return found


def resolve_backend(backend: Optional[str], device: torch.device, op: Optional[str] = None) -> str:
    """The backend a call on ``device`` uses: argument, then ``SAFA_BACKEND``, then automatic.

    ``op`` (``"gather"``, ``"stitch"`` or ``"sync"``) lets the automatic choice follow what
    was measured for that op on this GPU (``tuning.py``). An unknown name is a ValueError, a
    backend with no kernel for the device a RuntimeError; both name where the choice came from.
    """
    name = backend if backend is not None else os.environ.get(ENVIRONMENT_VARIABLE, "auto")
    if name == "auto":
        index = device.index if device.index is not None else (
            torch.cuda.current_device() if device.type == "cuda" else -1)
        return _auto_backend(device.type, index, op)
    source = "backend" if backend is not None else f"the {ENVIRONMENT_VARIABLE} environment variable"
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {('auto',) + BACKENDS}, got {name!r}")
    if name != "reference" and name not in available_backends(device):
        raise RuntimeError(f"{source}: backend {name!r} is not available for {device.type} tensors here; "
                           f"available: {available_backends(device)}")
    return name
