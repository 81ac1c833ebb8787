"""Reference-statistics guidance (``SaFaStats``, safa/methods/reference_stats.py) and the noise-level helpers it
stands on (``step_snr``, ``shift_clean_prediction``), on tiny pipelines and bare schedulers (CPU, offline).

- No guidance (``snr=0`` or ``strength=0``) is ``safa_selfloop`` bitwise; one view is the pipeline
  (also in test_sampler's every-method tests); the merge never receives the reference; the
  reference is denoised exactly during the guided steps.
- The hook does what its docstring says, checked against row statistics computed here.
- ``shift_clean_prediction`` moves x0 by delta and keeps the noise, for every scheduler family,
  checked against each family's own ``x_t = A x0 + S eps`` written out here.
- Bad parameters: clear errors naming the parameter.
"""
from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
from diffusers import (CosineDPMSolverMultistepScheduler, DDIMScheduler, DPMSolverMultistepScheduler,
                       EDMEulerScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler)

import safa
import safa.testing.pipelines as tp
from safa import JointDiffusion, SaFaStats, get_method
from safa.methods.reference_stats import ReferenceStatisticsHooks, row_gains
from safa.texture import make_texture_pipeline
from safa.schedulers import predict_x0, shift_clean_prediction, step_snr
from safa_kernels import ViewLayout, gather, stitch

WINDOW_S = 1.28  # 32 latent frames of the tiny AudioLDM
KW = dict(window=WINDOW_S, overlap=0.25, num_inference_steps=5, output_type="latent")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def audioldm():
    return tp.tiny_audioldm_pipeline()


def _jd(pipe, scheduler_cls):
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    return JointDiffusion(pipe)


# == equivalences ===============================================================================
@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DPMSolverMultistepScheduler], ids=lambda c: c.__name__)
@pytest.mark.parametrize("loop", [False, True], ids=["open", "loop"])
@pytest.mark.parametrize("method", [SaFaStats(snr=0.0), SaFaStats(snr=1e9, strength=0.0)], ids=["snr0", "strength0"])
def test_no_guidance_is_selfloop_bitwise(audioldm, scheduler_cls, loop, method):
    jd = _jd(audioldm, scheduler_cls)
    seconds = 3.84 if loop else 2.9
    selfloop = jd("rain", seconds, method="safa_selfloop", loop=loop, generator=gen(), **KW).latent
    got = jd("rain", seconds, method=method, loop=loop, generator=gen(), **KW).latent
    assert torch.equal(got, selfloop)


