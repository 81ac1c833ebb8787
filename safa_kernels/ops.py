"""Public ops: ``gather``, ``stitch``, ``sync_`` over any backend.

Each kernel backend ``b`` is one torch.library op, ``safa::merge_<b>_``, all defined
here from one schema (the plan executor of ``plan.py``). The CPU C++ and CUDA kernels
register their implementations from ``csrc/`` with ``TORCH_LIBRARY_IMPL``; the Triton
kernel registers from ``triton_merge.py``. The ``reference`` backend is plain PyTorch
(``reference.py``) and needs no op.

Backend choice, per call: ``backend=`` argument, else the ``SAFA_BACKEND`` environment
variable, else automatic (``tuning.py``): on a GPU that benchmarks/gpu.sh measured, the
backend it found faster for the op; otherwise the first available of ``cpp`` on CPU,
``cuda`` then ``triton`` on CUDA; ``reference`` where there is no kernel.

Per call the hot path is: validate (Python ints), look up the memoised plan, one op
call. We use ``torch.library.Library.define`` + ``register_fake`` rather than
``torch.library.custom_op``: the latter wraps every call in a Python layer (~20 us,
measured in benchmarks/README.md) that a C++ kernel does not need.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Dict, Optional, Tuple

import torch

from . import reference as _reference
from . import tuning
from ._compile import constant_under_compile
from .layout import ViewLayout
from .plan import REF_LONG_AXIS, REF_NONE, REF_OTHER_AXIS, get_plan

__all__ = ["gather", "stitch", "sync_", "available_backends", "resolve_backend",
           "BACKENDS", "KERNEL_BACKENDS", "MODES"]

MODES = ("swap", "mean", "triangular")
KERNEL_BACKENDS = ("cpp", "cuda", "triton")
BACKENDS = ("reference",) + KERNEL_BACKENDS
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# One schema for every kernel backend. `src` is None for an in-place sync (sources are
# read from `out`); tensors are canonical 4-D (views, outer, long axis, inner).
MERGE_SCHEMA = ("(Tensor(a!) out, Tensor? src, Tensor? reference, Tensor index, Tensor weight, "
                "int[] parity) -> ()")

_lib = torch.library.Library("safa", "DEF")
for _b in KERNEL_BACKENDS:
    _lib.define(f"merge_{_b}_" + MERGE_SCHEMA)

    @torch.library.register_fake(f"safa::merge_{_b}_", lib=_lib)
    def _merge_fake(out, src, reference, index, weight, parity):  # mutates `out`, returns nothing
        return None


def _op(backend: str) -> Callable:
    return getattr(torch.ops.safa, f"merge_{backend}_").default


# -- which backends exist -------------------------------------------------------------
def _has_kernel(backend: str, device_type: str) -> bool:
    """Whether ``backend`` has a kernel registered for the device type's dispatch key."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"safa::merge_{backend}_", key)


def available_backends(device: torch.device | str = "cpu") -> Tuple[str, ...]:
    """Backends that can run on ``device``, fastest first; ``reference`` is always last."""
    return _available_backends(torch.device(device).type)


# Memoised, and a constant for torch.compile: the dispatcher query costs microseconds per
# call and is not traceable, and its answer is fixed once the package (and with it the
# extension and the Triton kernel) has been imported. (Not functools.lru_cache: dynamo
# warns on every compiled call through one.)
_BACKENDS_BY_DEVICE: Dict[str, Tuple[str, ...]] = {}


