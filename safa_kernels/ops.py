"""Public ops: ``gather``, ``stitch``, ``sync_`` over any backend.

Two layers of torch.library ops, all defined here:

- Plan executors. Each kernel backend ``b`` is one op, ``safa::merge_<b>_``, all from one
  schema: run a plan of ``plan.py`` into ``out``, in place. The CPU C++ and CUDA kernels
  register their implementations from ``csrc/`` with ``TORCH_LIBRARY_IMPL``; the Triton
  kernel registers from ``triton_merge.py``. Raw machinery, not differentiable.
- Functional ops ``safa::gather`` and ``safa::stitch``, and their adjoints
  ``safa::gather_adjoint``, ``safa::stitch_adjoint`` and ``safa::reference_adjoint``: each
  allocates its output and runs one plan executor (the ``backend`` argument). Each has a
  fake kernel and an autograd formula (``torch.library.register_autograd``): a linear op's
  backward is its adjoint op, and the adjoint's backward is the op again, so gradients of
  any order run on the same kernels.

The ``reference`` backend is plain PyTorch (``reference.py``), differentiable as written,
and needs no op.

In-place ``sync_`` runs the ``sync`` plan through the plan executor when autograd has
nothing to record. When it has (grad mode on, ``views`` or ``reference`` requiring grad),
``sync_`` runs as what it equals, ``views.copy_(gather(stitch(views, ...)))``: ``copy_``
records the mutation (and refuses a leaf that requires grad, as every in-place op does),
and the backward runs the adjoint plans.

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

import functools
import math
import os
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.autograd.forward_ad as _forward_ad

from . import reference as _reference
from . import tuning
from ._compile import constant_under_compile
from ._memory import INTERNAL_OVERLAP, PARTIAL_OVERLAP, has_internal_overlap, shares_memory
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


# The functional ops. `layout` is (length, window, overlap, loop) of a ViewLayout, `dim` the
# long axis of the latent (non-negative), `backend` the plan executor; `reference_axis` is
# None exactly when there is no reference.
FUNCTIONAL_SCHEMAS = {
    "gather": "(Tensor latent, int[] layout, int dim, str backend) -> Tensor",
    "gather_adjoint": "(Tensor views, int[] layout, int dim, str backend) -> Tensor",
    "stitch": ("(Tensor views, Tensor? reference, int[] layout, int dim, str mode, int swap_interval, "
               "int? reference_axis, str backend) -> Tensor"),
    "stitch_adjoint": ("(Tensor latent, int[] layout, int dim, str mode, int swap_interval, int? reference_axis, "
                       "str backend) -> Tensor"),
    "reference_adjoint": ("(Tensor latent, int[] layout, int dim, int swap_interval, int reference_axis, "
                          "str backend) -> Tensor"),
}
for _name, _schema in FUNCTIONAL_SCHEMAS.items():
    _lib.define(_name + _schema)


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
    source = "backend" if backend is not None else "the SAFA_BACKEND environment variable"
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {('auto',) + BACKENDS}, got {name!r}")
    if name != "reference" and name not in available_backends(device):
        raise RuntimeError(f"{source}: backend {name!r} is not available for {device.type} tensors here; "
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


# -- the functional ops: allocate, run one plan -----------------------------------------------
def _geometry(layout: ViewLayout) -> list:
    return [layout.length, layout.window, layout.overlap, int(layout.loop)]


@functools.lru_cache(maxsize=64)
def _layout_of(length: int, window: int, overlap: int, loop: int) -> ViewLayout:
    """The layout of a geometry, one object per value, so its memoised device plans are reused."""
    return ViewLayout(length, window, overlap, bool(loop))


def _long_axis(shape, dim: int, size: int) -> list:
    shape = list(shape)
    shape[dim] = size
    return shape


def _op_layout(op: str, geometry, backend: str, name: str, x: torch.Tensor, lead: bool, dim: int,
               mode: str = "mean", swap_interval: int = 1, reference_axis: Optional[int] = None) -> ViewLayout:
    """The layout of a functional op's call, once its arguments are checked: a clear error
    for a direct caller, not a plan that runs past the tensors."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"safa::{op}: backend must be one of {KERNEL_BACKENDS}, got {backend!r}")
    layout = _layout_of(*geometry)
    ndim = x.ndim - int(lead)
    if not 0 <= dim < ndim:
        raise ValueError(f"safa::{op}: dim must be in [0, {ndim - 1}] for {name} of shape {tuple(x.shape)}, got {dim}")
    columns = layout.window if op in ("gather_adjoint", "stitch") else layout.length
    if x.shape[dim + lead] != columns or (lead and x.shape[0] != layout.num_views):
        views = f"{layout.num_views} views on dim 0 and " if lead else ""
        raise ValueError(f"safa::{op}: {name} must have {views}{columns} columns on the long axis (dim {dim + lead}), "
                         f"got shape {tuple(x.shape)}")
    if mode not in MODES or (mode == "swap" and 2 * layout.overlap > layout.window):
        raise ValueError(f"safa::{op}: mode must be one of {MODES} ('swap' needs overlap <= window / 2), got {mode!r}")
    if swap_interval < 1:
        raise ValueError(f"safa::{op}: swap_interval must be >= 1, got {swap_interval}")
    if reference_axis is not None and not 0 <= reference_axis < ndim:
        raise ValueError(f"safa::{op}: reference_axis must be in [0, {ndim - 1}], got {reference_axis}")
    return layout


