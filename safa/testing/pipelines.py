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
- FLUX.1: latent ``(B, 4, H, W)`` with a VAE /8, packed by its pipeline into 2x2 tokens.
- Stable Audio 3: latent ``(B, 8, T)``, time last, 44.1 kHz / 1024 ~ 43 frames/s (SAME autoencoder).
- LongCat-AudioDiT: latent ``(B, T, 8)``, time on dim -2, 80 Hz / 8 = 10 frames/s (the real one:
  24 kHz / 2048 ~ 11.7 frames/s), the pipeline's own 30 s native window (300 frames).
- The 2-D analytic texture model (``tiny_texture2d_pipeline``): latent ``(B, 4, H, W)``, one pixel
  per cell, an exact denoiser on square tiles (no weights: it is built from its config).

Every pipeline survives ``save_pretrained(dir)`` + ``<Class>.from_pretrained(dir)`` offline.
"""

from __future__ import annotations

import torch
from diffusers import (
    AudioLDM2Pipeline,
    AudioLDM2ProjectionModel,
    AudioLDM2UNet2DConditionModel,
    AudioLDMPipeline,
    AutoencoderKL,
    AutoencoderOobleck,
    ControlNetModel,
    CosineDPMSolverMultistepScheduler,
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    MusicLDMPipeline,
    SD3Transformer2DModel,
    StableAudioDiTModel,
    StableAudioPipeline,
    StableAudioProjectionModel,
    StableDiffusion3Pipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    ClapAudioConfig,
    ClapConfig,
    ClapFeatureExtractor,
    ClapModel,
    ClapTextConfig,
    ClapTextModelWithProjection,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    RobertaTokenizer,
    SpeechT5HifiGan,
    SpeechT5HifiGanConfig,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

__all__ = [
    "tiny_audioldm_pipeline",
    "tiny_audioldm2_pipeline",
    "tiny_musicldm_pipeline",
    "tiny_stable_audio_pipeline",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_controlnet_pipeline",
    "tiny_sdxl_controlnet_pipeline",
    "tiny_upscale_pipeline",
    "tiny_sd3_pipeline",
    "tiny_flux_pipeline",
    "tiny_stable_audio_3_pipeline",
    "tiny_longcat_audio_pipeline",
    "tiny_texture2d_pipeline",
    "tiny_wan_pipeline",
    "tiny_flux2_klein_pipeline",
    "tiny_gemma_tokenizer",
    "tiny_roberta_tokenizer",
    "tiny_clip_tokenizer",
    "tiny_t5_tokenizer",
]

# Prompt length in tokens (CLIP's and the AudioLDM family's 77). The tokenizers below have tiny
# vocabularies (one token per byte / character, no merges): embedding tables stay negligible and
# any ASCII prompt still tokenizes without unknown tokens.
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


def tiny_clip_tokenizer(model_max_length: int = _MAX_TEXT_LEN) -> CLIPTokenizer:
    """A CLIP tokenizer built in code: one token per byte, plus its end-of-word ('</w>') form.

    CLIP's BPE marks the last symbol of every word with '</w>', so both forms must be in the
    vocabulary for a merge-free BPE to tokenize any ASCII word.
    """
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
    for ch in _bytes_to_unicode().values():
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def tiny_t5_tokenizer(model_max_length: int = _MAX_TEXT_LEN) -> T5Tokenizer:
    """A T5 (SentencePiece unigram) tokenizer built in code over printable ASCII.

    transformers 5 takes the unigram vocabulary as ``[(piece, log_prob), ...]``; pad/eos/unk
    keep T5's ids 0/1/2. No extra_ids: the sentinel tokens are for span corruption only.
    """
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for c in map(chr, range(33, 127)):
        pieces.append((c, -3.0))
        pieces.append(("\u2581" + c, -2.5))
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def _tiny_clap_text_config(projection_dim: int, vocab_size: int) -> ClapTextConfig:
    return ClapTextConfig(
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


def _tiny_clap_model(projection_dim: int, vocab_size: int) -> ClapModel:
    """Full CLAP (text + audio towers): MusicLDM and AudioLDM2 take a ClapModel and only call its
    text tower while sampling; the audio tower is there for their waveform ranking."""
    audio = ClapAudioConfig(
        spec_size=64,
        window_size=4,
        num_mel_bins=64,
        intermediate_size=16,
        layer_norm_eps=1e-5,
        depths=[1, 1],
        num_attention_heads=[2, 2],
        num_hidden_layers=2,
        hidden_size=16,
        patch_embeds_hidden_size=8,
        projection_dim=projection_dim,
        patch_size=2,
        patch_stride=2,
        patch_embed_input_channels=4,
    )
    config = ClapConfig(
        text_config=_tiny_clap_text_config(projection_dim, vocab_size).to_dict(),
        audio_config=audio.to_dict(),
        projection_dim=projection_dim,
    )
    return ClapModel(config)


def _tiny_clap_text_encoder(projection_dim: int, vocab_size: int) -> ClapTextModelWithProjection:
    return ClapTextModelWithProjection(_tiny_clap_text_config(projection_dim, vocab_size))


def _tiny_t5_encoder(vocab_size: int, d_model: int) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_ff=d_model, d_kv=8, num_heads=2,
                                   num_layers=1, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


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


def _audio_ldm_unet(sample_size: int, class_dim: int) -> UNet2DConditionModel:
    """AudioLDM/MusicLDM UNet: text enters only as a projected class embedding."""
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=8,
        out_channels=8,
        block_out_channels=(8, 16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=(8, 16, 32),
        attention_head_dim=8,
        class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=class_dim,
        class_embeddings_concat=True,
    )


def tiny_musicldm_pipeline(seed: int = 0) -> MusicLDMPipeline:
    """A tiny random MusicLDMPipeline: same latent layout and timing as AudioLDM, CLAP text
    embedding as class label, full ClapModel + feature extractor as in the real pipeline."""
    torch.manual_seed(seed)
    tokenizer = tiny_roberta_tokenizer()
    pipe = MusicLDMPipeline(
        vae=_tiny_audio_vae(8),
        text_encoder=_tiny_clap_model(projection_dim=16, vocab_size=len(tokenizer)),
        tokenizer=tokenizer,
        # Built from defaults (no files): 48 kHz CLAP front end, used only to rank waveforms.
        feature_extractor=ClapFeatureExtractor(),
        unet=_audio_ldm_unet(sample_size=128, class_dim=16),
        scheduler=_ldm_ddim_scheduler(),
        vocoder=_tiny_hifigan(),
    )
    return _finish(pipe)


def tiny_audioldm2_pipeline(seed: int = 0) -> AudioLDM2Pipeline:
    """A tiny random AudioLDM2Pipeline: latent (B, 8, T, 16), 25 frames/s, 16 kHz.

    CLAP + T5 embeddings are projected and fed through a GPT-2 that generates ``max_new_tokens``
    hidden states; the UNet cross-attends to those (dim 16) and to the T5 states (dim 32).
    The default length is 10.24 s (``sample_size`` 256 latent frames), as in the real model.
    """
    torch.manual_seed(seed)
    tokenizer = tiny_roberta_tokenizer()
    tokenizer_2 = tiny_t5_tokenizer()
    text_encoder = _tiny_clap_model(projection_dim=16, vocab_size=len(tokenizer))
    text_encoder_2 = _tiny_t5_encoder(len(tokenizer_2), d_model=32)
    # GPT2LMHeadModel, not GPT2Model: in transformers 5 only the LM-head class carries the
    # GenerationMixin helpers that AudioLDM2.generate_language_model calls.
    language_model = GPT2LMHeadModel(
        GPT2Config(n_embd=16, n_head=2, n_layer=1, vocab_size=8, n_positions=99, bos_token_id=0, eos_token_id=0)
    )
    # Read by generate_language_model when __call__ is given no max_new_tokens; a small number
    # keeps the autoregressive loop cheap (the real checkpoint uses 8).
    language_model.config.max_new_tokens = 8
    projection_model = AudioLDM2ProjectionModel(
        text_encoder_dim=16, text_encoder_1_dim=32, langauge_model_dim=16
    )
    unet = AudioLDM2UNet2DConditionModel(
        sample_size=256,
        in_channels=8,
        out_channels=8,
        block_out_channels=(8, 16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        # per block: self-attention, cross-attention to GPT-2 states, cross-attention to T5
        cross_attention_dim=([None, 16, 32],) * 3,
        attention_head_dim=8,
    )
    pipe = AudioLDM2Pipeline(
        vae=_tiny_audio_vae(8),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        projection_model=projection_model,
        language_model=language_model,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        feature_extractor=ClapFeatureExtractor(),
        unet=unet,
        scheduler=_ldm_ddim_scheduler(),
        vocoder=_tiny_hifigan(),
    )
    return _finish(pipe)


def tiny_stable_audio_pipeline(seed: int = 0, sample_size: int = 64) -> StableAudioPipeline:
    """A tiny random StableAudioPipeline (Stable Audio Open layout): latent (B, 64, T), time last.

    44.1 kHz stereo and a 2048-sample hop (2*4*4*8*8), i.e. ~21.5 latent frames/s as in the real
    model; 64 latent channels as in the real model (cheap: only the first/last projections see
    them). The window is ``sample_size`` latent frames (64 ~ 2.97 s; the real model has 1024 ~
    47.5 s): Stable Audio always generates the full window and crops the waveform.
    """
    torch.manual_seed(seed)
    tokenizer = tiny_t5_tokenizer(model_max_length=32)
    text_encoder = _tiny_t5_encoder(len(tokenizer), d_model=16)
    projection_model = StableAudioProjectionModel(
        text_encoder_dim=16, conditioning_dim=16, min_value=0, max_value=512
    )
    transformer = StableAudioDiTModel(
        sample_size=sample_size,
        in_channels=64,
        out_channels=64,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        num_key_value_attention_heads=1,
        cross_attention_dim=16,
        time_proj_dim=16,
        # the global condition is [seconds_start, seconds_end] hidden states concatenated
        global_states_input_dim=32,
        cross_attention_input_dim=16,
    )
    vae = AutoencoderOobleck(
        encoder_hidden_size=4,
        downsampling_ratios=[2, 4, 4, 8, 8],
        channel_multiples=[1, 1, 1, 1, 1],
        decoder_channels=4,
        decoder_input_channels=64,
        audio_channels=2,
        sampling_rate=44100,
    )
    scheduler = CosineDPMSolverMultistepScheduler(
        solver_order=2,
        prediction_type="v_prediction",
        sigma_data=1.0,
        sigma_min=0.3,
        sigma_max=500.0,
        sigma_schedule="exponential",
    )
    pipe = StableAudioPipeline(
        vae=vae,
        text_encoder=text_encoder,
        projection_model=projection_model,
        tokenizer=tokenizer,
        transformer=transformer,
        scheduler=scheduler,
    )
    return _finish(pipe)


def _tiny_image_vae(latent_channels: int = 4, **kwargs) -> AutoencoderKL:
    # Four levels -> downsampling by 8 as in every SD VAE, with 8 channels so that decoding a
    # 512 x 2048 panorama stays cheap on a CPU.
    return AutoencoderKL(
        block_out_channels=[8, 8, 8, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=256,
        **kwargs,
    )


def _tiny_clip_config(vocab_size: int, hidden_size: int = 32, projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden_size,
        intermediate_size=hidden_size,
        num_attention_heads=2,
        num_hidden_layers=2,
        layer_norm_eps=1e-5,
        vocab_size=vocab_size,
        max_position_embeddings=_MAX_TEXT_LEN,
        hidden_act="gelu",
        projection_dim=projection_dim,
    )


def tiny_sd_pipeline(seed: int = 0, sample_size: int = 64) -> StableDiffusionPipeline:
    """A tiny random StableDiffusionPipeline (SD 1.x/2.x layout): latent (B, 4, H, W), VAE /8.

    ``sample_size`` 64 latent columns (512 px) as in SD 1.x, which is the native window.
    DDIM as in most panorama work (diffusers' Panorama pipeline defaults to DDIM).
    """
    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        # attention only at 1/4 resolution (16 x 16 tokens for a 64 x 64 window): full-size
        # attention would dominate the CPU time of every test
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=_tiny_image_vae(4),
        text_encoder=CLIPTextModel(_tiny_clip_config(len(tokenizer))),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _finish(pipe)


def tiny_sdxl_pipeline(seed: int = 0, sample_size: int = 32) -> StableDiffusionXLPipeline:
    """A tiny random StableDiffusionXLPipeline: two CLIP encoders (hidden states concatenated to
    64 channels), pooled embedding + 6 added time ids through ``addition_embed_type='text_time'``.

    ``sample_size`` 32 latent columns (256 px) keeps tests fast; the real SDXL uses 128.
    """
    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(_tiny_clip_config(len(tokenizer)))
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_config(len(tokenizer_2)))
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        # pooled text embedding (32) + 6 time ids x 8
        projection_class_embeddings_input_dim=32 + 6 * 8,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_image_vae(4),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    return _finish(pipe)


def tiny_sd3_pipeline(seed: int = 0, sample_size: int = 32) -> StableDiffusion3Pipeline:
    """A tiny random StableDiffusion3Pipeline: MMDiT transformer, two CLIP encoders with
    projection (pooled 32 + 32 = 64) and a T5 (joint attention dim 32), FlowMatchEuler.

    Latent (B, 4, H, W) with a VAE /8 (the real SD3 has 16 latent channels; the pipeline reads
    the count from the transformer). ``sample_size`` 32 (256 px); the real SD3 uses 128.
    """
    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_clip_tokenizer()
    tokenizer_3 = tiny_t5_tokenizer()
    text_encoder = CLIPTextModelWithProjection(_tiny_clip_config(len(tokenizer)))
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_config(len(tokenizer_2)))
    text_encoder_3 = _tiny_t5_encoder(len(tokenizer_3), d_model=32)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        # patch 2 as in the real model: a 32 x 32 latent window is 256 tokens
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=64,
        pos_embed_max_size=96,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_image_vae(4, use_quant_conv=False, use_post_quant_conv=False,
                            shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    return _finish(pipe)


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True) -> "FluxPipeline":
    """A tiny random FluxPipeline (FLUX.1 layout): latent ``(B, 4, H, W)`` with a VAE /8, packed by
    the pipeline into 2x2 patches (16-channel tokens) with ``(0, row, col)`` positional ids; a CLIP
    (pooled, 32) and a T5 (joint attention dim 32), FlowMatchEuler with the resolution shift.

    The real FLUX.1 has 16 latent channels (64 per token) and a 1024 px default size
    (``default_sample_size`` 128 latent rows); the geometry is the same. ``guidance_embeds``:
    FLUX.1-dev's distilled guidance input (True) or FLUX.1-schnell's none (False).
    """
    from diffusers import FluxPipeline, FluxTransformer2DModel
    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x a 2x2 patch
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),  # (text/image index, row, column): sums to attention_head_dim
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=16, max_image_seq_len=1024)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=_tiny_image_vae(4, use_quant_conv=False, use_post_quant_conv=False,
                            shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=CLIPTextModel(_tiny_clip_config(len(tokenizer))),
        tokenizer=tokenizer,
        text_encoder_2=_tiny_t5_encoder(len(tokenizer_2), d_model=32),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return _finish(pipe)


def tiny_gemma_tokenizer(model_max_length: int = 32) -> "GemmaTokenizer":
    """A Gemma tokenizer built in code over printable ASCII (one token per character, no merges)."""
    from transformers import GemmaTokenizer
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "\u2581": 5}
    for c in map(chr, range(33, 127)):
        vocab.setdefault(c, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def tiny_stable_audio_3_pipeline(seed: int = 0, stochastic: bool = True,
                                 max_seconds: float = 2.0) -> "StableAudio3Pipeline":
    """A tiny random StableAudio3Pipeline: latent ``(B, 8, T)``, time last; a SAME autoencoder of
    ratio 1024 (patch 256 x stride 4) at 44.1 kHz stereo, ~43 latent frames/s (the real SAME has
    ratio 4096 and 256 latent channels); a T5Gemma encoder; the duration embedder's range
    ``[0, max_seconds]`` (384 s for SA3 Medium), which is the adapter's native window.

    ``stochastic``: the distilled checkpoint's ping-pong sampler (FlowMatchEuler with
    ``stochastic_sampling``, fresh noise every step) or the base checkpoint's plain Euler.
    """
    from diffusers import StableAudio3Pipeline
    from diffusers.models.autoencoders.autoencoder_same import AutoencoderSAME
    from diffusers.models.transformers.transformer_stable_audio3 import StableAudio3DiTModel
    from diffusers.pipelines.stable_audio_3.modeling_stable_audio_3 import StableAudio3DurationEmbedder
    from transformers import T5GemmaConfig, T5GemmaEncoderModel
    torch.manual_seed(seed)
    tokenizer = tiny_gemma_tokenizer()
    module = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8, sliding_window=16)
    text_encoder = T5GemmaEncoderModel(T5GemmaConfig(encoder=module, decoder=module, vocab_size=len(tokenizer),
                                                     is_encoder_decoder=False))
    transformer = StableAudio3DiTModel(io_channels=8, embed_dim=32, depth=1, num_heads=2, cond_token_dim=16,
                                       global_cond_dim=16, local_add_cond_dim=9, timestep_features_dim=16,
                                       ff_mult=2.0, num_memory_tokens=4)
    vae = AutoencoderSAME(audio_channels=2, patch_size=256, encoder_channels=8, encoder_c_mults=(1,),
                          encoder_strides=(4,), encoder_transformer_depths=(1,), latent_dim=8, dim_heads=8,
                          ff_mult=2, sliding_window=1, sampling_rate=44100)
    pipe = StableAudio3Pipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        duration_embedder=StableAudio3DurationEmbedder(output_dim=16, fourier_dim=16, max_val=max_seconds),
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(stochastic_sampling=stochastic))
    return _finish(pipe)


def tiny_longcat_audio_pipeline(seed: int = 0) -> "LongCatAudioDiTPipeline":
    """A tiny random LongCatAudioDiTPipeline: latent ``(B, T, 8)``, time on dim -2; a convolutional
    VAE of ratio 8 (strides 2, 4) at a toy 80 Hz mono, so 10 latent frames/s and the pipeline's
    fixed 30 s cap is 300 frames (the real one: 24 kHz / 2048, 64 latent channels); a UMT5 encoder;
    the pipeline's own FlowMatchEuler with ``invert_sigmas``.

    The transformer zero-initialises its output projection, AdaLN and GRN gains (its output would
    be 0 whatever the input): its parameters are redrawn here so that a call's output depends on
    its inputs.
    """
    from diffusers import LongCatAudioDiTPipeline, LongCatAudioDiTTransformer, LongCatAudioDiTVae
    from transformers import UMT5Config, UMT5EncoderModel
    torch.manual_seed(seed)
    tokenizer = tiny_t5_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=16, d_ff=16, d_kv=8, num_heads=2,
                                               num_layers=1, pad_token_id=0, eos_token_id=1,
                                               decoder_start_token_id=0))
    transformer = LongCatAudioDiTTransformer(dit_dim=32, dit_depth=2, dit_heads=2, dit_text_dim=16, latent_dim=8,
                                             ff_mult=2.0)
    with torch.no_grad():
        for parameter in transformer.parameters():
            parameter.normal_(0.0, 0.2)
    vae = LongCatAudioDiTVae(in_channels=1, channels=8, c_mults=[1, 2], strides=[2, 4], latent_dim=8,
                             encoder_latent_dim=16, downsampling_ratio=8, sample_rate=80)
    pipe = LongCatAudioDiTPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, invert_sigmas=True))
    return _finish(pipe)


def _tiny_controlnet(unet: UNet2DConditionModel, seed: int) -> ControlNetModel:
    """A ControlNet copied from ``unet`` (as ``ControlNetModel.from_unet`` does for real ones), its
    conditioning embedding tiny (3 downsamplings: pixels -> latent resolution, /8).

    A trained ControlNet's zero convolutions (and its condition embedding's last one) have learned
    weights; freshly made they are zero, and the control image would change nothing: they are drawn
    at random here, so tests can see it.
    """
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 16))
    with torch.no_grad():
        for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                      controlnet.controlnet_cond_embedding.conv_out]:
            block.weight.normal_(0.0, 0.2)
    return controlnet.eval()


def tiny_controlnet_pipeline(seed: int = 0, sample_size: int = 64) -> StableDiffusionControlNetPipeline:
    """A tiny random StableDiffusionControlNetPipeline: :func:`tiny_sd_pipeline`'s components plus a
    ControlNet made from its UNet (:func:`_tiny_controlnet`). The control image is pixels, 8 per
    latent column."""
    base = tiny_sd_pipeline(seed, sample_size)
    pipe = StableDiffusionControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        controlnet=_tiny_controlnet(base.unet, seed + 1), scheduler=base.scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    return _finish(pipe)


def tiny_sdxl_controlnet_pipeline(seed: int = 0, sample_size: int = 32) -> StableDiffusionXLControlNetPipeline:
    """A tiny random StableDiffusionXLControlNetPipeline: :func:`tiny_sdxl_pipeline`'s components plus
    a ControlNet made from its UNet (pooled text and time ids as the UNet's)."""
    base = tiny_sdxl_pipeline(seed, sample_size)
    pipe = StableDiffusionXLControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2, tokenizer=base.tokenizer,
        tokenizer_2=base.tokenizer_2, unet=base.unet, controlnet=_tiny_controlnet(base.unet, seed + 1),
        scheduler=base.scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False)
    return _finish(pipe)


