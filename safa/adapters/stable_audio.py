"""Adapter for Stable Audio Open (``StableAudioPipeline``): a DiT over a 1-D latent.

Latent ``(B, 64, T)`` with time last; the Oobleck VAE decodes one latent frame to ``hop_length``
(2048) stereo samples at 44.1 kHz, so about 21.5 latent frames per second. The native window is
the transformer's ``sample_size`` (1024 frames, 47.55 s for the released checkpoint).

Timing conditioning, per window: Stable Audio is conditioned on ``seconds_start`` and
``seconds_total`` and fills ``seconds_total`` seconds of its window with sound, then silence
("end-cutting"). Every view and the reference is a complete window of audio, so each window is
conditioned on ``(0, window seconds)``, computed from the window actually denoised, never on the
whole output's length (which would ask for silence after the window's length, and exceeds the
conditioner's range for long outputs). A window-sized call of the pipeline with its default
``audio_end_in_s`` uses exactly these values, which is what the one-view equivalence checks.
Below one window the pipeline itself still denoises a whole window, conditioned on
``(0, audio_end_in_s)``, and cuts the audio: so does the sampler (:meth:`short_window` is the
native window, and the timing is ``(0, min(window, requested) seconds)``).

Output: ``(B, channels, samples)`` (stereo for the released model), as the pipeline returns it.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from .base import AudioAdapter, Conditions, register_adapter

__all__ = ["StableAudioAdapter"]


@register_adapter
class StableAudioAdapter(AudioAdapter):
    pipeline_classes = ("StableAudioPipeline",)
    long_dim = -1
    reference_axis = -1  # audio: the reference swap alternates along time (paper Eq. 10)
    decoded_dim = -1
    finalize_scale = 1
    _denoiser = "transformer"
    # Latent frames of context each side of a decoded tile: the Oobleck decoder's whole receptive
    # field (conv_in kernel 7: 3 frames; first upsampling block, stride 8: its transposed conv
    # ~1 frame plus dilated residual units of +-39 samples at 8 per frame: ~5 frames; the later
    # blocks under 1 frame together: ~10 frames). The decoder has no normalisation layers, so
    # with this context a tiled decode equals the full decode up to float rounding (tested).
    decode_context = 10

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        # Rotary tables and duration states depend only on the window length (and live on the
        # denoiser's device, which a later pipe.to(...) changes): cache them per (length, device).
        self._rotary: Dict[Tuple[int, torch.device], Tuple[torch.Tensor, torch.Tensor]] = {}
        self._duration: Dict[Tuple[float, torch.device], Tuple[torch.Tensor, torch.Tensor]] = {}

    # -- geometry -----------------------------------------------------------------------------
    @property
    def decoded_scale(self) -> int:  # type: ignore[override]
        return int(self.pipe.vae.hop_length)

    @property
    def sample_rate(self) -> int:
        return int(self.pipe.vae.config.sampling_rate)


    def native_window(self) -> int:
        return int(self.pipe.transformer.config.sample_size)

    def latent_shape(self, batch_size: int, length: int, height: Optional[int] = None) -> Tuple[int, ...]:
        return (batch_size, int(self.pipe.transformer.config.in_channels), int(length))

    def short_window(self, columns: int) -> int:
        # The pipeline always denoises its whole window (and cuts the audio at audio_end_in_s).
        return self.native_window()

    # -- conditions ---------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Optional[Sequence[str]],
                       guidance_scale: float) -> Conditions:
        pipe = self.pipe
        prompts = list(prompts)
        cfg = guidance_scale > 1.0  # the pipeline's own rule
        with torch.no_grad():
            if cfg and negative_prompts is not None:
                both = pipe.encode_prompt(prompts, self.device, True, list(negative_prompts))
                neg, pos = both[:len(prompts)], both[len(prompts):]
            else:
                pos = pipe.encode_prompt(prompts, self.device, False)
                neg = None
        # context_gate multiplies each row's whole cross-attention context (text AND duration
        # tokens): 1 keeps it; 0 is the pipeline's unconditional branch without a negative
        # prompt, whose context is all zeros while the global (duration) condition stays.
        keep = pos.new_ones(len(prompts), 1, 1)
        positive = {"text": pos, "context_gate": keep}
        if not cfg:
            return Conditions(positive)
        if neg is None:
            return Conditions(positive, {"text": torch.zeros_like(pos), "context_gate": torch.zeros_like(keep)})
        return Conditions(positive, {"text": neg, "context_gate": keep})

    def _duration_states(self, seconds: float, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(seconds_start, seconds_end)`` hidden states, each ``(1, 1, D)``, for ``(0, seconds)``."""
        key = (seconds, self.device)
        if key not in self._duration:
            proj = self.pipe.projection_model.config
            if not proj.min_value <= seconds <= proj.max_value:
                raise ValueError(f"a window of {seconds:.2f} s is outside the timing conditioner's range "
                                 f"[{proj.min_value}, {proj.max_value}] s: choose a shorter window")
            with torch.no_grad():
                start, end = self.pipe.encode_duration(0.0, seconds, self.device, False, 1)
            self._duration[key] = (start, end)
        start, end = self._duration[key]
        return start.to(dtype), end.to(dtype)

    def _rotary_embedding(self, frames: int) -> Tuple[torch.Tensor, torch.Tensor]:
        key = (frames, self.device)
        if key not in self._rotary:
            from diffusers.models.embeddings import get_1d_rotary_pos_embed
            # +1: the global duration token is prepended to the latent sequence. Built on the
            # host: moved to the denoiser's device once here, or every attention layer would
            # copy it host-to-device (a host sync) each step, which a CUDA graph capture refuses.
            cos, sin = get_1d_rotary_pos_embed(
                self.pipe.rotary_embed_dim, frames + 1, use_real=True, repeat_interleave_real=False)
            self._rotary[key] = (cos.to(self.device), sin.to(self.device))
        return self._rotary[key]

    # -- denoiser -------------------------------------------------------------------------------
    def _denoise(self, x: torch.Tensor, t: torch.Tensor, c: Dict[str, torch.Tensor],
                 extra: Dict[str, Any]) -> torch.Tensor:
        n, frames = x.shape[0], x.shape[-1]
        # Every window is audio from its start to min(its length, the requested length): a
        # pipeline call conditions on (0, audio_end_in_s) the same way (extra["seconds"] is
        # the call's requested length, set by the sampler).
        seconds = frames * self.decoded_scale / self.sample_rate
        if extra.get("seconds") is not None:
            seconds = min(seconds, float(extra["seconds"]))
        text = c["text"]
        start, end = self._duration_states(seconds, text.dtype)
        start, end = start.expand(n, -1, -1), end.expand(n, -1, -1)
        context = torch.cat([text, start, end], dim=1) * c["context_gate"]
        global_states = torch.cat([start, end], dim=2)
        return self.pipe.transformer(x, t.reshape(1), encoder_hidden_states=context,
                                     global_hidden_states=global_states,
                                     rotary_embedding=self._rotary_embedding(frames), return_dict=False)[0]

    # -- decoding -------------------------------------------------------------------------------
    def denoiser_memory(self, rows: int, guidance: bool, window_shape: Optional[Tuple[int, ...]] = None,
                        grad: bool = False) -> Optional[int]:
        """The DiT's block peak over a window's frames plus the prepended global token
        (:data:`~safa.adapters.working_memory.GLU_DIT_MAPS`); unknown under ``grad``."""
        from .working_memory import GLU_DIT_MAPS, dit_forward_bytes
        if window_shape is None or grad:
            return None
        cfg = self.pipe.transformer.config
        width = int(cfg.num_attention_heads) * int(cfg.attention_head_dim)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        per_row = dit_forward_bytes(int(window_shape[-1]) + 1, width, itemsize, GLU_DIT_MAPS)
        return rows * (2 if guidance else 1) * per_row

    def decode_latents(self, latent: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        return vae.decode(latent.to(device=self.device, dtype=vae.dtype)).sample

    def finalize(self, decoded: torch.Tensor) -> torch.Tensor:
        return decoded.float().cpu()

    def output_elements_per_column(self, height: Optional[int] = None) -> int:
        return int(self.pipe.vae.config.audio_channels)

    def encode_audio(self, waveform: torch.Tensor) -> torch.Tensor:
        # The Oobleck VAE's posterior mean (the pipeline's audio-to-audio samples it: the mean is
        # the deterministic choice, and the latent has no scaling factor).
        vae = self.pipe.vae
        return vae.encode(waveform.to(device=self.device, dtype=vae.dtype)).latent_dist.mode()
