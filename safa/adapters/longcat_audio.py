"""Adapter for LongCat-AudioDiT (``LongCatAudioDiTPipeline``): a flow-matching DiT over a 1-D latent.

Latent ``(B, T, latent_dim)`` with time on dim -2 (64 channels for the 1B checkpoint); its
convolutional VAE decodes ``(B, latent_dim, T)`` (the pipeline permutes) to
``downsampling_ratio`` mono samples per frame (2048 at 24 kHz: ~11.7 frames per second).

Native window: the pipeline caps ``audio_duration_s`` at its ``max_wav_duration`` (30 s), so
30 s of frames is the window; beyond it, joint diffusion (``window=`` chooses shorter windows).
Below one window the call is the pipeline's own. The pipeline rounds the length DOWN to whole
frames (``int(s * sample_rate // ratio)``); here, as for every audio family, it is rounded up
and the decoded audio cropped to exactly the requested seconds, so the two agree whenever the
duration is a whole number of frames.

Duration: the model has no duration input; the pipeline's ``audio_duration_s`` only sets the
number of frames, with an all-true frame mask. Every view is a whole window with its own
all-true mask: each window is conditioned on its own length, as a one-view call is.

Text: the pipeline lower-cases and normalises the prompt, encodes it with UMT5 (final hidden
state layer-normed, plus the layer-normed input embeddings) and pads a batch of prompts to the
longest with a text mask. The text ConvNeXt's GRN normalises over the whole padded sequence,
so the padding length matters: the conditional and unconditional branches run as two model
calls, as the pipeline runs them, rather than padded into one batch. Without a negative prompt
the unconditional branch is the pipeline's: zero text embeddings under the prompt's mask.

Sampler: ``FlowMatchEulerDiscreteScheduler`` with ``invert_sigmas`` (sigma counts up from noise
to data: ``x_t = s x0 + (1 - s) eps``, the model predicts ``x0 - eps``) on the pipeline's
linear schedule ``linspace(1, 1/n, n)`` and its timestep ``t / num_train_timesteps``. Euler is
deterministic and keeps only the step index, so all views step as one batch. SyncDiffusion and
SaFaStats read x0 through :mod:`safa.schedulers`, which knows ``invert_sigmas``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from .base import AudioAdapter, Conditions, register_adapter

__all__ = ["LongCatAudioAdapter"]


@register_adapter
class LongCatAudioAdapter(AudioAdapter):
    pipeline_classes = ("LongCatAudioDiTPipeline",)
    long_dim = -2
    reference_axis = -2  # audio: the reference swap alternates along time (paper Eq. 10)
    decoded_dim = -1
    finalize_scale = 1
    _denoiser = "transformer"

    # -- geometry -----------------------------------------------------------------------------
    @property
    def decoded_scale(self) -> int:  # type: ignore[override]
        return int(self.pipe.vae_scale_factor)

    @property
    def decode_context(self) -> int:  # type: ignore[override]
        # The decoder is convolutions only (no attention, no normalisation), so a tile decoded
        # with its receptive field as context equals the whole decode up to float rounding.
        # Reach in latent frames: the input conv (kernel 7), then per upsampling block a
        # transposed conv (kernel 2s: one input frame each side) and three residual units of
        # kernel 7, dilations 1, 3, 9 (3 * 13 samples of that level each side), and the output
        # conv (3 samples), each divided by the samples per latent frame at its level.
        strides = self._decoder_strides()
        reach, rate = 3.0, 1
        for stride in reversed(strides):
            reach += 1.0 / rate
            rate *= stride
            reach += 39.0 / rate
        return int(math.ceil(reach + 3.0 / rate)) + 1

    def _decoder_strides(self) -> list:
        # The VAE's own rule (AudioDiTVaeDecoder): one stride per c_mults entry, the last repeated.
        cfg = self.pipe.vae.config
        levels = len(cfg.c_mults or [1, 2, 4, 8, 16])
        strides = list(cfg.strides or [2] * levels)
        return (strides + [strides[-1] if strides else 2] * levels)[:levels]

    @property
    def sample_rate(self) -> int:
        return int(self.pipe.sample_rate)


    def native_window(self) -> int:
        return int(float(self.pipe.max_wav_duration) * self.sample_rate // self.decoded_scale)

    def latent_shape(self, batch_size: int, length: int, height: Optional[int] = None) -> Tuple[int, ...]:
        return (batch_size, int(length), int(self.pipe.latent_dim))

    # -- conditions ---------------------------------------------------------------------------
    def _encode(self, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        from diffusers.pipelines.longcat_audio_dit.pipeline_longcat_audio_dit import _normalize_text
        text, lengths = self.pipe.encode_prompt([_normalize_text(p) for p in prompts], self.device)
        return {"text": text, "lengths": lengths}

    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Optional[Sequence[str]],
                       guidance_scale: float) -> Conditions:
        positive = self._encode(prompts)
        if not guidance_scale > 1.0:  # the pipeline's own rule
            return Conditions(positive)
        if negative_prompts is None:  # the pipeline's unconditional branch: zero text, the prompt's mask
            return Conditions(positive, {"text": torch.zeros_like(positive["text"]), "lengths": positive["lengths"]})
        return Conditions(positive, self._encode(list(negative_prompts)))

    # -- sampling ---------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int, window_shape: Tuple[int, ...]) -> torch.Tensor:
        """The pipeline's linear sigmas ``linspace(1, 1/n, n)``, inverted by its scheduler."""
        scheduler = self.pipe.scheduler
        sigmas = torch.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps, dtype=torch.float32).tolist()
        scheduler.set_timesteps(sigmas=sigmas, device=self.device)
        scheduler.set_begin_index(0)
        return scheduler.timesteps

    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditions, guidance_scale: float) -> torch.Tensor:
        # Two calls, as the pipeline makes them (the text's padding length changes the text
        # ConvNeXt's GRN, see the module docstring), combined in the pipeline's order.
        prediction = self._denoise(latents, t, cond.positive, cond.extra)
        if cond.negative is None:
            return prediction
        unconditional = self._denoise(latents, t, cond.negative, cond.extra)
        return unconditional + (prediction - unconditional) * guidance_scale

    def denoiser_memory(self, rows: int, guidance: bool, window_shape: Optional[Tuple[int, ...]] = None,
                        grad: bool = False) -> Optional[int]:
        """The DiT's block peak over a window's frames
        (:func:`~safa.adapters.working_memory.longcat_dit_maps`); guidance runs the two branches
        as two calls (:meth:`predict`), so it does not double the batch; unknown under ``grad``."""
        from .working_memory import dit_forward_bytes, longcat_dit_maps
        if window_shape is None or grad:
            return None
        cfg = self.pipe.transformer.config
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return rows * dit_forward_bytes(int(window_shape[-2]), int(cfg.dit_dim), itemsize,
                                        longcat_dit_maps(float(cfg.ff_mult)))

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, c: Dict[str, torch.Tensor],
                 extra: Dict[str, Any]) -> torch.Tensor:
        from diffusers.pipelines.longcat_audio_dit.pipeline_longcat_audio_dit import _lens_to_mask
        n, frames = x.shape[0], x.shape[1]
        text = c["text"]
        t = torch.as_tensor(t, device=x.device)
        timestep = t / self.pipe.scheduler.config.num_train_timesteps
        timestep = (timestep.reshape(-1) if timestep.numel() == n else timestep.expand(n)).to(dtype=text.dtype)
        # Every window is sound over its whole length: an all-true frame mask, as the pipeline's.
        frame_mask = _lens_to_mask(torch.full((n,), frames, device=x.device, dtype=torch.long))
        return self.pipe.transformer(
            hidden_states=x, encoder_hidden_states=text,
            encoder_attention_mask=_lens_to_mask(c["lengths"], length=text.shape[1]), timestep=timestep,
            attention_mask=frame_mask, latent_cond=torch.zeros(n, frames, x.shape[2], device=x.device, dtype=text.dtype),
        ).sample

    # -- decoding -------------------------------------------------------------------------------
    def decode_latents(self, latent: torch.Tensor) -> torch.Tensor:
        return self.pipe.vae.decode(latent.to(device=self.device).permute(0, 2, 1)).sample

    def finalize(self, decoded: torch.Tensor) -> torch.Tensor:
        return decoded.float().cpu()  # the pipeline does not clamp its waveform

    def output_elements_per_column(self, height: Optional[int] = None) -> int:
        return int(self.pipe.vae.config.in_channels)