def tiny_upscale_pipeline(seed: int = 0, sample_size: int = 32) -> StableDiffusionUpscalePipeline:
    """A tiny random StableDiffusionUpscalePipeline (the x4 upscaler's layout, after diffusers' own
    tests): a UNet on the latent (4) + the low-resolution image (3) with ``noise_level`` class
    embeddings, a 3-level VAE (x4, ``scaling_factor`` 0.08333 as the real one), a DDPM
    ``low_res_scheduler`` and a v-prediction DDIM. ``sample_size`` 32 latent columns: windows of
    32 low-res pixels, 128 output pixels."""
    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=7, out_channels=4, block_out_channels=(8, 16, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, use_linear_projection=True, num_class_embeds=400)
    vae = AutoencoderKL(block_out_channels=[8, 8, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                        latent_channels=4, layers_per_block=1, norm_num_groups=4, scaling_factor=0.08333)
    pipe = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=CLIPTextModel(_tiny_clip_config(len(tokenizer))), tokenizer=tokenizer, unet=unet,
        low_res_scheduler=DDPMScheduler(), scheduler=DDIMScheduler(prediction_type="v_prediction"),
        max_noise_level=350)
    return _finish(pipe)


def tiny_texture2d_pipeline(seed: int = 0, window: int = 16, scheduler: str = "DDIM") -> "TexturePipeline2D":
    """The 2-D analytic texture pipeline (:mod:`safa.texture.pipeline2d`) on ``window x window`` tiles
    (default 16: a grid of a few tiles stays cheap), with ``scheduler`` ``"DDIM"`` (no x0 clipping)
    or ``"DPMSolverMultistep"`` (its default) on Stable Diffusion's schedule."""
    from diffusers import DDIMScheduler

    from ..texture.pipeline2d import make_texture2d_pipeline
    pipe = make_texture2d_pipeline(seed=seed, window=window)
    if scheduler == "DDIM":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif scheduler != "DPMSolverMultistep":
        raise ValueError(f"scheduler must be 'DDIM' or 'DPMSolverMultistep', got {scheduler!r}")
    return _finish(pipe)


