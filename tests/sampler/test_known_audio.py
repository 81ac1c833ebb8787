"""The user's own audio (safa.known): continue, extend, fill and loop a clip on every audio family."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import soundfile
import torch
from diffusers import (AutoencoderOobleck, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler)

from safa import JointDiffusion
from safa.known import noised_known, read_audio
from safa.texture import make_texture_pipeline
from safa.testing.pipelines import (tiny_audioldm2_pipeline, tiny_audioldm_pipeline, tiny_musicldm_pipeline,
                                    tiny_stable_audio_pipeline)

_BETAS = dict(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear")


# -- the noise level of step i's output, per scheduler family ------------------------------------
@pytest.mark.parametrize("make", [
    lambda: DDIMScheduler(**_BETAS, clip_sample=False, set_alpha_to_one=True),
    lambda: DPMSolverMultistepScheduler(**_BETAS),
    lambda: DPMSolverMultistepScheduler(**_BETAS, algorithm_type="sde-dpmsolver++"),
    lambda: UniPCMultistepScheduler(**_BETAS),
    lambda: EulerDiscreteScheduler(**_BETAS),
    lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
], ids=["ddim", "dpm++2m", "sde-dpm++", "unipc", "euler", "flow-match"])
def test_noised_known_is_the_scheduler_trajectory_of_an_exact_model(make):
    """With a model that predicts the true noise of ``x0``, every deterministic scheduler's step lands
    exactly on ``noised_known(x0, noise, i)``: the known columns are brought to the level of the step's
    output. A stochastic one (SDE-DPM-Solver++) lands on the same mean and noise level with fresh noise."""
    scheduler = make()
    scheduler.set_timesteps(8)
    timesteps = scheduler.timesteps
    g = torch.Generator().manual_seed(0)
    shape = (4, 4, 2000)
    x0, noise = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g,
                                                                                  dtype=torch.float64)
    flow = isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
    stochastic = "sde" in str(getattr(scheduler.config, "algorithm_type", ""))
    x = noised_known(scheduler, x0, noise, timesteps, -1)  # x at timesteps[0]
    for i, t in enumerate(timesteps):
        eps = (x - noised_known(scheduler, x0, torch.zeros_like(x0), timesteps, i - 1)) / (
            noised_known(scheduler, torch.zeros_like(x0), torch.ones_like(x0), timesteps, i - 1)[0, 0, 0])
        kwargs = {"generator": g} if stochastic else {}
        x = scheduler.step(eps - x0 if flow else eps, t, x, **kwargs).prev_sample
        expected = noised_known(scheduler, x0, noise, timesteps, i)
        if not stochastic:
            assert (x - expected).abs().max() <= 1e-5 * (1 + expected.abs().max()), (i, float((x - expected).abs().max()))
        else:  # the clean part exact, the noise's level within sampling error (16 000 values: ~1.1%)
            clean = noised_known(scheduler, x0, torch.zeros_like(x0), timesteps, i)
            level = (expected - clean).std() if i + 1 < len(timesteps) else torch.tensor(0.0)
            assert abs(float((x - clean).std() - level)) <= 0.04 * float(level) + 1e-6, i
            assert abs(float((x - clean).mean())) <= 0.04 * float(level) + 1e-6, i


# -- the sampler, on the built-in model (fast) -----------------------------------------------------
@pytest.fixture(scope="module")
def texture():
    return JointDiffusion(make_texture_pipeline(window_frames=16))


def _clip(rate: float, seconds: float, channels: int = 1) -> np.ndarray:
    n = int(round(rate * seconds))
    t = np.arange(n) / rate
    x = 0.3 * np.sin(2 * np.pi * 440 * t) * (1 + 0.2 * np.sin(2 * np.pi * 3 * t))
    return np.stack([x * (1 + 0.1 * c) for c in range(channels)]).astype(np.float32).squeeze(0 if channels == 1
                                                                                             else ())


def _run(jd, **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("output_type", "pt")
    return jd("rain", generator=torch.Generator().manual_seed(0), **kwargs)


@pytest.mark.parametrize("placement", ["continue", "extend", "fill", "loop"])
def test_texture_given_samples_come_back_exactly(texture, placement):
    rate = texture.sample_rate
    clip = _clip(rate, 0.9)
    args = dict(continue_=dict(seconds=2.0), extend=dict(seconds=2.0, audio_start=0.6),
                fill=dict(seconds=2.0, audio_start=0.3, keep=[(0.3, 0.6), (0.9, 1.2)]),
                loop=dict(seconds=2.0, loop=True))[placement if placement != "continue" else "continue_"]
    out = _run(texture, audio=clip, sample_rate=rate, audio_crossfade=0.02, **args)
    audio = out.audio[0]
    assert audio.shape == (int(2.0 * rate),) and out.output_length == int(2.0 * rate)
    start = int(round(args.get("audio_start", 0.0) * rate))
    fade = int(0.02 * rate)
    for a, b in args.get("keep", [(start / rate, start / rate + 0.9)]):
        lo, hi = int(round(a * rate)), int(round(b * rate))
        inner_lo = lo + (fade if (lo > 0 or args.get("loop")) else 0)
        inner_hi = hi - fade
        given = torch.from_numpy(clip[inner_lo - start:inner_hi - start])
        assert torch.equal(audio[inner_lo:inner_hi], given)
    if placement == "fill":  # the gap is generated, not the clip
        gap = slice(int(0.62 * rate), int(0.88 * rate))
        assert not torch.allclose(audio[gap], torch.from_numpy(clip[gap.start - start:gap.stop - start]))


def test_known_latent_columns_are_clean_and_one_impose_per_step(texture, monkeypatch):
    """``audio_latents``: the final latent holds them exactly over the kept columns; the known columns
    cost one impose (one ``index_put_``) per step, after the one merge."""
    from safa import known as known_module
    window = texture.adapter.native_window()
    given = torch.randn(texture.adapter.latent_shape(1, 20), generator=torch.Generator().manual_seed(3))
    calls = []
    original = known_module.KnownAudio.impose
    monkeypatch.setattr(known_module.KnownAudio, "impose",
                        lambda self, *a: (calls.append(a[-1]), original(self, *a))[1])
    fps = texture.adapter.frames_per_second
    out = _run(texture, seconds=3 * window / fps, audio_latents=given, audio_start=4 / fps,
               output_type="latent", num_inference_steps=4)
    assert calls == [0, 1, 2, 3]
    assert torch.equal(out.latent[:, :, 4:24], given)


@pytest.mark.parametrize("audio_start_frames, at_end", [(0, False), (28, True)])
def test_reference_window_holds_the_clip_while_it_guides(audio_start_frames, at_end):
    """SaFa's X^0 holds the clip's known columns at each guided step's noise level (at its start for
    a continuation, at its end when the clip ends the output), with one fixed noise; given
    ``reference_latents``, X^0 is the user's and holds nothing of the clip."""
    pipe = make_texture_pipeline(window_frames=16)
    pipe.scheduler = DDIMScheduler(**_BETAS, clip_sample=False, set_alpha_to_one=True)
    jd = JointDiffusion(pipe)
    fps, window = jd.adapter.frames_per_second, jd.adapter.native_window()
    given = torch.randn(jd.adapter.latent_shape(1, 12), generator=torch.Generator().manual_seed(3))
    seen = {}

    def keep_reference(_jd, i, t, state):
        seen[i] = (int(t), state["reference"].clone() if state["reference"] is not None else None)
    kwargs = dict(seconds=40 / fps, audio_latents=given, audio_start=audio_start_frames / fps, output_type="latent",
                  num_inference_steps=10, method="safa:guide=0.5", callback_on_step_end=keep_reference)
    _run(jd, **kwargs)
    cols = slice(window - 12, window) if at_end else slice(0, 12)
    alphas = pipe.scheduler.alphas_cumprod
    timesteps = [t for t, _ in seen.values()] + [None]
    implied_noise = []
    for i in range(5):  # guide=0.5 of 10 steps
        a = alphas[timesteps[i + 1]].double()
        ref = seen[i][1][:, :, cols].double()
        implied_noise.append((ref - a.sqrt() * given.double()) / (1 - a).sqrt())
    for noise in implied_noise[1:]:
        assert torch.allclose(noise, implied_noise[0], atol=1e-4)
    assert seen[5][1] is None  # X^0 freed once it stops guiding
    seen.clear()
    own = torch.randn(jd.adapter.latent_shape(1, window), generator=torch.Generator().manual_seed(4))
    _run(jd, reference_latents=own, **kwargs)
    a = alphas[seen[1][0]].double()
    ref = seen[0][1][:, :, cols].double()
    assert not torch.allclose((ref - a.sqrt() * given.double()) / (1 - a).sqrt(), implied_noise[0], atol=1e-2)


