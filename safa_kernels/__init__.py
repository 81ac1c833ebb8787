"""safa_kernels: fused gather / stitch / sync of overlapping views for joint diffusion.

>>> import torch
>>> from safa_kernels import ViewLayout, gather, stitch, sync_
>>> layout = ViewLayout.covering(1000, window=256, overlap=51)
>>> layout.num_views, layout.length
(5, 1076)
>>> views = gather(torch.randn(2, 8, layout.length, 16), layout, dim=-2)
>>> views.shape
torch.Size([5, 2, 8, 256, 16])
>>> _ = sync_(views, layout, dim=-2, mode="swap")      # merge the overlaps in place
>>> stitch(views, layout, dim=-2).shape
torch.Size([2, 8, 1076, 16])
"""
from .layout import ViewLayout
from .ops import BACKENDS, KERNEL_BACKENDS, MODES, available_backends, gather, resolve_backend, stitch, sync_
from . import _extension, triton_merge  # noqa: F401,E402  (register the compiled and Triton kernels)

__all__ = ["ViewLayout", "gather", "stitch", "sync_", "available_backends", "resolve_backend",
           "BACKENDS", "KERNEL_BACKENDS", "MODES"]
from safa import __version__  # noqa: E402  (the one version string; safa's __init__ imports nothing)
