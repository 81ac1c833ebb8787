"""Adapter for Stable Audio 3 (``StableAudio3Pipeline``): a rectified-flow DiT over a 1-D latent.

Latent ``(B, latent_dim, T)`` with time last (256 channels for SA3 Medium); the SAME autoencoder
decodes one latent frame to ``downsampling_ratio`` stereo samples (4096 at 44.1 kHz: ~10.8 frames
per second). The pipeline has no fixed window: it generates ``ceil(duration * fps)`` frames.

Native window: the longest duration the model can be told, the duration embedder's ``max_val``
(384 s for SA3 Medium; longer durations are clamped by the embedder). Beyond it, joint diffusion;
``window=`` chooses shorter windows. Below one window the call is the pipeline's own at the
requested length (:meth:`short_window` is the base rule: the requested frames).

Duration conditioning, per window: the pipeline embeds ``duration`` seconds once as the global
(AdaLN) condition and as one extra cross-attention token after the text. Every view and the
reference is a complete window of sound, so each is conditioned on its own length in seconds
(at most the requested length, as a one-view call of the pipeline is). The pipeline's
``silence_padding_duration`` (default 0) adds frames that the duration condition asks to be
silent and then cuts them: a long output has no such tail to cut, so it is not applied.

Sampler: the distilled checkpoint's ping-pong sampling is ``FlowMatchEulerDiscreteScheduler``
with ``stochastic_sampling``: each step predicts ``x0 = x - sigma v`` and re-noises it to the
next sigma with fresh noise drawn for the whole batch. Its only state is the step index, shared
by every row, so stepping all views as one batch is right; the fresh noise is per row. The swap
methods keep one view's value in each overlap cell, so the re-noise keeps its variance there;
the averaging methods (MD, MD*) average two independent draws in overlaps, which lowers the
re-noise's variance there (to half for MD's equal weights), as with any ancestral scheduler. The schedule is the pipeline's log-SNR sigmas,
and its default step count (8 ping-pong steps, 100 for the base checkpoint's Euler).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from .base import AudioAdapter, Conditions, register_adapter

__all__ = ["StableAudio3Adapter"]


@register_adapter
class StableAudio3Adapter(AudioAdapter):
    pipeline_classes = ("StableAudio3Pipeline",)
    long_dim = -1
    reference_axis = -1  # audio: the reference swap alternates along time (paper Eq. 10)
    decoded_dim = -1
    finalize_scale = 1
    _denoiser = "transformer"
    embeds_arguments = ("prompt_embeds", "negative_prompt_embeds")

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        self._duration: Dict[Tuple[float, torch.device], torch.Tensor] = {}

    # -- geometry -----------------------------------------------------------------------------
    @property
    def decoded_scale(self) -> int:  # type: ignore[override]
        return int(self.pipe.vae.downsampling_ratio)

    @property
    def decode_context(self) -> int:  # type: ignore[override]
        # The SAME decoder's transformers attend within +-sliding_window latent frames per layer
        # (a band mask); its RoPE is relative, so with this context a tiled decode equals the
        # whole decode up to float rounding. One frame more for the patch boundary.
        cfg = self.pipe.vae.config
        return int(cfg.sliding_window) * sum(cfg.encoder_transformer_depths) + 1

    @property
    def sample_rate(self) -> int:
        return int(self.pipe.vae.config.sampling_rate)


    def native_window(self) -> int:
        return int(float(self.pipe.duration_embedder.config.max_val) * self.frames_per_second)

    def latent_shape(self, batch_size: int, length: int, height: Optional[int] = None) -> Tuple[int, ...]:
        return (batch_size, int(self.pipe.vae.config.latent_dim), int(length))

    def pipeline_default(self, name: str, fallback: Any) -> Any:
        if name == "num_inference_steps":  # the pipeline's None: 8 ping-pong steps, or 100 Euler steps
            return 8 if self.pipe.scheduler.config.get("stochastic_sampling", False) else 100
        return super().pipeline_default(name, fallback)

    # -- conditions ---------------------------------------------------------------------------
    def _encode(self, prompts: Optional[Sequence[str]], embeds: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        with torch.no_grad():
            text, mask = self.pipe.encode_prompt(None if prompts is None else list(prompts), self.device, 1, embeds)
        return {"text": text, "mask": mask}

    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Optional[Sequence[str]],
                       guidance_scale: float) -> Conditions:
        positive = self._encode(prompts)
        if not guidance_scale > 1.0:  # the pipeline's own rule
            return Conditions(positive)
        # the pipeline's unconditional branch without a negative prompt: "" per prompt
        return Conditions(positive, self._encode(list(negative_prompts) if negative_prompts is not None
                                                 else [""] * len(prompts)))

    def conditions_from_embeds(self, embeds: Dict[str, torch.Tensor], guidance_scale: float) -> Conditions:
        positive = self._encode(None, embeds["prompt_embeds"])
        if not guidance_scale > 1.0:
            return Conditions(positive)
        negative = embeds.get("negative_prompt_embeds")
        rows = int(embeds["prompt_embeds"].shape[0])
        return Conditions(positive, self._encode(None, negative) if negative is not None else self._encode([""] * rows))

    def _duration_state(self, seconds: float) -> torch.Tensor:
        """The duration embedding ``(1, D)`` of ``seconds`` (the pipeline's ``encode_duration``)."""
        key = (seconds, self.device)
        if key not in self._duration:
            with torch.no_grad():
                self._duration[key] = self.pipe.encode_duration(seconds, self.device, 1, 1)
        return self._duration[key]

    # -- sampling ---------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int, window_shape: Tuple[int, ...]) -> torch.Tensor:
        """The pipeline's log-SNR-warped sigmas (its default ``logsnr_min`` / ``logsnr_max``)."""
        from diffusers.pipelines.stable_audio_3.pipeline_stable_audio_3 import (logsnr_sigma_schedule,
                                                                                retrieve_timesteps)
        sigmas = logsnr_sigma_schedule(num_inference_steps, self.pipeline_default("logsnr_min", -6.2),
                                       self.pipeline_default("logsnr_max", 2.0))
        timesteps, _ = retrieve_timesteps(self.pipe.scheduler, sigmas=sigmas, device=self.device)
        return timesteps

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, c: Dict[str, torch.Tensor],
                 extra: Dict[str, Any]) -> torch.Tensor:
        n, frames = x.shape[0], x.shape[-1]
        # Each window is sound over its whole length, at most the requested length (a one-view
        # call: the pipeline's own duration).
        seconds = frames / self.frames_per_second
        if extra.get("seconds") is not None:
            seconds = min(seconds, float(extra["seconds"]))
        global_states = self._duration_state(seconds).expand(n, -1)
        context, mask = self.pipe.prepare_cross_attention(c["text"], c["mask"], global_states)
        return self.pipe.transformer(x, t.expand(n), encoder_hidden_states=context, global_hidden_states=global_states,
                                     encoder_attention_mask=mask, return_dict=False)[0]

    def denoiser_memory(self, rows: int, guidance: bool, window_shape: Optional[Tuple[int, ...]] = None,
                        grad: bool = False) -> Optional[int]:
        """The DiT's block peak over a window's frames plus its memory tokens
        (:func:`~safa.adapters.working_memory.glu_dit_maps`); unknown under ``grad``."""
        from .working_memory import dit_forward_bytes, glu_dit_maps
        if window_shape is None or grad:
            return None
        cfg = self.pipe.transformer.config
        tokens = int(window_shape[-1]) // int(cfg.patch_size) + int(cfg.num_memory_tokens)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        per_row = dit_forward_bytes(tokens, int(cfg.embed_dim), itemsize, glu_dit_maps(float(cfg.ff_mult)))
        return rows * (2 if guidance else 1) * per_row

    # -- decoding -------------------------------------------------------------------------------
    def decode_latents(self, latent: torch.Tensor) -> torch.Tensor:
        return self.pipe.vae.decode(latent.to(device=self.device, dtype=self.pipe.vae.dtype)).sample

    def finalize(self, decoded: torch.Tensor) -> torch.Tensor:
        return decoded.float().cpu().clamp(-1.0, 1.0)  # the pipeline clamps the waveform

    def output_elements_per_column(self, height: Optional[int] = None) -> int:
        return int(self.pipe.vae.config.audio_channels)
