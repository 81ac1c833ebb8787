"""RePaint's resampling (safa.known.Resampling): the jump is the scheduler's forward transition, off is
bitwise off, every redone step is counted and merged once, multistep history is restored, bad input is
a one-line ValueError."""
from __future__ import annotations

import re

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler)

from safa import JointDiffusion
from safa import known as known_module
from safa.known import renoise, restore_scheduler, scheduler_state
from safa.texture import make_texture_pipeline

_BETAS = dict(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear")
_SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(**_BETAS, clip_sample=False, set_alpha_to_one=True),
    "ddpm": lambda: DDPMScheduler(**_BETAS, clip_sample=False),
    "dpm++2m": lambda: DPMSolverMultistepScheduler(**_BETAS),
    "euler": lambda: EulerDiscreteScheduler(**_BETAS),
    "flow-match": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
}


def _forward(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The oracle: the scheduler's own forward process ``q(x_t | x0)`` at timestep ``t``."""
    if hasattr(scheduler, "scale_noise"):
        return scheduler.scale_noise(x0, t, noise)
    return scheduler.add_noise(x0, noise, t)


@pytest.mark.parametrize("name", list(_SCHEDULERS))
def test_jump_is_the_forward_transition_of_the_scheduler(name):
    """From ``x_t' = a' x0 + s' e`` (the scheduler's ``add_noise`` / ``scale_noise`` at the next
    timestep, the clean sample after the last step), the jump lands on ``a x0 + s e`` in law at the
    step's timestep: ``renoise`` is linear, so its coefficient on ``x_t'`` and its noise's scale are
    read off exactly and checked against the forward process's ``a``, ``s`` at both timesteps."""
    scheduler = _SCHEDULERS[name]()
    scheduler.set_timesteps(7)
    timesteps = scheduler.timesteps
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    for i in range(len(timesteps)):
        t = timesteps[i:i + 1]
        a, s = float(_forward(scheduler, one, zero, t)), float(_forward(scheduler, zero, one, t))
        if i + 1 < len(timesteps):
            t_next = timesteps[i + 1:i + 2]
            a_next = float(_forward(scheduler, one, zero, t_next))
            s_next = float(_forward(scheduler, zero, one, t_next))
        else:
            a_next, s_next = 1.0, 0.0
        ratio = float(renoise(one, scheduler, timesteps, i, zero))
        spread = float(renoise(zero, scheduler, timesteps, i, one))
        assert ratio * a_next == pytest.approx(a, rel=1e-5), i
        assert (ratio * s_next) ** 2 + spread ** 2 == pytest.approx(s * s, rel=1e-5, abs=1e-9), i


def test_jump_keeps_the_marginal_of_an_exact_gaussian():
    """Sampling check of the same: x0 ~ N(0, c^2) brought to the next level, jumped back, has the
    forward process's variance ``a^2 c^2 + s^2`` at the step's timestep (200 000 values: ~0.3%)."""
    scheduler = _SCHEDULERS["ddim"]()
    scheduler.set_timesteps(10)
    timesteps, g, c = scheduler.timesteps, torch.Generator().manual_seed(0), 0.5
    draw = lambda: torch.randn(200_000, generator=g, dtype=torch.float64)  # noqa: E731
    for i in (0, 4, 9):
        x0 = c * draw()
        nxt = _forward(scheduler, x0, draw(), timesteps[i + 1:i + 2]) if i + 1 < len(timesteps) else x0
        x = renoise(nxt, scheduler, timesteps, i, draw())
        one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        a = float(_forward(scheduler, one, zero, timesteps[i:i + 1]))
        s = float(_forward(scheduler, zero, one, timesteps[i:i + 1]))
        assert float(x.var()) == pytest.approx(a * a * c * c + s * s, rel=0.015), i
        assert float((x * x0).mean()) == pytest.approx(a * c * c, rel=0.02, abs=2e-3), i


def test_multistep_history_is_restored_around_a_jump():
    """DPM-Solver++(2M): a step redone after ``restore_scheduler`` from the same input returns the same
    sample as its first run (without the restore its history would hold the first run's output)."""
    scheduler = _SCHEDULERS["dpm++2m"]()
    scheduler.set_timesteps(6)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, generator=g)
    for t in scheduler.timesteps[:2]:
        x = scheduler.step(torch.randn(2, 8, generator=g), t, x).prev_sample
    t, out = scheduler.timesteps[2], torch.randn(2, 8, generator=g)
    state = scheduler_state(scheduler)
    first = scheduler.step(out, t, x).prev_sample
    stale = scheduler.step(out, t, x).prev_sample  # no restore: a step further, another history
    restore_scheduler(scheduler, state)
    again = scheduler.step(out, t, x).prev_sample
    assert torch.equal(first, again) and not torch.equal(first, stale)
    assert scheduler.step_index == 3 and scheduler.lower_order_nums == 2


# -- the sampler, on the built-in model (fast) -----------------------------------------------------
@pytest.fixture(scope="module")
def texture():
    return JointDiffusion(make_texture_pipeline(window_frames=16))


