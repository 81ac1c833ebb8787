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
from .backends import available_backends, resolve_backend
from .cache import intern_layout
from .layout import GridLayout, ViewLayout
from .library import BACKENDS, KERNEL_BACKENDS, MODES
from .ops import gather, stitch, sync_

__all__ = ["ViewLayout", "GridLayout", "gather", "stitch", "sync_", "available_backends", "resolve_backend", "intern_layout",
           "BACKENDS", "KERNEL_BACKENDS", "MODES"]

def __getattr__(name: str):
    # The distribution's one version string (safa/__init__.py), read from the installed metadata
    # so that the op layer does not import the sampler package.
    if name == "__version__":
        from importlib.metadata import version
        return version("safa")
    raise AttributeError(f"module 'safa_kernels' has no attribute {name!r}")