@constant_under_compile
def _available_backends(device_type: str) -> Tuple[str, ...]:
    found = _BACKENDS_BY_DEVICE.get(device_type)
    if found is None:
        from . import _extension, triton_merge  # noqa: F401  (registers what could be built)
        preferred = tuning.DEFAULT_ORDER.get(device_type, ())
        found = tuple(b for b in preferred if _has_kernel(b, device_type)) + ("reference",)
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
    was measured for that op on this GPU (``tuning.py``)."""
    name = backend if backend is not None else os.environ.get("SAFA_BACKEND", "auto")
    if name == "auto":
        index = device.index if device.index is not None else (
            torch.cuda.current_device() if device.type == "cuda" else -1)
        return _auto_backend(device.type, index, op)
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    if name != "reference" and name not in available_backends(device):
        raise RuntimeError(f"backend {name!r} is not available for {device.type} tensors here; "
                           f"available: {available_backends(device)}")
    return name


# -- validation -------------------------------------------------------------------------
def _check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in DTYPES:
        raise TypeError(f"{name} must have a floating dtype in {[str(d) for d in DTYPES]}, got {x.dtype}")
    return x


def _check_dim(name: str, dim: object, ndim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{name} must be an int, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name} must be in [{-ndim}, {ndim - 1}] for a {ndim}-d latent, got {dim}")
    return dim % ndim


def _check_layout(layout: object) -> ViewLayout:
    if not isinstance(layout, ViewLayout):
        raise TypeError(f"layout must be a ViewLayout, got {type(layout).__name__}")
    return layout


def _check_merge_args(views: torch.Tensor, layout: ViewLayout, dim: int, mode: str, swap_interval: int,
                      reference: Optional[torch.Tensor], reference_axis: Optional[int]) -> Tuple[int, Optional[int]]:
    """Validate the arguments of stitch/sync_; returns (dim, reference_axis) made non-negative."""
    _check_layout(layout)
    _check_tensor("views", views)
    if views.ndim < 2:
        raise ValueError(f"views must be (num_views, *latent_shape), got shape {tuple(views.shape)}")
    ndim = views.ndim - 1
    dim = _check_dim("dim", dim, ndim)
    if views.shape[0] != layout.num_views or views.shape[dim + 1] != layout.window:
        raise ValueError(f"views must have {layout.num_views} views on dim 0 and window {layout.window} on the "
                         f"long axis (dim {dim} of the latent), got shape {tuple(views.shape)}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "swap" and 2 * layout.overlap > layout.window:
        raise ValueError(f"mode='swap' needs overlap <= window / 2 (no column covered by three views); got "
                         f"overlap {layout.overlap} for window {layout.window}: use mode='mean' or 'triangular'")
    if isinstance(swap_interval, bool) or not isinstance(swap_interval, int):
        raise TypeError(f"swap_interval must be an int, got {type(swap_interval).__name__}")
    if swap_interval < 1:
        raise ValueError(f"swap_interval must be >= 1, got {swap_interval}")
    axis = None
    if reference is not None:
        _check_tensor("reference", reference)
        if tuple(reference.shape) != tuple(views.shape[1:]):
            raise ValueError(f"reference must have one view's shape {tuple(views.shape[1:])}, "
                             f"got {tuple(reference.shape)}")
        if reference.dtype != views.dtype or reference.device != views.device:
            raise ValueError(f"reference must match views' dtype and device ({views.dtype}, {views.device}), "
                             f"got ({reference.dtype}, {reference.device})")
        axis = dim if reference_axis is None else _check_dim("reference_axis", reference_axis, ndim)
    elif reference_axis is not None:
        raise ValueError("reference_axis was given without a reference")
    return dim, axis


# -- canonical 4-D views of strided tensors ------------------------------------------------
def _merged_stride(sizes, strides) -> Optional[int]:
    """The stride of dims collapsed into one, or None when their strides do not allow it."""
    dims = [(n, st) for n, st in zip(sizes, strides) if n != 1]
    for (n0, st0), (n1, st1) in zip(dims, dims[1:]):
        if st0 != st1 * n1:
            return None
    return dims[-1][1] if dims else 1


def _canonical(x: torch.Tensor, dim: int, lead: bool) -> Optional[torch.Tensor]:
    """``x`` as a 4-D ``(lead, outer, long, inner)`` view without copying, or None.

    ``dim`` is the long axis in latent coordinates; ``lead`` says whether ``x`` has a
    leading view axis.
    """
    sizes = x.shape[1:] if lead else x.shape
    shape = (x.shape[0] if lead else 1, math.prod(sizes[:dim]), sizes[dim], math.prod(sizes[dim + 1:]))
    if x.is_contiguous():  # the common case, decided in C++
        return x.view(shape)
    if x.numel() == 0:  # nothing will be read or written: any tensor of the shape will do
        return x.new_empty(shape)
    sizes, strides = list(sizes), list(x.stride()[1:] if lead else x.stride())
    outer_st = _merged_stride(sizes[:dim], strides[:dim])
    inner_st = _merged_stride(sizes[dim + 1:], strides[dim + 1:])
    if outer_st is None or inner_st is None:
        return None
    return x.as_strided(shape, (x.stride(0) if lead else 0, outer_st, strides[dim], inner_st))


def _canonical_input(x: torch.Tensor, dim: int, lead: bool) -> torch.Tensor:
    c = _canonical(x, dim, lead)
    return c if c is not None else _canonical(x.contiguous(), dim, lead)


def _parity(shape, dim: int, axis: Optional[int], swap_interval: int) -> Tuple[int, list]:
    """(plan ref kind, kernel parity argument) for a reference swap along latent ``axis``."""
    if axis is None:
        return REF_NONE, [0, 1, 1, swap_interval]
    if axis == dim:
        return REF_LONG_AXIS, [0, 1, 1, swap_interval]
    if axis < dim:
        return REF_OTHER_AXIS, [1, math.prod(shape[axis + 1:dim]), shape[axis], swap_interval]
    return REF_OTHER_AXIS, [2, math.prod(shape[axis + 1:]), shape[axis], swap_interval]


def _run(backend: str, out: torch.Tensor, src: Optional[torch.Tensor], reference: Optional[torch.Tensor],
         layout: ViewLayout, op: str, mode: str, swap_interval: int, ref_kind: int, parity: list) -> None:
    index, weight = get_plan(layout, op, mode, swap_interval, ref_kind, out.device)
    if index.shape[0]:  # e.g. sync_ with no overlap and no reference has nothing to do
        _op(backend)(out, src, reference, index, weight, parity)


# -- public API ---------------------------------------------------------------------------
def gather(latent: torch.Tensor, layout: ViewLayout, dim: int = -2, *, backend: Optional[str] = None) -> torch.Tensor:
    """Every view's window of ``latent``: shape ``(num_views, *latent.shape)`` with ``window`` on ``dim``."""
    _check_layout(layout)
    _check_tensor("latent", latent)
    dim = _check_dim("dim", dim, latent.ndim)
    if latent.shape[dim] != layout.length:
        raise ValueError(f"latent has {latent.shape[dim]} columns on dim {dim}, layout.length is {layout.length}")
    backend = resolve_backend(backend, latent.device, "gather")
    if backend == "reference":
        return _reference.gather(latent, layout, dim)
    shape = list(latent.shape)
    shape[dim] = layout.window
    views = latent.new_empty([layout.num_views] + shape)
    _run(backend, _canonical(views, dim, True), _canonical_input(latent, dim, False), None,
         layout, "gather", "swap", 1, REF_NONE, [0, 1, 1, 1])
    return views