def _zeros(like: torch.Tensor, shape) -> torch.Tensor:
    """A read-only zero tensor of ``shape``: one element broadcast, no memory."""
    return like.new_zeros(()).expand(list(shape))


def _gather_views(latent: torch.Tensor, layout: ViewLayout, dim: int, backend: str) -> torch.Tensor:
    """gather's work: allocate the views, run the plan."""
    views = latent.new_empty([layout.num_views] + _long_axis(latent.shape, dim, layout.window))
    _run(backend, _canonical(views, dim, True), _canonical_input(latent, dim, False), None,
         layout, "gather", "swap", 1, REF_NONE, [0, 1, 1, 1])
    return views


def _gather_fake(latent, layout, dim, backend):
    layout = _op_layout("gather", layout, backend, "latent", latent, False, dim)
    return latent.new_empty([layout.num_views] + _long_axis(latent.shape, dim, layout.window))


def _gather_impl(latent, layout, dim, backend):
    return _gather_views(latent, _op_layout("gather", layout, backend, "latent", latent, False, dim), dim, backend)


def _gather_adjoint_fake(views, layout, dim, backend):
    layout = _op_layout("gather_adjoint", layout, backend, "views", views, True, dim)
    return views.new_empty(_long_axis(views.shape[1:], dim, layout.length))


def _gather_adjoint_impl(views, layout, dim, backend):
    latent = _gather_adjoint_fake(views, layout, dim, backend)  # every column is written
    _run(backend, _canonical(latent, dim, False), _canonical_input(views, dim, True), None,
         _layout_of(*layout), "gather_adjoint", "swap", 1, REF_NONE, [0, 1, 1, 1])
    return latent


def _stitch_latent(views: torch.Tensor, reference: Optional[torch.Tensor], layout: ViewLayout, dim: int, mode: str,
                   swap_interval: int, reference_axis: Optional[int], backend: str) -> torch.Tensor:
    """stitch's work: allocate the latent, run the plan."""
    latent = views.new_empty(_long_axis(views.shape[1:], dim, layout.length))
    ref_kind, parity = _parity(latent.shape, dim, reference_axis, swap_interval)
    ref = None if reference is None else _canonical_input(reference, dim, False)[0]
    _run(backend, _canonical(latent, dim, False), _canonical_input(views, dim, True), ref,
         layout, "stitch", mode, swap_interval, ref_kind, parity)
    return latent


def _stitch_op_layout(views, reference, layout, dim, mode, swap_interval, reference_axis, backend) -> ViewLayout:
    layout = _op_layout("stitch", layout, backend, "views", views, True, dim, mode, swap_interval, reference_axis)
    if (reference is None) != (reference_axis is None):
        raise ValueError("safa::stitch: reference and reference_axis must be given together")
    if reference is not None and tuple(reference.shape) != tuple(views.shape[1:]):
        raise ValueError(f"safa::stitch: reference must have one view's shape {tuple(views.shape[1:])}, "
                         f"got {tuple(reference.shape)}")
    return layout


def _stitch_fake(views, reference, layout, dim, mode, swap_interval, reference_axis, backend):
    layout = _stitch_op_layout(views, reference, layout, dim, mode, swap_interval, reference_axis, backend)
    return views.new_empty(_long_axis(views.shape[1:], dim, layout.length))


