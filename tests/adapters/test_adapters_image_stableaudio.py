"""JointDiffusion over the Stable Audio Open, SD 1.x/2.x, SDXL and SD3 adapters, on the tiny
offline pipelines of safa.testing.

- every method, open and loop layouts: the exact requested width / length comes out;
- one view in an open layout reproduces the wrapped pipeline's own output for the same seed
  and initial latent (the wrapper does not change the model);
- the per-window conditioning (SDXL time ids, Stable Audio timing) is that of a window.
"""
from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
import torch
from merge_asserts import assert_merged_as_the_method_says, keep_last_views

from safa import JointDiffusion
from safa.testing import pipelines as tp

METHODS = ("safa", "safa_selfloop", "multidiffusion", "multidiffusion_triangular")
HAS_TORCHSDE = importlib.util.find_spec("torchsde") is not None
needs_torchsde = pytest.mark.skipif(
    not HAS_TORCHSDE, reason="Stable Audio's CosineDPMSolverMultistepScheduler needs torchsde")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


# One pipeline per class for the whole module: building is cheap, but not free on 2 shared cores.
@pytest.fixture(scope="module")
def pipes():
    built = {
        "sd": tp.tiny_sd_pipeline(seed=0),
        "sdxl": tp.tiny_sdxl_pipeline(seed=0),
        "sd3": tp.tiny_sd3_pipeline(seed=0),
    }
    if HAS_TORCHSDE:
        built["stable_audio"] = tp.tiny_stable_audio_pipeline(seed=0)
    return built


# Requested sizes, chosen so that the open layout must be cropped (not a multiple of the VAE
# factor / of a stride): SD window 64, width 1001 px -> 126 columns; SDXL / SD3 window 32,
# 601 px -> 76 columns; Stable Audio window 64 frames, 5.85 s -> 126 frames, 257985 samples.
# Panorama height for the tests: 16 latent rows instead of a square window keeps the UNet and
# VAE cost down by 4x; the long axis (what these tests are about) keeps the native window.
TEST_HEIGHT = 128
SIZES = {"sd": dict(width=1001, height=TEST_HEIGHT), "sdxl": dict(width=601, height=TEST_HEIGHT),
         "sd3": dict(width=601, height=TEST_HEIGHT), "stable_audio": dict(seconds=5.85)}
# A loop is a whole number of latent columns (else its loop point falls inside one) and about
# 1.6 windows for two views at overlap 0.2: 102 columns (816 px, or 102 Stable Audio frames of
# 2048 samples at 44.1 kHz) for window 64, 52 columns (416 px) for window 32.
LOOP_SIZES = {"sd": dict(width=816, height=TEST_HEIGHT), "sdxl": dict(width=416, height=TEST_HEIGHT),
              "sd3": dict(width=416, height=TEST_HEIGHT), "stable_audio": dict(seconds=102 * 2048 / 44100)}
CLASSES = ["sd", "sdxl", "sd3", pytest.param("stable_audio", marks=needs_torchsde)]


def _jd(pipe) -> JointDiffusion:
    return JointDiffusion(pipe)


