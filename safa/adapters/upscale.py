"""Adapter for the x4 upscaler (``StableDiffusionUpscalePipeline``) at any size.

Its UNet takes the latents concatenated (on channels) with the low-resolution image, which is
at the latent's resolution (the VAE decodes 1 latent pixel to ``vae_scale_factor`` = 4 output
pixels), plus ``noise_level`` as class labels; the pipeline first noises the low-resolution
image with its ``low_res_scheduler`` at ``noise_level``. Here that image is the canvas: noised
whole (one noise draw, before the latents' as in the pipeline), then cropped per view by the
rule of :mod:`safa.adapters.canvas` (1 image pixel per latent column), so a low-res image of
``w x h`` gives a ``4w x 4h`` output through overlapping views of the UNet's native window,
over a 2-D grid of tiles when it is taller than one window.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from .base import register_adapter
from .stable_diffusion import StableDiffusionAdapter

__all__ = ["StableDiffusionUpscaleAdapter"]


@register_adapter
class StableDiffusionUpscaleAdapter(StableDiffusionAdapter):
    """``StableDiffusionUpscalePipeline``: ``image=`` (required) is the low-resolution input."""

    pipeline_classes = ("StableDiffusionUpscalePipeline",)
    image_role = "low_res"

    @property
    def image_pixels_per_column(self) -> int:
        return 1  # the low-resolution image is at the latent's resolution

    @property
    def max_noise_level(self) -> int:
        return int(self.pipe.config.max_noise_level)

    def latent_shape(self, batch_size: int, length: int, height: Optional[int] = None) -> Tuple[int, ...]:
        # The UNet's in_channels include the image's 3: the latent is the VAE's.
        return (batch_size, int(self.pipe.vae.config.latent_channels), self.latent_rows(height), int(length))

    def image_conditions(self, image: Any, generator: Any) -> Dict[str, torch.Tensor]:
        # As the pipeline: preprocess to [-1, 1], noise drawn for the image's shape, low_res_scheduler.add_noise.
        from diffusers.utils.torch_utils import randn_tensor
        pixels = (image.pixels * 2.0 - 1.0).to(device=self.device, dtype=self.dtype)
        noise = randn_tensor(pixels.shape, generator=generator, device=self.device, dtype=self.dtype)
        level = torch.tensor([image.noise_level], dtype=torch.long, device=self.device)
        return {"low_res_image": self.pipe.low_res_scheduler.add_noise(pixels, noise, level)}

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, c: Dict[str, torch.Tensor],
                 extra: Dict[str, Any]) -> torch.Tensor:
        labels = torch.full((x.shape[0],), int(extra.get("noise_level", 20)), dtype=torch.long, device=x.device)
        return self.denoiser(torch.cat([x, c["low_res_image"]], dim=1), t,
                             encoder_hidden_states=c["encoder_hidden_states"], class_labels=labels,
                             return_dict=False)[0]