def test_no_audio_is_the_plain_call(texture):
    plain = _run(texture, seconds=1.5, output_type="latent")
    same = _run(texture, seconds=1.5, output_type="latent", audio=None, keep=None)
    assert torch.equal(plain.latent, same.latent)


def test_paste_audio_false_returns_the_decoded_version(texture):
    rate = texture.sample_rate
    clip = _clip(rate, 0.5)
    pasted = _run(texture, seconds=1.5, audio=clip, sample_rate=rate).audio[0]
    decoded = _run(texture, seconds=1.5, audio=clip, sample_rate=rate, paste_audio=False).audio[0]
    assert torch.equal(pasted[:4000], torch.from_numpy(clip[:4000]))
    assert not torch.equal(decoded[:4000], pasted[:4000])
    assert torch.equal(decoded[12000:], pasted[12000:])  # beyond the clip nothing changes


# -- bad input: one-line errors before any work -----------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(seconds=1.0, audio=np.zeros(32000, np.float32) + 0.1, sample_rate=16000), "beyond the requested"),
    (dict(seconds=2.0, audio=np.ones(8000, np.float32) * 0.1, sample_rate=16000, keep=[(0.2, 0.9)]),
     "keep-range"),
    (dict(seconds=2.0, audio=np.ones(8000, np.float32) * 0.1, sample_rate=0), "sample_rate must be an int > 0"),
    (dict(seconds=2.0, audio=np.ones(8000, np.float32) * 0.1), "sample_rate is required"),
    (dict(seconds=2.0, audio=np.zeros(0, np.float32), sample_rate=16000), "empty"),
    (dict(seconds=2.0, audio="/nonexistent/clip.wav"), "no such file"),
    (dict(seconds=2.0, keep=[(0, 1)]), "give audio="),
    (dict(seconds=0.48, audio=np.ones(7680, np.float32) * 0.1, sample_rate=16000),
     "nothing is left to generate"),
])
def test_bad_input_is_a_one_line_value_error(texture, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        _run(texture, **kwargs)
    assert "\n" not in str(info.value)


def test_unreadable_file_and_silence_and_downmix(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    with pytest.raises(ValueError, match="cannot read"):
        read_audio(str(bad), None, 16000, 1)
    silent = tmp_path / "silent.flac"
    soundfile.write(str(silent), np.zeros(4410, np.float32), 44100)
    with pytest.warns(UserWarning, match="silence"):
        got = read_audio(str(silent), None, 16000, 1)
    assert got.shape == (1, 1600)  # resampled 44.1 kHz -> 16 kHz, length exact
    stereo = np.stack([np.full(100, 0.2, np.float32), np.full(100, 0.4, np.float32)])
    with pytest.warns(UserWarning, match="downmixed"):
        mono = read_audio(stereo, 16000, 16000, 1)
    np.testing.assert_allclose(mono, np.full((1, 100), 0.3), rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_audio(stereo[0], 16000, 16000, 2).shape == (2, 100)  # mono -> stereo: duplicated


# -- every audio family (tiny random pipelines) -------------------------------------------------
def _stable_audio():
    pipe = tiny_stable_audio_pipeline()
    # The tiny pipeline's VAE encoder is narrower than its decoder (encode is never used there):
    # a consistent one (64 latent channels both ways, as the released model).
    pipe.vae = AutoencoderOobleck(encoder_hidden_size=128, downsampling_ratios=[2, 4, 4, 8, 8],
                                  channel_multiples=[1, 1, 1, 1, 1], decoder_channels=4, decoder_input_channels=64,
                                  audio_channels=2, sampling_rate=44100)
    return pipe


@pytest.mark.parametrize("make", [tiny_audioldm_pipeline, tiny_musicldm_pipeline, tiny_audioldm2_pipeline,
                                  _stable_audio], ids=["audioldm", "musicldm", "audioldm2", "stable_audio"])
def test_every_family_continues_a_clip(make):
    jd = JointDiffusion(make())
    rate, fps = jd.sample_rate, jd.adapter.frames_per_second
    window = jd.adapter.native_window() / fps
    channels = jd.adapter.output_elements_per_column()
    clip = _clip(rate, 0.5 * window, channels)
    seconds = 1.5 * window
    out = _run(jd, seconds=seconds, audio=clip, sample_rate=rate, audio_start=0.25, num_inference_steps=2)
    audio = out.audio[0]
    n = int(round(seconds * rate))
    assert audio.shape[-1] == n and out.output_length == n
    start, fade = int(round(0.25 * rate)), int(round(0.05 * rate))
    given = torch.from_numpy(clip[..., fade:-fade])
    assert torch.equal(audio[..., start + fade:start + clip.shape[-1] - fade], given)


# -- the exact truth of a continuation on the built-in model ------------------------------------------
def test_sample_conditional_is_the_dense_gaussian_conditional():
    from safa.texture.model import TextureModel
    model = TextureModel(channels=2, freq_bins=2, window=8, class_names=["rain", "surf"])
    cw = model.encode_prompt(["surf"]).double()
    g = torch.Generator().manual_seed(0)
    prefix = model.sample(torch.tensor([4]), length=4, generator=g, dtype=torch.float64)
    # The posterior against the dense multivariate normal of each component's first 4 frames.
    dense = []
    for k in range(model.num_components):
        cov = model.component_cov(k).reshape(4, 8, 4, 8)[:, :4, :, :4].reshape(16, 16)
        x = prefix[0].permute(0, 2, 1).reshape(-1)
        dense.append(torch.distributions.MultivariateNormal(torch.zeros(16, dtype=torch.float64), cov).log_prob(x))
    expected = torch.softmax(torch.stack(dense) + model.component_logprior(cw)[0], 0)
    torch.testing.assert_close(model.substyle_posterior(prefix, cw)[0], expected)
    # The conditional's mean and covariance against the dense Schur complement (4000 draws).
    n = 4000
    out, comps = model.sample_conditional(prefix.expand(n, -1, -1, -1), cw.expand(n, -1), 8, generator=g,
                                          dtype=torch.float64)
    k = int(expected.argmax())
    assert (comps == k).float().mean() > 0.5 * float(expected[k])
    rows = out[comps == k][:, :, 4:].permute(0, 1, 3, 2).reshape(-1, 16)           # (c, f, t) order
    full = model.component_cov(k)                                                   # (c, f, t) over 8 frames
    t = torch.arange(8)
    past = (torch.arange(4)[:, None] * 8 + t[None, :4]).reshape(-1)
    future = (torch.arange(4)[:, None] * 8 + t[None, 4:]).reshape(-1)
    gain = torch.linalg.solve(full[past][:, past], full[past][:, future])
    mean = prefix[0].permute(0, 2, 1).reshape(-1) @ gain
    cov = full[future][:, future] - full[future][:, past] @ gain
    assert (rows.mean(0) - mean).abs().max() < 4 * cov.diagonal().max().sqrt() / rows.shape[0] ** 0.5
    assert (torch.cov(rows.T) - cov).abs().max() < 0.1 * cov.diagonal().max()


def test_continuation_task_runs_at_a_tiny_size(monkeypatch):
    """The table's rows and columns (the measurement itself: docs/own-audio.md)."""
    import safa.texture
    from safa.evaluate import evaluate_continuation, format_continuation_table
    make = safa.texture.make_texture_pipeline
    monkeypatch.setattr(safa.texture, "make_texture_pipeline", lambda: make(window_frames=16))
    res = evaluate_continuation(prompts=("rain",), samples=1, clip_seconds=0.64, seconds=2.56, steps=3, probe=8)
    table = format_continuation_table(res)
    for row in ("true", "one window", "crossfade", "multidiffusion", "safa", "multidiffusion + resample",
                "safa + resample"):
        assert row in table and len(res.rows[row]["junction"]) == 1
    assert res.rows["true"]["interior"][0] >= 0
