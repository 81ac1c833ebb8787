"""Adapter for panoramas with FLUX.1 (``FluxPipeline``: MMDiT + single-stream DiT, rectified flow).

Latent: the pipeline draws ``(B, C, H, W)`` noise (``C = transformer.in_channels / 4``, VAE /8)
and packs it into a sequence of 2x2 patches, ``(B, H/2 * W/2, 4C)``, with positional ids
``(0, row, col)`` per token for the rotary embedding. The sampler works on the UNPACKED latent:
views are cut, merged and stepped there (the flow-matching step is elementwise, so stepping
the unpacked latent is the pipeline's step on the packed one, value for value), and
:meth:`FluxAdapter._denoise` packs each view just before the transformer and unpacks its output.
A window is therefore a multiple of 2 latent columns and the height a multiple of 16 pixels,
as the pipeline requires.

Positional ids: each view carries the ids of ITS OWN window, ``(0, 0..h/2-1, 0..w/2-1)``, not
those of its place on the canvas. Why: Flux's only positional signal is the rotary embedding,
whose image-image attention depends on position differences alone, so a shift of every image id
changes nothing there; but the text tokens all sit at id ``(0, 0, 0)``, so canvas ids would move
every view but the first ever further from its prompt in the text-image attention, to offsets
the model never saw in training (a 4096 px panorama puts the last view at column 256, beyond
FLUX.1's trained 2 MP). Own ids keep every view an in-distribution image, and a one-view call
is the pipeline's own call.

Guidance: FLUX.1-dev is guidance-distilled: ``guidance_scale`` is an input of the transformer
(``guidance_embeds``), not classifier-free guidance, and is passed to every window as the
pipeline does (FLUX.1-schnell has no such input, and ignores it as the pipeline does). The
pipeline's "true CFG" (``true_cfg_scale`` with a negative prompt) is not run here, so a negative
prompt is refused rather than silently ignored.

The schedule is the pipeline's: ``sigmas = linspace(1, 1/T, T)`` shifted by ``mu`` from the
token count of ONE window (the image the model actually denoises), as for SD3.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .base import Conditions, ImageAdapter, register_adapter

__all__ = ["FluxAdapter"]

_NO_TRUE_CFG = ("negative prompts need the Flux pipeline's true classifier-free guidance (true_cfg_scale), which "
                "safa does not run for Flux: guidance_scale is FLUX.1's distilled guidance; drop the negative prompt")


@register_adapter
class FluxAdapter(ImageAdapter):
    """``FluxPipeline``: CLIP pooled + T5 conditions, 2x2-packed latent tokens with own-window ids."""

    pipeline_classes = ("FluxPipeline",)
    _denoiser = "transformer"
    embeds_arguments = ("prompt_embeds", "pooled_prompt_embeds")

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        # Image ids depend only on the window's size (and live on the denoiser's device).
        self._image_ids: Dict[Tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def max_sequence_length(self) -> int:
        """The T5 prompt length: the pipeline's own default (512 for FLUX.1)."""
        return int(self.pipeline_default("max_sequence_length", 512))

    # -- geometry -------------------------------------------------------------------------
    def native_window(self) -> int:
        # The pipeline's default size (1024 px for FLUX.1): its transformer has no sample_size.
        return int(self.pipe.default_sample_size)

    def window_multiple(self) -> int:
        return 2  # the pipeline packs 2x2 latent patches into one token

    def latent_shape(self, batch_size: int, length: int, height: Optional[int] = None) -> Tuple[int, ...]:
        return (batch_size, int(self.denoiser.config.in_channels) // 4, self.latent_rows(height), int(length))

    # -- conditions -----------------------------------------------------------------------
    def _conditions(self, cfg: bool, **kwargs: Any) -> Conditions:
        if kwargs.pop("negative_prompt", None) is not None:
            raise ValueError(_NO_TRUE_CFG)
        with torch.no_grad():
            embeds, pooled, text_ids = self.pipe.encode_prompt(
                prompt_2=None, device=self.device, num_images_per_prompt=1,
                max_sequence_length=self.max_sequence_length, **kwargs)
        # text ids are the same for every row (all zeros): kept once, outside the per-row tensors
        return Conditions({"encoder_hidden_states": embeds, "pooled_projections": pooled},
                          extra={"txt_ids": text_ids})

    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Optional[Sequence[str]],
                       guidance_scale: float) -> Conditions:
        if negative_prompts is not None:
            raise ValueError(_NO_TRUE_CFG)
        return self._conditions(False, prompt=list(prompts))

    def conditions_from_embeds(self, embeds: Dict[str, torch.Tensor], guidance_scale: float) -> Conditions:
        return self._conditions(False, prompt=None, **embeds)

    # -- sampling -------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int, window_shape: Tuple[int, ...]) -> torch.Tensor:
        """The pipeline's sigmas and shift ``mu`` for the token count of one window."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
        scheduler = self.pipe.scheduler
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        seq_len = (int(window_shape[-2]) // 2) * (int(window_shape[-1]) // 2)
        mu = calculate_shift(seq_len, scheduler.config.get("base_image_seq_len", 256),
                             scheduler.config.get("max_image_seq_len", 4096),
                             scheduler.config.get("base_shift", 0.5), scheduler.config.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(scheduler, num_inference_steps, self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return timesteps

    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditions, guidance_scale: float) -> torch.Tensor:
        # No classifier-free guidance batch: guidance_scale is the transformer's own input.
        extra = dict(cond.extra, guidance_scale=guidance_scale)
        return self._denoise(latents, t, cond.positive, extra)

    def image_ids(self, rows: int, columns: int, dtype: torch.dtype) -> torch.Tensor:
        """Positional ids ``(rows/2 * columns/2, 3)`` of one window's tokens: its own positions."""
        key = (rows, columns, self.device, dtype)
        if key not in self._image_ids:
            self._image_ids[key] = self.pipe._prepare_latent_image_ids(1, rows // 2, columns // 2, self.device, dtype)
        return self._image_ids[key]

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, c: Dict[str, torch.Tensor],
                 extra: Dict[str, Any]) -> torch.Tensor:
        n, channels, rows, columns = x.shape
        pipe = self.pipe
        packed = pipe._pack_latents(x, n, channels, rows, columns)
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full([n], float(extra["guidance_scale"]), device=x.device, dtype=torch.float32)
        timestep = t.expand(n).to(x.dtype)
        out = self.denoiser(hidden_states=packed, timestep=timestep / 1000, guidance=guidance,
                            pooled_projections=c["pooled_projections"], encoder_hidden_states=c["encoder_hidden_states"],
                            txt_ids=extra["txt_ids"], img_ids=self.image_ids(rows, columns, extra["txt_ids"].dtype),
                            return_dict=False)[0]
        scale = pipe.vae_scale_factor
        return pipe._unpack_latents(out, rows * scale, columns * scale, scale)

    # -- decoding -------------------------------------------------------------------------
    def denoiser_memory(self, rows: int, guidance: bool, window_shape: Optional[Tuple[int, ...]] = None,
                        grad: bool = False) -> Optional[int]:
        """A single-stream block's peak over a window's packed 2x2 tokens plus the T5 tokens
        (:data:`~safa.adapters.working_memory.FLUX_SINGLE_MAPS`); guidance adds no batch (it is
        the transformer's input); unknown under ``grad``."""
        from .working_memory import FLUX_SINGLE_MAPS, dit_forward_bytes
        if window_shape is None or grad:
            return None
        cfg = self.denoiser.config
        tokens = (int(window_shape[-2]) // 2) * (int(window_shape[-1]) // 2) + self.max_sequence_length
        width = int(cfg.num_attention_heads) * int(cfg.attention_head_dim)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return rows * dit_forward_bytes(tokens, width, itemsize, FLUX_SINGLE_MAPS)

    def _vae_input(self, latent: torch.Tensor) -> torch.Tensor:
        cfg = self.pipe.vae.config
        return latent / cfg.scaling_factor + cfg.shift_factor