def test_one_view_is_the_pipeline_even_when_every_step_would_guide(audioldm):
    # (test_sampler checks every method's one view too; here the window would cover every step.)
    jd = _jd(audioldm, DDIMScheduler)
    ref = audioldm("rain", audio_length_in_s=WINDOW_S, num_inference_steps=5, generator=gen(3)).audios
    out = jd("rain", WINDOW_S, method=SaFaStats(snr=1e9), window=WINDOW_S, num_inference_steps=5,
             generator=gen(3), output_type="np")
    assert out.layout.num_views == 1
    np.testing.assert_allclose(out.audio, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_guided_steps_reference_rows_and_no_swap_of_the_reference(audioldm):
    # snr=1e9: every step guides. The reference is denoised on every step (n T + T windows), is never
    # given to the merge (nothing of it is copied), and the result differs from SaFa* and from SaFa.
    jd = _jd(audioldm, DDIMScheduler)
    rows, merged_refs = [], []

    def spy_merge(views, reference, *args):
        merged_refs.append(reference)
        safa.accel.merge_step(views, reference, *args)

    hook = audioldm.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        out = JointDiffusion(audioldm, merge_step=spy_merge)("rain", 2.9, method=SaFaStats(snr=1e9),
                                                             generator=gen(), **KW)
    finally:
        hook.remove()
    n = out.layout.num_views
    assert n == 3 and sum(rows) == (n + 1) * 5 * 2  # classifier-free guidance (2.5) doubles the rows
    assert merged_refs == [None] * 5
    selfloop = jd("rain", 2.9, method="safa_selfloop", generator=gen(), **KW).latent
    safa_out = jd("rain", 2.9, method="safa", generator=gen(), **KW).latent
    assert not torch.allclose(out.latent, selfloop) and not torch.allclose(out.latent, safa_out)
    again = JointDiffusion(audioldm)("rain", 2.9, method=SaFaStats(snr=1e9), generator=gen(), **KW).latent
    assert torch.equal(again, out.latent)


def test_window_is_a_range_of_noise_levels():
    # The guided steps are the leading steps whose SNR is at most `snr`, for 25 and 200 steps alike.
    sched = DDIMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear", clip_sample=False)
    method = SaFaStats(snr=0.02)
    for steps in (25, 200):
        sched.set_timesteps(steps)
        g = method.reference_steps(steps, sched)
        snrs = [step_snr(sched, i) for i in range(steps)]
        assert all(a < b for a, b in zip(snrs, snrs[1:]))
        assert 0 < g < steps and snrs[g - 1] <= 0.02 < snrs[g]
        ab = sched.alphas_cumprod[sched.timesteps[g - 1]].item()
        assert snrs[g - 1] == pytest.approx(ab / (1 - ab))
    assert SaFaStats(snr=0.0).reference_steps(25, sched) == 0
    assert SaFaStats(snr=1e9).reference_steps(25, sched) == 25


# == the hook against statistics computed here ===================================================
def _context(scheduler, layout):
    return types.SimpleNamespace(scheduler=scheduler, step=types.SimpleNamespace(dim=-2, layout=layout))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_hook_gives_every_view_the_reference_row_level(prediction, strength):
    sched = DDIMScheduler(clip_sample=False, prediction_type=prediction)
    sched.set_timesteps(10)
    layout = ViewLayout(96, 32, 0)  # no overlaps: nothing to reconcile, the rule shows exactly
    n, b = layout.num_views, 2
    views = torch.randn(n, b, 3, 32, 4, generator=gen(1), dtype=torch.float64)
    views[1] *= 3.0  # views at different levels
    reference = 0.5 * torch.randn(b, 3, 32, 4, generator=gen(2), dtype=torch.float64)
    out = torch.randn(n * b + b, 3, 32, 4, generator=gen(3), dtype=torch.float64)
    model_in = torch.cat([views.reshape(n * b, 3, 32, 4), reference])
    i = 2
    x0_before = predict_x0(sched, i, views.reshape(n * b, 3, 32, 4), model_in[:n * b], out[:n * b]).view_as(views)
    x0_ref = predict_x0(sched, i, reference, model_in[n * b:], out[n * b:])
    hooks = ReferenceStatisticsHooks(SaFaStats(strength=strength), _context(sched, layout))
    hooks.after_model(i, views, reference, model_in, out)
    x0_after = predict_x0(sched, i, views.reshape(n * b, 3, 32, 4), views.reshape(n * b, 3, 32, 4),
                          out[:n * b]).view_as(views)
    rms = lambda x: x.pow(2).mean(-2).sqrt()  # noqa: E731  (per row: over time)
    expected = rms(x0_before) ** (1 - strength) * rms(x0_ref) ** strength
    torch.testing.assert_close(rms(x0_after), expected.expand_as(rms(x0_after)), rtol=1e-9, atol=1e-12)
    # Each row only scaled: its shape over time is the view's own.
    ratio = x0_after / x0_before
    torch.testing.assert_close(ratio, ratio[..., :1, :].expand_as(ratio), rtol=1e-9, atol=1e-9)
    hooks.after_model(i, views, None, model_in, out)  # outside the window: nothing to do


def test_hook_keeps_overlapping_views_one_long_latent():
    sched = DDIMScheduler(clip_sample=False)
    sched.set_timesteps(10)
    layout = ViewLayout(120, 32, 8, loop=True)
    latent = torch.randn(2, 3, 120, 4, generator=gen(4), dtype=torch.float64)
    latent[..., 40:80, :] *= 4.0
    views = gather(latent, layout, -2).contiguous()
    n = layout.num_views
    reference = torch.randn(2, 3, 32, 4, generator=gen(5), dtype=torch.float64)
    out = torch.randn(n * 2 + 2, 3, 32, 4, generator=gen(6), dtype=torch.float64)
    model_in = torch.cat([views.reshape(n * 2, 3, 32, 4), reference])
    ReferenceStatisticsHooks(SaFaStats(), _context(sched, layout)).after_model(3, views, reference, model_in, out)
    assert not torch.allclose(views, gather(latent, layout, -2))
    torch.testing.assert_close(gather(stitch(views, layout, -2, "swap"), layout, -2), views, rtol=0, atol=1e-12)


def test_row_gains():
    # (n=1, B=1, time=2, rows=2): row 0 is [1, 1] (rms 1), row 1 is [2, 0] (rms sqrt 2).
    x0 = torch.tensor([[[[1.0, 2.0], [1.0, 0.0]]]])
    ref = torch.tensor([[[2.0, 0.0], [2.0, 0.0]]])              # rms 2 and 0
    torch.testing.assert_close(row_gains(x0, ref, -2, 1.0), torch.tensor([[[[2.0, 0.0]]]]))
    torch.testing.assert_close(row_gains(x0, ref, -2, 0.5), torch.tensor([[[[math.sqrt(2.0), 0.0]]]]))
    silent = torch.zeros_like(x0)                                 # a zero row keeps gain 1 (no division by 0)
    torch.testing.assert_close(row_gains(silent, ref, -2, 1.0), torch.ones(1, 1, 1, 2))


# == shift_clean_prediction per scheduler family =================================================
def _families():
    ddpm = dict(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear")
    return [
        ("ddim-eps", DDIMScheduler(clip_sample=False, **ddpm)),
        ("ddim-v", DDIMScheduler(clip_sample=False, prediction_type="v_prediction", **ddpm)),
        ("ddim-x0", DDIMScheduler(clip_sample=False, prediction_type="sample", **ddpm)),
        ("dpm++", DPMSolverMultistepScheduler(**ddpm)),
        ("euler", EulerDiscreteScheduler(**ddpm)),
        ("flow", FlowMatchEulerDiscreteScheduler()),
        ("edm", EDMEulerScheduler()),
        ("cosine-edm", CosineDPMSolverMultistepScheduler()),
    ]


def _signal_noise(name, sched, i):
    """x_t = A x0 + S eps in the scheduler's own sample units, written out per family."""
    if name.startswith("ddim"):
        ab = sched.alphas_cumprod[sched.timesteps[i]].double()
        return ab.sqrt().item(), (1 - ab).sqrt().item()
    if name == "dpm++":  # variance-preserving samples, sigma = sqrt((1 - ab) / ab)
        s = sched.sigmas[i].double().item()
        return 1 / math.sqrt(1 + s * s), s / math.sqrt(1 + s * s)
    if name == "flow":
        s = sched.sigmas[i].double().item()
        return 1 - s, s
    return 1.0, sched.sigmas[i].double().item()  # Euler and EDM: x0 + sigma eps


@pytest.mark.parametrize("name,sched", _families(), ids=[n for n, _ in _families()])
def test_shift_clean_prediction_moves_x0_and_keeps_the_noise(name, sched):
    sched.set_timesteps(10)
    i = 3
    t = sched.timesteps[i]
    sample = torch.randn(2, 3, 8, 4, generator=gen(1), dtype=torch.float64)
    scale = getattr(sched, "scale_model_input", None)
    model_in = lambda x: scale(x, t) if scale is not None else x  # noqa: E731
    if hasattr(sched, "_step_index"):
        sched._step_index = i  # Euler-type schedulers scale by the sigma of their current step
    out = torch.randn(2, 3, 8, 4, generator=gen(2), dtype=torch.float64)
    delta = torch.randn(2, 3, 8, 4, generator=gen(3), dtype=torch.float64)
    a, s = _signal_noise(name, sched, i)
    x0 = predict_x0(sched, i, sample, model_in(sample), out, clip=False)
    eps = (sample - a * x0) / s
    new_sample, new_out = sample.clone(), out.clone()
    shift_clean_prediction(sched, i, new_sample, model_in(sample), new_out, delta)
    x0_new = predict_x0(sched, i, new_sample, model_in(new_sample), new_out, clip=False)
    torch.testing.assert_close(x0_new, x0 + delta, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close((new_sample - a * x0_new) / s, eps, rtol=1e-6, atol=1e-6)
    if name in ("ddim-eps", "dpm++", "euler"):
        assert torch.equal(new_out, out)  # an epsilon model's output is the noise: untouched


def test_step_snr_per_family():
    ddim = DDIMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear")
    flow, edm = FlowMatchEulerDiscreteScheduler(), EDMEulerScheduler()
    for sched in (ddim, flow, edm):
        sched.set_timesteps(10)
    ab = ddim.alphas_cumprod[ddim.timesteps[2]].item()
    assert step_snr(ddim, 2) == pytest.approx(ab / (1 - ab))
    s = flow.sigmas[2].item()
    assert step_snr(flow, 2) == pytest.approx(((1 - s) / s) ** 2)
    assert step_snr(edm, 2) == pytest.approx(1 / edm.sigmas[2].item() ** 2)
    for sched in (ddim, flow, edm):
        snrs = [step_snr(sched, i) for i in range(10)]
        assert all(x < y for x, y in zip(snrs, snrs[1:]))


# == bad input ==================================================================================
@pytest.mark.parametrize("kwargs,match", [
    (dict(snr=-0.1), "snr must be a finite number >= 0"),
    (dict(snr=float("nan")), "snr must be a finite number >= 0"),
    (dict(snr=float("inf")), "snr must be a finite number >= 0"),
    (dict(snr=True), "snr must be a finite number >= 0"),
    (dict(snr="0.1"), "snr must be a finite number >= 0"),
    (dict(strength=1.5), r"strength must be in \[0.0, 1.0\]"),
    (dict(strength=-0.5), r"strength must be in \[0.0, 1.0\]"),
    (dict(swap_interval=0), "swap_interval must be an int >= 1"),
])
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SaFaStats(**kwargs)


def test_bad_parameters_through_the_shorthand_and_the_sampler(audioldm):
    assert get_method("safa_stats", swap_interval=2) == SaFaStats(swap_interval=2)
    with pytest.raises(ValueError, match="guide does not apply to method 'safa_stats'"):
        get_method("safa_stats", guide=0.3)
    with pytest.raises(ValueError, match="needs the scheduler"):
        SaFaStats().reference_steps(10)
    jd = _jd(audioldm, DDIMScheduler)
    with pytest.raises(ValueError, match="guide does not apply"):
        jd("rain", 2.9, method="safa_stats", guide=0.5, **KW)
    with pytest.raises(ValueError, match="overlap must be in"):
        jd("rain", 2.9, method="safa_stats", **dict(KW, overlap=0.7))


@pytest.mark.parametrize("spec,match", [
    ("safa_stats:snr=-1", "snr must be a finite number >= 0"),
    ("safa_stats:strength=2", r"strength must be in [0.0, 1.0]"),
    ("safa_stats:swap_interval=0", "swap_interval must be an int >= 1"),
    ("safa_stats:guide=0.3", "guide does not apply to method 'safa_stats'"),
])
def test_bad_parameters_through_the_cli_method_spec(spec, match, tmp_path, capsys):
    # Out-of-range values in `safa evaluate --methods` specs: one line naming the parameter, exit 2,
    # before any sampling and with nothing written.
    from safa.cli import main
    out = tmp_path / "ev"
    assert main(["evaluate", "--methods", spec, "--samples", "2", "--quiet", "--out", str(out)]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("safa evaluate: error:") and match in lines[0], lines
    assert not out.exists() or not any(out.iterdir())


def test_memory_estimate_counts_the_reference_window():
    # Before the timesteps exist the estimate asks whether the method may denoise X^0 at all:
    # SaFaStats does, as SaFa does (one window), and does not with its guidance off.
    jd = JointDiffusion(make_texture_pipeline())
    peak = {m: jd.estimate_memory(seconds=60, method=m).peak
            for m in ("safa", "safa_selfloop", SaFaStats(), SaFaStats(snr=0.0))}
    assert peak[SaFaStats()] == peak["safa"] > peak["safa_selfloop"] == peak[SaFaStats(snr=0.0)]