def stitch(views: torch.Tensor, layout: ViewLayout, dim: int = -2, mode: str = "swap", swap_interval: int = 1,
           reference: Optional[torch.Tensor] = None, reference_axis: Optional[int] = None, *,
           backend: Optional[str] = None) -> torch.Tensor:
    """Merge ``views`` into the long latent.

    ``mode``: ``"swap"`` (SaFa self-loop latent swap, needs ``overlap <= window / 2``),
    ``"mean"`` (MultiDiffusion) or ``"triangular"`` (MD*: triangular-window weighted
    mean). With ``reference`` (one view's shape), each view's middle region (columns no
    other view covers) takes the reference at alternating positions (reference-guided
    swap), alternating every ``swap_interval`` along ``reference_axis`` (default ``dim``).
    """
    dim, axis = _check_merge_args(views, layout, dim, mode, swap_interval, reference, reference_axis)
    backend = resolve_backend(backend, views.device, "stitch")
    if backend == "reference":
        return _reference.stitch(views, layout, dim, mode, swap_interval, reference, axis)
    shape = list(views.shape[1:])
    shape[dim] = layout.length
    latent = views.new_empty(shape)
    ref_kind, parity = _parity(shape, dim, axis, swap_interval)
    ref = None if reference is None else _canonical_input(reference, dim, False)[0]
    _run(backend, _canonical(latent, dim, False), _canonical_input(views, dim, True), ref,
         layout, "stitch", mode, swap_interval, ref_kind, parity)
    return latent


def sync_(views: torch.Tensor, layout: ViewLayout, dim: int = -2, mode: str = "swap", swap_interval: int = 1,
          reference: Optional[torch.Tensor] = None, reference_axis: Optional[int] = None, *,
          backend: Optional[str] = None) -> torch.Tensor:
    """In place: make every view equal to its window of ``stitch(views, ...)``; returns ``views``.

    Equal to ``views.copy_(gather(stitch(views, ...)))`` but writes only the cells that
    change: in swap mode the losing half of each overlap and, with ``reference``, the
    reference's half of each middle region.
    """
    dim, axis = _check_merge_args(views, layout, dim, mode, swap_interval, reference, reference_axis)
    backend = resolve_backend(backend, views.device, "sync")
    if backend == "reference":
        return _reference.sync_(views, layout, dim, mode, swap_interval, reference, axis)
    ref_kind, parity = _parity(list(views.shape[1:]), dim, axis, swap_interval)
    ref = None if reference is None else _canonical_input(reference, dim, False)[0]
    target = _canonical(views, dim, True)
    if target is None:  # strides that no 4-D view can express: merge a copy, write it back
        views.copy_(sync_(views.contiguous(), layout, dim, mode, swap_interval, reference, reference_axis,
                          backend=backend))
        return views
    _run(backend, target, None, ref, layout, "sync", mode, swap_interval, ref_kind, parity)
    return views
