"""Working memory of diffusers denoisers and VAE decoders, from their configs and the input's shape.

What :meth:`~safa.adapters.base.Adapter.denoiser_memory` and
:meth:`~safa.adapters.base.Adapter.decoder_memory` report to :mod:`safa.memory`: the peak of
the tensors a forward keeps alive at once, walked block by block through the architecture
the config describes (pure arithmetic, nothing is built or allocated). Sizes are in "maps":
``channels x tokens`` elements of one batch row; the walkers add up the maps alive at each
point and keep the largest sum.

- **UNet** (``UNet2DConditionModel`` and the AudioLDM 2 UNet): the skip connections of the down
  path stay alive until their up block has run (the UNet's ``forward`` holds a block's skips
  for its whole call), on top of the block at work. A ResNet block holds its input, the
  GroupNorm / SiLU outputs and the convolution outputs (:func:`_resnet`); a transformer block
  peaks in its feed-forward, where the GEGLU projection (``2 x 4 x D``), the GELU of its gate
  (``4 D``), their product (``4 D``), the residual stream and its LayerNorm are alive together
  (:data:`GEGLU_MAPS`). Attention runs through ``scaled_dot_product_attention``'s fused
  kernels (flash attention on CPU and CUDA), which never hold the score matrix, so
  attention (q, k, v, output: about 7 maps) stays below the feed-forward.
- **DiT** (SD3's MMDiT, Flux, Stable Audio's DiT): no skips, so the peak is one block's and
  does not depend on the depth; a block peaks in its feed-forward over all tokens (image /
  audio tokens plus, for joint attention, the text tokens). The maps per token of each family
  (:data:`MMDIT_IMAGE_MAPS`, :data:`MMDIT_TEXT_MAPS`, :data:`FLUX_SINGLE_MAPS`,
  :data:`GLU_DIT_MAPS`) are counted from the block's code and checked against the live peak of
  full-width blocks of the published configs (``benchmarks/bench_fullsize.py --memory``).
- **VAE decoder** (``AutoencoderKL``): no skips; the peak is the last ResNet / upsampling at
  full resolution. ``grad=True`` (SyncDiffusion's gradient through the decoder) keeps what
  every op saves for the backward pass: each ResNet its input, both GroupNorm inputs, both
  SiLU outputs (:data:`RESNET_SAVED_MAPS`), each upsampling its convolution's input.

The estimate is of live tensor bytes (what CUDA's ``max_memory_allocated`` reports, and what
:class:`safa.profiling.memory.LiveTensorPeak` measures on the CPU), checked against the
full-size SD 2.0 and AudioLDM-S UNets (random weights; docs/long-audio.md, "Where memory goes"). A CPU
process's resident set grows further by the freed heap glibc keeps (measured 1.3-1.9x the
live peak around one full-size UNet call), which the estimate does not model.
"""
from __future__ import annotations

import math
from typing import Any, List, Sequence, Tuple

__all__ = ["unet_forward_bytes", "unet_graph_bytes", "UNET_TRANSFORMER_SAVED_MAPS", "dit_forward_bytes", "mmdit_forward_bytes", "vae_decode_bytes", "glu_dit_maps",
           "longcat_dit_maps", "GEGLU_MAPS",
           "GELU_MAPS", "MMDIT_IMAGE_MAPS", "MMDIT_TEXT_MAPS", "FLUX_SINGLE_MAPS", "GLU_DIT_MAPS",
           "RESNET_SAVED_MAPS"]