@pytest.mark.parametrize("loop", [False, True], ids=["open", "loop"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", CLASSES)
def test_exact_length_every_method(pipes, name, method, loop):
    jd = _jd(pipes[name])
    size = (LOOP_SIZES if loop else SIZES)[name]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="torchsde")  # its own float-rounding chatter
        r = jd("a mountain range at dawn", method=method, loop=loop, num_inference_steps=2,
               guidance_scale=3.0, generator=_gen(), output_type="np", **size)
    assert r.layout.loop is loop
    assert r.layout.num_views >= 2
    if name == "stable_audio":
        # (B, channels, samples) with time last, stereo at 44.1 kHz
        assert r.sample_rate == 44100
        assert r.audio.shape == (1, 2, int(round(size["seconds"] * 44100)))
        assert r.latent.shape[:2] == (1, 64) and r.latent.shape[-1] == r.layout.length
        out = r.audio
    else:
        assert r.latent.shape[-2] * pipes[name].vae_scale_factor == TEST_HEIGHT
        assert r.images.shape == (1, TEST_HEIGHT, size["width"], 3)
        assert r.latent.shape[-1] == r.layout.length and r.latent.shape[1] == 4
        assert 0.0 <= r.images.min() and r.images.max() <= 1.0
        out = r.images
    assert np.isfinite(out).all()
    if loop:
        assert r.layout.length == r.columns  # an exact loop, nothing cropped in latent space


def test_default_output_is_pil_of_requested_width(pipes):
    jd = JointDiffusion(pipes["sd"])
    r = jd("a mountain range", width=600, num_inference_steps=1, guidance_scale=1.0, generator=_gen())
    assert len(r.images) == 1 and r.images[0].size == (600, 512)


def test_height_is_a_call_argument(pipes):
    jd = JointDiffusion(pipes["sd"])
    assert jd.adapter.latent_shape(1, 40) == (1, 4, 64, 40)  # default: the native (square) window
    r = jd("a mountain range", width=600, height=64, num_inference_steps=1, guidance_scale=1.0, generator=_gen(),
           output_type="np")
    assert r.images.shape == (1, 64, 600, 3) and r.latent.shape[-2] == 8
    for bad in (100, 0, -8):  # not a positive multiple of the VAE factor
        with pytest.raises(ValueError, match=r"height must be a positive multiple of 8 pixels"):
            jd("x", width=600, height=bad, num_inference_steps=1)
    for bad, name in ((64.0, "float"), (True, "bool"), ("64", "str")):  # a wrong type says so
        with pytest.raises(ValueError, match=rf"height must be an int \(pixels\), got {name}"):
            jd("x", width=600, height=bad, num_inference_steps=1)
    # SD3's transformer patchifies 2x2 latent cells: a multiple of 16 px, as its pipeline requires
    with pytest.raises(ValueError, match=r"height must be a positive multiple of 16 pixels"):
        JointDiffusion(pipes["sd3"])("x", width=600, height=72, num_inference_steps=1)


def test_panorama_narrower_than_a_window_equals_the_pipeline(pipes):
    """Below one window the wrapper is the pipeline: one view of the requested size."""
    pipe = pipes["sd"]
    common = dict(height=TEST_HEIGHT, width=200, num_inference_steps=2, guidance_scale=3.0, output_type="np")
    theirs = pipe("a mountain range", generator=_gen(3), **common).images
    for method in METHODS:
        ours = JointDiffusion(pipe)("a mountain range", method=method, generator=_gen(3), **common)
        assert ours.layout.num_views == 1 and ours.layout.window == 25  # 200 px = 25 latent columns
        np.testing.assert_allclose(ours.images, theirs, rtol=1e-4, atol=1e-5)


@needs_torchsde
def test_stable_audio_shorter_than_a_window_equals_the_pipeline(pipes):
    """Stable Audio's pipeline denoises its whole window, conditioned on (0, audio_end_in_s), and
    cuts the audio there: so does the wrapper below one window."""
    pipe = pipes["stable_audio"]
    common = dict(num_inference_steps=2, guidance_scale=3.0, output_type="np")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="torchsde")
        theirs = pipe("rain", audio_end_in_s=1.5, generator=_gen(5), **common).audios
        ours = JointDiffusion(pipe)("rain", 1.5, generator=_gen(5), **common)
    assert ours.layout.num_views == 1 and ours.layout.window == pipe.transformer.config.sample_size
    assert ours.audio.shape == theirs.shape == (1, 2, int(1.5 * 44100))
    np.testing.assert_allclose(ours.audio, theirs, rtol=1e-4, atol=1e-5)


