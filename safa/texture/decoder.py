"""Decoder of texture latents to audio: latent -> log-mel -> linear magnitude -> Griffin-Lim.

Two stages, mirroring a latent audio model's VAE + vocoder so that the sampler's whole,
per-view and tiled decodes all apply:

1. :meth:`TextureDecoder.latent_to_mel` (the "VAE"): a fixed channel-wise linear map
   (the paper's Eq. 5 connectivity: latent channels combine linearly into the feature),
   then linear upsampling by ``time_scale`` in time and to ``n_mels`` bins in frequency,
   giving a natural-log mel magnitude ``(B, 1, T * time_scale, n_mels)``.
2. :meth:`TextureDecoder.mel_to_audio` (the "vocoder"): interpolate the log magnitude from
   the mel axis onto the STFT's linear bins, exponentiate, and run fast Griffin-Lim
   (torch.stft / istft, momentum 0.99) with a seeded initial phase, so decoding is
   deterministic.  ``hop`` samples per mel frame at ``sample_rate``.

At the defaults (25 latent frames/s, ``time_scale`` 4, hop 160, 16 kHz) one latent frame is
40 ms of audio, like AudioLDM.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["TextureDecoder"]


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + f / 700.0)


class TextureDecoder:
    """Deterministic latent -> waveform decoder for :class:`~safa.texture.model.TextureModel` latents."""

    def __init__(self, channels: int = 8, freq_bins: int = 16, n_mels: int = 64, time_scale: int = 4,
                 sample_rate: int = 16000, n_fft: int = 1024, hop: int = 160, griffin_lim_iters: int = 32,
                 log_gain: float = 1.5, seed: int = 0) -> None:
        self.channels, self.freq_bins, self.n_mels = channels, freq_bins, n_mels
        self.time_scale, self.sample_rate, self.n_fft, self.hop = time_scale, sample_rate, n_fft, hop
        self.iters, self.log_gain, self.seed = griffin_lim_iters, log_gain, seed
        gen = np.random.default_rng(seed + 1)
        w = np.abs(gen.standard_normal(channels)) + 0.5  # positive mixing weights: channels add up
        self.channel_weights = torch.tensor(w / np.linalg.norm(w), dtype=torch.float32)
        # Log-magnitude offset per mel bin: a gentle pink tilt so textures are not harsh.
        m = np.arange(n_mels)
        self.mel_offset = torch.tensor(0.5 - 1.5 * m / max(1, n_mels - 1), dtype=torch.float32)
        # Fractional mel-bin position of each linear STFT bin, for interpolation.
        freqs = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
        pos = _hz_to_mel(freqs) / _hz_to_mel(np.array(sample_rate / 2.0)) * (n_mels - 1)
        lo = np.clip(np.floor(pos).astype(np.int64), 0, n_mels - 2)
        self._lo = torch.tensor(lo)
        self._frac = torch.tensor(pos - lo, dtype=torch.float32)
        self.window = torch.hann_window(n_fft)
        # Fixed output gain (not per-call normalisation, so tiles of a long decode match).
        self.out_gain = 1.0

    # -- stage 1: latent -> log mel ------------------------------------------------------
    @property
    def frames_per_second(self) -> float:
        """Latent frames per second of audio."""
        return self.sample_rate / (self.time_scale * self.hop)

    def latent_to_mel(self, latent: torch.Tensor) -> torch.Tensor:
        """``(B, C, T, F)`` latent -> ``(B, 1, T * time_scale, n_mels)`` natural-log mel magnitude."""
        b, c, t, f = latent.shape
        if (c, f) != (self.channels, self.freq_bins):
            raise ValueError(f"decoder expects (B, {self.channels}, T, {self.freq_bins}), got {tuple(latent.shape)}")
        u = torch.einsum("bctf,c->btf", latent.float(), self.channel_weights.to(latent.device))
        u = torch.nn.functional.interpolate(u[:, None], size=(t * self.time_scale, self.n_mels),
                                            mode="bilinear", align_corners=False)
        return self.log_gain * u + self.mel_offset.to(u.device)

    # -- stage 2: log mel -> waveform ----------------------------------------------------
    def mel_to_linear(self, log_mel: torch.Tensor) -> torch.Tensor:
        """``(B, 1, T, n_mels)`` log mel -> ``(B, n_fft//2+1, T)`` linear magnitude."""
        lm = log_mel[:, 0].float()                                   # (B, T, M)
        lo, frac = self._lo.to(lm.device), self._frac.to(lm.device)
        lin = lm[..., lo] * (1 - frac) + lm[..., lo + 1] * frac       # (B, T, K)
        return torch.exp(lin).transpose(1, 2)

    def griffin_lim(self, magnitude: torch.Tensor) -> torch.Tensor:
        """Fast Griffin-Lim: ``(B, K, T)`` magnitude -> ``(B, T * hop)`` waveform."""
        b, k, t = magnitude.shape
        win = self.window.to(magnitude.device)
        # One extra frame so that istft(center=True) returns exactly T * hop samples.
        mag = torch.cat([magnitude, magnitude[..., -1:]], dim=-1)
        length = t * self.hop
        gen = torch.Generator().manual_seed(self.seed)
        phase = torch.rand(mag.shape, generator=gen, dtype=torch.float32).to(mag.device) * (2 * math.pi)
        spec = torch.polar(mag, phase)
        prev = torch.zeros_like(spec)
        audio = torch.istft(spec, self.n_fft, self.hop, window=win, length=length)
        for _ in range(self.iters):
            rebuilt = torch.stft(audio, self.n_fft, self.hop, window=win, return_complex=True)
            accel = rebuilt - 0.99 * prev                             # momentum (Perraudin et al. 2013)
            prev = rebuilt
            # Keep the phase of `accel`, impose `mag` (cheaper than exp(1j * angle)).
            spec = accel * (mag / accel.abs().clamp_min(1e-12))
            audio = torch.istft(spec, self.n_fft, self.hop, window=win, length=length)
        return audio

    def mel_to_audio(self, log_mel: torch.Tensor) -> torch.Tensor:
        """``(B, 1, T, n_mels)`` log mel -> ``(B, T * hop)`` float32 waveform in ``(-1, 1)``."""
        audio = self.griffin_lim(self.mel_to_linear(log_mel)) * self.out_gain
        return torch.tanh(audio).float().cpu()                       # soft limiter, never clips

    def __call__(self, latent: torch.Tensor) -> torch.Tensor:
        return self.mel_to_audio(self.latent_to_mel(latent))
