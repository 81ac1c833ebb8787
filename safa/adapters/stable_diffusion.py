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

from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from .base import Adapter, Conditions, register_adapter

__all__ = ["ImageAdapter", "StableDiffusionAdapter", "StableDiffusionXLAdapter"]


def _side(sample_size: Any) -> int:
    """The latent height/width of a ``sample_size`` config entry (an int, or ``(h, w)``)."""
    if isinstance(sample_size, (list, tuple)):
        return int(sample_size[-1])
    return int(sample_size)


class ImageAdapter(Adapter):
    """What every latent-image pipeline shares: geometry, CFG batching, VAE decoding to ``[0, 1]``.

    Subclasses provide :meth:`encode_prompts` and :meth:`_denoise` (one model call on an
    already CFG-batched input), and name the denoiser in ``_denoiser``.
    """

    kind = "image"
    long_dim = -1
    reference_axis = -2  # images: the reference swap alternates over rows (paper Sec. 2.3, Fig. 4)
    decoded_dim = -1
    finalize_scale = 1
    # decode_context: the base default (8 latent columns each side of a tile). The SD VAE decoder
    # has GroupNorm and a mid-block self-attention, so no finite context makes a tiled decode
    # exact; 8 covers its convolutions' effective reach (diffusers' own tiled VAE decode blends
    # over a comparable margin).

    _denoiser: str = "unet"

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self._denoiser)

    @property
    def decoded_scale(self) -> int:  # type: ignore[override]
        return int(self.pipe.vae_scale_factor)

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    def native_window(self) -> int:
        return _side(self.denoiser.config.sample_size)

    def latent_rows(self, height: Optional[int] = None) -> int:
        """Latent rows (dim -2) of every window and of the panorama for ``height`` pixels.

        ``None``: the native window's height (a square window, what the model was trained on).
        """
        if height is None:
            return self.native_window()
        m = self.decoded_scale * self.window_multiple()
        if isinstance(height, bool) or not isinstance(height, int) or height < m or height % m:
            raise ValueError(f"height must be a positive multiple of {m} pixels, got {height!r}")
        return height // self.decoded_scale

    def latent_shape(self, batch_size: int, length: int, height: Optional[int] = None) -> Tuple[int, ...]:
        return (batch_size, int(self.denoiser.config.in_channels), self.latent_rows(height), int(length))

    # -- decoding ----------------------------------------------------------------------------
    def _vae_input(self, latent: torch.Tensor) -> torch.Tensor:
        """Undo the latent normalisation the way the pipeline does before ``vae.decode``."""
        return latent / self.pipe.vae.config.scaling_factor

    def decode_latents(self, latent: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        z = self._vae_input(latent.to(device=self.device, dtype=vae.dtype))
        return vae.decode(z, return_dict=False)[0]

    def finalize(self, decoded: torch.Tensor) -> torch.Tensor:
        # The pipelines' image_processor.postprocess: [-1, 1] -> [0, 1] (denormalize), float.
        return (decoded.float() / 2 + 0.5).clamp(0, 1)

    # -- conditions: the pipeline's own encode_prompt, from prompts or from embeddings -------
    def _conditions(self, cfg: bool, **kwargs: Any) -> Conditions:
        """``pipe.encode_prompt(**kwargs)`` as :class:`Conditions`."""
        raise NotImplementedError

    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Optional[Sequence[str]],
                       guidance_scale: float) -> Conditions:
        cfg = guidance_scale > 1.0  # the pipelines' own rule
        prompts, negative = self._split(prompts, negative_prompts, cfg)
        return self._conditions(cfg, prompt=prompts, negative_prompt=negative)

    def conditions_from_embeds(self, embeds: Dict[str, torch.Tensor], guidance_scale: float) -> Conditions:
        return self._conditions(guidance_scale > 1.0, prompt=None, **embeds)

    # -- shared prompt handling ------------------------------------------------------------
    @staticmethod
    def _split(prompts: Sequence[str], negative_prompts: Optional[Sequence[str]],
               cfg: bool) -> Tuple[list, Optional[list]]:
        return list(prompts), (list(negative_prompts) if (cfg and negative_prompts is not None) else None)


@register_adapter
class StableDiffusionAdapter(ImageAdapter):
    """SD 1.x / 2.x (``StableDiffusionPipeline`` and diffusers' panorama pipeline, same components)."""

    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionPanoramaPipeline")
    embeds_arguments = ("prompt_embeds", "negative_prompt_embeds")

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

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, c: Dict[str, torch.Tensor],
                 extra: Dict[str, Any]) -> torch.Tensor:
        time_ids = self._time_ids(x.shape[-2], x.shape[-1], x.shape[0], c["encoder_hidden_states"].dtype)
        added = {"text_embeds": c["text_embeds"], "time_ids": time_ids}
        return self.denoiser(x, t, encoder_hidden_states=c["encoder_hidden_states"],
                             added_cond_kwargs=added, return_dict=False)[0]

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