def _stitch_impl(views, reference, layout, dim, mode, swap_interval, reference_axis, backend):
    layout = _stitch_op_layout(views, reference, layout, dim, mode, swap_interval, reference_axis, backend)
    return _stitch_latent(views, reference, layout, dim, mode, swap_interval, reference_axis, backend)


def _stitch_adjoint_fake(latent, layout, dim, mode, swap_interval, reference_axis, backend):
    layout = _op_layout("stitch_adjoint", layout, backend, "latent", latent, False, dim, mode, swap_interval,
                        reference_axis)
    return latent.new_zeros([layout.num_views] + _long_axis(latent.shape, dim, layout.window))


def _stitch_adjoint_impl(latent, layout, dim, mode, swap_interval, reference_axis, backend):
    views = _stitch_adjoint_fake(latent, layout, dim, mode, swap_interval, reference_axis, backend)
    layout = _layout_of(*layout)
    ref_kind, parity = _parity(latent.shape, dim, reference_axis, swap_interval)
    # Where the reference's parity runs along another axis the plan keeps its reference
    # columns, and a zero reference writes the zero gradient of the cells it replaced.
    zero = _zeros(latent, views.shape[1:]) if ref_kind == REF_OTHER_AXIS else None
    _run(backend, _canonical(views, dim, True), _canonical_input(latent, dim, False),
         None if zero is None else _canonical_input(zero, dim, False)[0],
         layout, "stitch_adjoint", mode, swap_interval, ref_kind, parity)
    return views


def _reference_adjoint_fake(latent, layout, dim, swap_interval, reference_axis, backend):
    layout = _op_layout("reference_adjoint", layout, backend, "latent", latent, False, dim,
                        swap_interval=swap_interval, reference_axis=reference_axis)
    return latent.new_zeros(_long_axis(latent.shape, dim, layout.window))


