"""JointDiffusion over the newer DiT families on tiny offline pipelines (safa.testing.pipelines).

Flux (``FluxPipeline``): views cut on the unpacked latent, packed per view with the ids of its
own window; one view is the pipeline's own call, bitwise; every applicable method, open and loop,
gives the requested size; what Flux cannot do (MAD, true CFG) is refused in one clear line.

Stable Audio 3 (``StableAudio3Pipeline``): below one window (its duration embedder's range) the
call is the pipeline's, bitwise, with its ping-pong sampler's fresh noise per step; long audio
and loops with every method, each window conditioned on its own duration; tiled / streamed decode.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from merge_asserts import assert_merged_as_the_method_says, keep_last_views

from safa import JointDiffusion
from safa.methods import SyncDiffusion
from safa.testing import pipelines as tp

METHODS = ("safa", "safa_selfloop", "multidiffusion", "multidiffusion_triangular")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


# -- Flux -------------------------------------------------------------------------------------
# 128 px high (16 latent rows, 8 token rows), windows of 32 latent columns (256 px): the real
# FLUX.1 window is 128 x 128; the long axis is what these tests are about.
FLUX_HEIGHT, FLUX_WINDOW = 128, 32


@pytest.fixture(scope="module")
def flux():
    return tp.tiny_flux_pipeline(seed=0)


def _flux_pipeline_latent(pipe, latents, **kw):
    """The pipeline's own final latent, unpacked to the (B, C, H, W) layout the sampler returns."""
    packed = pipe._pack_latents(latents.clone(), *latents.shape)
    out = pipe(latents=packed, output_type="latent", **kw).images
    return pipe._unpack_latents(out, kw["height"], kw["width"], pipe.vae_scale_factor)


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev", "schnell"])
def test_flux_one_view_equals_pipeline(guidance_embeds, flux):
    pipe = flux if guidance_embeds else tp.tiny_flux_pipeline(seed=0, guidance_embeds=False)
    jd = JointDiffusion(pipe)
    width = FLUX_WINDOW * pipe.vae_scale_factor
    latents = torch.randn(jd.adapter.latent_shape(1, FLUX_WINDOW, FLUX_HEIGHT), generator=_gen(7))
    kw = dict(height=FLUX_HEIGHT, width=width, num_inference_steps=3, guidance_scale=4.0)
    ours = jd("a mountain range", latents=latents, output_type="latent", **kw)
    assert ours.layout.num_views == 1 and ours.layout.window == FLUX_WINDOW
    assert torch.equal(ours.latent, _flux_pipeline_latent(pipe, latents, prompt="a mountain range", **kw))
    # decoded through the pipeline's own VAE scaling and image processor: the same image
    a = jd("a mountain range", generator=_gen(), output_type="np", **kw).images
    b = pipe("a mountain range", generator=_gen(), output_type="np", **kw).images
    np.testing.assert_array_equal(a, b)


def test_flux_narrower_than_a_window_is_the_pipeline(flux):
    """Below one window (FLUX.1's 1024 px default) the call is the pipeline's at the requested size."""
    jd = JointDiffusion(flux)
    kw = dict(height=FLUX_HEIGHT, width=200, num_inference_steps=2, output_type="np")
    ours = jd("a mountain range", generator=_gen(3), **kw)
    # the pipeline rounds 200 px down to a multiple of 16 (192); the wrapper generates 208 and crops
    assert ours.layout.num_views == 1 and ours.layout.window == 26 and ours.images.shape == (1, 128, 200, 3)
    assert jd.adapter.native_window() == flux.default_sample_size


