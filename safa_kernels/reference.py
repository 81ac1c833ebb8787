"""Pure-PyTorch reference: the executable form of the merge rules (docs/kernels.md, section 2).

Written for reading, not speed: per-view loops over ``index_select``/``index_copy_``.
Every kernel backend is tested against these functions, and they are the fallback on
any device where no kernel was built. Arguments are validated by the public API in
``ops.py``; these functions assume valid input.

Conventions: ``latent`` has the long axis at ``dim``; ``views`` is
``(num_views, *latent.shape)`` with ``window`` columns on the long axis; ``reference``
is one view's shape.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .layout import GridLayout, ViewLayout
from .library import MODES, axis_weights


def _parity(offsets: torch.Tensor, swap_interval: int) -> torch.Tensor:
    """``p = floor(offset / swap_interval) mod 2`` (Eq. 9): True where the swap takes the other side."""
    return (offsets // swap_interval) % 2 == 1


def _cols(layout: ViewLayout, view: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(layout.columns(view), dtype=torch.long, device=device)


def gather(latent: torch.Tensor, layout: ViewLayout, dim: int) -> torch.Tensor:
    """``views[i] = F_i(latent)``: each view's window of the long axis."""
    dim = dim % latent.ndim
    return torch.stack([latent.index_select(dim, _cols(layout, i, latent.device))
                        for i in range(layout.num_views)])


def _triangular_weights(window: int) -> torch.Tensor:
    k = torch.arange(window, dtype=torch.float32)
    return torch.minimum(k + 1, window - k)


def stitch(views: torch.Tensor, layout: ViewLayout, dim: int, mode: str = "swap",
           swap_interval: int = 1, reference: Optional[torch.Tensor] = None,
           reference_axis: Optional[int] = None) -> torch.Tensor:
    """Merge the views into the long latent ``J`` by ``mode`` (then the reference swap)."""
    ndim = views.ndim - 1
    dim = dim % ndim
    shape = list(views.shape[1:])
    shape[dim] = layout.length

    if mode == "swap":
        # Paint every view, then write each overlap explicitly from its pair (i, j):
        # Eq. 9 with X1 = Left(X^j), X2 = Right(X^i); parity 0 keeps view i.
        out = views.new_empty(shape)
        for i in range(layout.num_views):
            out.index_copy_(dim, _cols(layout, i, views.device), views[i])
        for i, j in layout.neighbour_pairs():
            o = layout.pair_overlap(i)  # a spaced layout's overlaps differ by a column
            q = torch.arange(o, device=views.device)
            mshape = [1] * ndim
            mshape[dim] = o
            take_right_view = _parity(q, swap_interval).view(mshape)
            left_part_of_j = views[j].index_select(dim, q)
            right_part_of_i = views[i].index_select(dim, layout.window - o + q)
            cols = _cols(layout, j, views.device)[q]
            out.index_copy_(dim, cols, torch.where(take_right_view, left_part_of_j, right_part_of_i))
    elif mode in ("mean", "triangular", "gaussian"):
        # MultiDiffusion: value / count over every covering view, accumulated in fp32
        # (fp64 for fp64 views).
        acc_dtype = torch.float64 if views.dtype == torch.float64 else torch.float32
        acc = torch.zeros(shape, dtype=acc_dtype, device=views.device)
        count = torch.zeros(layout.length, dtype=acc_dtype, device=views.device)
        weight = (torch.ones(layout.window) if mode == "mean" else _triangular_weights(layout.window)
                  if mode == "triangular" else torch.tensor(axis_weights(mode, layout.window), dtype=acc_dtype))
        weight = weight.to(views.device)
        bshape = [1] * ndim
        bshape[dim] = layout.window
        for i in range(layout.num_views):
            cols = _cols(layout, i, views.device)
            acc.index_add_(dim, cols, views[i].to(acc_dtype) * weight.view(bshape))
            count.index_add_(0, cols, weight.to(acc_dtype))
        cshape = [1] * ndim
        cshape[dim] = layout.length
        out = (acc / count.view(cshape)).to(views.dtype)
        # A column covered by one view takes that view's value exactly (not x * w / w).
        for i in range(layout.num_views):
            lo, hi = layout.middle(i)
            if hi > lo:
                local = torch.arange(lo, hi, device=views.device)
                out.index_copy_(dim, _cols(layout, i, views.device)[local], views[i].index_select(dim, local))
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    if reference is not None:
        _reference_swap(out, views, layout, dim, swap_interval, reference, reference_axis)
    return out


def _reference_swap(out: torch.Tensor, views: torch.Tensor, layout: ViewLayout, dim: int,
                    swap_interval: int, reference: torch.Tensor, reference_axis: Optional[int]) -> None:
    """Eq. 10: in each view's middle, parity-1 positions take ``Middle(X^0)``, written into ``out``.

    Parity runs over the offset from the middle's start along the long axis, or, when
    ``reference_axis`` is another axis (rows of an image), over that axis's index.
    """
    ndim = out.ndim
    axis = dim if reference_axis is None else reference_axis % ndim
    for i in range(layout.num_views):
        lo, hi = layout.middle(i)
        if hi <= lo:
            continue
        local = torch.arange(lo, hi, device=out.device)
        cols = _cols(layout, i, out.device)[local]
        own = views[i].index_select(dim, local)
        ref = reference.index_select(dim, local)
        if axis == dim:
            take_ref = _parity(local - lo, swap_interval)
        else:
            take_ref = _parity(torch.arange(out.shape[axis], device=out.device), swap_interval)
        mshape = [1] * ndim
        mshape[axis] = take_ref.numel()
        out.index_copy_(dim, cols, torch.where(take_ref.view(mshape), ref, own))