# Maps of width D alive at a transformer block's feed-forward peak: the residual stream, its
# LayerNorm, the GEGLU projection (2 x 4D), GELU(gate) (4D) and the product (4D).
GEGLU_MAPS = 1 + 1 + 8 + 4 + 4
# ... in a UNet's BasicTransformerBlock: plus the cross-attention's output, which its forward
# still holds while the feed-forward runs, and one more map of the block's state (SD 2.0's UNet
# peaks there at 64 x 64: 8 maps of the width besides the feed-forward's 16, with its skips).
UNET_FF_MAPS = GEGLU_MAPS + 2
# ... with a plain GELU feed-forward (SD3, DiTs): residual, LayerNorm, projection 4D, GELU 4D.
GELU_MAPS = 1 + 1 + 4 + 4
# SD3's joint (MMDiT) block at the image stream's feed-forward: GELU_MAPS plus the AdaLN-modulated
# norm, the gated attention output and the feed-forward's output before its gate (measured 12.6
# per image token on SD3-medium's width). Meanwhile the text stream holds its residual, norm,
# modulated norm, attention output and gated sum (measured 5.7 per text token).
MMDIT_IMAGE_MAPS = GELU_MAPS + 3
MMDIT_TEXT_MAPS = 6
# Flux's single-stream block over text + image tokens: residual, modulated norm, attention output
# (D each), the MLP projection and its GELU (4D each), and their concatenation (5D) (measured 15.4).
FLUX_SINGLE_MAPS = 1 + 1 + 1 + 4 + 4 + 5
# Stable Audio's DiT: a GLU feed-forward (GEGLU_MAPS: 2 x 4D projection, activation, product) plus
# the AdaLN-free pre-norm block's attention output and the summed residual (measured 20.1).
GLU_DIT_MAPS = GEGLU_MAPS + 2
# Stable Audio 3's DiT: the GLU block of Stable Audio Open's, with its feed-forward ``ff_mult`` wide
# (2 + 2 per unit of ff_mult: 2 x ff projection, activation, product; 20 at ff_mult 4, measured
# 20.0 per token at width 1536), over the frames plus its memory tokens.
def glu_dit_maps(ff_mult: float) -> int:
    return 4 + math.ceil(4 * ff_mult)


# LongCat-AudioDiT's block: residual, norm, AdaLN-modulated norm, attention output, long-skip
# state and a GELU feed-forward ``ff_mult`` wide (projection and activation): 14 at ff_mult 4,
# measured 14.0 per frame at width 1536.
def longcat_dit_maps(ff_mult: float) -> int:
    return 6 + math.ceil(2 * ff_mult)


# What a ResNet block saves for the backward pass, in maps of its input (Cin) and output (Cout)
# channels: GroupNorm-1's input, SiLU-1's input (the GroupNorm's output) and conv-1's input (the
# SiLU's output: a convolution saves its input even when its weight needs no gradient) -> 3 Cin;
# the same three of GroupNorm-2, SiLU-2 and conv-2 -> 3 Cout (counted with autograd's saved
# tensors on SD 2.0's UNet and VAE decoder).
RESNET_SAVED_MAPS = (3, 3)


def _get(config: Any, name: str, default: Any = None) -> Any:
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


