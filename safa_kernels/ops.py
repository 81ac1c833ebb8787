"""Public ops: ``gather``, ``stitch``, ``sync_``, their argument checks, and where each call goes.

A call is checked here (Python ints and tensor metadata only), its backend resolved
(``backends.py``), and then it runs on one of four paths:

- ``backend="reference"``: plain PyTorch (``reference.py``), differentiable as written;
- a forward-mode dual level with a tangent (``forward_ad.py``): the op on the primals and
  on the tangents;
- autograd has something to record (grad mode on, an input requiring grad): the functional
  op ``safa::gather`` / ``safa::stitch`` (``library.py``), whose backward runs the adjoint
  plans (``autograd.py``). ``sync_`` then runs as what it equals,
  ``views.copy_(gather(stitch(views, ...)))``: ``copy_`` records the mutation (and refuses a
  leaf that requires grad, as every in-place op does);
- otherwise the plan executor directly (``execute.py``), without the dispatcher's Python
  autograd layer that would only pass the call through (benchmarks/README.md measures it).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from . import autograd as _autograd  # noqa: F401  (registers the functional ops' backward formulas)
from . import forward_ad
from . import reference as _reference
from ._memory import INTERNAL_OVERLAP, PARTIAL_OVERLAP, has_internal_overlap, shares_memory
from .backends import available_backends, resolve_backend
from .canonical import merge_axes, merged_axis, split_axes
from .execute import gather_views, stitch_latent, sync_views
from .layout import AnyLayout, GridLayout, ViewLayout
from .library import BACKENDS, DTYPES, KERNEL_BACKENDS, MODES

__all__ = ["gather", "stitch", "sync_", "available_backends", "resolve_backend",
           "BACKENDS", "KERNEL_BACKENDS", "MODES"]


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


def _check_layout(layout: object) -> AnyLayout:
    if not isinstance(layout, (ViewLayout, GridLayout)):
        raise TypeError(f"layout must be a ViewLayout or a GridLayout, got {type(layout).__name__}")
    return layout


Dims = Union[int, Sequence[int], None]


def _check_dims(layout: AnyLayout, dim: Dims, ndim: int) -> Union[int, Tuple[int, int]]:
    """The long axis of a strip (default -2), or a grid's ``(rows, cols)`` axes (default the last two), non-negative."""
    if isinstance(layout, ViewLayout):
        return _check_dim("dim", -2 if dim is None else dim, ndim)
    dims = (-2, -1) if dim is None else dim
    if not isinstance(dims, (tuple, list)) or len(dims) != 2:
        raise ValueError(f"dim must be a pair (rows axis, columns axis) for a GridLayout, got {dim!r}")
    rows, cols = _check_dim("dim[0]", dims[0], ndim), _check_dim("dim[1]", dims[1], ndim)
    if rows == cols:
        raise ValueError(f"dim must name two different axes for a GridLayout, got {dim!r}")
    return rows, cols


def _check_long_axes(name: str, x: torch.Tensor, layout: AnyLayout, dim, lead: bool, of_view: bool) -> None:
    """``x`` has the layout's window (``of_view``) or length on its long axis or axes, and its views on dim 0."""
    axes = [(dim, layout)] if isinstance(layout, ViewLayout) else [(dim[0], layout.rows), (dim[1], layout.cols)]
    want = [axis.window if of_view else axis.length for _, axis in axes]
    got = [x.shape[d + int(lead)] for d, _ in axes]
    if got != want or (lead and x.shape[0] != layout.num_views):
        what = "window" if of_view else "length"
        views = f"{layout.num_views} views on dim 0 and " if lead else ""
        raise ValueError(f"{name} must have {views}the layout's {what} {tuple(want) if len(want) > 1 else want[0]} on "
                         f"the long axis {dim} of the latent, got shape {tuple(x.shape)}")


def _check_merge_args(views: torch.Tensor, layout: AnyLayout, dim: Dims, mode: str, swap_interval: int,
                      reference: Optional[torch.Tensor], reference_axis: Optional[int]):
    """Validate the arguments of stitch/sync_; returns (dim, reference_axis) made non-negative
    (``dim`` a pair for a grid)."""
    _check_layout(layout)
    _check_tensor("views", views)
    if views.ndim < 2:
        raise ValueError(f"views must be (num_views, *latent_shape), got shape {tuple(views.shape)}")
    ndim = views.ndim - 1
    dim = _check_dims(layout, dim, ndim)
    _check_long_axes("views", views, layout, dim, True, True)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "swap" and not layout.swappable:
        raise ValueError(f"mode='swap' needs overlap <= window / 2 (no column covered by three views) on every "
                         f"axis; got {layout!r}: use mode='mean', 'triangular' or 'gaussian'")
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
        axis = _check_reference_axis(dim, reference_axis, ndim)
    elif reference_axis is not None:
        raise ValueError("reference_axis was given without a reference")
    return dim, axis