def sync_(views: torch.Tensor, layout: ViewLayout, dim: int, mode: str = "swap", swap_interval: int = 1,
          reference: Optional[torch.Tensor] = None, reference_axis: Optional[int] = None) -> torch.Tensor:
    """In place: every view becomes its window of the merged latent (docs/kernels.md, section 3).

    Differentiable: ``copy_`` records the mutation for autograd.
    """
    # Under autograd, stitch's index_copy_ saves slices of what it reads for its backward,
    # and the copy_ below overwrites views: it reads a snapshot then.
    recording = torch.is_grad_enabled() and views.requires_grad
    merged = stitch(views.clone() if recording else views, layout, dim, mode, swap_interval, reference, reference_axis)
    views.copy_(gather(merged, layout, dim))
    return views


# -- grids (docs/kernels.md, section 8) -----------------------------------------------------------
def gather_grid(latent: torch.Tensor, grid: GridLayout, dims: Tuple[int, int]) -> torch.Tensor:
    """``views[a * cols.num_views + b]``: tile ``(a, b)``'s rows and columns of ``latent``."""
    rows_dim, cols_dim = dims
    return torch.stack([latent.index_select(rows_dim, _cols(grid.rows, a, latent.device))
                        .index_select(cols_dim, _cols(grid.cols, b, latent.device))
                        for a in range(grid.rows.num_views) for b in range(grid.cols.num_views)])


def stitch_grid(views: torch.Tensor, grid: GridLayout, dims: Tuple[int, int], mode: str = "swap",
                swap_interval: int = 1, reference: Optional[torch.Tensor] = None,
                reference_axis: Optional[int] = None) -> torch.Tensor:
    """Merge a grid's tiles: the 1-D rule along the columns within each row of tiles, then the
    1-D rule along the rows between the resulting strips (the separable form of section 8), then
    the reference swap into every tile's middle. Averages run in the accumulation type and are
    rounded once."""
    rows_dim, cols_dim = dims
    acc_dtype = torch.float64 if views.dtype == torch.float64 else torch.float32
    tiles = (views if mode == "swap" else views.to(acc_dtype)).unflatten(0, (grid.rows.num_views, grid.cols.num_views))
    strips = torch.stack([stitch(row_of_tiles, grid.cols, cols_dim, mode, swap_interval) for row_of_tiles in tiles])
    out = stitch(strips, grid.rows, rows_dim, mode, swap_interval).to(views.dtype)
    if reference is not None:
        _grid_reference_swap(out, views, grid, dims, swap_interval, reference, reference_axis)
    return out


def _grid_reference_swap(out: torch.Tensor, views: torch.Tensor, grid: GridLayout, dims: Tuple[int, int],
                         swap_interval: int, reference: torch.Tensor, reference_axis: Optional[int]) -> None:
    """Eq. 10 per tile: in its middle (row middle x column middle), parity-1 positions take the
    reference; the parity runs over the row offset from the middle's first row, or over the
    index of ``reference_axis`` when that is not a grid axis."""
    rows_dim, cols_dim = dims
    axis = rows_dim if reference_axis is None else reference_axis % out.ndim
    canvas = out.movedim(dims, (-2, -1))  # a view: writes land in out
    for view in range(grid.num_views):
        a, b = grid.tile(view)
        (row_lo, row_hi), (col_lo, col_hi) = grid.middle(view)
        if row_hi <= row_lo or col_hi <= col_lo:
            continue
        local_rows = torch.arange(row_lo, row_hi, device=out.device)
        local_cols = torch.arange(col_lo, col_hi, device=out.device)
        own = views[view].index_select(rows_dim, local_rows).index_select(cols_dim, local_cols)
        ref = reference.index_select(rows_dim, local_rows).index_select(cols_dim, local_cols)
        if axis == rows_dim:
            take_ref = _parity(local_rows - row_lo, swap_interval)
        else:
            take_ref = _parity(torch.arange(out.shape[axis], device=out.device), swap_interval)
        mshape = [1] * out.ndim
        mshape[axis] = take_ref.numel()
        block = torch.where(take_ref.view(mshape), ref, own).movedim(dims, (-2, -1))
        canvas_rows = _cols(grid.rows, a, out.device)[local_rows]
        canvas_cols = _cols(grid.cols, b, out.device)[local_cols]
        canvas[..., canvas_rows[:, None], canvas_cols[None, :]] = block


def sync_grid(views: torch.Tensor, grid: GridLayout, dims: Tuple[int, int], mode: str = "swap",
              swap_interval: int = 1, reference: Optional[torch.Tensor] = None,
              reference_axis: Optional[int] = None) -> torch.Tensor:
    """In place: every tile becomes its window of the merged canvas (as :func:`sync_`)."""
    recording = torch.is_grad_enabled() and views.requires_grad
    merged = stitch_grid(views.clone() if recording else views, grid, dims, mode, swap_interval, reference,
                         reference_axis)
    views.copy_(gather_grid(merged, grid, dims))
    return views
