"""Full-size random-weight pipelines built from published configs, with no download.

The numbers below are copied from the models' published ``config.json`` files on the
Hugging Face Hub (cited per config); weights are random, so what is measured is cost (time,
memory, window evaluations), never quality. The text encoders stay tiny (they run once per
call), but with the hidden size the denoiser's cross-attention / class embedding expects.

- :data:`SD2_UNET`, :data:`SD2_VAE`: ``stabilityai/stable-diffusion-2-base``, ``unet/config.json``
  and ``vae/config.json``;
- :data:`AUDIOLDM_UNET`, :data:`AUDIOLDM_VAE`, :data:`AUDIOLDM_VOCODER`: ``cvssp/audioldm-s-full-v2``,
  ``unet/config.json``, ``vae/config.json``, ``vocoder/config.json``;
- :data:`STABLE_AUDIO_DIT`: ``stabilityai/stable-audio-open-1.0``, ``transformer/config.json``
  (written down for the GPU kit; its 1.06 B parameters are not built on the 2-core VM);
- :data:`SD3_MEDIUM_DIT`: ``stabilityai/stable-diffusion-3-medium-diffusers``, ``transformer/config.json``;
- :data:`FLUX_DEV_DIT`: ``black-forest-labs/FLUX.1-dev``, ``transformer/config.json``.

The DiTs' working memory is one block's (no skips), so :func:`dit_block` builds them at full
width but :data:`DIT_MEMORY_LAYERS` deep, which fits the 2-core VM and gives the same peak.

Configs not in this list are left at diffusers' defaults, which are those of these files
unless a comment says otherwise. ``kind="tiny"`` returns safa.testing's tiny pipelines
instead (the smoke mode of bench_fullsize.py, so CI runs the same code in seconds).
"""
from __future__ import annotations

from typing import Any, Dict

import torch

# stabilityai/stable-diffusion-2-base, unet/config.json (865.9 M parameters when built).
SD2_UNET: Dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=1024,  # OpenCLIP ViT-H text width
    attention_head_dim=(5, 10, 20, 20),  # heads per level (64 channels each): diffusers' SD 2 naming
    use_linear_projection=True,
)
# stabilityai/stable-diffusion-2-base, vae/config.json (the SD 1.x / 2.x KL-f8 autoencoder).
SD2_VAE: Dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.18215,
)
# stabilityai/stable-diffusion-2-base, scheduler/scheduler_config.json: the betas. The file names
# PNDM; the benchmarks use DDIM on these betas, the scheduler of the paper's panorama baselines.
SD2_BETAS: Dict[str, Any] = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                 clip_sample=False, set_alpha_to_one=False, steps_offset=1)

# cvssp/audioldm-s-full-v2, unet/config.json. Text enters as a projected class embedding
# (CLAP, 512) concatenated to the time embedding; encoder_hidden_states is None.
AUDIOLDM_UNET: Dict[str, Any] = dict(
    sample_size=128, in_channels=8, out_channels=8, layers_per_block=2,
    block_out_channels=(128, 256, 384, 640),
    down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
    up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
    cross_attention_dim=(128, 256, 384, 640),
    # Unsure: the conversion writes the original num_head_channels (32) here; the FLOPs do not
    # depend on how the channels are split into heads, only the attention kernel's shape does.
    attention_head_dim=8,
    class_embed_type="simple_projection", projection_class_embeddings_input_dim=512,
    class_embeddings_concat=True,
)
# cvssp/audioldm-s-full-v2, vae/config.json: 64 mel bins -> 16 latent rows, 8 latent channels.
AUDIOLDM_VAE: Dict[str, Any] = dict(
    in_channels=1, out_channels=1, latent_channels=8, layers_per_block=2, sample_size=256,
    block_out_channels=(128, 256, 512),
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    scaling_factor=0.9227914214134216,  # unsure of the digits; it scales latents, not cost
)
# cvssp/audioldm-s-full-v2, vocoder/config.json (SpeechT5HifiGanConfig): 16 kHz, hop 160.
AUDIOLDM_VOCODER: Dict[str, Any] = dict(
    model_in_dim=64, sampling_rate=16000, upsample_initial_channel=1024, upsample_rates=[5, 4, 2, 2, 2],
    upsample_kernel_sizes=[16, 16, 8, 4, 4], resblock_kernel_sizes=[3, 7, 11],
    resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]], normalize_before=False,
)
# cvssp/audioldm-s-full-v2, scheduler/scheduler_config.json (DDIM).
AUDIOLDM_BETAS: Dict[str, Any] = dict(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear",
                                      clip_sample=False, set_alpha_to_one=False)

