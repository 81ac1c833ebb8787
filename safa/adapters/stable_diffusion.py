"""Adapters for panoramas with Stable Diffusion 1.x/2.x and SDXL (UNet, epsilon / v prediction).

Latent ``(B, C, H, W)`` (C = 4) with the panorama running along the width (dim -1); the VAE
decodes 1 latent column to ``vae_scale_factor`` (8) pixel columns. The native window is the
UNet's ``sample_size`` (64 latent columns = 512 px for SD 1.x, 96 for SD 2.x at 768 px, 128 for
SDXL). The reference-guided swap alternates over *rows* (dim -2; paper Sec. 2.3, Fig. 4): segment-level swaps
of the flattened image rather than pixel-wise column swaps (paper, Fig. 4).

The panorama height is the call's ``height=`` (pixels, a multiple of the VAE factor), by default
the native window's (a square window, what the model was trained on).
"""
from __future__ import annotations

from typing import Any, Dict

import torch

from .base import Conditions, ImageAdapter, register_adapter

__all__ = ["StableDiffusionAdapter", "StableDiffusionXLAdapter"]


@register_adapter
class StableDiffusionAdapter(ImageAdapter):
    """SD 1.x / 2.x (``StableDiffusionPipeline`` and diffusers' panorama pipeline, same components)."""

    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionPanoramaPipeline")
    returns_nsfw_flags = True  # their tuple is (images, has_nsfw_concept)
    embeds_arguments = ("prompt_embeds", "negative_prompt_embeds")
    image_role = "init"  # image= + strength=: img2img over the canvas (docs/conditions.md)

    def _conditions(self, cfg: bool, **kwargs: Any) -> Conditions:
        with torch.no_grad():
            # Without a negative prompt the pipeline encodes "" for the unconditional branch.
            pos, neg = self.pipe.encode_prompt(device=self.device, num_images_per_prompt=1,
                                               do_classifier_free_guidance=cfg, **kwargs)
        return Conditions({"encoder_hidden_states": pos}, {"encoder_hidden_states": neg} if cfg else None)

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, c: Dict[str, torch.Tensor],
                 extra: Dict[str, Any]) -> torch.Tensor:
        return self.denoiser(x, t, encoder_hidden_states=c["encoder_hidden_states"], return_dict=False)[0]


@register_adapter
class StableDiffusionXLAdapter(ImageAdapter):
    """SDXL: two text encoders (hidden states concatenated), pooled text embedding and the six
    added time ids ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``.

    The time ids are set *per window*: every view is a window-sized image generated uncropped,
    so each window gets ``(H, w, 0, 0, H, w)`` in pixels of the window (the pipeline's own
    values for a window-sized call), never the panorama's width, which would ask the model
    for a squeezed full panorama inside every window.
    """

    pipeline_classes = ("StableDiffusionXLPipeline",)
    embeds_arguments = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                        "negative_pooled_prompt_embeds")
    image_role = "init"

    def _conditions(self, cfg: bool, **kwargs: Any) -> Conditions:
        with torch.no_grad():
            # negative_prompt=None keeps the pipeline's force_zeros_for_empty_prompt behaviour.
            pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
                device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=cfg, **kwargs)
        positive = {"encoder_hidden_states": pos, "text_embeds": pooled}
        negative_c = {"encoder_hidden_states": neg, "text_embeds": neg_pooled} if cfg else None
        return Conditions(positive, negative_c)

    def _time_ids(self, rows: int, cols: int, batch: int, dtype: torch.dtype) -> torch.Tensor:
        # Memoised on the device: the pipeline's helper builds them on the host, and a
        # host-to-device copy per step is a host sync (and an error under CUDA graph capture).
        cache = self.__dict__.setdefault("_time_ids_cache", {})
        key = (rows, cols, dtype, self.device)
        if key not in cache:
            pipe = self.pipe
            size = (rows * self.decoded_scale, cols * self.decoded_scale)
            enc2 = pipe.text_encoder_2
            proj_dim = int(enc2.config.projection_dim) if enc2 is not None else None
            # The pipeline's helper also checks the ids against the UNet's added-embedding width.
            ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=dtype, text_encoder_projection_dim=proj_dim)
            cache[key] = ids.to(self.device)
        return cache[key].repeat(batch, 1)

    def _added_cond(self, x: torch.Tensor, c: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        time_ids = self._time_ids(x.shape[-2], x.shape[-1], x.shape[0], c["encoder_hidden_states"].dtype)
        return {"text_embeds": c["text_embeds"], "time_ids": time_ids}

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, c: Dict[str, torch.Tensor],
                 extra: Dict[str, Any]) -> torch.Tensor:
        return self.denoiser(x, t, encoder_hidden_states=c["encoder_hidden_states"],
                             added_cond_kwargs=self._added_cond(x, c), return_dict=False)[0]

    def encode_image(self, pixels: torch.Tensor, generator: Any, sample_mode: str = "sample") -> torch.Tensor:
        # As SDXL's img2img prepare_latents: the VAE's own normalisation (latents_mean / std) when it has one.
        vae = self.pipe.vae
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is None or std is None:
            return super().encode_image(pixels, generator, sample_mode)
        latent = super().encode_image(pixels, generator, sample_mode) / vae.config.scaling_factor
        shape = (1, -1) + (1,) * (latent.dim() - 2)
        mean_t = torch.tensor(mean, device=latent.device, dtype=latent.dtype).view(shape)
        std_t = torch.tensor(std, device=latent.device, dtype=latent.dtype).view(shape)
        return (latent - mean_t) * vae.config.scaling_factor / std_t

    def decode_latents(self, latent: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        # As the pipeline: the fp16 SDXL VAE overflows, so it decodes in float32 when asked to.
        upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
        dtype = torch.float32 if upcast else vae.dtype
        z = latent.to(device=self.device, dtype=dtype)
        mean = getattr(vae.config, "latents_mean", None)
        std = getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, -1) + (1,) * (z.dim() - 2)
            mean_t = torch.tensor(mean, device=z.device, dtype=z.dtype).view(shape)
            std_t = torch.tensor(std, device=z.device, dtype=z.dtype).view(shape)
            z = z * std_t / vae.config.scaling_factor + mean_t
        else:
            z = z / vae.config.scaling_factor
        if upcast:
            return _decode_fp32(vae, z)
        return vae.decode(z, return_dict=False)[0]


def _decode_fp32(vae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Decode in float32 and put the VAE back in its dtype (what SDXL's pipeline does around decode)."""
    dtype = vae.dtype
    vae.to(torch.float32)
    try:
        return vae.decode(z.float(), return_dict=False)[0]
    finally:
        vae.to(dtype)
