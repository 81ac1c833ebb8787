"""Tiny random-weight diffusers pipelines, built fully offline.

The machine that runs the tests has no model hub, so every component (tokenizers included) is
constructed from a config in code. The latent *layouts* match the real models (what the
joint-diffusion sampler cares about); only channel widths and depths are shrunk so that a
10-step call runs in well under a second on a CPU.

- AudioLDM / AudioLDM2 / MusicLDM: latent ``(B, 8, T, 16)``, time on dim -2, 25 latent frames/s
  (16 kHz audio, a 160-sample vocoder hop, a VAE that downsamples by 4, 64 mel bins).
- Stable Audio Open: latent ``(B, C, T)``, time last, 44.1 kHz / 2048 ~ 21.5 frames/s.
- Stable Diffusion 1.x/2.x, SDXL, SD3: latent ``(B, 4, H, W)`` with a VAE that downsamples by 8
  (SD3 may use fewer latent channels; its pipeline reads them from the transformer config).

Every pipeline survives ``save_pretrained(dir)`` + ``<Class>.from_pretrained(dir)`` offline.
"""

from __future__ import annotations

import torch
from diffusers import (
    AudioLDMPipeline,
    AutoencoderKL,
    DDIMScheduler,
    UNet2DConditionModel,
)
from transformers import (
    ClapTextConfig,
    ClapTextModelWithProjection,
    RobertaTokenizer,
    SpeechT5HifiGan,
    SpeechT5HifiGanConfig,
)

__all__ = [
    "tiny_audioldm_pipeline",
]

# Tiny text vocabularies: small enough to keep embedding tables negligible, large enough that
# any ASCII prompt tokenizes without unknown tokens.
_MAX_TEXT_LEN = 77


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map (what byte-level BPE vocabularies use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _byte_level_vocab(specials: list[str]) -> dict[str, int]:
    """Special tokens first, then one token per byte: a byte-level BPE with no merges.

    With no merges every prompt becomes one token per byte, which is all a random-weight
    test model needs, and it needs no files (transformers 5 tokenizers take ``vocab=`` dicts).
    """
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in _bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
    return vocab


def tiny_roberta_tokenizer(model_max_length: int = _MAX_TEXT_LEN) -> RobertaTokenizer:
    """A RoBERTa (byte-level BPE) tokenizer built in code, ids 0..~260."""
    vocab = _byte_level_vocab(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    return RobertaTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def _tiny_clap_text_encoder(projection_dim: int, vocab_size: int) -> ClapTextModelWithProjection:
    config = ClapTextConfig(
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        hidden_size=16,
        intermediate_size=32,
        layer_norm_eps=1e-5,
        num_attention_heads=2,
        num_hidden_layers=1,
        vocab_size=vocab_size,
        # RoBERTa position ids start after padding_idx, so the table needs max_len + 2 rows.
        max_position_embeddings=_MAX_TEXT_LEN + 2,
        projection_dim=projection_dim,
    )
    return ClapTextModelWithProjection(config)


def _tiny_audio_vae(latent_channels: int = 8) -> AutoencoderKL:
    # Three resolution levels -> downsampling by 4, as in AudioLDM's VAE (64 mel bins -> 16).
    return AutoencoderKL(
        block_out_channels=[8, 8, 8],
        in_channels=1,
        out_channels=1,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
    )


def _tiny_hifigan() -> SpeechT5HifiGan:
    # 16 kHz with a 160-sample hop (10 * 16) = 100 mel frames/s = 25 latent frames/s after the
    # VAE's factor 4: the real AudioLDM timing.
    config = SpeechT5HifiGanConfig(
        model_in_dim=64,
        sampling_rate=16000,
        upsample_initial_channel=16,
        upsample_rates=[10, 16],
        upsample_kernel_sizes=[20, 32],
        resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]],
        normalize_before=False,
    )
    return SpeechT5HifiGan(config)


def _ldm_ddim_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.0015,
        beta_end=0.0195,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
    )


def tiny_audioldm_pipeline(seed: int = 0) -> AudioLDMPipeline:
    """A tiny random AudioLDMPipeline: latent (B, 8, T, 16), 25 latent frames/s, 16 kHz audio.

    The text embedding reaches the UNet as a class embedding (``class_labels``), exactly as in
    AudioLDM; the default length is 5.12 s (``sample_size`` 128 latent frames), as in the real
    checkpoint's config.
    """
    torch.manual_seed(seed)
    tokenizer = tiny_roberta_tokenizer()
    text_encoder = _tiny_clap_text_encoder(projection_dim=16, vocab_size=len(tokenizer))
    unet = UNet2DConditionModel(
        sample_size=128,
        in_channels=8,
        out_channels=8,
        # Attention only at the coarsest level (64 x 4 tokens for a 10.24 s window): at full
        # resolution self-attention over 4096 tokens would cost ~20x the rest of the UNet.
        block_out_channels=(8, 16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        # AudioLDM passes encoder_hidden_states=None: the text reaches the UNet only through
        # the projected class embedding, concatenated to the time embedding.
        cross_attention_dim=(8, 16, 32),
        attention_head_dim=8,
        class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=16,
        class_embeddings_concat=True,
    )
    pipe = AudioLDMPipeline(
        vae=_tiny_audio_vae(8),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_ldm_ddim_scheduler(),
        vocoder=_tiny_hifigan(),
    )
    return _finish(pipe)


def _finish(pipe):
    """CPU, float32, eval mode, quiet progress bar (tests call many pipelines)."""
    # Freshly built modules are already float32; passing a dtype to .to() only adds warnings.
    pipe = pipe.to("cpu")
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
