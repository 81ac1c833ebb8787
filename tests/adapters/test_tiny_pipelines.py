"""The tiny offline pipelines of safa.testing: each builds, runs its own __call__ for 2 steps with
the real latent layout, and round-trips save_pretrained / from_pretrained with no network."""

from __future__ import annotations

import importlib.util
from typing import Any, Callable

import numpy as np
import pytest
import torch

from safa.testing import pipelines as tp

# Stable Audio's scheduler (CosineDPMSolverMultistepScheduler) needs the optional torchsde.
needs_torchsde = pytest.mark.skipif(importlib.util.find_spec("torchsde") is None,
                                    reason="CosineDPMSolverMultistepScheduler needs torchsde")


def _gen() -> torch.Generator:
    return torch.Generator("cpu").manual_seed(0)


def _musicldm_embeds(pipe) -> dict[str, torch.Tensor]:
    # MusicLDM's own prompt path calls ClapModel.get_text_features and expects a tensor;
    # transformers 5 returns a BaseModelOutputWithPooling (a diffusers/transformers 5
    # incompatibility of the deprecated pipeline, not of the tiny model), so encode here.
    ids = pipe.tokenizer(["rain on a tin roof", ""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    with torch.no_grad():
        emb = pipe.text_encoder.get_text_features(ids.input_ids, attention_mask=ids.attention_mask).pooler_output
    return {"prompt_embeds": emb[:1], "negative_prompt_embeds": emb[1:]}


# name -> (factory, call kwargs builder, expected decoded output shape, expected latent shape)
# Latent layouts (docs/method.md, section 1): (B, 8, T, 16) at 25 frames/s for the AudioLDM family,
# (B, 64, T) for Stable Audio, (B, 4, H/8, W/8) for images.
_AUDIO_KW = dict(audio_length_in_s=2.56)
CASES: dict[str, tuple[Callable[..., Any], Callable[[Any], dict], tuple, tuple]] = {
    "audioldm": (tp.tiny_audioldm_pipeline, lambda p: dict(prompt="rain on a tin roof", **_AUDIO_KW),
                 (1, 40960), (1, 8, 64, 16)),
    "audioldm2": (tp.tiny_audioldm2_pipeline, lambda p: dict(prompt="rain on a tin roof", **_AUDIO_KW),
                  (1, 40960), (1, 8, 64, 16)),
    "musicldm": (tp.tiny_musicldm_pipeline, lambda p: dict(**_musicldm_embeds(p), **_AUDIO_KW),
                 (1, 40960), (1, 8, 64, 16)),
    # Stable Audio always generates its whole window (64 frames * 2048 samples) and crops.
    "stable_audio": (tp.tiny_stable_audio_pipeline, lambda p: dict(prompt="rain", audio_end_in_s=2.0),
                     (1, 2, 88200), (1, 64, 64)),
    "sd": (tp.tiny_sd_pipeline, lambda p: dict(prompt="a mountain range", height=64, width=128),
           (1, 64, 128, 3), (1, 4, 8, 16)),
    "sdxl": (tp.tiny_sdxl_pipeline, lambda p: dict(prompt="a mountain range", height=64, width=128),
             (1, 64, 128, 3), (1, 4, 8, 16)),
    "sd3": (tp.tiny_sd3_pipeline, lambda p: dict(prompt="a mountain range", height=64, width=128),
            (1, 64, 128, 3), (1, 4, 8, 16)),
}


def _run(pipe, kwargs: dict, **extra) -> np.ndarray:
    out = pipe(num_inference_steps=2, generator=_gen(), **kwargs, **extra)
    arr = out.audios if hasattr(out, "audios") else out.images
    return arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)


def _latent(pipe, kwargs: dict) -> tuple:
    """The final latent's shape, via the pipeline's step callback (AudioLDM/MusicLDM/AudioLDM2
    have no output_type='latent'; the others' callback_on_step_end sees the same tensor)."""
    seen: list[torch.Tensor] = []
    import inspect
    params = inspect.signature(pipe.__call__).parameters
    if "callback_on_step_end" in params:
        def cb(p, i, t, kw):
            seen.append(kw["latents"])
            return kw
        pipe(num_inference_steps=2, generator=_gen(), callback_on_step_end=cb, output_type="latent", **kwargs)
    else:
        pipe(num_inference_steps=2, generator=_gen(), callback=lambda i, t, lat: seen.append(lat), **kwargs)
    return tuple(seen[-1].shape)


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_torchsde) if n == "stable_audio" else n
                                  for n in CASES])