def _check_reference_axis(dim, reference_axis: Optional[int], ndim: int) -> int:
    """The axis the reference swap alternates along: default the long axis, a grid's rows axis."""
    if isinstance(dim, int):
        return dim if reference_axis is None else _check_dim("reference_axis", reference_axis, ndim)
    axis = dim[0] if reference_axis is None else _check_dim("reference_axis", reference_axis, ndim)
    if axis == dim[1]:
        raise ValueError(f"reference_axis must not be a grid's columns axis ({dim[1]}): the reference swap of a grid "
                         f"alternates along its rows axis (dim[0]) or an axis outside the grid; to alternate along "
                         f"the other axis, swap the grid's rows and cols and the two dims")
    return axis


# -- where a call goes -------------------------------------------------------------------------
def _records_grad(x: torch.Tensor, reference: Optional[torch.Tensor] = None) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or (reference is not None and reference.requires_grad))


def _gather(latent: torch.Tensor, layout: ViewLayout, dim: int, backend: str) -> torch.Tensor:
    if backend == "reference":
        return _reference.gather(latent, layout, dim)
    if forward_ad.active():
        (primal,), tangents = forward_ad.split(latent)
        if tangents is not None:
            return forward_ad.dual(_gather(primal, layout, dim, backend), _gather(*tangents, layout, dim, backend))
    if _records_grad(latent):
        return torch.ops.safa.gather.default(latent, layout.geometry, dim, backend)
    return gather_views(latent, layout, dim, backend)


def _stitch(views: torch.Tensor, layout: ViewLayout, dim: int, mode: str, swap_interval: int,
            reference: Optional[torch.Tensor], axis: Optional[int], backend: str) -> torch.Tensor:
    if backend == "reference":
        return _reference.stitch(views, layout, dim, mode, swap_interval, reference, axis)
    if forward_ad.active():
        (views_p, reference_p), tangents = forward_ad.split(views, reference)
        if tangents is not None:
            return forward_ad.dual(_stitch(views_p, layout, dim, mode, swap_interval, reference_p, axis, backend),
                                   _stitch(tangents[0], layout, dim, mode, swap_interval, tangents[1], axis,
                                           backend))
    if _records_grad(views, reference):
        return torch.ops.safa.stitch.default(views, reference, layout.geometry, dim, mode, swap_interval, axis,
                                             backend)
    return stitch_latent(views, reference, layout, dim, mode, swap_interval, axis, backend)


# A grid runs on the strip machinery with its two axes merged into one (canonical.merge_axes):
# the plans of a GridLayout address that merged axis (docs/kernels.md, section 8).
def _kernel_axis(dims: Tuple[int, int], axis: Optional[int], ndim: int) -> Optional[int]:
    """A grid's reference axis after merging: the merged axis for the rows axis (the plan's parity)."""
    if axis is None:
        return None
    return min(dims) if axis == dims[0] else merged_axis(axis, dims, ndim)


def _gather_any(latent: torch.Tensor, layout: AnyLayout, dim, backend: str) -> torch.Tensor:
    if isinstance(layout, ViewLayout):
        return _gather(latent, layout, dim, backend)
    if backend == "reference":
        return _reference.gather_grid(latent, layout, dim)
    merged, p, _ = merge_axes(latent, dim, False)
    views = _gather(merged, layout, p, backend)
    return split_axes(views, dim, (layout.rows.window, layout.cols.window), True).contiguous()


def _stitch_any(views: torch.Tensor, layout: AnyLayout, dim, mode: str, swap_interval: int,
                reference: Optional[torch.Tensor], axis: Optional[int], backend: str) -> torch.Tensor:
    if isinstance(layout, ViewLayout):
        return _stitch(views, layout, dim, mode, swap_interval, reference, axis, backend)
    if backend == "reference":
        return _reference.stitch_grid(views, layout, dim, mode, swap_interval, reference, axis)
    merged, p, _ = merge_axes(views, dim, True)
    ref = None if reference is None else merge_axes(reference, dim, False)[0]
    latent = _stitch(merged, layout, p, mode, swap_interval, ref, _kernel_axis(dim, axis, views.ndim - 1), backend)
    return split_axes(latent, dim, (layout.rows.length, layout.cols.length), False).contiguous()