def _reference_adjoint_impl(latent, layout, dim, swap_interval, reference_axis, backend):
    reference = _reference_adjoint_fake(latent, layout, dim, swap_interval, reference_axis, backend)
    ref_kind, _ = _parity(latent.shape, dim, reference_axis, swap_interval)
    _run(backend, _canonical(reference, dim, False), _canonical_input(latent, dim, False), None,
         _layout_of(*layout), "reference_adjoint", "mean", swap_interval, ref_kind, [0, 1, 1, 1])
    if ref_kind == REF_OTHER_AXIS:  # only positions of odd parity along that axis took the reference
        shape = [1] * latent.ndim
        shape[reference_axis] = latent.shape[reference_axis]
        h = torch.arange(latent.shape[reference_axis], device=latent.device)
        reference.masked_fill_(((h // swap_interval) % 2 == 0).view(shape), 0)
    return reference


# Autograd: every op is linear, so its backward is its adjoint op and saves no tensor.
def _keep_arguments(ctx, inputs, output):
    ctx.arguments = inputs[1:]  # all but the one tensor


def _keep_stitch_arguments(ctx, inputs, output):
    ctx.arguments = inputs[2:]  # all but views and reference
    ctx.has_reference = inputs[1] is not None


def _gather_backward(ctx, grad):
    return torch.ops.safa.gather_adjoint.default(grad, *ctx.arguments), None, None, None


def _gather_adjoint_backward(ctx, grad):
    return torch.ops.safa.gather.default(grad, *ctx.arguments), None, None, None


def _stitch_backward(ctx, grad):
    layout, dim, mode, swap_interval, reference_axis, backend = ctx.arguments
    views_grad = reference_grad = None
    if ctx.needs_input_grad[0]:
        views_grad = torch.ops.safa.stitch_adjoint.default(grad, *ctx.arguments)
    if ctx.has_reference and ctx.needs_input_grad[1]:
        reference_grad = torch.ops.safa.reference_adjoint.default(grad, layout, dim, swap_interval, reference_axis,
                                                                  backend)
    return views_grad, reference_grad, None, None, None, None, None, None


def _stitch_adjoint_backward(ctx, grad):
    # (latent -> views)^T is the stitch of views, with zero in place of a reference.
    layout, dim, mode, swap_interval, reference_axis, backend = ctx.arguments
    zero = None if reference_axis is None else _zeros(grad, grad.shape[1:])
    return (torch.ops.safa.stitch.default(grad, zero, layout, dim, mode, swap_interval, reference_axis, backend),
            None, None, None, None, None, None)


def _reference_adjoint_backward(ctx, grad):
    # (latent -> reference)^T is the stitch of zero views with this reference.
    layout, dim, swap_interval, reference_axis, backend = ctx.arguments
    zero = _zeros(grad, [_layout_of(*layout).num_views] + list(grad.shape))
    return (torch.ops.safa.stitch.default(zero, grad, layout, dim, "mean", swap_interval, reference_axis, backend),
            None, None, None, None, None)


for _name, _impl, _fake, _setup, _backward in [
        ("gather", _gather_impl, _gather_fake, _keep_arguments, _gather_backward),
        ("gather_adjoint", _gather_adjoint_impl, _gather_adjoint_fake, _keep_arguments, _gather_adjoint_backward),
        ("stitch", _stitch_impl, _stitch_fake, _keep_stitch_arguments, _stitch_backward),
        ("stitch_adjoint", _stitch_adjoint_impl, _stitch_adjoint_fake, _keep_arguments, _stitch_adjoint_backward),
        ("reference_adjoint", _reference_adjoint_impl, _reference_adjoint_fake, _keep_arguments,
         _reference_adjoint_backward)]:
    _lib.impl(_name, _impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"safa::{_name}", _fake, lib=_lib)
    torch.library.register_autograd(f"safa::{_name}", _backward, setup_context=_setup, lib=_lib)


# The public ops call the functional op only when autograd has something to record; else
# the op's own kernel directly, without the dispatcher's Python autograd layer (~10 us per
# call, measured in benchmarks/README.md) that would only pass the call through.
def _records_grad(x: torch.Tensor, reference: Optional[torch.Tensor] = None) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or (reference is not None and reference.requires_grad))


# Forward-mode AD (torch.autograd.forward_ad): the kernels know nothing of tangents, and the
# ops are linear, so an output's tangent is the op applied to the inputs' tangents (zero
# for an input without one). Checked only inside a dual level: one module read otherwise.
def _forward_ad_active() -> bool:
    return _forward_ad._current_level >= 0


def _tangents(*tensors):
    """(primals, tangents) of ``tensors``; tangents is None when none of them has one."""
    unpacked = [None if t is None else _forward_ad.unpack_dual(t) for t in tensors]
    if all(u is None or u.tangent is None for u in unpacked):
        return tensors, None
    primals = [None if u is None else u.primal for u in unpacked]
    tangents = [None if u is None else (u.tangent if u.tangent is not None else _zeros(u.primal, u.primal.shape))
                for u in unpacked]
    return primals, tangents


def _gather(latent: torch.Tensor, layout: ViewLayout, dim: int, backend: str) -> torch.Tensor:
    if backend == "reference":
        return _reference.gather(latent, layout, dim)
    if _forward_ad_active():
        (primal,), tangents = _tangents(latent)
        if tangents is not None:
            return _forward_ad.make_dual(_gather(primal, layout, dim, backend), _gather(*tangents, layout, dim, backend))
    if _records_grad(latent):
        return torch.ops.safa.gather.default(latent, _geometry(layout), dim, backend)
    return _gather_views(latent, layout, dim, backend)


def _stitch(views: torch.Tensor, layout: ViewLayout, dim: int, mode: str, swap_interval: int,
            reference: Optional[torch.Tensor], axis: Optional[int], backend: str) -> torch.Tensor:
    if backend == "reference":
        return _reference.stitch(views, layout, dim, mode, swap_interval, reference, axis)
    if _forward_ad_active():
        (views_p, reference_p), tangents = _tangents(views, reference)
        if tangents is not None:
            return _forward_ad.make_dual(_stitch(views_p, layout, dim, mode, swap_interval, reference_p, axis, backend),
                                         _stitch(tangents[0], layout, dim, mode, swap_interval, tangents[1], axis,
                                                 backend))
    if _records_grad(views, reference):
        return torch.ops.safa.stitch.default(views, reference, _geometry(layout), dim, mode, swap_interval, axis,
                                             backend)
    return _stitch_latent(views, reference, layout, dim, mode, swap_interval, axis, backend)


# -- public API ---------------------------------------------------------------------------
def gather(latent: torch.Tensor, layout: ViewLayout, dim: int = -2, *, backend: Optional[str] = None) -> torch.Tensor:
    """Every view's window of ``latent``: shape ``(num_views, *latent.shape)`` with ``window`` on ``dim``.

    Differentiable: the gradient of a column is the sum of its views' gradients.
    """
    _check_layout(layout)
    _check_tensor("latent", latent)
    dim = _check_dim("dim", dim, latent.ndim)
    if latent.shape[dim] != layout.length:
        raise ValueError(f"latent has {latent.shape[dim]} columns on dim {dim}, layout.length is {layout.length}")
    return _gather(latent, layout, dim, resolve_backend(backend, latent.device, "gather"))


def stitch(views: torch.Tensor, layout: ViewLayout, dim: int = -2, mode: str = "swap", swap_interval: int = 1,
           reference: Optional[torch.Tensor] = None, reference_axis: Optional[int] = None, *,
           backend: Optional[str] = None) -> torch.Tensor:
    """Merge ``views`` into the long latent.

    ``mode``: ``"swap"`` (SaFa self-loop latent swap, needs ``overlap <= window / 2``),
    ``"mean"`` (MultiDiffusion) or ``"triangular"`` (MD*: triangular-window weighted
    mean). With ``reference`` (one view's shape), each view's middle region (columns no
    other view covers) takes the reference at alternating positions (reference-guided
    swap), alternating every ``swap_interval`` along ``reference_axis`` (default ``dim``).

    Differentiable in ``views`` and ``reference``: each cell the merge read gets its
    weight times its column's gradient; the cells it did not read get zero.
    """
    dim, axis = _check_merge_args(views, layout, dim, mode, swap_interval, reference, reference_axis)
    backend = resolve_backend(backend, views.device, "stitch")
    return _stitch(views, layout, dim, mode, swap_interval, reference, axis, backend)


def _check_writable(views: torch.Tensor, reference: Optional[torch.Tensor]) -> None:
    """sync_ writes ``views`` while it reads it and ``reference``: refuse aliased memory, before any write.

    Under torch.compile the graph mutates ``views`` functionally (reads everything, then
    copies back), and tracing cannot read addresses: the checks are eager only.
    """
    if torch.compiler.is_compiling():
        return
    if has_internal_overlap(views):
        raise RuntimeError(f"sync_: views: {INTERNAL_OVERLAP}")
    if reference is not None and shares_memory(views, reference):
        raise RuntimeError(f"sync_: views and reference: {PARTIAL_OVERLAP}")


def sync_(views: torch.Tensor, layout: ViewLayout, dim: int = -2, mode: str = "swap", swap_interval: int = 1,
          reference: Optional[torch.Tensor] = None, reference_axis: Optional[int] = None, *,
          backend: Optional[str] = None) -> torch.Tensor:
    """In place: make every view equal to its window of ``stitch(views, ...)``; returns ``views``.

    Equal to ``views.copy_(gather(stitch(views, ...)))`` but writes only the cells that
    change: in swap mode the losing half of each overlap and, with ``reference``, the
    reference's half of each middle region. ``views`` must not have elements that share
    memory with each other or with ``reference`` (a RuntimeError, before any write).

    Under autograd (grad mode on, ``views`` or ``reference`` requiring grad) it runs as
    exactly that ``copy_``: the mutation is recorded, gradients flow through the merge,
    and a leaf ``views`` that requires grad is refused as by every in-place op.
    """
    dim, axis = _check_merge_args(views, layout, dim, mode, swap_interval, reference, reference_axis)
    backend = resolve_backend(backend, views.device, "sync")
    _check_writable(views, reference)
    if backend == "reference":  # differentiable as written
        return _reference.sync_(views, layout, dim, mode, swap_interval, reference, axis)
    if _records_grad(views, reference) or (_forward_ad_active() and _tangents(views, reference)[1] is not None):
        merged = _stitch(views, layout, dim, mode, swap_interval, reference, axis, backend)
        return views.copy_(_gather(merged, layout, dim, backend))
    ref_kind, parity = _parity(list(views.shape[1:]), dim, axis, swap_interval)
    ref = None if reference is None else _canonical_input(reference, dim, False)[0]
    target = _canonical(views, dim, True)
    if target is None:  # strides that no 4-D view can express: merge a copy, write it back
        views.copy_(sync_(views.contiguous(), layout, dim, mode, swap_interval, reference, reference_axis,
                          backend=backend))
        return views
    _run(backend, target, None, ref, layout, "sync", mode, swap_interval, ref_kind, parity)
    return views
