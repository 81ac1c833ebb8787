"""Adapter for the 2-D analytic texture model (:class:`safa.texture.pipeline2d.TexturePipeline2D`).

Latent ``(B, C, H, W)`` (C = 4) like Stable Diffusion's, with square ``window x window`` tiles
(the model is defined on those only); one pixel per latent cell, decoded by the pipeline's fixed
linear channels -> RGB map. Conditions are the model's class weights, batched for classifier-free
guidance like text embeddings. Strips (``height`` = the window) and grids (taller, or
``loop="both"``) run as for any image family; a height below the window is refused (the model
has no smaller tile).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .base import ImageAdapter, register_adapter
from .texture import AnalyticConditions

__all__ = ["TextureImageAdapter"]


@register_adapter
class TextureImageAdapter(AnalyticConditions, ImageAdapter):
    """The 2-D texture model behind the image adapter protocol; the model acts where a UNet does."""

    pipeline_classes = ("TexturePipeline2D",)
    _denoiser = "model"
    fixed_window = True  # the model is defined on its window only (it raises on anything else)
    decode_context = 0   # the decoder maps each cell alone, so a tile decodes exactly without context

    @property
    def decoded_scale(self) -> int:  # type: ignore[override]
        return 1

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.dtype

    def native_window(self) -> int:
        return int(self.pipe.model.window)

    def latent_rows(self, height: Optional[int] = None) -> int:
        w = self.native_window()
        if height is None:
            return w
        if isinstance(height, bool) or not isinstance(height, int):
            raise ValueError(f"height must be an int (pixels), got {type(height).__name__}: {height!r}")
        if height < w:
            raise ValueError(f"height must be at least the texture model's window, {w} px, got {height!r}")
        return height

    def latent_shape(self, batch_size: int, length: int, height: Optional[int] = None) -> Tuple[int, ...]:
        return (batch_size, int(self.pipe.model.channels), self.latent_rows(height), int(length))

    def check_window(self, window: int) -> None:
        if window != self.native_window():
            raise ValueError(f"this texture model is defined on tiles of exactly {self.native_window()} latent "
                             f"cells, got window {window}: build one with make_texture2d_pipeline(window=...)")

    def short_window(self, columns: int) -> int:
        # The pipeline only samples its own tile: a narrower output is that tile, cropped.
        return self.native_window()


    def decode_latents(self, latent: torch.Tensor) -> torch.Tensor:
        return self.pipe.decode(latent.to(self.device, torch.float32))
