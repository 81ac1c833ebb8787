"""The joint-diffusion sampler on tiny random-weight pipelines (CPU, offline).

Window 1.28 s = 32 latent frames (the tiny UNets downsample by 4) and a handful of steps
keep every call well under a second.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, PNDMScheduler)

import safa
import safa.testing.pipelines as tp
from merge_asserts import assert_merged_as_the_method_says, keep_last_views
from safa import METHODS, JointDiffusion, get_method
from safa.adapters import Adapter, get_adapter, registered_adapters
from safa.decode import decode_tiled
from safa.layouts import LoopLengthError, loop_layout, open_layout
from safa_kernels import ViewLayout

WINDOW_S = 1.28  # 32 latent frames at 25 frames/s
W = 32
SR = 16000
SCHEDULERS = (DDIMScheduler, PNDMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
              EulerAncestralDiscreteScheduler, DDPMScheduler)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def audioldm():
    return tp.tiny_audioldm_pipeline()


@pytest.fixture(scope="module")
def audioldm64():
    return tp.tiny_audioldm_pipeline().to(dtype=torch.float64)


@pytest.fixture(scope="module")
def jd(audioldm):
    audioldm.scheduler = DDIMScheduler.from_config(audioldm.scheduler.config)
    return JointDiffusion(audioldm)


def _factory(name: str):
    # A renamed factory must fail here, not skip silently.
    return getattr(tp, name)


# -- geometry -------------------------------------------------------------------------------
def test_open_layout_covers_and_loop_is_exact():
    open_ = open_layout(83, 32, 6)
    assert open_.length >= 83 and open_.overlap == 6 and not open_.loop
    assert ViewLayout.covering(83, 32, 6).num_views == open_.num_views
    # 96 = 4 * 24: the requested window and overlap fit exactly.
    assert loop_layout(96, 32, 0.25, "swap") == ViewLayout(96, 32, 8, loop=True)
    with pytest.raises(LoopLengthError, match="nearest loopable lengths"):
        loop_layout(83, 32, 0.25, "swap", fixed=True)  # 83 is prime
    with pytest.raises(ValueError, match="shorter than one window"):
        open_layout(31, 32, 8)


# -- exact length, every method, open and loop --------------------------------------------
@pytest.mark.parametrize("loop", [False, True])
@pytest.mark.parametrize("method", list(METHODS))
def test_exact_length_every_method(jd, method, loop):
    # open: 82.5 latent frames, never a whole number of views; loop: 96 frames, exactly (on
    # MAD's 4-column grid too)
    seconds = 3.84 if loop else 3.3
    out = jd("rain", seconds, method=method, loop=loop, window=WINDOW_S, overlap=0.25,
             num_inference_steps=3, generator=gen())
    assert out.audio.shape == (1, round(seconds * SR))
    assert np.isfinite(out.audio).all()
    assert out.sample_rate == SR and out.layout.loop == loop
    assert out.layout.window == W if not loop else abs(out.layout.window - W) <= 0.05 * W
    assert out.latent.shape == (1, 8, out.layout.length, 16) and out.columns == (96 if loop else 83)
    assert out.layout.num_views >= 3


@pytest.mark.parametrize("decode", ["full", "views", "tiled"])
def test_loop_exact_length_every_decode(jd, decode):
    out = jd("rain", 3.84, loop=True, window=WINDOW_S, overlap=0.25, num_inference_steps=2, generator=gen(),
             decode=decode)
    assert out.layout == ViewLayout(96, 32, 8, loop=True)
    assert out.audio.shape == (1, round(3.84 * SR)) and np.isfinite(out.audio).all()


@pytest.mark.parametrize("factory", ["tiny_musicldm_pipeline", "tiny_audioldm2_pipeline"])
def test_other_families_exact_length(factory):
    pipe = _factory(factory)()
    jd = JointDiffusion(pipe)
    for loop in (False, True):
        out = jd(view_prompts=["rain", "wind", "calm"], seconds=2.88, loop=loop, window=WINDOW_S, overlap=0.25,
                 num_inference_steps=2, generator=gen(), negative_prompt="noise")
        assert out.layout.num_views == 3 and out.layout.overlap == 8
        assert out.audio.shape == (1, round(2.88 * SR)) and np.isfinite(out.audio).all()


# -- one view reproduces the wrapped pipeline -------------------------------------------------
def _capture_last(store):
    def cb(i, t, latents):
        store["latents"] = latents.clone()
    return cb


@pytest.mark.parametrize("method", list(METHODS))
def test_one_view_equals_audioldm_pipeline(audioldm, jd, method):
    store = {}
    ref = audioldm("rain", audio_length_in_s=WINDOW_S, num_inference_steps=4, guidance_scale=2.5,
                   negative_prompt="noise", generator=gen(3), callback=_capture_last(store)).audios
    out = jd("rain", WINDOW_S, method=method, window=WINDOW_S, num_inference_steps=4, guidance_scale=2.5,
             negative_prompt="noise", generator=gen(3), output_type="pt")
    assert out.layout.num_views == 1
    torch.testing.assert_close(out.latent, store["latents"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.audio.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("scheduler", [DPMSolverMultistepScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler])
def test_one_view_equals_pipeline_stateful_and_stochastic_schedulers(scheduler):
    # Multistep history and per-step noise: the wrapper's single batched step is the pipeline's.
    pipe = tp.tiny_audioldm_pipeline()
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    store = {}
    pipe("rain", audio_length_in_s=WINDOW_S, num_inference_steps=4, generator=gen(5), callback=_capture_last(store))
    out = JointDiffusion(pipe)("rain", WINDOW_S, window=WINDOW_S, num_inference_steps=4, generator=gen(5),
                               output_type="latent")
    torch.testing.assert_close(out.latent, store["latents"], rtol=1e-5, atol=1e-5)


def test_one_view_equals_audioldm2_pipeline():
    pipe = _factory("tiny_audioldm2_pipeline")()
    kw = dict(num_inference_steps=3, guidance_scale=3.5, negative_prompt="noise")
    ref = pipe("rain", audio_length_in_s=WINDOW_S, generator=gen(1), output_type="latent", **kw).audios
    out = JointDiffusion(pipe)("rain", WINDOW_S, window=WINDOW_S, generator=gen(1), output_type="latent", **kw)
    torch.testing.assert_close(out.latent, ref, rtol=1e-5, atol=1e-5)


# -- diffusers' conventions: a prompt list is a batch -----------------------------------------
def test_prompt_list_is_a_batch_like_diffusers(jd):
    kw = dict(window=WINDOW_S, overlap=0.25, num_inference_steps=3, output_type="pt")
    batch = jd(["rain", "wind"], 2.9, negative_prompt=["noise", "hum"], generator=[gen(1), gen(2)], **kw)
    assert batch.audio.shape == (2, round(2.9 * SR))
    for b, (p, neg) in enumerate([("rain", "noise"), ("wind", "hum")]):
        one = jd(p, 2.9, negative_prompt=neg, generator=gen(b + 1), **kw)  # output b alone, its own generator
        torch.testing.assert_close(batch.latent[b:b + 1], one.latent, rtol=1e-4, atol=1e-4)
    two = jd("rain", audio_length_in_s=2.9, num_waveforms_per_prompt=2, generator=[gen(1), gen(2)], **kw)
    torch.testing.assert_close(two.latent[:1], jd("rain", 2.9, generator=gen(1), **kw).latent, rtol=1e-4, atol=1e-4)
    (audio,) = jd("rain", 2.9, generator=gen(1), return_dict=False, **kw)
    torch.testing.assert_close(audio, jd("rain", 2.9, generator=gen(1), **kw).audio)


def test_view_prompts_per_batch_prompt(jd):
    kw = dict(seconds=2.9, window=WINDOW_S, overlap=0.25, num_inference_steps=2, output_type="latent")
    per_item = [["rain", "wind", "calm"], ["calm", "calm", "rain"]]
    both = jd(view_prompts=per_item, generator=[gen(1), gen(2)], **kw).latent
    second = jd(view_prompts=per_item[1], generator=gen(2), **kw).latent
    assert both.shape[0] == 2
    torch.testing.assert_close(both[1:], second, rtol=1e-4, atol=1e-4)


def test_prompt_embeds_equal_prompts(audioldm, jd):
    kw = dict(seconds=2.9, window=WINDOW_S, overlap=0.25, num_inference_steps=2, output_type="latent")
    emb = audioldm._encode_prompt(["rain"], "cpu", 1, False)
    neg = audioldm._encode_prompt(["noise"], "cpu", 1, False)
    expected = jd("rain", negative_prompt="noise", generator=gen(), **kw).latent
    got = jd(prompt_embeds=emb, negative_prompt_embeds=neg, generator=gen(), **kw).latent
    torch.testing.assert_close(got, expected)
    # without a negative embedding: the pipeline's own unconditional branch, as for a prompt
    torch.testing.assert_close(jd(prompt_embeds=emb, generator=gen(), **kw).latent,
                               jd("rain", generator=gen(), **kw).latent)
    with pytest.raises(ValueError, match="either prompt_embeds or prompt"):
        jd("rain", prompt_embeds=emb, **kw)


# -- below one window: the pipeline's own call ---------------------------------------------
@pytest.mark.parametrize("method", list(METHODS))
def test_shorter_than_a_window_equals_the_pipeline(audioldm, jd, method):
    # 0.8 s = 20 latent frames (80 mel frames, a multiple of the VAE factor): the pipeline
    # denoises exactly that; so must the wrapper, whatever the method.
    store = {}
    ref = audioldm("rain", audio_length_in_s=0.8, num_inference_steps=3, guidance_scale=2.5,
                   generator=gen(4), callback=_capture_last(store)).audios
    out = jd("rain", 0.8, method=method, num_inference_steps=3, guidance_scale=2.5, generator=gen(4),
             output_type="pt")
    assert out.layout == ViewLayout(20, 20, 0) and out.columns == 20
    torch.testing.assert_close(out.latent, store["latents"], rtol=1e-5, atol=1e-5)
    assert out.audio.shape == (1, round(0.8 * SR)) == ref.shape
    np.testing.assert_allclose(out.audio.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_shorter_than_a_window_texture_model_crops_its_window():
    # The built-in model is defined on its window only, and its pipeline samples exactly that:
    # a shorter request is that window, cropped (the pipeline's own output, cropped).
    from safa.texture import make_texture_pipeline
    pipe = make_texture_pipeline(window_frames=32)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, guidance_scale=2.0, generator=gen(2), output_type="latent")
    ref = pipe("rain", **kw).audios
    kw["generator"] = gen(2)
    out = JointDiffusion(pipe)("rain", 0.5, **kw)
    assert out.layout == ViewLayout(32, 32, 0) and out.columns == 13
    torch.testing.assert_close(out.latent, ref)


# -- the reference window is denoised only while it guides -----------------------------------
@pytest.mark.parametrize("guidance_scale", [1.0, 2.5], ids=["no_cfg", "cfg"])
@pytest.mark.parametrize("method,guide", [("safa", 0.3), ("safa", 0.5), ("safa", 0.0), ("safa", 1.0),
                                          ("safa_selfloop", None), ("multidiffusion", None),
                                          ("multidiffusion_triangular", None)])
def test_rows_reaching_the_denoiser(audioldm, jd, method, guide, guidance_scale):
    rows = []
    hook = audioldm.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        out = jd("rain", 2.9, method=method, guide=guide, window=WINDOW_S, overlap=0.25, num_inference_steps=7,
                 guidance_scale=guidance_scale, output_type="latent", generator=gen())
    finally:
        hook.remove()
    n, steps = out.layout.num_views, 7
    expected = n * steps + (math.floor(guide * steps + 0.5) if method == "safa" else 0)
    assert n == 3 and sum(rows) == expected * (2 if guidance_scale > 1 else 1)


def test_guide_zero_equals_selfloop_and_guide_changes_only_while_guiding(jd):
    kw = dict(window=WINDOW_S, overlap=0.25, num_inference_steps=4, output_type="latent")
    selfloop = jd("rain", 2.9, method="safa_selfloop", generator=gen(), **kw).latent
    torch.testing.assert_close(jd("rain", 2.9, method=safa.SaFa(guide=0.0), generator=gen(), **kw).latent,
                               selfloop, rtol=0, atol=0)
    assert not torch.allclose(jd("rain", 2.9, method="safa", generator=gen(), **kw).latent, selfloop)


# -- loop shift-equivariance --------------------------------------------------------------
@pytest.mark.parametrize("method", ["safa_selfloop", "multidiffusion", "multidiffusion_triangular",
                                    safa.SaFa(guide=0.0)], ids=str)
def test_loop_without_reference_is_shift_equivariant(jd, method):
    layout = ViewLayout(96, 32, 8, loop=True)
    noise = torch.randn(1, 8, 96, 16, generator=gen(7))
    kw = dict(method=method, loop=True, window=WINDOW_S, overlap=0.25, num_inference_steps=3,
              output_type="latent")
    a = jd("rain", 3.84, latents=noise, **kw)
    b = jd("rain", 3.84, latents=noise.roll(layout.stride, dims=-2), **kw)
    assert a.layout == b.layout == layout
    torch.testing.assert_close(b.latent, a.latent.roll(layout.stride, dims=-2), rtol=1e-4, atol=1e-4)


# -- the sampler equals Algorithm 1 written naively --------------------------------------
def _naive_algorithm1(pipe, layout, steps, g, mode, use_ref, guide, w_swap, j_t, x0_t, prompts, ref_prompt,
                      scheduler_cls=DDIMScheduler):
    """Algorithm 1 written out: one view at a time, one column at a time.

    Every window (each view and the reference X^0) has its own scheduler instance, so
    multistep schedulers keep per-window histories; X^0 is stepped only while it guides.
    """
    def new_scheduler():
        sched = scheduler_cls.from_config(pipe.scheduler.config)
        sched.set_timesteps(steps)
        return sched

    n, w = layout.num_views, layout.window
    view_scheds = [new_scheduler() for _ in range(n)]
    ref_sched = new_scheduler()
    timesteps = ref_sched.timesteps

    embs = {p: pipe._encode_prompt([p], "cpu", 1, True, [""]) for p in set(prompts) | {ref_prompt}}

    def eps(x, t, prompt):
        emb = embs[prompt]
        out = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=None, class_labels=emb).sample
        u, c = out.chunk(2)
        return u + g * (c - u)

    J, X0 = j_t * ref_sched.init_noise_sigma, x0_t * ref_sched.init_noise_sigma
    guide_steps = math.floor(guide * len(timesteps) + 0.5) if use_ref else 0
    for step, t in enumerate(timesteps):
        X = []
        for i in range(n):
            x = J[:, :, layout.columns(i), :]  # F_i(J)
            model_in = view_scheds[i].scale_model_input(x, t)
            X.append(view_scheds[i].step(eps(model_in, t, prompts[i]), t, x).prev_sample)
        if step < guide_steps:
            model_in = ref_sched.scale_model_input(X0, t)
            X0 = ref_sched.step(eps(model_in, t, ref_prompt), t, X0).prev_sample
        new = torch.empty_like(J)
        for col in range(layout.length):
            cov = layout.coverage(col)
            if mode == "mean":
                new[:, :, col] = sum(X[v][:, :, k] for v, k in cov) / len(cov)
            elif mode == "triangular":
                wts = [min(k + 1, w - k) for v, k in cov]
                new[:, :, col] = sum(wt * X[v][:, :, k] for wt, (v, k) in zip(wts, cov)) / sum(wts)
            elif len(cov) == 1:
                v, k = cov[0]
                new[:, :, col] = X[v][:, :, k]
                lo, hi = layout.middle(v)
                if step < guide_steps and lo <= k < hi and ((k - lo) // w_swap) % 2 == 1:
                    new[:, :, col] = X0[:, :, k]  # Eq. 10: p = 1 takes Middle(X^0)
            else:
                (a, ka), (b, kb) = cov if cov[0][1] > cov[1][1] else cov[::-1]  # a: the earlier view
                p = (kb // w_swap) % 2  # Eq. 9 at overlap offset q = the later view's local column
                new[:, :, col] = X[a][:, :, ka] if p == 0 else X[b][:, :, kb]
        J = new
    return J


@pytest.mark.parametrize("method,loop,w_swap,scheduler", [
    ("safa", False, 1, DDIMScheduler), ("safa", True, 2, DDIMScheduler),
    ("multidiffusion", True, 1, DDIMScheduler), ("multidiffusion_triangular", False, 1, DDIMScheduler),
    # multistep: the reference's own scheduler must keep its history apart from the views'
    ("safa", False, 1, DPMSolverMultistepScheduler), ("safa", True, 1, PNDMScheduler),
    ("multidiffusion", False, 1, DPMSolverMultistepScheduler), ("safa_selfloop", True, 1, PNDMScheduler),
    # Euler scales its model input by the step's sigma (scale_model_input) and counts steps
    ("safa", True, 1, EulerDiscreteScheduler), ("multidiffusion_triangular", False, 1, EulerDiscreteScheduler),
    # a loop of 76 columns: 3 views of 33 spread evenly (strides 25, 25, 26: overlaps 8, 8, 7)
    ("safa", "spaced", 1, DDIMScheduler), ("multidiffusion", "spaced", 1, DPMSolverMultistepScheduler)],
    ids=lambda v: v.__name__ if isinstance(v, type) else str(v))
def test_sampler_equals_naive_algorithm1(audioldm64, method, loop, w_swap, scheduler):
    # float64 end to end: the oracle runs the model per view, the sampler in one batch, and
    # float32 rounding differences grow through multistep schedulers' large coefficients.
    audioldm = audioldm64
    m = get_method(method, swap_interval=w_swap if "safa" in method else None,
                   guide=0.5 if method == "safa" else None)
    use_ref = method == "safa"
    layout = {False: ViewLayout(80, 32, 8, loop=False), True: ViewLayout(72, 32, 8, loop=True),
              "spaced": ViewLayout.spaced(76, 33, 3, loop=True)}[loop]
    loop = bool(loop)
    j_t = torch.randn(1, 8, layout.length, 16, generator=gen(11), dtype=torch.float64)
    x0_t = torch.randn(1, 8, layout.window, 16, generator=gen(12), dtype=torch.float64)
    prompts = ["rain", "wind", "calm"]
    audioldm.scheduler = scheduler.from_config(audioldm.scheduler.config)
    steps = 5 if scheduler is PNDMScheduler else 3  # PNDM needs >= 4 for its warm-up
    out = JointDiffusion(audioldm)(
        view_prompts=prompts, seconds=layout.length / 25, method=m, loop=loop, window=WINDOW_S, overlap=0.25,
        num_inference_steps=steps, guidance_scale=2.5, latents=j_t,
        reference_latents=x0_t if use_ref else None, reference_prompt="thunder", output_type="latent")
    assert out.layout == layout
    naive = _naive_algorithm1(audioldm, layout, steps, 2.5, m.merge_mode, use_ref, 0.5, w_swap, j_t, x0_t,
                              prompts, "thunder", scheduler)
    # Triangular weights are stored as float32 in the kernel plan (exact for swap / mean).
    tol = 1e-5 if m.merge_mode == "triangular" else 1e-10
    torch.testing.assert_close(out.latent, naive, rtol=tol, atol=tol)


# -- every scheduler x every method ------------------------------------------------------
@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=lambda c: c.__name__)
def test_every_scheduler_every_method(scheduler):
    # Exactness per scheduler is test_sampler_equals_naive_algorithm1's; here every pairing runs,
    # is reproducible for a seed (stochastic ones included), and steps the scheduler once per step.
    pipe = tp.tiny_audioldm_pipeline()
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    jd = JointDiffusion(pipe)
    for method in METHODS:
        kw = dict(method=method, loop=method == "safa", window=WINDOW_S, overlap=0.25,
                  num_inference_steps=4, output_type="latent")  # PNDM needs >= 4
        last = []
        out = jd("rain", 2.88, generator=gen(), callback_on_step_end=keep_last_views(last), **kw)
        assert torch.isfinite(out.latent).all(), (scheduler.__name__, method)
        assert_merged_as_the_method_says(out, last[0], jd.adapter.long_dim)
        assert torch.equal(jd("rain", 2.88, generator=gen(), **kw).latent, out.latent)
        if getattr(pipe.scheduler, "step_index", None) is not None:
            # One scheduler.step per timestep for all views, not one per view.
            assert pipe.scheduler.step_index == len(pipe.scheduler.timesteps)


# -- options ----------------------------------------------------------------------------------
def test_view_batch_size_does_not_change_the_result(jd):
    kw = dict(window=WINDOW_S, overlap=0.25, num_inference_steps=3, output_type="latent")
    a = jd("rain", 3.3, generator=gen(), **kw)
    b = jd("rain", 3.3, generator=gen(), view_batch_size=1, **kw)
    # Convolutions may pick batch-size dependent kernels: equal up to float rounding.
    torch.testing.assert_close(a.latent, b.latent, rtol=1e-4, atol=1e-4)


def test_per_view_prompts_and_reference_prompt(jd):
    kw = dict(window=WINDOW_S, overlap=0.25, num_inference_steps=2, output_type="latent")
    n = jd.layout_for(2.9, window=WINDOW_S, overlap=0.25).num_views
    same = jd(view_prompts=["rain"] * n, seconds=2.9, generator=gen(), **kw).latent
    torch.testing.assert_close(same, jd("rain", 2.9, generator=gen(), **kw).latent)
    per_view = jd(view_prompts=["rain", "wind", "calm"][:n], seconds=2.9, generator=gen(), **kw).latent
    assert not torch.allclose(per_view, same)
    other_ref = jd("rain", 2.9, reference_prompt="thunder", generator=gen(), **kw).latent
    assert not torch.allclose(other_ref, same)


def test_callback_on_step_end(jd):
    seen = []

    def cb(pipe, step, t, kwargs):
        seen.append((step, kwargs["views"].shape, kwargs["reference"] is not None))
        if step == 1:
            return {"views": torch.zeros_like(kwargs["views"])}
        return None

    out = jd("rain", 2.9, window=WINDOW_S, overlap=0.25, num_inference_steps=2, callback_on_step_end=cb,
             output_type="latent")
    # guide 0.3 of 2 steps: the reference guides (and exists) in step 0 only.
    assert [s for s, _, _ in seen] == [0, 1] and [r for _, _, r in seen] == [True, False]
    assert seen[0][1] == (3, 1, 8, 32, 16)
    assert torch.count_nonzero(out.latent) == 0  # the callback's replacement was applied


def test_tiled_decode_bounded_and_equal_to_full_for_one_tile(jd):
    adapter = jd.adapter
    latent = torch.randn(1, 8, 96, 16, generator=gen(2))
    full = decode_tiled(adapter, latent, loop=False, tile=96)
    torch.testing.assert_close(full, adapter.finalize(adapter.decode_latents(latent)))
    seen = []
    orig = adapter.decode_latents
    adapter.decode_latents = lambda z: (seen.append(z.shape[-2]), orig(z))[1]
    try:
        long = torch.randn(1, 8, 25 * 60, 16, generator=gen(2))  # one minute
        out = decode_tiled(adapter, long, loop=True, tile=W)
    finally:
        del adapter.decode_latents
    assert out.shape == (1, 25 * 60 * 640) and torch.isfinite(out).all()
    # Every decoder call sees one tile plus context: memory does not grow with length.
    assert max(seen) <= W + 2 * adapter.decode_context and len(seen) == math.ceil(1500 / W)


# -- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(method="nope"), "method must be one of"),
    (dict(overlap=0.6), r"overlap must be in \[0.0, 0.5\]"),
    (dict(method="multidiffusion", overlap=1.0), r"overlap must be in \[0.0, 1.0\)"),
    (dict(overlap=-0.1), "overlap must be in"),
    (dict(guide=1.5), r"guide must be in \[0.0, 1.0\]"),
    (dict(seconds=1.0, loop=True), r"no seamless loop of exactly 1 s .*nearest loopable lengths: 1.76 s"),
    (dict(seconds=2.9, loop=True), r"not a whole number of latent columns.* 2.88 s \(72 latent frames\) or 2.92 s"),
    (dict(guide=0.5, method="multidiffusion"), "guide does not apply to method 'multidiffusion'"),
    (dict(method=safa.SaFa(), swap_interval=2), "given beside the method object"),
    (dict(height=64), "height is for image pipelines"),
    (dict(seconds=-2.0), "seconds must be"),
    (dict(prompt=None, view_prompts=["a", "b"]), "one prompt per view: this layout has 3"),
    (dict(view_prompts=["a", "b", "c"]), "either prompt .* or view_prompts"),
    (dict(prompt=None), "give prompt"),
    (dict(prompt=["a", "b"], negative_prompt=["x"]), "negative_prompt must be a str or a list of 2"),
    (dict(prompt=["a", "b"], generator=[torch.Generator()]), "generator is a list of 1 but this call makes 2"),
    (dict(seconds=None), r"give seconds= \(or audio_length_in_s=\)"),
    (dict(audio_length_in_s=3.0), "disagree"),
    (dict(num_images_per_prompt=2), "num_images_per_prompt is for image pipelines"),
    (dict(num_waveforms_per_prompt=0), "num_waveforms_per_prompt must be an int >= 1"),
    (dict(prompt_embeds=torch.zeros(1, 4), pooled_prompt_embeds=torch.zeros(1, 4)),
     "pooled_prompt_embeds is not supported for AudioLDMPipeline"),
    (dict(swap_interval=0), "swap_interval must be"),
    (dict(num_inference_steps=0), "num_inference_steps must be"),
    (dict(view_batch_size=0), "view_batch_size must be"),
    (dict(decode="nope"), "decode must be one of"),
    (dict(window=-1.0), "window must be > 0"),
    (dict(width=512), "width is for image pipelines"),
    (dict(output_type="pil"), "output_type must be one of"),
    (dict(latents=torch.zeros(1, 8, 10, 16)), "latents must have shape"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    (dict(guidance_scale="7"), "guidance_scale must be a finite number"),
    (dict(eta=float("nan")), r"eta must be in \[0.0, inf\)"),
    # a wrong type says so (and the unit), not a range it was never out of
    (dict(seconds="10"), r"seconds must be a number \(int or float, seconds\), got str: '10'"),
    (dict(window="10"), r"window must be a number \(int or float, seconds\), got str"),
    (dict(overlap="0.2"), r"overlap must be a number \(int or float, a rate of the window\), got str"),
])
def test_bad_input_raises_value_error(jd, kwargs, match):
    args = dict(prompt="rain", seconds=2.9, window=WINDOW_S, overlap=0.25, num_inference_steps=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        jd(args.pop("prompt"), args.pop("seconds"), **args)


def test_unsupported_pipeline_lists_supported():
    class FancyPipeline:
        pass
    with pytest.raises(ValueError, match="unsupported pipeline class FancyPipeline; supported: .*AudioLDMPipeline"):
        JointDiffusion(FancyPipeline())
    assert {"AudioLDMPipeline", "AudioLDM2Pipeline", "MusicLDMPipeline"} <= set(registered_adapters())


def test_adapter_registry_resolves_subclasses(audioldm):
    class MyAudioLDM(type(audioldm)):
        pass
    adapter = get_adapter(audioldm)
    assert isinstance(adapter, Adapter) and adapter.native_window() == 256  # 10.24 s at 25 frames/s
    assert adapter.frames_per_second == 25 and adapter.sample_rate == SR
    assert type(get_adapter(MyAudioLDM.__new__(MyAudioLDM))) is type(adapter)


def test_unset_steps_and_guidance_are_the_wrapped_pipelines_own():
    # As the pipeline itself: the built-in pipeline's call defaults are 50 steps and no guidance
    # (its denoiser is exact); a diffusers pipeline's are read from its __call__ the same way.
    from safa.texture import make_texture_pipeline
    pipe = make_texture_pipeline(window_frames=32)
    pipe.set_progress_bar_config(disable=True)
    jd = JointDiffusion(pipe)
    steps = []
    out = jd("rain", seconds=2.4, callback_on_step_end=lambda *a: steps.append(a[1]),
             generator=torch.Generator().manual_seed(0), output_type="latent")
    explicit = jd("rain", seconds=2.4, num_inference_steps=50, guidance_scale=1.0,
                  generator=torch.Generator().manual_seed(0), output_type="latent")
    assert len(steps) == 50 and torch.equal(out.latent, explicit.latent)
    sd = JointDiffusion(tp.tiny_sd_pipeline())
    assert (sd.adapter.pipeline_default("num_inference_steps", None),
            sd.adapter.pipeline_default("guidance_scale", None)) == (50, 7.5)
    assert JointDiffusion(tp.tiny_audioldm_pipeline()).adapter.pipeline_default("guidance_scale", None) == 2.5


def test_layout_for_takes_height_and_validates_as_the_call(jd):
    sd = JointDiffusion(tp.tiny_sd_pipeline())
    layout = sd.layout_for(width=1000, height=128, window=32, overlap=0.25)
    assert layout == sd("a mountain range", width=1000, height=128, window=32, overlap=0.25, num_inference_steps=1,
                        guidance_scale=1.0, output_type="latent").layout
    with pytest.raises(ValueError, match="height must be a positive multiple of 8 pixels, got 100"):
        sd.layout_for(width=1000, height=100)
    with pytest.raises(ValueError, match="height must be an int \\(pixels\\), got str"):
        sd.layout_for(width=1000, height="128")
    with pytest.raises(ValueError, match="width must be an int \\(pixels\\), got float"):
        sd.layout_for(width=1000.0)
    with pytest.raises(ValueError, match="height is for image pipelines"):
        jd.layout_for(seconds=3.0, height=128)
    with pytest.raises(ValueError, match="seconds must be a number .*got str"):
        jd.layout_for(seconds="3")


def test_output_is_a_diffusers_base_output(jd):
    from diffusers.utils import BaseOutput
    out = jd("rain", 2.9, window=WINDOW_S, overlap=0.25, num_inference_steps=1, output_type="latent")
    assert isinstance(out, BaseOutput)
    # Attributes as before; as a dict, the fields that are not None (diffusers' convention).
    assert out.audio is None and out.images is None and out.output_paths is None
    assert out["latent"] is out.latent and out.layout.num_views == 3
    assert "audio" not in out and out.to_tuple()[0] is out.latent and out[0] is out.latent
    decoded = jd("rain", 2.9, window=WINDOW_S, overlap=0.25, num_inference_steps=1)
    assert decoded[0] is decoded.audio and decoded.audio.shape == (1, int(round(2.9 * SR)))


def test_window_is_seconds_for_the_texture_pipeline_too():
    # window= is seconds at every door for audio; the texture pipeline's own size is window_frames=.
    from safa.texture import make_texture_pipeline, window_frames
    jd = JointDiffusion(make_texture_pipeline(window_frames=window_frames(1.28)))
    assert jd.layout_for(seconds=3.0, window=1.28).window == 32
    with pytest.raises(ValueError, match=r"defined on windows of exactly 1.28 s \(32 latent frames\), "
                                         r"got window 100 s \(2500 latent frames\)"):
        jd("rain", 300.0, window=100, num_inference_steps=1)


@pytest.mark.parametrize("method", ["safa", "multidiffusion"])
def test_the_merge_assertion_catches_a_missing_merge(audioldm, method):
    # The matrices' assertion can fail: without the per-step merge the views disagree on overlaps.
    jd = JointDiffusion(audioldm, merge_step=lambda *args: None)
    last: list = []
    out = jd("rain", 2.88, method=method, window=WINDOW_S, overlap=0.25, num_inference_steps=2,
             output_type="latent", generator=gen(), callback_on_step_end=keep_last_views(last))
    with pytest.raises(AssertionError):
        assert_merged_as_the_method_says(out, last[0], jd.adapter.long_dim)