def _one_view_pair(pipe, name: str, guidance: float, negative):
    """(JointDiffusion output, pipeline output) for one native window, same seed and latent."""
    jd = _jd(pipe)
    height = None if name == "stable_audio" else TEST_HEIGHT
    shape = jd.adapter.latent_shape(1, jd.adapter.native_window(), height)
    latents = torch.randn(shape, generator=_gen(7))
    common = dict(num_inference_steps=3, guidance_scale=guidance, negative_prompt=negative, output_type="np")
    if name == "stable_audio":
        w = jd.adapter.native_window()
        seconds = w * pipe.vae.hop_length / pipe.vae.config.sampling_rate
        ours = jd("rain on a tin roof", seconds, generator=_gen(), latents=latents, **common)
        # default audio_end_in_s = the whole window, i.e. the timing the adapter sets per window
        theirs = pipe("rain on a tin roof", generator=_gen(), latents=latents.clone(), **common).audios
        assert ours.layout.num_views == 1
        n = min(ours.audio.shape[-1], theirs.shape[-1])
        # the pipeline crops at int(seconds * sr), which float rounding may put one sample short
        assert abs(ours.audio.shape[-1] - theirs.shape[-1]) <= 1
        return ours.audio[..., :n], theirs[..., :n]
    side = jd.adapter.native_window() * pipe.vae_scale_factor
    ours = jd("a mountain range", width=side, height=TEST_HEIGHT, generator=_gen(), latents=latents, **common)
    theirs = pipe("a mountain range", height=TEST_HEIGHT, width=side, generator=_gen(), latents=latents.clone(),
                  **common).images
    assert ours.layout.num_views == 1
    return ours.images, theirs


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3"])
def test_images_are_the_pipelines_own_postprocess(pipes, name):
    """Every output_type of one view goes through the pipeline's own image_processor: the same
    values as the pipeline's own call (float rounding of the batched model call aside)."""
    from PIL import Image
    pipe = pipes[name]
    jd = _jd(pipe)
    latents = torch.randn(jd.adapter.latent_shape(1, jd.adapter.native_window(), TEST_HEIGHT), generator=_gen(7))
    side = jd.adapter.native_window() * pipe.vae_scale_factor
    for output_type in ("np", "pt", "pil"):
        common = dict(num_inference_steps=2, guidance_scale=1.0, output_type=output_type)
        ours = jd("a mountain range", width=side, height=TEST_HEIGHT, generator=_gen(), latents=latents,
                  **common).images
        theirs = pipe("a mountain range", height=TEST_HEIGHT, width=side, generator=_gen(), latents=latents.clone(),
                      **common).images
        assert type(ours) is type(theirs)
        if output_type == "pil":
            assert all(isinstance(im, Image.Image) and im.size == (side, TEST_HEIGHT) for im in ours)
            ours = np.stack([np.asarray(im) for im in ours]).astype(int)
            theirs = np.stack([np.asarray(im) for im in theirs]).astype(int)
            # uint8: a value within float rounding of a rounding boundary may land one level off
            assert np.abs(ours - theirs).max() <= 1 and (ours == theirs).mean() > 0.99
        else:
            ours, theirs = np.asarray(ours), np.asarray(theirs)
            assert ours.shape == theirs.shape
            np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("guidance,negative", [(5.0, None), (5.0, "blurry"), (1.0, None)],
                         ids=["cfg", "cfg-negative", "no-cfg"])
@pytest.mark.parametrize("name", CLASSES)
def test_one_view_equals_pipeline(pipes, name, guidance, negative):
    if name != "sd" and negative is not None and guidance == 1.0:
        pytest.skip("covered by the other cases")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="torchsde")
        ours, theirs = _one_view_pair(pipes[name], name, guidance, negative)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_panorama_pipeline_class_is_supported(pipes):
    """diffusers' own MultiDiffusion pipeline has SD's components: same adapter, same output."""
    from diffusers import StableDiffusionPanoramaPipeline
    sd = pipes["sd"]
    pano = StableDiffusionPanoramaPipeline(**sd.components, requires_safety_checker=False)
    kw = dict(width=601, height=TEST_HEIGHT, num_inference_steps=2, guidance_scale=3.0, output_type="np")
    a = _jd(sd)("a mountain range", generator=_gen(), **kw).images
    b = _jd(pano)("a mountain range", generator=_gen(), **kw).images
    np.testing.assert_array_equal(a, b)


def test_sdxl_time_ids_are_per_window(pipes):
    adapter = JointDiffusion(pipes["sdxl"]).adapter
    ids = adapter._time_ids(32, 40, 3, torch.float32)
    # (orig_h, orig_w, crop_top, crop_left, target_h, target_w) of ONE 256 x 320 px window
    assert ids.tolist() == [[256.0, 320.0, 0.0, 0.0, 256.0, 320.0]] * 3


