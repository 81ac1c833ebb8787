"""The merge loop users write today, for comparison (benchmarks, profiler, demo).

This is diffusers' StableDiffusionPanoramaPipeline (MultiDiffusion) pattern: after every
denoising step, per-view slices of the long latent accumulate into ``value`` and
``count``, the latent is ``value / count``, and the next step slices the views out again.
The swap variant is the same loop with SaFa's merge: paint each view, then write each
overlap from the pair with a parity mask. Eager PyTorch, open layouts only (a loop layout
needs wrap-around slicing that these snippets, like most user code, do not have).

All functions take the same arguments as ``safa_kernels``' ``gather``/``stitch``/``sync_``.
"""
from __future__ import annotations

import torch

from safa_kernels import ViewLayout

__all__ = ["naive_gather", "naive_stitch", "naive_sync_"]


def _open(layout: ViewLayout) -> ViewLayout:
    if layout.loop:
        raise NotImplementedError("the naive loop handles open layouts only")
    return layout


def naive_gather(latent: torch.Tensor, layout: ViewLayout, dim: int = -2) -> torch.Tensor:
    _open(layout)
    return torch.stack([latent.narrow(dim, start, layout.window) for start in layout.starts])


def naive_stitch(views: torch.Tensor, layout: ViewLayout, dim: int = -2, mode: str = "mean",
                 swap_interval: int = 1) -> torch.Tensor:
    _open(layout)
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
    if mode == "swap":
        latent = views.new_empty(shape)
        for view, start in zip(views, layout.starts):
            latent.narrow(dim, start, w).copy_(view)
        mask_shape = [1] * len(shape)
        mask_shape[dim] = o
        take_right_view = ((torch.arange(o, device=views.device) // swap_interval) % 2 == 1).view(mask_shape)
        for i in range(layout.num_views - 1):
            right_part_of_i = views[i].narrow(dim, w - o, o)
            left_part_of_next = views[i + 1].narrow(dim, 0, o)
            latent.narrow(dim, layout.starts[i + 1], o).copy_(
                torch.where(take_right_view, left_part_of_next, right_part_of_i))
        return latent
    raise ValueError(f"naive_stitch supports mode 'mean' or 'swap', got {mode!r}")


def naive_sync_(views: torch.Tensor, layout: ViewLayout, dim: int = -2, mode: str = "mean",
                swap_interval: int = 1) -> torch.Tensor:
    """Merge into the long latent, then slice every view back out (in place on ``views``)."""
    latent = naive_stitch(views, layout, dim, mode, swap_interval)
    views.copy_(naive_gather(latent, layout, dim % (views.ndim - 1)))
    return views
