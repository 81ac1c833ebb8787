"""Adapter for panoramas with FLUX.2 [klein] (``Flux2KleinPipeline``: text to image).

Latent: the pipeline draws its noise PATCHIFIED, ``(B, 4C, H/16, W/16)`` (the VAE's /8 latent
of ``C`` channels in 2x2 patches: 128 channels for the released models), and packs it into a
sequence of tokens ``(B, H/16 * W/16, 4C)`` with 4-D positional ids ``(t=0, row, col, l=0)``.
The sampler works on that patchified latent: one latent column is 16 pixels, views are cut,
merged and stepped there (the flow-matching step is elementwise), and
:meth:`Flux2KleinAdapter._denoise` packs each view just before the transformer and unpacks its
output. The noise is drawn in the pipeline's own shape, so a one-view call is the pipeline's.

Positional ids: each view carries the ids of ITS OWN window (as for FLUX.1, safa/adapters/flux.py:
the rotary embedding sees position differences only among image tokens, and own ids keep every
view an in-distribution image whose text tokens sit where training put them).

Text: the pipeline's Qwen3 chat-template encoding (three hidden layers stacked). Guidance: the
base [klein] models run true classifier-free guidance (``guidance_scale > 1``) against the
empty prompt, as the pipeline does; a ``negative_prompt`` here replaces that empty prompt (the
pipeline itself takes only ``negative_prompt_embeds``). The distilled models
(``is_distilled``) take no guidance, as the pipeline. Schedule: ``sigmas = linspace(1, 1/T, T)``
shifted by the pipeline's empirical ``mu`` for the token count of ONE window. Decoding: the
latent's batch-norm statistics restored, unpatchified, ``vae.decode``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .base import Conditions, ImageAdapter, register_adapter

__all__ = ["Flux2KleinAdapter"]


@register_adapter
class Flux2KleinAdapter(ImageAdapter):
    """``Flux2KleinPipeline``: Qwen3 text, patchified 2x2 latent tokens with own-window 4-D ids."""

    pipeline_classes = ("Flux2KleinPipeline",)
    _denoiser = "transformer"
    embeds_arguments = ("prompt_embeds", "negative_prompt_embeds")

    # -- geometry -----------------------------------------------------------------------------
    @property
    def decoded_scale(self) -> int:  # type: ignore[override]
        return int(self.pipe.vae_scale_factor) * 2  # a patchified latent column is 2 VAE columns

    def native_window(self) -> int:
        # The pipeline's default size (default_sample_size VAE latents: 1024 px), in patchified columns.
        return int(self.pipe.default_sample_size) * int(self.pipe.vae_scale_factor) // self.decoded_scale

    # -- conditions ---------------------------------------------------------------------------
    def _guided(self, guidance_scale: float) -> bool:
        return guidance_scale > 1.0 and not self.pipe.config.is_distilled  # the pipeline's own rule

    def _encode(self, **kwargs: Any) -> Dict[str, torch.Tensor]:
        with torch.no_grad():
            embeds, ids = self.pipe.encode_prompt(device=self.device, **kwargs)
        return {"text": embeds, "text_ids": ids}

    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Optional[Sequence[str]],
                       guidance_scale: float) -> Conditions:
        positive = self._encode(prompt=list(prompts))
        if not self._guided(guidance_scale):
            return Conditions(positive)
        negative = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
        return Conditions(positive, self._encode(prompt=negative))

    def conditions_from_embeds(self, embeds: Dict[str, torch.Tensor], guidance_scale: float) -> Conditions:
        positive = self._encode(prompt=None, prompt_embeds=embeds["prompt_embeds"])
        if not self._guided(guidance_scale):
            return Conditions(positive)
        rows = embeds["prompt_embeds"].shape[0]
        if "negative_prompt_embeds" in embeds:
            return Conditions(positive, self._encode(prompt=None, prompt_embeds=embeds["negative_prompt_embeds"]))
        return Conditions(positive, self._encode(prompt=[""] * rows))

    # -- sampling -----------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int, window_shape: Tuple[int, ...]) -> torch.Tensor:
        """The pipeline's sigmas and empirical shift ``mu`` for one window's tokens."""
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
        scheduler = self.pipe.scheduler
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        mu = compute_empirical_mu(image_seq_len=int(window_shape[-2] * window_shape[-1]),
                                  num_steps=num_inference_steps)
        if sigmas is None:
            scheduler.set_timesteps(num_inference_steps, device=self.device, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        return scheduler.timesteps

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, c: Dict[str, torch.Tensor],
                 extra: Dict[str, Any]) -> torch.Tensor:
        n, channels, rows, columns = x.shape
        transformer = self.pipe.transformer
        tokens = x.reshape(n, channels, rows * columns).permute(0, 2, 1)  # the pipeline's _pack_latents
        # Own-window ids (t, row, col, l), as the pipeline's _prepare_latent_ids for one window.
        ids = torch.cartesian_prod(torch.arange(1), torch.arange(rows), torch.arange(columns), torch.arange(1))
        t = torch.as_tensor(t, device=x.device)
        timestep = (t.reshape(-1) if t.numel() == n else t.reshape(()).expand(n)).to(x.dtype)
        out = transformer(hidden_states=tokens.to(transformer.dtype), timestep=timestep / 1000, guidance=None,
                          encoder_hidden_states=c["text"], txt_ids=c["text_ids"],
                          img_ids=ids.to(x.device).expand(n, -1, -1), return_dict=False)[0]
        return out[:, :rows * columns].permute(0, 2, 1).reshape(n, channels, rows, columns)

    # -- decoding -----------------------------------------------------------------------------
    def decode_latents(self, latent: torch.Tensor) -> torch.Tensor:
        pipe = self.pipe
        vae = pipe.vae
        latent = latent.to(device=self.device)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latent.device, latent.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latent.device,
                                                                                                latent.dtype)
        latent = pipe._unpatchify_latents(latent * std + mean)
        return vae.decode(latent.to(vae.dtype), return_dict=False)[0]

    # -- memory -------------------------------------------------------------------------------
    def denoiser_memory(self, rows: int, guidance: bool, window_shape: Optional[Tuple[int, ...]] = None,
                        grad: bool = False) -> Optional[int]:
        """The transformer's feed-forward peak over one window's image and text tokens (per row;
        guidance doubles the batch); unknown under ``grad``."""
        from .working_memory import dit_forward_bytes
        if window_shape is None or grad:
            return None
        config = self.denoiser.config
        tokens = int(window_shape[-2] * window_shape[-1]) + int(self.pipe.tokenizer_max_length)
        width = int(config.num_attention_heads * config.attention_head_dim)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        # The residual and its norm, then SwiGLU: 2 x mlp_ratio in, mlp_ratio out (not yet checked
        # against a full-width block, as SD3's and FLUX.1's are).
        maps = 3 + int(np.ceil(3 * float(config.mlp_ratio)))
        return rows * (2 if guidance else 1) * dit_forward_bytes(tokens, width, itemsize, maps)
