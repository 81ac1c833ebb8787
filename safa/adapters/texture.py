"""Adapter for the built-in analytic texture model (:class:`safa.texture.TexturePipeline`).

Latent ``(B, 8, T, 16)`` with time on dim -2 at 25 frames per second (like AudioLDM);
the "VAE" stage is the texture decoder's latent -> log-mel map (4 mel frames per latent
frame) and the "vocoder" stage is Griffin-Lim (hop 160 at 16 kHz).  Conditions are the
model's class-weight vectors (``class_weights``: one-hot for a class name, the class
prior for ``""``), so classifier-free guidance batches exactly like text embeddings.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from .base import AudioAdapter, Conditions, register_adapter

__all__ = ["TextureAdapter"]


class AnalyticConditions:
    """Prompts and denoiser of the built-in analytic pipelines (1-D and 2-D): a prompt is class
    weights, the denoiser the pipeline's exact one. Mixed into their adapters."""

    pipe: Any
    device: torch.device

    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Optional[Sequence[str]],
                       guidance_scale: float) -> Conditions:
        prompts = list(prompts)
        pos = {"class_weights": self.pipe.encode_prompt(prompts).to(self.device)}
        if guidance_scale > 1.0:  # the pipeline's own rule for classifier-free guidance
            neg = self.pipe.encode_prompt(list(negative_prompts) if negative_prompts is not None
                                          else [""] * len(prompts)).to(self.device)
            return Conditions(pos, {"class_weights": neg})
        return Conditions(pos)

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, c: Dict[str, torch.Tensor],
                 extra: Dict[str, Any]) -> torch.Tensor:
        return self.pipe.denoise(x, t, c["class_weights"])


@register_adapter
class TextureAdapter(AnalyticConditions, AudioAdapter):
    """The texture model behind the adapter protocol; the model acts where a UNet does."""

    pipeline_classes = ("TexturePipeline",)
    long_dim = -2
    reference_axis = -2
    decoded_dim = -2
    # Decoding is bilinear upsampling (receptive field 1 latent frame) then Griffin-Lim,
    # whose STFT spans 1024 samples = 1.6 latent frames; 4 frames of context each side of a
    # tile keeps tile edges out of the kept output.
    decode_context = 4
    fixed_window = True  # the model is defined on its window only (it raises on anything else)

    @property
    def decoded_scale(self) -> int:  # type: ignore[override]
        return int(self.pipe.decoder.time_scale)

    @property
    def finalize_scale(self) -> int:  # type: ignore[override]
        return int(self.pipe.decoder.hop)

    @property
    def sample_rate(self) -> int:
        return int(self.pipe.decoder.sample_rate)

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.dtype

    def native_window(self) -> int:
        # The model is defined on exactly this many frames (it raises on anything else).
        return int(self.pipe.model.window)

    def latent_shape(self, batch_size: int, length: int, height: Optional[int] = None) -> Tuple[int, ...]:
        m = self.pipe.model
        return (batch_size, int(m.channels), int(length), int(m.freq_bins))

    def check_window(self, window: int) -> None:
        if window != self.native_window():
            raise ValueError(f"this texture model is defined on windows of exactly "
                             f"{self.describe_columns(self.native_window())}, got window "
                             f"{self.describe_columns(window)}: build one for that window with "
                             f"make_texture_pipeline(window_frames=window_frames(seconds))")

    def short_window(self, columns: int) -> int:
        # The pipeline only samples its own window: a shorter output is that window, cropped.
        return self.native_window()


    # Memory (safa.memory). The denoiser rotates every row into each mixture component's
    # eigenbasis: per row about 5 (components, C*F, T) coefficient tensors plus part of a
    # broadcast (components, C*F, C*F) rotation, and per call ~10 float64 per-component
    # statistics of one window. Fitted to peak RSS of predict() on 8 and 32 windows with
    # guidance at windows of 32 and 256 frames (within 12% at all four); all components: an
    # upper bound, since a class prompt without guidance uses only its own.
    def denoiser_memory(self, rows: int, guidance: bool, window_shape: Optional[Tuple[int, ...]] = None,
                        grad: bool = False) -> Optional[int]:
        if grad:  # the exact denoiser is never differentiated through by the built-in methods
            return None
        m = self.pipe.model
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        cf = m.channels * m.freq_bins
        coefficients = m.num_components * cf * m.window * itemsize
        rotation = m.num_components * cf * cf * itemsize
        statistics = 10 * m.num_components * cf * m.window * 8
        return int(rows * (2 if guidance else 1) * (5 * coefficients + 0.7 * rotation) + statistics)

    # Griffin-Lim holds about ten complex64-sized tensors per STFT bin and frame (magnitude,
    # phase, spectrum, momentum, rebuilt, ...): measured 142-180 KiB per latent column.
    _DECODE_BYTES_PER_BIN = 80

    def decoder_memory(self, columns: int, batch_size: int, grad: bool = False,
                       height: Optional[int] = None) -> Optional[int]:
        if grad:
            return None
        d = self.pipe.decoder
        return batch_size * columns * d.time_scale * (d.n_fft // 2 + 1) * self._DECODE_BYTES_PER_BIN

    def decode_latents(self, latent: torch.Tensor) -> torch.Tensor:
        return self.pipe.decoder.latent_to_mel(latent.to(self.device, torch.float32))

    def finalize(self, decoded: torch.Tensor) -> torch.Tensor:
        return self.pipe.decoder.mel_to_audio(decoded)

    def encode_audio(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.pipe.encode_audio(waveform[:, 0]).to(device=self.device, dtype=self.dtype)