def _per_level(value: Any, levels: int) -> List[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def _resnet(c_in: int, c_out: int) -> int:
    """Peak maps of a ResNet block beyond nothing: its input, then the largest of GroupNorm + SiLU
    (2 Cin), SiLU + conv-1 (Cin + Cout) and shortcut + branch + sum (3 Cout)."""
    return c_in + max(2 * c_in, c_in + c_out, 3 * c_out)


def _transformer(c: int, ff_maps: int) -> int:
    """Peak maps of a transformer block over ``c``-channel tokens (the block input held as residual)."""
    return c + ff_maps * c


def _unet_levels(config: Any, window_shape: Sequence[int]) -> Tuple[List[int], List[str], List[str], List[int], List[int]]:
    """A UNet's levels: ``(channels, down block types, up block types, layers per block, tokens)``,
    ``tokens[level]`` the latent cells at that level (halved per level, rounded up, as its
    downsamplers do) of a ``window_shape = (..., H, W)`` window."""
    channels = [int(c) for c in _get(config, "block_out_channels")]
    layers = [int(n) for n in _per_level(_get(config, "layers_per_block", 2), len(channels))]
    h, w = int(window_shape[-2]), int(window_shape[-1])
    tokens = []
    for _ in channels:
        tokens.append(h * w)
        h, w = -(-h // 2), -(-w // 2)
    return channels, list(_get(config, "down_block_types")), list(_get(config, "up_block_types")), layers, tokens


def unet_forward_bytes(config: Any, window_shape: Sequence[int], itemsize: int) -> int:
    """Peak bytes of one batch row's no-grad forward of a UNet with ``config`` on a
    ``window_shape = (..., C, H, W)`` latent (activations only: not the weights, not the input)."""
    channels, down_types, up_types, layers, tokens = _unet_levels(config, window_shape)
    levels = len(channels)
    peak = 0
    skips: List[int] = [channels[0] * tokens[0]]  # conv_in's output
    for level, kind in enumerate(down_types):
        c_in = channels[max(level - 1, 0)]
        n, c = tokens[level], channels[level]
        for i in range(layers[level]):
            held = sum(skips)
            peak = max(peak, held + _resnet(c_in if i == 0 else c, c) * n)
            if "CrossAttn" in kind:
                peak = max(peak, held + _transformer(c, UNET_FF_MAPS) * n)
            skips.append(c * n)
        if level < levels - 1:  # the downsampling convolution: its input and its output
            peak = max(peak, sum(skips) + c * tokens[level + 1])
            skips.append(c * tokens[level + 1])
    bottom = channels[-1] * tokens[-1]
    peak = max(peak, sum(skips) + _transformer(channels[-1], UNET_FF_MAPS) * tokens[-1])
    up_channels = channels[::-1]
    for level, kind in enumerate(up_types):
        n, c = tokens[levels - 1 - level], up_channels[level]
        count = layers[::-1][level] + 1
        held = sum(skips)  # the block's skips stay alive for its whole call
        # ... and so does its input: the UNet's forward holds it while the block runs
        block_input = prev = bottom if level == 0 else up_channels[level - 1] * n
        for i in range(count):
            c_prev = up_channels[max(level - 1, 0)] if i == 0 else c
            c_skip = skips[-1 - i] // n
            concat = (c_prev + c_skip) * n
            earlier = prev if i else 0  # the previous layer's output, freed once concatenated
            peak = max(peak, held + block_input + _resnet(c_prev + c_skip, c) * n,
                       held + block_input + earlier + concat)
            if "CrossAttn" in kind:
                peak = max(peak, held + block_input + _transformer(c, UNET_FF_MAPS) * n)
            prev = c * n
        del skips[len(skips) - count:]
        if level < levels - 1:  # nearest upsampling x2, then a convolution at the finer level
            finer = tokens[levels - 2 - level]
            peak = max(peak, sum(skips) + c * n + 2 * c * finer)
            bottom = c * finer
    return int(peak * itemsize)


# What a UNet transformer (Transformer2DModel with one BasicTransformerBlock) saves for the
# backward pass when only its input needs a gradient (frozen weights: linear layers and
# convolutions save nothing), in maps of its width: the GroupNorm's input, LayerNorm 1's input,
# self-attention's q, k, v and output (SDPA's fused kernel: no score matrix), LayerNorm 2's
# input, cross-attention's q and output, LayerNorm 3's input, the GEGLU projection (8: GELU
# keeps the gate, which is a view of it) and the GELU output (4) the product keeps.
UNET_TRANSFORMER_SAVED_MAPS = 1 + 1 + 4 + 1 + 2 + 1 + 8 + 4


def unet_graph_bytes(config: Any, window_shape: Sequence[int], itemsize: int) -> int:
    """Peak bytes of one batch row's forward of a UNet with ``config`` recording the graph for a
    backward pass to its input (SyncDiffusion's gradient; the weights frozen): what the
    ResNets (:data:`RESNET_SAVED_MAPS`), the transformers
    (:data:`UNET_TRANSFORMER_SAVED_MAPS`; AudioLDM's cross-attention attends to the hidden
    states themselves, two more maps) and the output's GroupNorm / SiLU save, all alive at the
    end of the forward (the downsampling and upsampling convolutions' inputs too), plus the
    no-grad forward's peak (the block at work and the skips)."""
    channels, down_types, up_types, layers, tokens = _unet_levels(config, window_shape)
    levels = len(channels)
    self_context = _get(config, "class_embed_type") == "simple_projection"  # AudioLDM: no text tokens
    attention = UNET_TRANSFORMER_SAVED_MAPS + (2 if self_context else 0)
    resnet_in, resnet_out = RESNET_SAVED_MAPS
    saved = 0
    for level, kind in enumerate(down_types):
        c, n = channels[level], tokens[level]
        for i in range(layers[level]):
            saved += (resnet_in * (channels[max(level - 1, 0)] if i == 0 else c) + resnet_out * c) * n
            saved += attention * c * n if "CrossAttn" in kind else 0
        if level < levels - 1:  # the downsampling convolution's input
            saved += c * n
    c, n = channels[-1], tokens[-1]
    saved += (2 * (resnet_in + resnet_out) + attention) * c * n  # the mid block: ResNet, transformer, ResNet
    up_channels = channels[::-1]
    for level, kind in enumerate(up_types):
        c, n = up_channels[level], tokens[levels - 1 - level]
        down_level = levels - 1 - level
        skip_channels = [channels[down_level]] * layers[down_level] + [channels[max(down_level - 1, 0)]]
        for i, c_skip in enumerate(skip_channels):
            c_prev = up_channels[max(level - 1, 0)] if i == 0 else c
            saved += (resnet_in * (c_prev + c_skip) + resnet_out * c) * n
            saved += attention * c * n if "CrossAttn" in kind else 0
        if level < levels - 1:  # the upsampling convolution's input, at the finer level
            saved += c * tokens[levels - 2 - level]
    saved += 3 * channels[0] * tokens[0]  # conv_norm_out's input, its SiLU's input, conv_out's input
    return int(saved * itemsize) + unet_forward_bytes(config, window_shape, itemsize)


def dit_forward_bytes(tokens: int, width: int, itemsize: int, maps: int) -> int:
    """Peak bytes of one batch row's no-grad forward of a transformer over ``tokens`` tokens of
    ``width`` channels, with ``maps`` maps of that width alive per token at a block's peak."""
    return int(tokens * maps * width * itemsize)


def mmdit_forward_bytes(image_tokens: int, text_tokens: int, width: int, itemsize: int) -> int:
    """Peak bytes of one batch row's no-grad forward of SD3's MMDiT: the image stream at its
    feed-forward while the text stream holds its own block state."""
    return int((image_tokens * MMDIT_IMAGE_MAPS + text_tokens * MMDIT_TEXT_MAPS) * width * itemsize)


def _decoder_levels(config: Any, latent_shape: Sequence[int]) -> Tuple[List[int], List[int], int]:
    channels = [int(c) for c in _get(config, "block_out_channels")][::-1]
    rows = int(math.prod(int(s) for s in latent_shape[-2:]))
    tokens = [rows * 4 ** level for level in range(len(channels))]
    return channels, tokens, int(_get(config, "layers_per_block", 2)) + 1


def vae_decode_bytes(config: Any, latent_shape: Sequence[int], itemsize: int, grad: bool = False) -> int:
    """Peak bytes of decoding one batch row of a ``latent_shape = (..., C, H, W)`` latent with an
    ``AutoencoderKL`` of ``config`` (the output included). ``grad``: the forward keeps what the
    backward pass needs and the peak is that plus the largest block's working set."""
    channels, tokens, per_level = _decoder_levels(config, latent_shape)
    out_channels = int(_get(config, "out_channels", 3))
    peak = saved = 0
    # The mid block: two ResNets and one single-head attention over the latent's tokens.
    c, n = channels[0], tokens[0]
    peak = max(peak, _resnet(c, c) * n, _transformer(c, 6) * n)
    saved += 2 * sum(RESNET_SAVED_MAPS) * c * n + 6 * c * n
    for level, c_out in enumerate(channels):
        n = tokens[level]
        c_in = channels[max(level - 1, 0)]
        for i in range(per_level):
            cin = c_in if i == 0 else c_out
            peak = max(peak, _resnet(cin, c_out) * n)
            saved += (RESNET_SAVED_MAPS[0] * cin + RESNET_SAVED_MAPS[1] * c_out) * n
        if level < len(channels) - 1:  # nearest x2 then a convolution: input, upsampled, output
            peak = max(peak, c_out * n + 2 * c_out * tokens[level + 1])
            saved += c_out * tokens[level + 1]
    # GroupNorm, SiLU and the output convolution at full resolution.
    c, n = channels[-1], tokens[-1]
    peak = max(peak, 3 * c * n + out_channels * n)
    saved += 3 * c * n + out_channels * n
    return int((saved + peak if grad else peak) * itemsize)


def hifigan_bytes(config: Any, frames: int, itemsize: int) -> int:
    """Peak bytes of one row of a HiFi-GAN vocoder (``SpeechT5HifiGan``) on ``frames`` mel frames:
    at each upsampling stage the stage's input, the running sum of its parallel ResBlocks and a
    ResBlock's LeakyReLU / convolution / residual outputs (6 maps of the stage's width)."""
    channels = int(_get(config, "upsample_initial_channel"))
    n, peak = int(frames), 0
    for rate in _get(config, "upsample_rates"):
        finer = n * int(rate)
        peak = max(peak, channels * n * 2 + channels // 2 * finer)  # LeakyReLU, transposed convolution
        channels, n = channels // 2, finer
        peak = max(peak, 6 * channels * n)
    return int(peak * itemsize)
