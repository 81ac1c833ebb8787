"""The eager work of every op: allocate the output, take canonical views, run one plan.

``gather_views``, ``stitch_latent`` and ``sync_views`` are what the public ops call when
autograd has nothing to record; the functional ops ``safa::gather``, ``safa::stitch`` and
their adjoints (schemas and fakes in ``library.py``) are implemented here from the same
pieces and registered for ``CompositeExplicitAutograd`` (their backward formulas are in
``autograd.py``).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .cache import intern_layout
from .canonical import canonical, canonical_input, parity
from .layout import AnyLayout
from .library import LIB, long_axis_shape, merge_op, op_layout, stitch_layout
from .plan import REF_NONE, REF_OTHER_AXIS, get_plan

__all__ = ["run", "gather_views", "stitch_latent", "sync_views", "zeros"]

_NO_PARITY = [0, 1, 1, 1]  # a plan without a reference


def run(backend: str, out: torch.Tensor, src: Optional[torch.Tensor], reference: Optional[torch.Tensor],
        layout: AnyLayout, op: str, mode: str, swap_interval: int, ref_kind: int, parity_arg: List[int]) -> None:
    """One plan executor call: the cached plan of ``(layout, op, ...)`` on ``out``'s device."""
    index, weight, runs = get_plan(layout, op, mode, swap_interval, ref_kind, out.device)
    if index.shape[0]:  # e.g. sync_ with no overlap and no reference has nothing to do
        if runs is None:  # a strip's plan: every row one cell
            merge_op(backend)(out, src, reference, index, weight, parity_arg)
        else:
            merge_op(backend)(out, src, reference, index, weight, parity_arg, runs)


def zeros(like: torch.Tensor, shape) -> torch.Tensor:
    """A read-only zero tensor of ``shape``: one element broadcast, no memory."""
    return like.new_zeros(()).expand(list(shape))


def gather_views(latent: torch.Tensor, layout: AnyLayout, dim: int, backend: str) -> torch.Tensor:
    """gather's work: allocate the views, run the plan."""
    views = latent.new_empty([layout.num_views] + long_axis_shape(latent.shape, dim, layout.view_cells))
    run(backend, canonical(views, dim, True), canonical_input(latent, dim, False), None,
        layout, "gather", "swap", 1, REF_NONE, _NO_PARITY)
    return views


def stitch_latent(views: torch.Tensor, reference: Optional[torch.Tensor], layout: AnyLayout, dim: int, mode: str,
                  swap_interval: int, reference_axis: Optional[int], backend: str) -> torch.Tensor:
    """stitch's work: allocate the latent, run the plan."""
    latent = views.new_empty(long_axis_shape(views.shape[1:], dim, layout.canvas_cells))
    ref_kind, parity_arg = parity(latent.shape, dim, reference_axis, swap_interval)
    ref = None if reference is None else canonical_input(reference, dim, False)[0]
    run(backend, canonical(latent, dim, False), canonical_input(views, dim, True), ref,
        layout, "stitch", mode, swap_interval, ref_kind, parity_arg)
    return latent


def sync_views(views: torch.Tensor, reference: Optional[torch.Tensor], layout: AnyLayout, dim: int, mode: str,
               swap_interval: int, reference_axis: Optional[int], backend: str) -> torch.Tensor:
    """sync_'s work, in place on ``views``: the ``sync`` plan, which writes only the cells that change."""
    ref_kind, parity_arg = parity(list(views.shape[1:]), dim, reference_axis, swap_interval)
    ref = None if reference is None else canonical_input(reference, dim, False)[0]
    target = canonical(views, dim, True)
    if target is None:  # strides that no 4-D view can express: merge a copy, write it back
        merged = views.contiguous()
        sync_views(merged, reference, layout, dim, mode, swap_interval, reference_axis, backend)
        return views.copy_(merged)
    run(backend, target, None, ref, layout, "sync", mode, swap_interval, ref_kind, parity_arg)
    return views


# -- the functional ops' implementations --------------------------------------------------------
# Each checks its arguments as its fake kernel does (library.py) and allocates the same output.
def _gather_impl(latent, layout, dim, backend):
    layout = intern_layout(op_layout("gather", layout, backend, "latent", latent, False, dim))
    return gather_views(latent, layout, dim, backend)


def _gather_adjoint_impl(views, layout, dim, backend):
    layout = intern_layout(op_layout("gather_adjoint", layout, backend, "views", views, True, dim))
    latent = views.new_empty(long_axis_shape(views.shape[1:], dim, layout.canvas_cells))  # every column is written
    run(backend, canonical(latent, dim, False), canonical_input(views, dim, True), None,
        layout, "gather_adjoint", "swap", 1, REF_NONE, _NO_PARITY)
    return latent


def _stitch_impl(views, reference, layout, dim, mode, swap_interval, reference_axis, backend):
    layout = intern_layout(stitch_layout(views, reference, layout, dim, mode, swap_interval, reference_axis, backend))
    return stitch_latent(views, reference, layout, dim, mode, swap_interval, reference_axis, backend)


def _stitch_adjoint_impl(latent, layout, dim, mode, swap_interval, reference_axis, backend):
    layout = intern_layout(op_layout("stitch_adjoint", layout, backend, "latent", latent, False, dim, mode,
                                     swap_interval, reference_axis))
    views = latent.new_zeros([layout.num_views] + long_axis_shape(latent.shape, dim, layout.view_cells))
    ref_kind, parity_arg = parity(latent.shape, dim, reference_axis, swap_interval)
    # Where the reference's parity runs along another axis the plan keeps its reference
    # columns, and a zero reference writes the zero gradient of the cells it replaced.
    zero = zeros(latent, views.shape[1:]) if ref_kind == REF_OTHER_AXIS else None
    run(backend, canonical(views, dim, True), canonical_input(latent, dim, False),
        None if zero is None else canonical_input(zero, dim, False)[0],
        layout, "stitch_adjoint", mode, swap_interval, ref_kind, parity_arg)
    return views


def _reference_adjoint_impl(latent, layout, dim, swap_interval, reference_axis, backend):
    layout = intern_layout(op_layout("reference_adjoint", layout, backend, "latent", latent, False, dim,
                                     swap_interval=swap_interval, reference_axis=reference_axis))
    reference = latent.new_zeros(long_axis_shape(latent.shape, dim, layout.view_cells))
    ref_kind, _ = parity(latent.shape, dim, reference_axis, swap_interval)
    run(backend, canonical(reference, dim, False), canonical_input(latent, dim, False), None,
        layout, "reference_adjoint", "mean", swap_interval, ref_kind, _NO_PARITY)
    if ref_kind == REF_OTHER_AXIS:  # only positions of odd parity along that axis took the reference
        shape = [1] * latent.ndim
        shape[reference_axis] = latent.shape[reference_axis]
        h = torch.arange(latent.shape[reference_axis], device=latent.device)
        reference.masked_fill_(((h // swap_interval) % 2 == 0).view(shape), 0)
    return reference


for _name, _impl in [("gather", _gather_impl), ("gather_adjoint", _gather_adjoint_impl), ("stitch", _stitch_impl),
                     ("stitch_adjoint", _stitch_adjoint_impl), ("reference_adjoint", _reference_adjoint_impl)]:
    LIB.impl(_name, _impl, "CompositeExplicitAutograd")