def test_tiny_pipeline_runs_and_roundtrips(name: str, tmp_path) -> None:
    factory, make_kwargs, out_shape, latent_shape = CASES[name]
    pipe = factory(seed=0)
    # float32 on the CPU, as promised
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            assert next(comp.parameters()).dtype == torch.float32
            assert next(comp.parameters()).device.type == "cpu"
    kwargs = make_kwargs(pipe)
    out = _run(pipe, kwargs, output_type="np")
    assert out.shape == out_shape
    assert np.isfinite(out).all()
    assert _latent(pipe, kwargs) == latent_shape

    pipe.save_pretrained(tmp_path)
    loaded = type(pipe).from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    for cname, comp in pipe.components.items():
        other = loaded.components[cname]
        if isinstance(comp, torch.nn.Module):
            sa, sb = comp.state_dict(), other.state_dict()
            assert sa.keys() == sb.keys(), cname
            for k in sa:
                assert torch.equal(sa[k], sb[k]), (cname, k)
        elif comp is None:
            assert other is None, cname
        else:
            assert type(other) is type(comp), cname
    again = _run(loaded, make_kwargs(loaded), output_type="np")
    np.testing.assert_allclose(again, out, rtol=1e-5, atol=1e-5)


def test_factories_are_seeded() -> None:
    a = tp.tiny_audioldm_pipeline(seed=0).unet.conv_in.weight
    b = tp.tiny_audioldm_pipeline(seed=0).unet.conv_in.weight
    c = tp.tiny_audioldm_pipeline(seed=1).unet.conv_in.weight
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("make", [tp.tiny_roberta_tokenizer, tp.tiny_clip_tokenizer, tp.tiny_t5_tokenizer])
def test_tokenizers_cover_ascii(make) -> None:
    tok = make()
    text = "Rain on a tin roof, then thunder: 42 drops/s!"
    ids = tok(text, add_special_tokens=False).input_ids
    # (CLIP's unk token is its end-of-text token, so look only at the text's own ids)
    assert tok.unk_token_id not in ids
    # CLIP lower-cases and splits punctuation: compare case- and space-insensitively
    assert tok.decode(ids).replace(" ", "").lower() == text.replace(" ", "").lower()


# -- JointDiffusion with return_dict=False: what the wrapped pipeline returns -----------------------
def _jd_kwargs(name: str) -> dict:
    """One view of each family's own size (the pipeline's own call), one step."""
    if name in ("sd", "sdxl", "sd3"):
        return dict(prompt="a mountain range", height=64, width=128)
    return dict(prompt="rain on a tin roof", seconds=2.0 if name == "stable_audio" else 2.56)


def _pipeline_tuple(pipe, name: str, output_type: str) -> tuple:
    kwargs = CASES[name][1](pipe)
    return pipe(num_inference_steps=1, generator=_gen(), return_dict=False, output_type=output_type, **kwargs)


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_torchsde) if n == "stable_audio" else n
                                  for n in CASES])
def test_return_dict_false_is_what_the_pipeline_returns(name: str) -> None:
    from safa import JointDiffusion
    pipe = CASES[name][0](seed=0)
    jd = JointDiffusion(pipe)
    call = dict(_jd_kwargs(name), num_inference_steps=1, guidance_scale=1.0)
    output_type = "pil" if name in ("sd", "sdxl", "sd3") else "np"
    theirs = _pipeline_tuple(pipe, name, output_type)
    ours = jd(generator=_gen(), return_dict=False, output_type=output_type, **call)
    # The pipeline's tuple: (images, has_nsfw_concept) for SD 1.x / 2.x, (output,) for the others.
    assert isinstance(ours, tuple) and len(ours) == len(theirs), (ours, theirs)
    assert type(ours[0]) is type(theirs[0])
    assert ours[1:] == (None,) * (len(theirs) - 1)
    # output_type="latent": the latent takes the output's place (it was (None,) for audio).
    whole = jd(generator=_gen(), output_type="latent", **call)
    latent_only = jd(generator=_gen(), output_type="latent", return_dict=False, **call)
    assert len(latent_only) == len(theirs)
    assert isinstance(latent_only[0], torch.Tensor) and torch.equal(latent_only[0], whole.latent)


def test_return_dict_false_latent_texture_pipeline() -> None:
    from safa import JointDiffusion
    from safa.texture import make_texture_pipeline
    pipe = make_texture_pipeline(window_frames=16)
    jd = JointDiffusion(pipe)
    call = dict(prompt="rain", seconds=1.5, num_inference_steps=1, output_type="latent")
    (latent,) = jd(generator=_gen(), return_dict=False, **call)
    assert torch.equal(latent, jd(generator=_gen(), **call).latent)
    (audio,) = jd(generator=_gen(), return_dict=False, **dict(call, output_type="np"))
    assert isinstance(audio, np.ndarray) and audio.shape == (1, 24000)