def _run(jd, **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    fps = jd.adapter.frames_per_second
    given = torch.randn(jd.adapter.latent_shape(1, 20), generator=torch.Generator().manual_seed(3))
    return jd("rain", seconds=48 / fps, audio_latents=given, output_type="latent",
              generator=torch.Generator().manual_seed(0), **kwargs)


@pytest.mark.parametrize("kwargs", [dict(resample_steps=1), dict(resample_steps=1, resample_until=0.3),
                                    dict(resample_steps=3, resample_until=0.1)])
def test_off_is_bitwise_the_plain_call(texture, kwargs):
    """``resample_steps=1`` (or no step inside ``resample_until``) is the call without resampling,
    bitwise, with the same window evaluations (nothing saved, nothing drawn)."""
    plain = _run(texture)
    off = _run(texture, **kwargs)
    assert torch.equal(plain.latent, off.latent)
    assert plain.window_evaluations == off.window_evaluations


@pytest.mark.parametrize("method", ["safa", "multidiffusion"])
def test_every_run_is_an_evaluation_and_one_merge(texture, method, monkeypatch):
    """r = 3 over the first half of 4 steps: steps 0 and 1 run three times, each run one model batch,
    one merge and one impose of the known columns; ``window_evaluations`` counts every window of every
    run (X^0 on the guided runs), the known columns come back clean, and the output differs."""
    runs, merges, impose = [], [], []
    from safa import accel
    original_impose = known_module.KnownAudio.impose
    original_predict, original_merge = accel.StepRunner.predict, accel.StepRunner.merge
    monkeypatch.setattr(accel.StepRunner, "predict",
                        lambda self, x, i, ref: (runs.append((i, x.shape[0], ref)),
                                                 original_predict(self, x, i, ref))[1])
    monkeypatch.setattr(accel.StepRunner, "merge", lambda self, *a: (merges.append(1), original_merge(self, *a))[1])
    monkeypatch.setattr(known_module.KnownAudio, "impose", lambda self, *a: (impose.append(a[-1]),
                                                                               original_impose(self, *a))[1])
    plain = _run(texture, method=method)
    base = len(runs)
    runs.clear(), merges.clear(), impose.clear()
    out = _run(texture, method=method, resample_steps=3, resample_until=0.5)
    assert [i for i, _, _ in runs] == [0, 0, 0, 1, 1, 1, 2, 3] and len(merges) == len(runs) == base + 4
    assert impose == [0, 0, 0, 1, 1, 1, 2, 3]
    windows = sum(rows for _, rows, _ in runs)  # batch 1, no guidance: one row per window
    assert out.window_evaluations == windows == plain.window_evaluations + sum(
        rows for i, rows, _ in runs if i < 2) * 2 // 3
    assert torch.equal(out.latent[:, :, 0:20], plain.latent[:, :, 0:20])  # the known columns, clean
    assert not torch.equal(out.latent, plain.latent)


def test_dpm_solver_resamples_and_ddim_too(texture):
    """The texture model's DPM-Solver++ and DDIM both run with resampling (DPM-Solver's history restored);
    a redone call is reproducible bitwise (the jumps' noise is seeded from the call's generator)."""
    a = _run(texture, resample_steps=2)
    b = _run(texture, resample_steps=2)
    assert torch.equal(a.latent, b.latent) and torch.isfinite(a.latent).all()
    pipe = make_texture_pipeline(window_frames=16)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    out = _run(JointDiffusion(pipe), resample_steps=2)
    assert torch.isfinite(out.latent).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(resample_steps=0), "resample_steps must be an int >= 1"),
    (dict(resample_steps=2.5), "resample_steps must be an int >= 1"),
    (dict(resample_steps=True), "resample_steps must be an int >= 1"),
    (dict(resample_steps="2"), "resample_steps must be an int >= 1"),
    (dict(resample_steps=2, resample_until=0.0), r"resample_until must be a fraction of the steps in \(0, 1\]"),
    (dict(resample_steps=2, resample_until=1.5), r"resample_until must be a fraction of the steps in \(0, 1\]"),
])
def test_bad_input_is_a_one_line_value_error(texture, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        _run(texture, **kwargs)
    assert "\n" not in str(info.value)


def test_unsupported_scheduler_is_refused_with_the_ones_that_work():
    """UniPC's corrector recomputes ``x_t`` from its previous sample (the jump would be thrown away):
    refused, naming the schedulers that work; without resampling it runs as before."""
    pipe = make_texture_pipeline(window_frames=16)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    jd = JointDiffusion(pipe)
    with pytest.raises(ValueError, match="DDIM, DDPM, EulerDiscrete.*UniPCMultistepScheduler is not one") as info:
        _run(jd, resample_steps=2)
    assert "\n" not in str(info.value)
    assert torch.isfinite(_run(jd).latent).all()


@pytest.mark.parametrize("flag, message", [("--resample=0", "--resample: must be an int >= 1"),
                                           ("--resample=1.5", "--resample: must be an int >= 1"),
                                           ("--resample-until=0", r"--resample-until: must be in \(0, 1\]")])
def test_cli_flags_are_checked_in_one_line(flag, message, capsys):
    """``safa generate --resample`` / ``--resample-until``: a one-line error, exit status 2, no work."""
    from safa.cli import main
    assert main(["generate", "rain", flag]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0])