def test_sdxl_time_ids_are_built_once_per_device(pipes, monkeypatch):
    # The pipeline builds them on the host: copied to the device every step they would be a
    # host sync per step (and an error under cuda_graphs capture).
    adapter = JointDiffusion(pipes["sdxl"]).adapter
    built = []
    real = adapter.pipe._get_add_time_ids
    monkeypatch.setattr(adapter.pipe, "_get_add_time_ids", lambda *a, **k: built.append(1) or real(*a, **k))
    first = adapter._time_ids(32, 40, 3, torch.float32)
    assert torch.equal(adapter._time_ids(32, 40, 2, torch.float32), first[:2]) and len(built) == 1
    assert first.device == adapter.device
    monkeypatch.setattr(type(adapter), "device", property(lambda self: torch.device("meta")))
    assert adapter._time_ids(32, 40, 3, torch.float32).device.type == "meta" and len(built) == 2


@needs_torchsde
def test_stable_audio_timing_is_per_window(pipes):
    pipe = pipes["stable_audio"]
    adapter = JointDiffusion(pipe).adapter
    start, end = adapter._duration_states(64 * 2048 / 44100, torch.float32)
    ref_start, ref_end = pipe.encode_duration(0.0, 64 * 2048 / 44100, adapter.device, False, 1)
    assert torch.equal(start, ref_start) and torch.equal(end, ref_end)
    # a window longer than the conditioner's range (512 s in the real model) is refused clearly
    with pytest.raises(ValueError, match="timing conditioner"):
        adapter._duration_states(600.0, torch.float32)


@needs_torchsde
def test_stable_audio_tiled_decode_equals_full(pipes):
    """The Oobleck decoder has no normalisation: with the adapter's context covering its receptive
    field, decoding in tiles equals decoding the whole latent (float rounding only)."""
    jd = JointDiffusion(pipes["stable_audio"])
    kw = dict(method="safa", num_inference_steps=2, guidance_scale=1.0, output_type="np")
    # a fresh generator per call: the same latent is decoded three ways
    full = jd("rain", 5.85, decode="full", generator=_gen(), **kw)
    tiled = jd("rain", 5.85, decode="tiled", decode_tile=20, generator=_gen(), **kw)
    views = jd("rain", 5.85, decode="views", generator=_gen(), **kw)
    assert torch.equal(full.latent, tiled.latent) and torch.equal(full.latent, views.latent)
    full, tiled, views = full.audio, tiled.audio, views.audio
    assert tiled.shape == full.shape == views.shape
    np.testing.assert_allclose(tiled, full, rtol=0, atol=1e-5)
    assert np.isfinite(views).all()


@pytest.mark.parametrize("decode", ["views", "tiled"])
@pytest.mark.parametrize("name", ["sd", "sd3"])
def test_image_decode_modes_give_the_requested_size(pipes, name, decode):
    jd = _jd(pipes[name])
    r = jd("a mountain range", **LOOP_SIZES[name], loop=True, num_inference_steps=1, guidance_scale=1.0,
           generator=_gen(), decode=decode, output_type="np")
    assert r.images.shape == (1, TEST_HEIGHT, LOOP_SIZES[name]["width"], 3)
    assert np.isfinite(r.images).all()


SD_SCHEDULERS = ["DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
                 "EulerAncestralDiscreteScheduler", "DDPMScheduler"]


def _with_scheduler(pipe, name: str):
    import diffusers
    cls = getattr(diffusers, name)
    kwargs = {"skip_prk_steps": True} if name == "PNDMScheduler" else {}
    return type(pipe)(**{**pipe.components, "scheduler": cls.from_config(pipe.scheduler.config, **kwargs)})


