"""safa_kernels: fused gather / stitch / sync of overlapping views for joint diffusion.

>>> from safa_kernels import ViewLayout, gather, stitch, sync_
>>> layout = ViewLayout(length=1024, window=256, overlap=51 - 51 % 1, loop=False)  # doctest: +SKIP
"""
from .layout import ViewLayout
from .ops import BACKENDS, KERNEL_BACKENDS, MODES, available_backends, gather, resolve_backend, stitch, sync_
from . import _extension, triton_merge  # noqa: F401,E402  (register the compiled and Triton kernels)

__all__ = ["ViewLayout", "gather", "stitch", "sync_", "available_backends", "resolve_backend",
           "BACKENDS", "KERNEL_BACKENDS", "MODES"]
__version__ = "0.1.0"
