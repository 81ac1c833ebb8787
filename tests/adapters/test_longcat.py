"""JointDiffusion over LongCat-AudioDiT (``LongCatAudioDiTPipeline``) on a tiny offline pipeline.

Latent ``(B, T, D)`` with time on dim -2; the tiny one runs at 10 latent frames/s with the
pipeline's own 30 s cap as the native window (300 frames). Below one window the call is the
pipeline's, bitwise; long audio and loops with every method; the VAE decoded tile by tile equals
the whole decode to float rounding; SyncDiffusion reads x0 through the scheduler's
``invert_sigmas``; MAD is refused in one line.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from merge_asserts import assert_merged_as_the_method_says, keep_last_views

from safa import JointDiffusion
from safa.methods import SyncDiffusion
from safa.schedulers import predict_x0, shift_clean_prediction, step_snr
from safa.testing import pipelines as tp

METHODS = ("safa", "safa_selfloop", "multidiffusion", "multidiffusion_triangular")
RATE = 80  # the tiny VAE's samples per second; 8 per latent frame
LONG, LOOP = 71.37, 72.0  # open: 714 frames, cropped; a loop of 720 frames (3 views, stride 240)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def longcat():
    return tp.tiny_longcat_audio_pipeline(seed=0)


@pytest.mark.parametrize("guidance,negative", [(1.0, None), (4.0, None), (4.0, "noise")],
                         ids=["no-cfg", "cfg", "cfg-negative"])
def test_longcat_one_view_equals_pipeline(longcat, guidance, negative):
    """Below one window: the same noise, text, zero-text unconditional branch, inverted sigmas, bitwise."""
    kw = dict(num_inference_steps=3, guidance_scale=guidance, negative_prompt=negative)
    ours = JointDiffusion(longcat)("Rain on a TIN roof", 2.0, generator=_gen(), output_type="np", **kw)
    theirs = longcat("Rain on a TIN roof", audio_duration_s=2.0, generator=_gen(), **kw).audios
    assert ours.layout.num_views == 1 and ours.layout.window == 20
    assert ours.audio.shape == theirs.shape == (1, 1, 2 * RATE)
    np.testing.assert_array_equal(ours.audio, theirs)


def test_longcat_native_window_is_the_pipelines_cap(longcat):
    jd = JointDiffusion(longcat)
    assert jd.adapter.native_window() == int(longcat.max_wav_duration * RATE // 8) == 300
    assert jd.adapter.pipeline_default("num_inference_steps", 50) == 16
    full = jd("rain", 30.0, num_inference_steps=1, generator=_gen(), output_type="latent")
    assert full.layout.num_views == 1 and full.latent.shape == (1, 300, 8)


@pytest.mark.parametrize("loop", [False, True], ids=["open", "loop"])
@pytest.mark.parametrize("method", METHODS)
def test_longcat_long_audio_every_method(longcat, method, loop):
    jd = JointDiffusion(longcat)
    seconds = LOOP if loop else LONG
    last: list = []
    r = jd("rain", seconds, method=method, loop=loop, num_inference_steps=2, generator=_gen(), output_type="np",
           callback_on_step_end=keep_last_views(last))
    assert r.audio.shape == (1, 1, int(round(seconds * RATE))) and np.isfinite(r.audio).all()
    assert r.layout.loop is loop and r.layout.num_views >= 3 and r.layout.window == 300
    assert r.latent.shape[0] == 1 and r.latent.shape[-1] == 8 and r.latent.shape[-2] == r.layout.length
    if loop:
        assert r.layout.length == r.columns == 720
    assert_merged_as_the_method_says(r, last[0], jd.adapter.long_dim)


def test_longcat_streamed_file_equals_returned_audio(longcat, tmp_path):
    """The convolutional decoder tiled with its receptive field as context equals the whole decode
    to float rounding; the file written tile by tile holds that audio."""
    import soundfile as sf
    jd = JointDiffusion(longcat)
    kw = dict(num_inference_steps=2, window=10.0)
    full = jd("rain", LONG, decode="full", output_type="np", generator=_gen(), **kw)
    tiled = jd("rain", LONG, decode="tiled", decode_tile=40, output_type="np", generator=_gen(), **kw)
    assert torch.equal(full.latent, tiled.latent)
    np.testing.assert_allclose(tiled.audio, full.audio, rtol=0, atol=1e-5)
    path = tmp_path / "rain.wav"
    r = jd("rain", LONG, decode="tiled", decode_tile=40, output_path=str(path), generator=_gen(), **kw)
    assert r.output_paths == [str(path)] and r.audio is None
    written, rate = sf.read(str(path), dtype="float32", always_2d=True)
    assert rate == RATE and written.shape == (int(round(LONG * RATE)), 1)
    np.testing.assert_allclose(written.T, full.audio[0], atol=1e-4)  # WAV's float32 rounding


def test_inverted_sigmas_x0_reads_the_clean_latent(longcat):
    """Under ``invert_sigmas`` the sigma is the weight of x0 and the model predicts x0 - eps: the x0
    of the exact velocity is x0, at every step; shifting the clean prediction moves it by delta."""
    scheduler = longcat.scheduler
    JointDiffusion(longcat).adapter.set_timesteps(4, (1, 20, 8))
    x0, eps, delta = torch.randn(3, 1, 20, 8, generator=_gen()).unbind(0)
    snrs = []
    for i in range(4):
        s = float(scheduler.sigmas[i])  # 0, 0.25, 0.5, 0.75: from noise towards data
        x_t = s * x0 + (1 - s) * eps
        torch.testing.assert_close(predict_x0(scheduler, i, x_t, x_t, x0 - eps), x0)
        sample, output = x_t.clone(), (x0 - eps).clone()
        shift_clean_prediction(scheduler, i, sample, sample.clone(), output, delta)
        torch.testing.assert_close(predict_x0(scheduler, i, sample, sample, output), x0 + delta)
        snrs.append(step_snr(scheduler, i))
    assert snrs == sorted(snrs) and snrs[0] == 0.0  # pure noise first, the signal grows


def test_longcat_syncdiffusion_and_refusals(longcat):
    jd = JointDiffusion(longcat)
    kw = dict(loop=True, num_inference_steps=2, generator=None, output_type="latent")
    zero = jd("rain", LOOP, method=SyncDiffusion(weight=0.0, steps=1.0), **{**kw, "generator": _gen()})
    sync = jd("rain", LOOP, method=SyncDiffusion(weight=20.0, steps=1.0), **{**kw, "generator": _gen()})
    assert torch.isfinite(sync.latent).all() and not torch.equal(zero.latent, sync.latent)
    # SaFaStats shifts the clean prediction through the same inverted-sigma reading
    stats = jd("rain", LOOP, method="safa_stats", **{**kw, "generator": _gen()})
    assert stats.latent.shape == zero.latent.shape and torch.isfinite(stats.latent).all()
    with pytest.raises(ValueError, match="MAD merges a UNet's self-attention layers; LongCatAudioDiTPipeline"):
        jd("rain", LONG, method="mad", num_inference_steps=1)
    with pytest.raises(ValueError, match="prompt_embeds is not supported for LongCatAudioDiTPipeline"):
        jd(prompt_embeds=torch.zeros(1, 4, 16), seconds=LONG, num_inference_steps=1)


def test_longcat_round_trips_offline(longcat, tmp_path):
    longcat.save_pretrained(tmp_path)
    loaded = type(longcat).from_pretrained(tmp_path)
    for a, b in zip(longcat.transformer.parameters(), loaded.transformer.parameters()):
        assert torch.equal(a, b)
    assert loaded.scheduler.config.invert_sigmas and loaded.sample_rate == RATE
