"""Stride handling: every operand as the kernels' canonical 4-D ``(views, outer, long, inner)`` view.

``outer`` is the product of the latent's dims before the long axis and ``inner`` of those
after it (docs/kernels.md, section 4). The views are taken without copying when the strides
allow it (the dims on each side of the long axis collapse into one stride); otherwise the
caller copies (an input) or merges a contiguous copy and writes it back (``sync_``'s target).
Also here: the kernels' runtime parity argument of a reference swap, which is a fact about
the same flattening.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from .plan import REF_LONG_AXIS, REF_NONE, REF_OTHER_AXIS

__all__ = ["canonical", "canonical_input", "parity", "merge_axes", "split_axes", "merged_axis"]


def _merged_stride(sizes, strides) -> Optional[int]:
    """The stride of dims collapsed into one, or None when their strides do not allow it."""
    dims = [(n, st) for n, st in zip(sizes, strides) if n != 1]
    for (n0, st0), (n1, st1) in zip(dims, dims[1:]):
        if st0 != st1 * n1:
            return None
    return dims[-1][1] if dims else 1


def canonical(x: torch.Tensor, dim: int, lead: bool) -> Optional[torch.Tensor]:
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


def canonical_input(x: torch.Tensor, dim: int, lead: bool) -> torch.Tensor:
    """:func:`canonical` of an operand that is only read: a contiguous copy when the strides do not collapse."""
    c = canonical(x, dim, lead)
    return c if c is not None else canonical(x.contiguous(), dim, lead)


def parity(shape, dim: int, axis: Optional[int], swap_interval: int) -> Tuple[int, List[int]]:
    """(plan reference kind, kernel parity argument) for a reference swap along latent ``axis``.

    The parity argument is ``[axis_part, div, size, swap_interval]``: the axis folds into
    ``outer`` (1) or ``inner`` (2), and its index is ``(x // div) % size`` of that flat index;
    ``axis_part`` 0 when the plan resolves the parity (no reference, or along the long axis).
    """
    if axis is None:
        return REF_NONE, [0, 1, 1, swap_interval]
    if axis == dim:
        return REF_LONG_AXIS, [0, 1, 1, swap_interval]
    if axis < dim:
        return REF_OTHER_AXIS, [1, math.prod(shape[axis + 1:dim]), shape[axis], swap_interval]
    return REF_OTHER_AXIS, [2, math.prod(shape[axis + 1:]), shape[axis], swap_interval]


# -- grids: two long axes as one ----------------------------------------------------------------
def merge_axes(x: torch.Tensor, dims: Tuple[int, int], lead: bool) -> Tuple[torch.Tensor, int, bool]:
    """``x`` with a grid's two axes ``dims = (rows, cols)`` (latent coordinates) merged into one
    axis of ``rows * cols`` cells, row-major, at latent position ``p = min(dims)``.

    Returns ``(merged, p, is_view)``: a view of ``x`` when the strides allow it (the two axes
    adjacent and in order, the rows' stride ``cols`` times the columns'), else a copy. The
    other axes keep their order.
    """
    rows, cols = dims
    p, off = min(dims), int(lead)
    moved = x.movedim((rows + off, cols + off), (p + off, p + 1 + off))
    shape = list(moved.shape)
    shape[p + off: p + off + 2] = [shape[p + off] * shape[p + off + 1]]
    try:
        return moved.view(shape), p, True
    except RuntimeError:  # strides that do not collapse: reading a copy is what the kernels need
        return moved.reshape(shape), p, False


def split_axes(x: torch.Tensor, dims: Tuple[int, int], sizes: Tuple[int, int], lead: bool) -> torch.Tensor:
    """The inverse of :func:`merge_axes`: the merged axis at ``min(dims)`` back into axes ``dims`` of ``sizes``."""
    rows, cols = dims
    p, off = min(dims), int(lead)
    return x.unflatten(p + off, sizes).movedim((p + off, p + 1 + off), (rows + off, cols + off))


def merged_axis(axis: int, dims: Tuple[int, int], ndim: int) -> int:
    """Where latent axis ``axis`` (not one of ``dims``) lies after :func:`merge_axes`."""
    others = [d for d in range(ndim) if d not in dims]
    p = min(dims)
    return (others[:p] + [None] + others[p:]).index(axis)
