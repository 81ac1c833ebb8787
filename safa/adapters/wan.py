"""Adapter for long video with Wan (``WanPipeline``: text to video, Wan 2.1 / 2.2).

Joint diffusion along the latent FRAME axis (docs/video.md): the latent ``(B, 16, F, H, W)``
(``AutoencoderKLWan``: 8x spatial, 4x temporal compression, the first frame alone) is covered
by overlapping windows of latent frames, each a whole clip of the pipeline's own size (its
default 81 frames: 21 latent frames), merged per step on dim -3 by the same op as audio's time
axis. Every view is denoised as a clip of its own: the transformer's 3-D rotary positions
start at its first latent frame, as in a one-clip call, which is the pipeline's own call below
one window. A view's first latent frame is thereby treated as a clip's first (image-like) frame
although in the long video it continues the frames before it; the overlaps and the swap carry
the continuity (the model has no way to be told otherwise without training).

Text: the pipeline's ``encode_prompt`` (UMT5, ``max_sequence_length`` tokens, zero-padded):
the padding is zeros with no attention mask, so the unconditional and conditional branches run
as one batch ``[uncond; cond]``; without a negative prompt the unconditional branch is the
pipeline's ``""``. Latents are float32 (the pipeline's), cast to the transformer's dtype for
each call. Wan 2.2 A14B's two experts (``transformer`` above ``boundary_ratio`` of the
schedule, ``transformer_2`` below) are chosen per step as the pipeline does, with the same
``guidance_scale`` for both (the pipeline's default for ``guidance_scale_2``); Wan 2.2 TI2V's
per-token timesteps (``expand_timesteps``) are built as its text-to-video call builds them.

Decoding: the VAE is causal along frames and decodes one latent frame at a time with a cache
of the last frames of every causal convolution (``AutoencoderKLWan._decode``). The long video
is decoded the same way in chunks of latent frames that carry that cache from chunk to chunk
(:meth:`WanAdapter.decode_frames`), so a chunked decode IS the whole decode, frame for frame,
while only one chunk of pixels is held; each chunk goes to the MP4 as it is decoded. A loop is
decoded after ``loop_context`` latent frames of its own end, so its first frames continue its
last ones (the causal cache is warmed on them), and is ``4 x`` latent frames long.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import torch

from .base import Conditions, VideoAdapter, register_adapter

__all__ = ["WanAdapter"]


@register_adapter
class WanAdapter(VideoAdapter):
    """``WanPipeline``: UMT5 text, a 3-D DiT over ``(1, 2, 2)`` patches, the causal ``AutoencoderKLWan``."""

    pipeline_classes = ("WanPipeline",)
    _denoiser = "transformer"
    embeds_arguments = ("prompt_embeds", "negative_prompt_embeds")
    decode_context = 0  # the chunked decode carries the causal cache: no context is decoded twice
    # Latent frames of its own end decoded before a loop (then discarded) so that its first frames
    # continue its last ones: the decoder's causal reach at the latent rate (conv_in, the middle
    # block and the first up block's residual convolutions: about 2 frames each).
    loop_context = 16

    # -- geometry -----------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        # Wan 2.2 A14B may load its low-noise expert alone (transformer None).
        return self.pipe.transformer if self.pipe.transformer is not None else self.pipe.transformer_2

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # the pipeline's latents; the model input is cast per call

    @property
    def fps(self) -> int:
        # Not in the pipeline's config: Wan 2.1 exports at 16 fps, Wan 2.2 TI2V-5B (expand_timesteps) at 24.
        given = getattr(self.pipe, "fps", None)
        if given is not None:
            return int(given)
        return 24 if getattr(self.pipe.config, "expand_timesteps", False) else 16

    @property
    def temporal_compression(self) -> int:
        return int(self.pipe.vae_scale_factor_temporal)

    @property
    def spatial_compression(self) -> int:
        return int(self.pipe.vae_scale_factor_spatial)

    def size_multiple(self) -> int:
        patch = self.denoiser.config.patch_size
        return self.spatial_compression * int(max(patch[1], patch[2]))

    def native_window(self) -> int:
        frames = int(self.pipeline_default("num_frames", 81))
        return (frames - 1) // self.temporal_compression + 1

    # -- conditions ---------------------------------------------------------------------------
    @property
    def max_sequence_length(self) -> int:
        return int(self.pipeline_default("max_sequence_length", 512))

    def _conditions(self, cfg: bool, **kwargs: Any) -> Conditions:
        with torch.no_grad():
            positive, negative = self.pipe.encode_prompt(
                do_classifier_free_guidance=cfg, max_sequence_length=self.max_sequence_length, device=self.device,
                **kwargs)
        dtype = self.denoiser.dtype
        return Conditions({"text": positive.to(dtype)}, {"text": negative.to(dtype)} if cfg else None)

    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Optional[Sequence[str]],
                       guidance_scale: float) -> Conditions:
        cfg = guidance_scale > 1.0  # the pipeline's own rule
        negative = list(negative_prompts) if (cfg and negative_prompts is not None) else None
        return self._conditions(cfg, prompt=list(prompts), negative_prompt=negative)

    def conditions_from_embeds(self, embeds: Dict[str, torch.Tensor], guidance_scale: float) -> Conditions:
        return self._conditions(guidance_scale > 1.0, prompt=None, **embeds)

    # -- denoiser -----------------------------------------------------------------------------
    def _model_for(self, t: torch.Tensor) -> torch.nn.Module:
        """The expert for timestep ``t`` (Wan 2.2 A14B), as the pipeline picks it."""
        pipe = self.pipe
        ratio = getattr(pipe.config, "boundary_ratio", None)
        if ratio is None or pipe.transformer_2 is None:
            return self.denoiser
        high_noise = float(t.reshape(-1)[0]) >= ratio * pipe.scheduler.config.num_train_timesteps
        return pipe.transformer if high_noise and pipe.transformer is not None else pipe.transformer_2

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, c: Dict[str, torch.Tensor],
                 extra: Dict[str, Any]) -> torch.Tensor:
        n = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        model = self._model_for(t)
        timestep = t.reshape(-1) if t.numel() == n else t.reshape(()).expand(n)
        if getattr(self.pipe.config, "expand_timesteps", False):
            # Wan 2.2 TI2V: one timestep per latent token (2x2 patches), all t for text to video.
            tokens = x.shape[2] * math.ceil(x.shape[3] / 2) * math.ceil(x.shape[4] / 2)
            timestep = timestep[:, None].expand(n, tokens)
        return model(hidden_states=x.to(model.dtype), timestep=timestep, encoder_hidden_states=c["text"],
                     return_dict=False)[0]

    # -- decoding -----------------------------------------------------------------------------
    def _vae_input(self, latent: torch.Tensor) -> torch.Tensor:
        """The pipeline's denormalisation before ``vae.decode``: ``latent * std + mean`` per channel."""
        vae = self.pipe.vae
        latent = latent.to(device=self.device, dtype=vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latent.device, latent.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latent.device, latent.dtype)
        return latent / inverse_std + mean

    def decode_latents(self, latent: torch.Tensor) -> torch.Tensor:
        return self.pipe.vae.decode(self._vae_input(latent), return_dict=False)[0]

    def decode_frames(self, latent: torch.Tensor, loop: bool, mode: str,
                      chunk: int) -> Iterator[Tuple[int, torch.Tensor]]:
        """``(first frame, frames)`` of the decoded video in order, each :meth:`finalize` d (frames last).

        ``mode="full"`` on an open video: the pipeline's own ``vae.decode``, one piece. Otherwise
        ``chunk`` latent frames per piece through the VAE's causal decoder with its cache carried
        over (its own per-frame loop), so the pieces together are the whole decode; a loop first
        decodes its last ``loop_context`` latent frames to warm the cache and drops their frames.
        """
        if mode == "full" and not loop:
            yield 0, self.finalize(self.decode_latents(latent))
            return
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
        vae = self.pipe.vae
        z = self._vae_input(latent)
        frames = z.shape[2]
        skip = 0  # output frames of the warm-up
        if loop:
            context = min(frames, self.loop_context)
            z = torch.cat([z[:, :, frames - context:], z], dim=2)
            skip = 1 + self.temporal_compression * (context - 1)
        if mode == "full":
            chunk = z.shape[2]
        x = vae.post_quant_conv(z)  # a kernel-1 convolution: frame by frame, as in _decode
        cache: list = [None] * vae._cached_conv_counts["decoder"]
        start, pending = 0, []
        for i in range(x.shape[2]):
            pending.append(vae.decoder(x[:, :, i:i + 1], feat_cache=cache, feat_idx=[0], first_chunk=i == 0))
            if len(pending) < chunk and i < x.shape[2] - 1:
                continue
            piece = torch.cat(pending, dim=2)
            pending = []
            if vae.config.patch_size is not None:
                piece = unpatchify(piece, patch_size=vae.config.patch_size)
            piece = piece.clamp(-1.0, 1.0)
            if skip:
                drop = min(skip, piece.shape[2])
                piece, skip = piece[:, :, drop:], skip - drop
                if piece.shape[2] == 0:
                    continue
            yield start, self.finalize(piece)
            start += piece.shape[2]

    # -- memory (safa.memory) ---------------------------------------------------------------------
    def denoiser_memory(self, rows: int, guidance: bool, window_shape: Optional[Tuple[int, ...]] = None,
                        grad: bool = False) -> Optional[int]:
        """The transformer's feed-forward peak over one window's tokens (per row; guidance doubles
        the batch); unknown under ``grad``."""
        from .working_memory import dit_forward_bytes
        if window_shape is None or grad:
            return None
        config = self.denoiser.config
        patch = config.patch_size
        tokens = (window_shape[2] // patch[0]) * (window_shape[3] // patch[1]) * (window_shape[4] // patch[2])
        width = int(config.num_attention_heads * config.attention_head_dim)
        itemsize = torch.empty((), dtype=self.denoiser.dtype).element_size()
        # The residual and its norm plus the feed-forward's projection and activation (not yet
        # checked against a full-width block, as SD3's and FLUX.1's are).
        per_row = dit_forward_bytes(tokens, width, itemsize, 3 + math.ceil(2 * config.ffn_dim / width))
        return rows * (2 if guidance else 1) * per_row

    def decoder_memory(self, columns: int, batch_size: int, grad: bool = False,
                       height: Optional[int] = None) -> Optional[int]:
        """A chunk of ``columns`` latent frames decoded: its frames twice (the decoder's output and
        the finalized float copy) plus one latent frame's activations at full resolution (four
        maps of the decoder's widest channels over ``temporal_compression`` frames), from the
        VAE's structure (not measured on a full-size Wan)."""
        if grad:
            return None
        vae = self.pipe.vae
        h, w = self.frame_size
        t = self.temporal_compression
        itemsize = torch.empty((), dtype=vae.dtype).element_size()
        frames = t * columns
        output = 2 * frames * 3 * h * w * 4
        activations = 4 * t * h * w * int(vae.config.base_dim) * max(vae.config.dim_mult) * itemsize
        return batch_size * (output + activations)