def tiny_wan_pipeline(seed: int = 0) -> "WanPipeline":
    """A tiny random WanPipeline (text to video), the shapes of diffusers' own Wan tests: a causal 3-D
    VAE (``AutoencoderKLWan``, 16 latent channels, 8x spatial and 4x temporal compression, base width
    3), a two-layer ``WanTransformer3DModel`` (patch ``(1, 2, 2)``, 2 heads of 12), a UMT5 encoder
    (width 32) with :func:`tiny_t5_tokenizer`, and FlowMatchEuler with shift 7. At ``height=width=32``
    a latent frame is 4 x 4 (4 tokens); the pipeline's default 81 frames are 21 latent frames.
    """
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel
    torch.manual_seed(seed)
    tokenizer = tiny_t5_tokenizer(model_max_length=512)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_ff=32, d_kv=8, num_heads=2,
                                               num_layers=1, pad_token_id=0, eos_token_id=1,
                                               decoder_start_token_id=0))
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
    return _finish(pipe)


def tiny_qwen_tokenizer(model_max_length: int = 512) -> "Qwen2Tokenizer":
    """A Qwen2 byte-level BPE tokenizer built in code (one token per byte, no merges) with a ChatML
    chat template (what Qwen3 chat models use), so ``apply_chat_template`` works offline."""
    from transformers import Qwen2Tokenizer
    vocab = _byte_level_vocab(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=model_max_length,
                               pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token=None)
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tokenizer


def tiny_flux2_klein_pipeline(seed: int = 0, is_distilled: bool = False) -> "Flux2KleinPipeline":
    """A tiny random Flux2KleinPipeline (FLUX.2 [klein] layout): a VAE /4 with 4 latent channels and
    batch-norm statistics, patchified 2x2 by the pipeline (16-channel tokens, 8 px per latent
    column) with 4-D ids; a 28-layer Qwen3 of width 16 (the pipeline stacks hidden layers 9, 18 and
    27: text width 48) with :func:`tiny_qwen_tokenizer`; FlowMatchEuler. The released models have
    a VAE /8 of 32 channels (128 per token, 16 px per column) and a 1024 px default size.
    ``is_distilled``: the distilled models' no-guidance rule.
    """
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    tokenizer = tiny_qwen_tokenizer()
    text_encoder = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=16,
                                                num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=1,
                                                head_dim=8, max_position_embeddings=1024))
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                          timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
                                          guidance_embeds=False)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                             up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4,
                             norm_num_groups=4, sample_size=32)
    with torch.no_grad():  # batch-norm statistics that are not the identity, so their use is tested
        vae.bn.running_mean.normal_(0.0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer, transformer=transformer, is_distilled=is_distilled)
    return _finish(pipe)
