"""Adapter for panoramas with Stable Diffusion 3 / 3.5 (MMDiT transformer, rectified flow).

Same geometry as the SD adapters (latent ``(B, C, H, W)``, panorama along dim -1, reference swap
over rows); the denoiser is ``pipe.transformer`` with pooled projections, and the scheduler is
``FlowMatchEulerDiscreteScheduler`` (no ``scale_model_input``, unit initial noise), whose
sigmas may be shifted by resolution: the shift is that of ONE window, the image the model
actually denoises, not of the whole panorama.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from .base import Conditions, ImageAdapter, register_adapter

__all__ = ["StableDiffusion3Adapter"]


@register_adapter
class StableDiffusion3Adapter(ImageAdapter):
    """``StableDiffusion3Pipeline``: CLIP-L + CLIP-G + T5 conditions, pooled CLIP projections."""

    pipeline_classes = ("StableDiffusion3Pipeline",)
    _denoiser = "transformer"

    # Longest T5 prompt, the pipeline's default.
    max_sequence_length: int = 256

    embeds_arguments = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                        "negative_pooled_prompt_embeds")

    def _conditions(self, cfg: bool, **kwargs: Any) -> Conditions:
        with torch.no_grad():
            # negative_prompt=None: the pipeline encodes "" for the unconditional branch.
            pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
                prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
                do_classifier_free_guidance=cfg, max_sequence_length=self.max_sequence_length, **kwargs)
        positive = {"encoder_hidden_states": pos, "pooled_projections": pooled}
        negative_c = {"encoder_hidden_states": neg, "pooled_projections": neg_pooled} if cfg else None
        return Conditions(positive, negative_c)

    def window_multiple(self) -> int:
        # The transformer patchifies the latent into patch_size x patch_size tokens.
        return int(self.denoiser.config.patch_size)

    def set_timesteps(self, num_inference_steps: int, window_shape: Tuple[int, ...]) -> torch.Tensor:
        """The pipeline's schedule, with the resolution-dependent shift (``mu``) of one window."""
        scheduler = self.pipe.scheduler
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
            patch = int(self.denoiser.config.patch_size)
            seq_len = (int(window_shape[-2]) // patch) * (int(window_shape[-1]) // patch)
            kwargs["mu"] = calculate_shift(
                seq_len,
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        scheduler.set_timesteps(num_inference_steps, device=self.device, **kwargs)
        return scheduler.timesteps

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, c: Dict[str, torch.Tensor],
                 extra: Dict[str, Any]) -> torch.Tensor:
        return self.denoiser(hidden_states=x, timestep=t.expand(x.shape[0]),
                             encoder_hidden_states=c["encoder_hidden_states"],
                             pooled_projections=c["pooled_projections"], return_dict=False)[0]

    def denoiser_memory(self, rows: int, guidance: bool, window_shape: Optional[Tuple[int, ...]] = None,
                        grad: bool = False) -> Optional[int]:
        """The MMDiT's block peak over a window's patch tokens and the prompt's CLIP + T5 tokens
        (:func:`~safa.adapters.working_memory.mmdit_forward_bytes`); unknown under ``grad``."""
        from .working_memory import mmdit_forward_bytes
        if window_shape is None or grad:
            return None
        cfg = self.denoiser.config
        patch = int(cfg.patch_size)
        image_tokens = (int(window_shape[-2]) // patch) * (int(window_shape[-1]) // patch)
        text_tokens = int(getattr(self.pipe, "tokenizer_max_length", 77)) + self.max_sequence_length
        width = int(cfg.num_attention_heads) * int(cfg.attention_head_dim)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return rows * (2 if guidance else 1) * mmdit_forward_bytes(image_tokens, text_tokens, width, itemsize)

    def _vae_input(self, latent: torch.Tensor) -> torch.Tensor:
        cfg = self.pipe.vae.config
        return latent / cfg.scaling_factor + (cfg.shift_factor or 0.0)