@pytest.mark.parametrize("loop", [False, True], ids=["open", "loop"])
@pytest.mark.parametrize("method", METHODS)
def test_flux_panorama_every_method(flux, method, loop):
    jd = JointDiffusion(flux)
    width = 416 if loop else 601  # a loop: 52 latent columns, two views; open: 76 columns, cropped
    last: list = []
    r = jd("a mountain range at dawn", width=width, height=FLUX_HEIGHT, window=FLUX_WINDOW, method=method,
           loop=loop, num_inference_steps=2, generator=_gen(), output_type="np",
           callback_on_step_end=keep_last_views(last))
    assert r.images.shape == (1, FLUX_HEIGHT, width, 3) and np.isfinite(r.images).all()
    assert r.latent.shape[:3] == (1, 4, FLUX_HEIGHT // 8) and r.latent.shape[-1] == r.layout.length
    assert r.layout.loop is loop and r.layout.num_views >= 2
    assert_merged_as_the_method_says(r, last[0], jd.adapter.long_dim)


def test_flux_odd_stride_packs_each_view_on_its_own(flux):
    """A view may start at an odd latent column: it is packed from its own first column."""
    r = JointDiffusion(flux)("a mountain range", width=480, height=FLUX_HEIGHT, window=FLUX_WINDOW, overlap=7 / 32,
                             num_inference_steps=1, generator=_gen(), output_type="latent")
    assert r.layout.stride == 25 and r.layout.num_views >= 2 and torch.isfinite(r.latent).all()


def test_flux_syncdiffusion(flux):
    """SyncDiffusion's loss is on decoded images; with a given loss (LPIPS needs weights) it runs and
    moves the views."""
    jd = JointDiffusion(flux)
    kw = dict(width=416, height=FLUX_HEIGHT, window=FLUX_WINDOW, num_inference_steps=2, output_type="latent")
    mse = lambda a, b: ((a - b) ** 2).mean()  # noqa: E731
    zero = jd("x", method=SyncDiffusion(weight=0.0, steps=1.0, loss=mse), generator=_gen(), **kw)
    sync = jd("x", method=SyncDiffusion(weight=20.0, steps=1.0, loss=mse), generator=_gen(), **kw)
    assert torch.isfinite(sync.latent).all() and not torch.equal(zero.latent, sync.latent)


def test_flux_refuses_clearly(flux):
    jd = JointDiffusion(flux)
    kw = dict(width=601, height=FLUX_HEIGHT, window=FLUX_WINDOW, num_inference_steps=1)
    with pytest.raises(ValueError, match="MAD merges a UNet's self-attention layers; FluxPipeline cannot run it"):
        jd("x", method="mad", **kw)
    with pytest.raises(ValueError, match="true classifier-free guidance"):
        jd("x", negative_prompt="blurry", **kw)
    with pytest.raises(ValueError, match="negative_prompt_embeds is not supported for FluxPipeline"):
        jd(prompt_embeds=torch.zeros(1, 4, 32), negative_prompt_embeds=torch.zeros(1, 4, 32), **kw)
    with pytest.raises(ValueError, match="height must be a positive multiple of 16 pixels"):
        jd("x", **{**kw, "height": 120})
    with pytest.raises(ValueError, match="window must be a multiple of 2 latent columns"):
        jd("x", **{**kw, "window": 31})


def test_flux_prompt_embeds_equal_prompt(flux):
    jd = JointDiffusion(flux)
    embeds, pooled, _ = flux.encode_prompt("a mountain range", prompt_2=None, max_sequence_length=512)
    kw = dict(width=416, height=FLUX_HEIGHT, window=FLUX_WINDOW, num_inference_steps=1, output_type="latent")
    a = jd("a mountain range", generator=_gen(), **kw).latent
    b = jd(prompt_embeds=embeds, pooled_prompt_embeds=pooled, generator=_gen(), **kw).latent
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # the encoders' float rounding only


def test_flux_writes_the_file(flux, tmp_path):
    from PIL import Image
    path = tmp_path / "pano.png"
    r = JointDiffusion(flux)("a mountain range", width=601, height=FLUX_HEIGHT, window=FLUX_WINDOW,
                             num_inference_steps=1, generator=_gen(), decode="tiled", output_path=str(path))
    assert r.output_paths == [str(path)] and Image.open(path).size == (601, FLUX_HEIGHT)


# -- Stable Audio 3 ---------------------------------------------------------------------------
# The tiny SA3: ~43 latent frames/s, native window 86 frames (the duration embedder's 2 s range).
SA3_OPEN, SA3_LOOP = 5.3, 200 * 1024 / 44100  # 228 frames: covered by 4 views, cropped; a loop of 200 frames


@pytest.fixture(scope="module")
def sa3():
    return tp.tiny_stable_audio_3_pipeline(seed=0)


@pytest.mark.parametrize("guidance,negative", [(1.0, None), (3.0, None), (3.0, "noise")],
                         ids=["distilled", "cfg", "cfg-negative"])
@pytest.mark.parametrize("stochastic", [True, False], ids=["ping-pong", "euler"])
def test_stable_audio_3_one_view_equals_pipeline(sa3, stochastic, guidance, negative):
    """Below one window the call is the pipeline's at the requested duration, bitwise: the same noise,
    duration conditioning, schedule, and (ping-pong) the same fresh noise drawn every step."""
    pipe = sa3 if stochastic else tp.tiny_stable_audio_3_pipeline(seed=0, stochastic=False)
    kw = dict(num_inference_steps=3, guidance_scale=guidance, negative_prompt=negative, output_type="np")
    ours = JointDiffusion(pipe)("rain on a tin roof", 1.0, generator=_gen(), **kw)
    theirs = pipe("rain on a tin roof", duration=1.0, generator=_gen(), **kw).audios
    assert ours.layout.num_views == 1 and ours.layout.window == 44  # ceil(1.0 s x 43.07 frames/s)
    assert ours.audio.shape == theirs.shape == (1, 2, 44100)
    np.testing.assert_array_equal(ours.audio, theirs)


def test_stable_audio_3_defaults_are_the_pipelines(sa3):
    adapter = JointDiffusion(sa3).adapter
    assert adapter.pipeline_default("num_inference_steps", 50) == 8  # ping-pong
    euler = JointDiffusion(tp.tiny_stable_audio_3_pipeline(seed=0, stochastic=False)).adapter
    assert euler.pipeline_default("num_inference_steps", 50) == 100
    assert adapter.native_window() == int(2.0 * 44100 / 1024)  # the duration embedder's range


@pytest.mark.parametrize("loop", [False, True], ids=["open", "loop"])
@pytest.mark.parametrize("method", METHODS)
def test_stable_audio_3_long_audio_every_method(sa3, method, loop):
    jd = JointDiffusion(sa3)
    seconds = SA3_LOOP if loop else SA3_OPEN
    last: list = []
    r = jd("rain", seconds, method=method, loop=loop, num_inference_steps=3, generator=_gen(), output_type="np",
           callback_on_step_end=keep_last_views(last))
    assert r.audio.shape == (1, 2, int(round(seconds * 44100))) and np.isfinite(r.audio).all()
    assert np.abs(r.audio).max() <= 1.0  # clamped as the pipeline does
    assert r.layout.loop is loop and r.layout.num_views >= 2 and r.latent.shape[:2] == (1, 8)
    if loop:
        assert r.layout.length == r.columns == 200
    assert_merged_as_the_method_says(r, last[0], jd.adapter.long_dim)


def test_stable_audio_3_duration_is_per_window(sa3, monkeypatch):
    """Every window is conditioned on its own length (the whole long output's would be out of range)."""
    jd = JointDiffusion(sa3)
    seen = set()
    real = jd.adapter._duration_state
    monkeypatch.setattr(jd.adapter, "_duration_state", lambda s: seen.add(round(s, 6)) or real(s))
    jd("rain", SA3_OPEN, num_inference_steps=1, generator=_gen(), output_type="latent")
    assert seen == {round(86 * 1024 / 44100, 6)}


def test_stable_audio_3_streamed_file_equals_returned_audio(sa3, tmp_path):
    """A tiled decode (the SAME decoder's band attention inside the context) equals the whole decode to
    float rounding, and the file written tile by tile holds that audio."""
    import soundfile as sf
    jd = JointDiffusion(sa3)
    kw = dict(num_inference_steps=2, generator=None)
    full = jd("rain", SA3_OPEN, decode="full", output_type="np", **{**kw, "generator": _gen()})
    tiled = jd("rain", SA3_OPEN, decode="tiled", decode_tile=40, output_type="np", **{**kw, "generator": _gen()})
    assert torch.equal(full.latent, tiled.latent)
    np.testing.assert_allclose(tiled.audio, full.audio, rtol=0, atol=1e-5)
    path = tmp_path / "rain.wav"
    r = jd("rain", SA3_OPEN, decode="tiled", decode_tile=40, output_path=str(path), **{**kw, "generator": _gen()})
    assert r.output_paths == [str(path)] and r.audio is None
    written, rate = sf.read(str(path), dtype="float32", always_2d=True)
    assert rate == 44100 and written.shape == (int(round(SA3_OPEN * 44100)), 2)
    np.testing.assert_allclose(written.T, full.audio[0], atol=1e-4)  # WAV's float32 / PCM rounding


def test_stable_audio_3_syncdiffusion_and_refusals(sa3):
    jd = JointDiffusion(sa3)
    r = jd("rain", SA3_LOOP, method=SyncDiffusion(steps=1.0), loop=True, num_inference_steps=2, generator=_gen(),
           output_type="np")
    assert r.audio.shape == (1, 2, int(round(SA3_LOOP * 44100))) and np.isfinite(r.audio).all()
    with pytest.raises(ValueError, match="MAD merges a UNet's self-attention layers; StableAudio3Pipeline"):
        jd("rain", SA3_OPEN, method="mad", num_inference_steps=1)


@pytest.mark.parametrize("make", [tp.tiny_flux_pipeline, tp.tiny_stable_audio_3_pipeline], ids=["flux", "sa3"])
def test_tiny_pipelines_round_trip_offline(make, tmp_path):
    pipe = make()
    pipe.save_pretrained(tmp_path)
    loaded = type(pipe).from_pretrained(tmp_path)
    for a, b in zip(pipe.transformer.parameters(), loaded.transformer.parameters()):
        assert torch.equal(a, b)
    assert type(loaded.tokenizer) is type(pipe.tokenizer)