@pytest.mark.parametrize("scheduler", SD_SCHEDULERS)
def test_sd_every_scheduler(pipes, scheduler):
    """Multistep (PNDM, DPM-Solver) and stochastic (Euler a, DDPM) schedulers: the views' state is per
    batch row, so the long panorama runs, and one view still reproduces the pipeline."""
    pipe = _with_scheduler(pipes["sd"], scheduler)
    pipe.set_progress_bar_config(disable=True)
    jd = _jd(pipe)
    for method in METHODS:
        last: list = []
        r = jd("a mountain range", width=816, height=TEST_HEIGHT, method=method, loop=True, num_inference_steps=3,
               guidance_scale=3.0, generator=_gen(), output_type="np", callback_on_step_end=keep_last_views(last))
        assert r.images.shape == (1, TEST_HEIGHT, 816, 3) and np.isfinite(r.images).all()
        assert_merged_as_the_method_says(r, last[0], jd.adapter.long_dim)
    ours, theirs = _one_view_pair(pipe, "sd", 3.0, None)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_sd3_dynamic_shift_is_that_of_one_window(pipes):
    """With resolution-dependent shifting (SD3.5-style configs) the schedule is the one the pipeline
    uses for a window-sized image: one view reproduces the pipeline, and a wide panorama gets the
    same timesteps as one window (not those of its full width)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    base = pipes["sd3"]
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=16,
                                            max_image_seq_len=1024, base_shift=0.5, max_shift=1.15)
    pipe = type(base)(**{**base.components, "scheduler": sched})
    pipe.set_progress_bar_config(disable=True)
    ours, theirs = _one_view_pair(pipe, "sd3", 4.0, None)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    jd = _jd(pipe)
    one = jd.adapter.set_timesteps(4, (1, 4, 16, 32)).clone()
    assert not torch.equal(jd.adapter.set_timesteps(4, (1, 4, 16, 128)), one)  # the shift depends on the size
    seen = []
    jd("a mountain range", width=1000, height=TEST_HEIGHT, num_inference_steps=4, guidance_scale=1.0, generator=_gen(),
       output_type="latent", callback_on_step_end=lambda j, i, t, kw: seen.append(float(t)))
    assert seen == one.tolist()


@needs_torchsde
def test_stable_audio_rotary_tables_live_on_the_denoiser_device(pipes, monkeypatch):
    # On the host they would be copied host-to-device by every attention layer each step: a
    # host sync per layer, and an error inside a CUDA graph capture. Cached per device, so a
    # later pipe.to(...) gets tables on the new device.
    adapter = JointDiffusion(pipes["stable_audio"]).adapter
    cos, sin = adapter._rotary_embedding(64)
    assert cos.device == sin.device == adapter.device
    monkeypatch.setattr(type(adapter), "device", property(lambda self: torch.device("meta")))
    cos, sin = adapter._rotary_embedding(64)
    assert cos.device.type == sin.device.type == "meta"


@pytest.mark.parametrize("circular", [False, True], ids=["open", "circular"])
def test_drop_in_for_diffusers_panorama_pipeline(pipes, circular):
    """diffusers' MultiDiffusion panorama pipeline (window 64, stride 8, optional circular padding)
    and JointDiffusion with method="multidiffusion" at the same window and stride give the same
    latents for the same noise: a user can switch, then try SaFa."""
    from diffusers import DDIMScheduler, StableDiffusionPanoramaPipeline
    sd = pipes["sd"]
    pano = StableDiffusionPanoramaPipeline(**{**sd.components, "scheduler": DDIMScheduler.from_config(
        sd.scheduler.config)}, requires_safety_checker=False)
    pano.set_progress_bar_config(disable=True)
    height, width = TEST_HEIGHT, 768  # 96 latent columns: 5 views at stride 8, or a loop of 12
    common = dict(height=height, width=width, num_inference_steps=3, guidance_scale=5.0, output_type="latent")
    theirs = pano("a mountain range", generator=_gen(11), circular_padding=circular, **common).images
    ours = JointDiffusion(pano)("a mountain range", method="multidiffusion", window=64, overlap=56 / 64,
                                loop=circular, generator=_gen(11), **common)
    assert ours.layout.window == 64 and ours.layout.stride == 8 and ours.layout.uniform
    assert ours.layout.num_views == (12 if circular else 5)
    torch.testing.assert_close(ours.latent, theirs, rtol=1e-4, atol=1e-4)
