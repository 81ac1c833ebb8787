"""The merge loop people write by hand: the baseline that benchmarks and ``safa profile --compare`` measure.

This is the pattern of diffusers' ``StableDiffusionPanoramaPipeline`` (MultiDiffusion):
after every denoising step, per-view slices of the long latent accumulate into ``value``
and ``count``, the latent is ``value / count``, and the next step slices the views out
again. The swap variant is the same loop with SaFa's merge: paint every view, then write
each overlap from its pair with a parity mask (arXiv 2502.05130, Eq. 9); the reference
swap (Eq. 10) is a per-view ``torch.where`` on each middle region. Eager PyTorch, one
small op per view or pair, so its op count grows with the number of views.

For grids the same per-tile loop (:func:`gather_grid`, :func:`stitch_grid`, :func:`sync_grid_`):
each tile added into a canvas slice with its weights (mean, or Mixture of Diffusers' Gaussian).

It is not a backend: the ops of :mod:`safa_kernels.ops` are what to use. It handles what
such hand-written loops handle, open layouts and the modes ``"mean"`` and ``"swap"``, and
refuses the rest with a ``ValueError``. Arguments mean what they mean for
:func:`safa_kernels.gather`, :func:`~safa_kernels.stitch` and :func:`~safa_kernels.sync_`;
tests/kernels/test_naive.py checks it against :mod:`safa_kernels.reference`.
"""
from __future__ import annotations

from typing import Optional

import torch

from .layout import ViewLayout
from .library import axis_weights

__all__ = ["MODES", "GRID_MODES", "gather", "stitch", "sync_", "reference_swap_", "gather_grid", "stitch_grid",
           "sync_grid_"]

MODES = ("mean", "swap")


def _check(layout: ViewLayout, mode: Optional[str] = None) -> None:
    if layout.loop:
        raise ValueError("layout.loop must be False: the naive loop slices views with narrow(), "
                         "which cannot wrap around (use safa_kernels.stitch for loop layouts)")
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} for the naive loop, got {mode!r}")


