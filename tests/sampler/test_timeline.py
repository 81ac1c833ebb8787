"""Audio prompt timelines (safa.regions, docs/timelines.md) on the built-in texture model and tiny AudioLDM."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

import safa.testing.pipelines as tp
from safa import JointDiffusion
from safa.cli import main
from safa.commands.generate import parse_timeline as cli_timeline
from safa.regions import timeline_weights
from safa.texture import make_texture_pipeline
from safa_kernels import naive

SPANS = [(0, "rain"), (20, "wind"), (40, "surf")]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def jd():
    pipe = make_texture_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return JointDiffusion(pipe)


# -- one span is the plain prompt --------------------------------------------------------------------------------------
@pytest.mark.parametrize("loop,seconds,method", [(False, 30, "safa"), (True, 30.72, "safa"),
                                                 (False, 30, "multidiffusion")])
def test_one_span_is_the_plain_prompt_bitwise(jd, loop, seconds, method):
    kw = dict(seconds=seconds, loop=loop, method=method, num_inference_steps=3, output_type="latent")
    plain = jd("rain", generator=_gen(), **kw)
    timeline = jd(timeline=[(0, "rain")], transition=3.0, generator=_gen(), **kw)
    assert torch.equal(plain.latent, timeline.latent)
    assert timeline.extra_window_evaluations == 0 and timeline.window_evaluations == plain.window_evaluations


def test_one_span_is_the_plain_prompt_on_audioldm():
    jd = JointDiffusion(tp.tiny_audioldm_pipeline())
    jd.pipe.set_progress_bar_config(disable=True)
    kw = dict(seconds=3.0, window=1.28, num_inference_steps=2, output_type="latent", negative_prompt="noise")
    plain = jd("rain on a roof", generator=_gen(), **kw)
    timeline = jd(timeline=[(0.0, "rain on a roof")], generator=_gen(), **kw)
    assert torch.equal(plain.latent, timeline.latent)
    mixed = jd(timeline=[(0.0, "rain on a roof"), (1.5, "thunder")], transition=0.5, generator=_gen(), **kw)
    assert mixed.extra_window_evaluations > 0 and not torch.equal(mixed.latent, plain.latent)


# -- the weights --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loop", [False, True])
@pytest.mark.parametrize("transition", [0.0, 1.0, 4.0])
def test_weights_are_a_partition_of_unity_with_ramps_of_the_transition(loop, transition):
    fps, seconds = 25.0, 60.0
    length = 1500 if loop else 1691  # an open layout covers more than asked: its extra columns are the last span's
    w = timeline_weights([0, 20, 40], seconds, transition, loop, length, fps).numpy()
    assert w.shape == (3, length) and (w >= 0).all()
    np.testing.assert_allclose(w.sum(0), 1.0, atol=1e-12)
    x = (np.arange(length) + 0.5) / fps
    # Inside a span, half a transition from its boundaries: exactly 1 (one branch, the plain prompt).
    for k, (a, b) in enumerate([(0, 20), (20, 40), (40, 60 if loop else np.inf)]):
        lo = a + transition / 2 if (k > 0 or loop) else -1
        inside = (x >= lo) & (x < b - transition / 2)
        assert (w[k][inside] == 1.0).all()
    if transition:
        # Linear ramp centred on the boundary at 20 s: w_wind(20 + d) = 1/2 + d / transition.
        near = np.abs(x - 20) < transition / 2
        np.testing.assert_allclose(w[1][near], 0.5 + (x[near] - 20) / transition, atol=1e-9)
    if loop and transition:  # the last span ramps into the first across the seam
        assert 0 < w[2][0] < 1 and 0 < w[0][0] < 1 and 0 < w[2][-1] < 1
    if not loop:
        assert w[0][0] == 1.0 and w[2][-1] == 1.0


def test_views_inside_one_span_run_one_branch(jd):
    out = jd(timeline=SPANS, seconds=60, transition=2.0, num_inference_steps=2, output_type="latent",
             generator=_gen())
    layout, fps = out.layout, 25.0
    spanning = 0
    for v in range(layout.num_views):
        a, b = layout.starts[v] / fps, (layout.starts[v] + layout.window) / fps
        spanning += sum(1 for boundary in (20, 40) if a < boundary + 1 and b > boundary - 1)
    assert out.extra_window_evaluations == spanning * 2
    assert out.window_evaluations == (layout.num_views + spanning) * 2 + round(0.3 * 2)


# -- the combine against an oracle ----------------------------------------------------------------------------------------
def _oracle_weights(length: int, fps: float, starts, seconds: float, transition: float) -> np.ndarray:
    """The spans smoothed by a box of width `transition`, written separately from safa.regions."""
    x = (np.arange(length) + 0.5) / fps
    ends = list(starts[1:]) + [np.inf]
    out = np.zeros((len(starts), length))
    for i in range(length):
        for k, (a, b) in enumerate(zip(starts, ends)):
            a = -np.inf if k == 0 else a
            lo, hi = x[i] - transition / 2, x[i] + transition / 2
            out[k, i] = max(0.0, min(hi, b) - max(lo, a)) / transition
    return out


def test_combine_equals_an_oracle_loop_over_branches_for_ddim():
    pipe = make_texture_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    jd = JointDiffusion(pipe)
    seconds, transition, steps = 30.0, 3.0, 3
    spans = [(0, "rain"), (12, "wind"), (20, "surf")]
    layout = jd.layout_for(seconds=seconds, method="multidiffusion")
    latents = torch.randn(jd.adapter.latent_shape(1, layout.length), generator=_gen(3))
    ours = jd(timeline=spans, seconds=seconds, transition=transition, method="multidiffusion",
              num_inference_steps=steps, guidance_scale=1.0, latents=latents.clone(), output_type="latent").latent
    # The oracle: every view, every prompt on its own; weights summed per column; DDIM; the mean merge.
    fps = pipe.frames_per_second
    w = torch.from_numpy(_oracle_weights(layout.length, fps, [s for s, _ in spans], seconds, transition))
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    views = naive.gather(latents * scheduler.init_noise_sigma, layout, -2)
    classes = [pipe.encode_prompt([p]) for _, p in spans]
    for t in scheduler.timesteps:
        eps = torch.zeros_like(views)
        for v in range(layout.num_views):
            cols = layout.columns(v)
            for k, cw in enumerate(classes):
                wk = w[k, cols]
                if (wk > 0).any():
                    eps[v] += wk.reshape(1, 1, -1, 1).to(eps.dtype) * pipe.denoise(views[v], t, cw)
        stepped = scheduler.step(eps.reshape(-1, *views.shape[2:]), t, views.reshape(-1, *views.shape[2:])
                                 ).prev_sample.reshape(views.shape)
        views = naive.gather(naive.stitch(stepped, layout, -2, "mean"), layout, -2)
    oracle = naive.stitch(views, layout, -2, "mean")
    torch.testing.assert_close(ours, oracle, rtol=1e-5, atol=1e-5)


# -- bad input --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(timeline=[(0, "rain"), (30, "wind"), (20, "surf")]), "timeline starts must increase"),
    (dict(timeline=[(0, "rain"), (20, "wind"), (20, "surf")]), "timeline starts must increase"),
    (dict(timeline=[(5, "rain"), (20, "wind")]), "timeline must start at 0"),
    (dict(timeline=[(0, "rain"), (70, "wind")]), "past the end"),
    (dict(timeline=[]), "timeline must be a non-empty list"),
    (dict(timeline=[(0, "rain", "x")]), "timeline entries must be"),
    (dict(timeline=[("0", "rain")]), "timeline entries must be"),
    (dict(timeline=[(0, "rain"), (30, "wind")], transition=-1), "transition must be a number of seconds >= 0"),
    (dict(timeline=[(0, "rain"), (58, "wind")], transition=4), r"transition must be at most the shortest"),
    (dict(timeline=[(0, "rain")], prompt="rain"), "give either prompt"),
    (dict(timeline=[(0, "rain")], view_prompts=["rain"] * 7), "give either view_prompts"),
    (dict(timeline=[(0, "rain")], regions=[((0, 0, 1, 1), "x")]), "not both"),
    (dict(prompt="rain", transition=2.0), "transition is the ramp between timeline spans"),
    (dict(prompt="rain", regions=[((0, 0, 1, 1), "x")]), "regions is for image pipelines"),
    (dict(timeline=[(0, "rain")], method="syncdiffusion"), "couples the views"),
])
def test_bad_timelines_are_one_clear_value_error(jd, kwargs, match):
    with pytest.raises(ValueError, match=match):
        jd(seconds=60, num_inference_steps=1, output_type="latent", **kwargs)


def test_timeline_with_prompt_embeds_is_refused():
    jd = JointDiffusion(tp.tiny_audioldm_pipeline())
    embeds = torch.zeros(1, 1, 32)
    with pytest.raises(ValueError, match="prompt_embeds cannot be combined"):
        jd(timeline=[(0, "rain")], prompt_embeds=embeds, seconds=3.0, window=1.28, num_inference_steps=1)


def test_timeline_on_an_image_pipeline_is_refused():
    jd = JointDiffusion(tp.tiny_sd_pipeline(sample_size=8))
    with pytest.raises(ValueError, match="timeline is for audio pipelines"):
        jd(timeline=[(0, "a forest")], width=128, height=64, num_inference_steps=1)


# -- command line -----------------------------------------------------------------------------------------------------------
def test_cli_parses_the_timeline():
    assert cli_timeline(["0:rain", "30:heavy: thunder", "45.5:calm"]) == [(0.0, "rain"), (30.0, "heavy: thunder"),
                                                                         (45.5, "calm")]


@pytest.mark.parametrize("argv,match", [
    (["--timeline", "rain"], "--timeline takes START:PROMPT"),
    (["--timeline", "0:rain", "--timeline", "70:wind"], "past the end of the 60 s output"),
    (["--timeline", "0:rain", "--prompt", "rain"], "give either --timeline"),
    (["--prompt", "rain", "--transition", "2"], "--transition is the ramp"),
])
def test_cli_bad_timelines_are_one_line(tmp_path, capsys, argv, match):
    code = main(["generate", "--model", "builtin:texture", "--seconds", "60", "--steps", "1", "--quiet",
                 "--out", str(tmp_path / "o.wav"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and match in err and len(err.splitlines()) == 1, err


def test_cli_generates_a_timeline_and_counts_its_evaluations(tmp_path, capsys):
    code = main(["generate", "--model", "builtin:texture", "--timeline", "0:rain", "--timeline", "6:wind",
                 "--transition", "2", "--seconds", "12", "--steps", "2", "--decode", "tiled", "--no-spectrogram",
                 "--out", str(tmp_path / "o.wav")])
    out = capsys.readouterr().out
    assert code == 0 and "window evaluations (" in out and "added by the timeline" in out, out


def test_a_timeline_takes_outputs_per_prompt_and_a_negative_prompt(jd):
    out = jd(timeline=SPANS[:2], seconds=30, transition=2.0, num_waveforms_per_prompt=2, guidance_scale=2.0,
             negative_prompt="surf", num_inference_steps=2, output_type="latent", generator=[_gen(1), _gen(2)])
    assert out.latent.shape[0] == 2 and not torch.equal(out.latent[0], out.latent[1])
    assert out.extra_window_evaluations > 0