def _sync_in_place(views: torch.Tensor, layout: AnyLayout, dim, mode: str, swap_interval: int,
                   reference: Optional[torch.Tensor], axis: Optional[int], backend: str) -> torch.Tensor:
    """The in-place sync plan; a grid's tiles merged on one axis (a copy written back when the strides need one)."""
    if isinstance(layout, ViewLayout):
        return sync_views(views, reference, layout, dim, mode, swap_interval, axis, backend)
    merged, p, is_view = merge_axes(views, dim, True)
    ref = None if reference is None else merge_axes(reference, dim, False)[0]
    sync_views(merged, ref, layout, p, mode, swap_interval, _kernel_axis(dim, axis, views.ndim - 1), backend)
    if not is_view:
        views.copy_(split_axes(merged, dim, (layout.rows.window, layout.cols.window), True))
    return views


# -- public API ---------------------------------------------------------------------------
def gather(latent: torch.Tensor, layout: AnyLayout, dim: Dims = None, *, backend: Optional[str] = None) -> torch.Tensor:
    """Every view's window of ``latent``: shape ``(num_views, *latent.shape)`` with ``window`` on ``dim``.

    ``dim``: the long axis of a ``ViewLayout`` (default -2), or the ``(rows, cols)`` axes of a
    ``GridLayout`` (default ``(-2, -1)``), whose tiles are numbered row-major.
    Differentiable: the gradient of a column is the sum of its views' gradients.
    """
    _check_layout(layout)
    _check_tensor("latent", latent)
    dim = _check_dims(layout, dim, latent.ndim)
    if isinstance(layout, GridLayout):
        _check_long_axes("latent", latent, layout, dim, False, False)
    elif latent.shape[dim] != layout.length:
        raise ValueError(f"latent has {latent.shape[dim]} columns on dim {dim}, layout.length is {layout.length}")
    return _gather_any(latent, layout, dim, resolve_backend(backend, latent.device, "gather"))


def stitch(views: torch.Tensor, layout: AnyLayout, dim: Dims = None, mode: str = "swap", swap_interval: int = 1,
           reference: Optional[torch.Tensor] = None, reference_axis: Optional[int] = None, *,
           backend: Optional[str] = None) -> torch.Tensor:
    """Merge ``views`` into the long latent.

    ``mode``: ``"swap"`` (SaFa self-loop latent swap, needs ``overlap <= window / 2``),
    ``"mean"`` (MultiDiffusion), ``"triangular"`` (MD*: triangular-window weighted
    mean) or ``"gaussian"`` (Mixture of Diffusers' Gaussian tile weights). With ``reference``
    (one view's shape), each view's middle region (columns no other view covers) takes the
    reference at alternating positions (reference-guided swap), alternating every
    ``swap_interval`` along ``reference_axis`` (default ``dim``; a grid's rows axis ``dim[0]``).
    ``layout`` and ``dim`` as for :func:`gather`.

    Differentiable in ``views`` and ``reference``: each cell the merge read gets its
    weight times its column's gradient; the cells it did not read get zero.
    """
    dim, axis = _check_merge_args(views, layout, dim, mode, swap_interval, reference, reference_axis)
    backend = resolve_backend(backend, views.device, "stitch")
    return _stitch_any(views, layout, dim, mode, swap_interval, reference, axis, backend)


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


def sync_(views: torch.Tensor, layout: AnyLayout, dim: Dims = None, mode: str = "swap", swap_interval: int = 1,
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
        sync = _reference.sync_ if isinstance(layout, ViewLayout) else _reference.sync_grid
        return sync(views, layout, dim, mode, swap_interval, reference, axis)
    if _records_grad(views, reference) or (forward_ad.active() and forward_ad.split(views, reference)[1] is not None):
        merged = _stitch_any(views, layout, dim, mode, swap_interval, reference, axis, backend)
        return views.copy_(_gather_any(merged, layout, dim, backend))
    return _sync_in_place(views, layout, dim, mode, swap_interval, reference, axis, backend)
