"""Adapters for the mel-spectrogram latent diffusion family: AudioLDM, MusicLDM, AudioLDM2.

Latent ``(B, 8, T, F)`` with time on dim -2; the VAE decodes to a mel spectrogram
``(B, 1, T * vae_scale_factor, mel_bins)`` and the HiFi-GAN vocoder to a 16 kHz waveform.
With the released checkpoints: 100 mel frames per second, VAE factor 4, so 25 latent
frames per second and a native window of 10.24 s = 256 latent frames (what the models
were trained on; SaFa's default window).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from .base import AudioAdapter, Conditions, register_adapter

__all__ = ["AudioLDMAdapter", "MusicLDMAdapter", "AudioLDM2Adapter"]

# The AudioLDM family is trained on 10.24 s clips (paper, section 3.1).
NATIVE_WINDOW_SECONDS = 10.24


@register_adapter
class AudioLDMAdapter(AudioAdapter):
    """AudioLDM and MusicLDM: one CLAP text embedding per prompt, passed to the UNet as ``class_labels``."""

    pipeline_classes = ("AudioLDMPipeline",)
    long_dim = -2
    reference_axis = -2  # audio: the reference swap alternates along time (paper Eq. 10)
    decoded_dim = -2
    decode_context = 8  # latent frames each side of a tile: covers the VAE decoder's receptive field

    @property
    def decoded_scale(self) -> int:  # type: ignore[override]
        return int(self.pipe.vae_scale_factor)

    @property
    def finalize_scale(self) -> int:  # type: ignore[override]
        return int(math.prod(self.pipe.vocoder.config.upsample_rates))

    @property
    def sample_rate(self) -> int:
        return int(self.pipe.vocoder.config.sampling_rate)

    def native_window(self) -> int:
        return max(1, int(round(NATIVE_WINDOW_SECONDS * self.frames_per_second)))

    def latent_shape(self, batch_size: int, length: int, height: Optional[int] = None) -> Tuple[int, ...]:
        bins = int(self.pipe.vocoder.config.model_in_dim) // self.decoded_scale
        return (batch_size, int(self.pipe.unet.config.in_channels), int(length), bins)

    # -- conditions ------------------------------------------------------------------------
    def _encode(self, prompts: Optional[list], negative: Optional[list], cfg: bool,
                **embeds: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The pipeline's own encoder; returns a tuple of tensors, each ``[neg; pos]`` rows under CFG.

        ``prompts`` is None when ``embeds`` (``prompt_embeds`` and friends) are given.
        """
        return (self.pipe._encode_prompt(prompts, self.device, 1, cfg, negative, **embeds),)

    _keys: Tuple[str, ...] = ("class_labels",)
    embeds_arguments = ("prompt_embeds", "negative_prompt_embeds")

    def _conditions(self, rows: int, cfg: bool, prompts: Optional[list], negative: Optional[list],
                    **embeds: torch.Tensor) -> Conditions:
        with torch.no_grad():
            tensors = self._encode(prompts, negative, cfg, **embeds)
        if cfg:  # the pipelines return cat([negative, positive]) along dim 0
            return Conditions({k: v[rows:] for k, v in zip(self._keys, tensors)},
                              {k: v[:rows] for k, v in zip(self._keys, tensors)})
        return Conditions(dict(zip(self._keys, tensors)))

    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Optional[Sequence[str]],
                       guidance_scale: float) -> Conditions:
        prompts = list(prompts)
        cfg = guidance_scale > 1.0  # the pipelines' own rule for classifier-free guidance
        negative = (list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)) if cfg else None
        return self._conditions(len(prompts), cfg, prompts, negative)

    def conditions_from_embeds(self, embeds: Dict[str, torch.Tensor], guidance_scale: float) -> Conditions:
        # No negative embedding: the pipeline encodes "" itself for the unconditional branch.
        return self._conditions(int(embeds["prompt_embeds"].shape[0]), guidance_scale > 1.0, None, None, **embeds)

    # -- denoiser --------------------------------------------------------------------------
    def _denoise(self, x: torch.Tensor, t: torch.Tensor, c: Dict[str, torch.Tensor],
                 extra: Dict[str, Any]) -> torch.Tensor:
        return self.pipe.unet(x, t, encoder_hidden_states=None, class_labels=c["class_labels"]).sample

    # -- decoding --------------------------------------------------------------------------
    def decode_latents(self, latent: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        latent = latent.to(device=self.device, dtype=vae.dtype)
        return vae.decode(latent / vae.config.scaling_factor).sample

    def finalize(self, decoded: torch.Tensor) -> torch.Tensor:
        return self.pipe.mel_spectrogram_to_waveform(decoded)

    # -- encoding the user's audio (safa.known) ----------------------------------------------
    def log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """``(B, samples)`` -> ``(B, 1, samples / hop, mel_bins)``: the log-mel the family's VAE and
        vocoder were trained on (AudioLDM's: STFT with a window of 6.4 hops, 1024 at hop 160 and
        16 kHz, reflect-padded so that there is one frame per hop; Slaney mel filters up to half the
        rate; ``log(max(mel, 1e-5))``)."""
        from transformers.audio_utils import mel_filter_bank
        hop, rate = self.finalize_scale, self.sample_rate
        n_fft = 1 << max(1, math.ceil(math.log2(6.4 * hop)))
        bins = int(self.pipe.vocoder.config.model_in_dim)
        filters = torch.tensor(mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=bins,
                                               min_frequency=0.0, max_frequency=rate / 2, sampling_rate=rate,
                                               norm="slaney", mel_scale="slaney"), dtype=torch.float32)
        pad = (n_fft - hop) // 2
        x = torch.nn.functional.pad(waveform.float()[:, None], (pad, n_fft - hop - pad), mode="reflect")[:, 0]
        spec = torch.stft(x, n_fft, hop, window=torch.hann_window(n_fft), center=False, return_complex=True)
        mel = torch.einsum("bkt,km->btm", spec.abs(), filters)
        return torch.log(mel.clamp_min(1e-5))[:, None]

    def encode_audio(self, waveform: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        mel = self.log_mel(waveform[:, 0]).to(device=self.device, dtype=vae.dtype)
        return vae.encode(mel).latent_dist.mode() * vae.config.scaling_factor


@register_adapter
class MusicLDMAdapter(AudioLDMAdapter):
    """MusicLDM: like AudioLDM (CLAP embedding as ``class_labels``), but the text goes through ``ClapModel``.

    The prompt encoding is the pipeline's ``_encode_prompt``, re-done here because with
    transformers 5 ``ClapModel.get_text_features`` returns a model output whose
    ``pooler_output`` holds the features (diffusers' MusicLDM expects a tensor).
    """

    pipeline_classes = ("MusicLDMPipeline",)

    def _features(self, texts: list) -> torch.Tensor:
        pipe = self.pipe
        tokens = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        feats = pipe.text_encoder.get_text_features(tokens.input_ids.to(self.device),
                                                    attention_mask=tokens.attention_mask.to(self.device))
        if not isinstance(feats, torch.Tensor):
            feats = feats.pooler_output
        return feats.to(dtype=pipe.text_encoder.text_model.dtype, device=self.device)

    def _encode(self, prompts: Optional[list], negative: Optional[list], cfg: bool,
                **embeds: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        pos = embeds["prompt_embeds"] if prompts is None else self._features(prompts)
        if not cfg:
            return (pos,)
        if negative is None and "negative_prompt_embeds" not in embeds:
            negative = [""] * pos.shape[0]  # the pipeline's unconditional branch
        neg = embeds["negative_prompt_embeds"] if negative is None else self._features(negative)
        return (torch.cat([neg.to(pos.device), pos]),)


@register_adapter
class AudioLDM2Adapter(AudioLDMAdapter):
    """AudioLDM2: CLAP -> GPT-2 generated embeddings plus T5 embeddings with an attention mask."""

    pipeline_classes = ("AudioLDM2Pipeline",)
    _keys = ("prompt_embeds", "attention_mask", "generated_prompt_embeds")
    embeds_arguments = ()  # AudioLDM2 needs generated embeddings and masks too: prompts only here

    def _encode(self, prompts: Optional[list], negative: Optional[list], cfg: bool,
                **embeds: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(self.pipe.encode_prompt(prompts, self.device, 1, cfg, negative_prompt=negative))

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, c: Dict[str, torch.Tensor],
                 extra: Dict[str, Any]) -> torch.Tensor:
        return self.pipe.unet(x, t, encoder_hidden_states=c["generated_prompt_embeds"],
                              encoder_hidden_states_1=c["prompt_embeds"],
                              encoder_attention_mask_1=c["attention_mask"], return_dict=False)[0]