def _parity_mask(n: int, swap_interval: int, axis: int, ndim: int, device: torch.device) -> torch.Tensor:
    """True where position ``0..n-1`` along ``axis`` takes the other side (Eq. 9 parity)."""
    shape = [1] * ndim
    shape[axis] = n
    return ((torch.arange(n, device=device) // swap_interval) % 2 == 1).view(shape)


def gather(latent: torch.Tensor, layout: ViewLayout, dim: int = -2) -> torch.Tensor:
    """Every view's window: ``torch.stack`` of ``narrow`` slices."""
    _check(layout)
    return torch.stack([latent.narrow(dim, start, layout.window) for start in layout.starts])


def stitch(views: torch.Tensor, layout: ViewLayout, dim: int = -2, mode: str = "mean",
           swap_interval: int = 1) -> torch.Tensor:
    """Merge ``views`` into the long latent: value / count (``"mean"``) or paint-then-swap (``"swap"``)."""
    _check(layout, mode)
    dim = dim % (views.ndim - 1)
    shape = list(views.shape[1:])
    shape[dim] = layout.length
    w, o = layout.window, layout.overlap
    if mode == "mean":
        value = views.new_zeros(shape)
        count = views.new_zeros(shape)
        for view, start in zip(views, layout.starts):
            value.narrow(dim, start, w).add_(view)
            count.narrow(dim, start, w).add_(1)
        return torch.where(count > 0, value / count, value)
    latent = views.new_empty(shape)
    for view, start in zip(views, layout.starts):
        latent.narrow(dim, start, w).copy_(view)
    take_right_view = _parity_mask(o, swap_interval, dim, len(shape), views.device)
    for i in range(layout.num_views - 1):
        right_part_of_i = views[i].narrow(dim, w - o, o)
        left_part_of_next = views[i + 1].narrow(dim, 0, o)
        latent.narrow(dim, layout.starts[i + 1], o).copy_(
            torch.where(take_right_view, left_part_of_next, right_part_of_i))
    return latent


def reference_swap_(views: torch.Tensor, reference: torch.Tensor, layout: ViewLayout, dim: int = -2,
                    swap_interval: int = 1, reference_axis: Optional[int] = None) -> torch.Tensor:
    """Eq. 10 in place, per view: slice the middle, build a parity mask, ``torch.where``, copy back."""
    _check(layout)
    ndim = views.ndim - 1
    dim %= ndim
    axis = dim if reference_axis is None else reference_axis % ndim
    for i in range(layout.num_views):
        lo, hi = layout.middle(i)
        if hi <= lo:
            continue
        own = views[i].narrow(dim, lo, hi - lo)
        ref = reference.narrow(dim, lo, hi - lo)
        take_reference = _parity_mask(own.shape[axis], swap_interval, axis, ndim, views.device)
        own.copy_(torch.where(take_reference, ref, own))
    return views


def sync_(views: torch.Tensor, layout: ViewLayout, dim: int = -2, mode: str = "mean", swap_interval: int = 1,
          reference: Optional[torch.Tensor] = None, reference_axis: Optional[int] = None) -> torch.Tensor:
    """In place: merge into the long latent, slice every view back out, then the reference swap."""
    latent = stitch(views, layout, dim, mode, swap_interval)
    views.copy_(gather(latent, layout, dim % (views.ndim - 1)))
    if reference is not None:
        reference_swap_(views, reference, layout, dim, swap_interval, reference_axis)
    elif reference_axis is not None:
        raise ValueError("reference_axis was given without a reference")
    return views


# -- grids: the per-tile loop of tiled-diffusion code (MultiDiffusion / Mixture of Diffusers) --------
GRID_MODES = ("mean", "gaussian")


def _check_grid(grid, mode: Optional[str] = None) -> None:
    if grid.rows.loop or grid.cols.loop:
        raise ValueError("grid.rows.loop and grid.cols.loop must be False: the naive loop slices tiles with "
                         "narrow(), which cannot wrap around (use safa_kernels.stitch for loop grids)")
    if mode is not None and mode not in GRID_MODES:
        raise ValueError(f"mode must be one of {GRID_MODES} for the naive grid loop, got {mode!r}")


def _tile_slices(x: torch.Tensor, grid, dims, a: int, b: int) -> torch.Tensor:
    return x.narrow(dims[0], grid.rows.starts[a], grid.rows.window).narrow(dims[1], grid.cols.starts[b],
                                                                             grid.cols.window)


def gather_grid(latent: torch.Tensor, grid, dims=(-2, -1)) -> torch.Tensor:
    """Every tile: ``torch.stack`` of two ``narrow`` slices per tile, row-major."""
    _check_grid(grid)
    return torch.stack([_tile_slices(latent, grid, dims, a, b)
                        for a in range(grid.rows.num_views) for b in range(grid.cols.num_views)])


def stitch_grid(views: torch.Tensor, grid, dims=(-2, -1), mode: str = "mean") -> torch.Tensor:
    """value / count per tile: each tile (times its weights) added into a canvas slice, then divided."""
    _check_grid(grid, mode)
    ndim = views.ndim - 1
    dims = (dims[0] % ndim, dims[1] % ndim)
    shape = list(views.shape[1:])
    shape[dims[0]], shape[dims[1]] = grid.rows.length, grid.cols.length
    weight = torch.ones(grid.rows.window, grid.cols.window, dtype=views.dtype, device=views.device)
    if mode == "gaussian":
        rows = torch.tensor(axis_weights(mode, grid.rows.window), dtype=views.dtype, device=views.device)
        cols = torch.tensor(axis_weights(mode, grid.cols.window), dtype=views.dtype, device=views.device)
        weight = rows[:, None] * cols[None, :]
    wshape = [1] * ndim
    wshape[dims[0]], wshape[dims[1]] = grid.rows.window, grid.cols.window
    weight = weight.view(wshape) if dims[0] < dims[1] else weight.t().reshape(wshape)
    value, count = views.new_zeros(shape), views.new_zeros(shape)
    for view in range(grid.num_views):
        a, b = divmod(view, grid.cols.num_views)
        _tile_slices(value, grid, dims, a, b).add_(views[view] * weight)
        _tile_slices(count, grid, dims, a, b).add_(weight)
    return value / count


def sync_grid_(views: torch.Tensor, grid, dims=(-2, -1), mode: str = "mean") -> torch.Tensor:
    """In place: stitch the tiles into a canvas, slice every tile back out."""
    return views.copy_(gather_grid(stitch_grid(views, grid, dims, mode), grid, dims))