# stabilityai/stable-audio-open-1.0, transformer/config.json (StableAudioDiTModel).
STABLE_AUDIO_DIT: Dict[str, Any] = dict(
    sample_size=1024, in_channels=64, out_channels=64, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, num_key_value_attention_heads=12, cross_attention_dim=768,
    cross_attention_input_dim=768, global_states_input_dim=1536, time_proj_dim=256,
)

# stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json (SD3Transformer2DModel).
SD3_MEDIUM_DIT: Dict[str, Any] = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
# black-forest-labs/FLUX.1-dev, transformer/config.json (FluxTransformer2DModel): 19 double-stream
# and 38 single-stream blocks of width 3072.
FLUX_DEV_DIT: Dict[str, Any] = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# Blocks built per DiT for the memory check: the no-grad peak of a DiT is one block's (measured
# equal at 2 and 3 SD3 blocks), so depth only costs build time.
DIT_MEMORY_LAYERS = {"sd3": dict(num_layers=2), "flux": dict(num_layers=1, num_single_layers=1),
                     "stable-audio": dict(num_layers=1)}


def dit_block(kind: str) -> Any:
    """The ``kind`` DiT ("sd3", "flux", "stable-audio") of its published config at full width, in
    a tiny pipeline of its family (whose adapter reads the transformer's config), with
    :data:`DIT_MEMORY_LAYERS` blocks."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, StableAudioDiTModel

    from safa.testing import pipelines
    build = {"sd3": (pipelines.tiny_sd3_pipeline, SD3Transformer2DModel, SD3_MEDIUM_DIT),
             "flux": (pipelines.tiny_flux_pipeline, FluxTransformer2DModel, FLUX_DEV_DIT),
             "stable-audio": (pipelines.tiny_stable_audio_pipeline, StableAudioDiTModel, STABLE_AUDIO_DIT)}
    tiny, cls, config = build[kind]
    pipe = tiny()
    torch.manual_seed(0)
    pipe.transformer = cls(**dict(config, **DIT_MEMORY_LAYERS[kind]))
    return _eval(pipe)


def _tiny_clip_encoder(hidden_size: int, vocab_size: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=1, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))


def sd2_pipeline(kind: str = "full") -> Any:
    """Stable Diffusion 2.0 base: full-size UNet and VAE, a one-layer text encoder of width 1024."""
    from safa.testing import tiny_sd_pipeline
    if kind == "tiny":
        return tiny_sd_pipeline(seed=0)
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from safa.testing.pipelines import tiny_clip_tokenizer
    torch.manual_seed(0)
    tokenizer = tiny_clip_tokenizer(model_max_length=77)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD2_VAE), text_encoder=_tiny_clip_encoder(SD2_UNET["cross_attention_dim"], len(tokenizer)),
        tokenizer=tokenizer, unet=UNet2DConditionModel(**SD2_UNET), scheduler=DDIMScheduler(**SD2_BETAS),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return _eval(pipe)


def audioldm_pipeline(kind: str = "full") -> Any:
    """AudioLDM-S full v2: full-size UNet, VAE and HiFi-GAN, a one-layer CLAP text tower (512-d projection)."""
    from safa.testing import tiny_audioldm_pipeline
    if kind == "tiny":
        return tiny_audioldm_pipeline()
    from diffusers import AudioLDMPipeline, AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import ClapTextConfig, ClapTextModelWithProjection, SpeechT5HifiGan, SpeechT5HifiGanConfig

    from safa.testing.pipelines import tiny_roberta_tokenizer
    torch.manual_seed(0)
    tokenizer = tiny_roberta_tokenizer()
    text_encoder = ClapTextModelWithProjection(ClapTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length + 2, bos_token_id=0,
        pad_token_id=1, eos_token_id=2, projection_dim=AUDIOLDM_UNET["projection_class_embeddings_input_dim"]))
    pipe = AudioLDMPipeline(vae=AutoencoderKL(**AUDIOLDM_VAE), text_encoder=text_encoder, tokenizer=tokenizer,
                            unet=UNet2DConditionModel(**AUDIOLDM_UNET), scheduler=DDIMScheduler(**AUDIOLDM_BETAS),
                            vocoder=SpeechT5HifiGan(SpeechT5HifiGanConfig(**AUDIOLDM_VOCODER)))
    return _eval(pipe)


def _eval(pipe: Any) -> Any:
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
