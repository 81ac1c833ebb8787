"""Long outputs: streamed to files tile by tile, decode="auto", and the memory estimate checked up front.

The built-in texture model with a short window (32 latent frames, 1.28 s) and a two-iteration
Griffin-Lim keeps minutes of audio to seconds of test time; the geometry (AudioLDM-shaped
latents, 25 frames/s, 16 kHz) is the real one.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler, \
    PNDMScheduler, UniPCMultistepScheduler

import safa.memory as memory
import safa.testing.pipelines as tp
from safa import JointDiffusion
from safa.audio_io import AudioWriter, write_audio
from safa.cli import main
from safa.decode import AUTO_WHOLE_WINDOWS, decode_full, decode_tiled, resolve_mode
from safa.memory import InsufficientMemoryError, scheduler_history
from safa.spectrogram import compute_spectrogram
from safa.texture import make_texture_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
W = 32  # latent frames per window: 1.28 s
SR = 16000


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _texture(window: int = W, iters: int = 2):
    pipe = make_texture_pipeline(window_frames=window)
    pipe.decoder.iters = iters
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def jd():
    return JointDiffusion(_texture())


def _leftovers(directory) -> list:
    return sorted(os.listdir(directory))


# -- streaming --------------------------------------------------------------------------------
@pytest.mark.parametrize("loop", [False, True])
def test_streamed_file_equals_in_memory_tiled_output(jd, tmp_path, loop):
    kw = dict(num_inference_steps=2, decode="tiled", decode_tile=20, loop=loop)
    seconds = 9.6 if loop else 9.5  # a loop must be a whole number of frames; open layouts are cropped
    memory_out = jd("rain", seconds, generator=gen(), **kw)
    chunks = []
    streamed = jd("rain", seconds, generator=gen(), output_path=str(tmp_path / "rain.wav"),
                  callback_on_output_chunk=lambda _, start, chunk: chunks.append((start, chunk.shape[-1])), **kw)
    assert streamed.audio is None and streamed.output_paths == [str(tmp_path / "rain.wav")]
    assert torch.equal(streamed.latent, memory_out.latent)
    data, sr = sf.read(str(tmp_path / "rain.wav"), dtype="float32")
    # 32-bit float WAV: the file holds the in-memory tiled output sample for sample.
    assert sr == SR and data.shape == (round(seconds * SR),) == memory_out.audio[0].shape
    assert np.array_equal(data, memory_out.audio[0])
    # It was written tile by tile (20 latent frames = 12800 samples each), in order, cropped.
    assert [s for s, _ in chunks] == list(range(0, data.shape[0], 20 * 640))
    assert sum(n for _, n in chunks) == data.shape[0] and len(chunks) > 10
    assert _leftovers(tmp_path) == ["rain.wav"]


def test_streamed_flac_and_one_file_per_output(jd, tmp_path):
    kw = dict(num_inference_steps=2, decode="tiled", decode_tile=24, num_waveforms_per_prompt=2)
    memory_out = jd("wind", 6.0, generator=[gen(1), gen(2)], **kw)
    paths = [str(tmp_path / "a.flac"), str(tmp_path / "b.flac")]
    jd("wind", 6.0, generator=[gen(1), gen(2)], output_path=paths, **kw)
    for path, expected in zip(paths, memory_out.audio):
        data, sr = sf.read(path, dtype="float64")
        # 16-bit PCM: the in-memory output rounded to the nearest of 2^16 levels.
        np.testing.assert_allclose(data, expected, rtol=0, atol=1.0 / 32768)
    assert not np.allclose(sf.read(paths[0])[0], sf.read(paths[1])[0])  # two different outputs
    assert _leftovers(tmp_path) == ["a.flac", "b.flac"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_stream_leaves_no_file(jd, tmp_path, error):
    target = tmp_path / "rain.flac"
    seen = []

    def fail_on_third(_, start, chunk):
        seen.append(start)
        if len(seen) == 3:  # two tiles are in the temporary file by now
            raise error("stop")

    with pytest.raises(error):
        jd("rain", 9.5, num_inference_steps=2, decode="tiled", decode_tile=20, output_path=str(target),
           callback_on_output_chunk=fail_on_third)
    assert len(seen) == 3
    assert _leftovers(tmp_path) == []  # neither the output nor its temporary file


def test_output_path_is_checked_before_any_work(jd, tmp_path):
    with pytest.raises(ValueError, match="one path per output"):
        jd("rain", 3.0, output_path=[str(tmp_path / "a.wav")], num_waveforms_per_prompt=2)
    with pytest.raises(ValueError, match=r"output_path must end in one of .wav, .flac"):
        jd("rain", 3.0, output_path=str(tmp_path / "a.mp3"))
    with pytest.raises(ValueError, match="does not exist"):
        jd("rain", 3.0, output_path=str(tmp_path / "missing" / "a.wav"))
    with pytest.raises(ValueError, match="output_type='latent'"):
        jd("rain", 3.0, output_path=str(tmp_path / "a.wav"), output_type="latent")
    assert _leftovers(tmp_path) == []


def test_audio_writer_checks_length_clips_pcm_and_chooses_rf64(tmp_path):
    with pytest.raises(ValueError, match="3 samples written, 4 expected"):
        with AudioWriter(str(tmp_path / "short.wav"), SR, 1, frames=4) as w:
            w.write(np.zeros(3))
    with pytest.warns(UserWarning, match="2 samples outside"):
        write_audio(str(tmp_path / "loud.flac"), np.array([0.5, 1.5, -2.0]), SR)
    np.testing.assert_allclose(sf.read(str(tmp_path / "loud.flac"))[0], [0.5, 32767 / 32768, -1.0], atol=1e-4)
    write_audio(str(tmp_path / "loud.wav"), np.array([0.5, 1.5, -2.0]), SR)  # float WAV keeps every value
    np.testing.assert_array_equal(sf.read(str(tmp_path / "loud.wav"))[0], [0.5, 1.5, -2.0])
    stereo = np.stack([np.linspace(-1, 1, 50), np.zeros(50)])
    write_audio(str(tmp_path / "stereo.wav"), stereo, SR)
    np.testing.assert_allclose(sf.read(str(tmp_path / "stereo.wav"))[0].T, stereo, atol=1e-7)
    # A WAV over 4 GiB is RF64 (the size is known up front); nothing is written here.
    big = AudioWriter(str(tmp_path / "big.wav"), SR, 1, frames=2 ** 30 + 1)
    assert big._sound.format == "RF64"
    big.abort()
    assert _leftovers(tmp_path) == ["loud.flac", "loud.wav", "stereo.wav"]


# -- decode="auto" ----------------------------------------------------------------------------
def test_auto_decodes_whole_while_short_and_in_tiles_beyond():
    assert resolve_mode("auto", AUTO_WHOLE_WINDOWS * W, W) == "full"
    assert resolve_mode("auto", AUTO_WHOLE_WINDOWS * W + 1, W) == "tiled"
    assert resolve_mode("views", 10 ** 9, W) == "views"
    with pytest.raises(ValueError, match="decode must be one of"):
        resolve_mode("tile", 10, W)


@pytest.mark.parametrize("seconds,same_as", [(4.0, "full"), (9.5, "tiled")])
def test_auto_is_the_whole_or_the_tiled_decode(jd, seconds, same_as):
    kw = dict(num_inference_steps=2, generator=None)
    auto = jd("rain", seconds, **{**kw, "generator": gen()})
    other = jd("rain", seconds, decode=same_as, **{**kw, "generator": gen()})
    assert np.array_equal(auto.audio, other.audio)


def test_texture_tiles_sound_like_the_whole_decode():
    """Griffin-Lim estimates phase over the whole signal, so tiles are not sample-equal to one
    whole decode (decoders without global state are: Stable Audio's, tests/adapters/test_adapters_*); the
    spectrogram must be the same up to the phase estimate's edge effects."""
    adapter = JointDiffusion(make_texture_pipeline()).adapter
    latent = torch.randn(1, 8, 4 * 256, 16, generator=gen(3))
    whole, tiled = decode_full(adapter, latent, False), decode_tiled(adapter, latent, False, 256)
    assert whole.shape == tiled.shape
    diff = np.abs(compute_spectrogram(whole[0].numpy(), SR).db() - compute_spectrogram(tiled[0].numpy(), SR).db())
    assert np.median(diff) < 1.0 and np.percentile(diff, 99) < 6.0, (np.median(diff), np.percentile(diff, 99))


# -- the memory estimate --------------------------------------------------------------------------
def test_scheduler_history_counts_what_schedulers_keep():
    config = DDIMScheduler().config
    expected = {DDIMScheduler: 0, EulerDiscreteScheduler: 0, DPMSolverMultistepScheduler: 2, PNDMScheduler: 4,
                HeunDiscreteScheduler: 2, UniPCMultistepScheduler: 3}
    for cls, count in expected.items():
        assert scheduler_history(cls.from_config(config)) == count, cls.__name__


def test_estimate_grows_with_the_latent_not_the_decoded_audio(jd):
    short = jd.estimate_memory(600.0, output_path="x.wav")
    long = jd.estimate_memory(6000.0, output_path="x.wav")
    in_memory = jd.estimate_memory(6000.0)
    assert long.peak_phase == "scheduler step"
    assert long.phases["scheduler step"]["views"] > 9 * short.phases["scheduler step"]["views"]
    # Streamed: no output buffer; in memory: the decoded audio (6000 s of float32) on top.
    assert "decode" not in long.host and in_memory.host["decode"]["output"] == 6000 * SR * 4
    model = long.phases["model call"]["model"]
    assert model == short.phases["model call"]["model"]  # bounded by view_batch_size, not the length
    assert jd.estimate_memory(6000.0, view_batch_size=2).phases["model call"]["model"] < model


def test_too_large_request_is_refused_before_anything_is_allocated(jd, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the request was not refused up front")

    monkeypatch.setattr(jd, "prepare_layout", must_not_run)
    monkeypatch.setattr(jd.adapter, "init_noise", must_not_run)
    started = time.perf_counter()
    with pytest.raises(InsufficientMemoryError) as info:
        jd("rain", 1e9, num_inference_steps=2)
    assert time.perf_counter() - started < 2.0
    message = str(info.value)
    assert message.startswith("seconds=1e+09 needs about") and "available" in message and "seconds=" in message
    assert info.value.estimate.peak > info.value.available
    assert isinstance(info.value, ValueError) and isinstance(info.value, MemoryError)


def test_refusal_says_what_to_change(jd, monkeypatch):
    budget = {"bytes": 0}
    monkeypatch.setattr(memory, "available_memory", lambda device: budget["bytes"])
    kw = dict(num_inference_steps=2)
    # The model batch is what does not fit: a smaller view_batch_size does.
    est = jd.estimate_memory(60.0, view_batch_size=16)
    assert est.peak_phase == "model call"
    budget["bytes"] = est.peak - est.phases["model call"]["model"] // 2
    with pytest.raises(InsufficientMemoryError, match=r"view_batch_size=\d+ \(windows per model call\) fits"):
        jd("", 60.0, view_batch_size=16, **kw)
    # Nothing but a shorter output fits: the longest that does is named.
    budget["bytes"] = jd.estimate_memory(100.0, view_batch_size=1, output_path="x.wav").peak
    with pytest.raises(InsufficientMemoryError, match=r"a shorter output: seconds=(9\d|100)(\.\d+)? ") as info:
        jd("", 3000.0, view_batch_size=1, output_path="x.wav", **kw)
    assert "view_batch_size=1 fits" not in str(info.value)


@pytest.mark.skipif(importlib.util.find_spec("torchsde") is None,
                    reason="Stable Audio's CosineDPMSolverMultistepScheduler needs torchsde")
def test_refusal_offers_streaming_when_the_decoded_audio_is_what_does_not_fit(monkeypatch):
    """44.1 kHz stereo is ~60x the bytes of its latent: holding it whole is the peak."""
    jd = JointDiffusion(tp.tiny_stable_audio_pipeline())
    est = jd.estimate_memory(600.0, guidance_scale=1.0)
    assert est.peak_phase == "decode" and est.host["decode"]["output"] == 600 * 44100 * 2 * 4
    monkeypatch.setattr(memory, "available_memory", lambda device: est.peak - est.host["decode"]["output"] // 2)
    with pytest.raises(InsufficientMemoryError, match=r"output_path= \(write the audio to a file tile by tile"):
        jd("rain", 600.0, guidance_scale=1.0, num_inference_steps=2)


_MEASURE = r"""
import ctypes, gc, json, os, sys, tempfile
import torch
torch.set_num_threads(1)
from safa import JointDiffusion
from safa.texture import make_texture_pipeline
seconds, streamed = float(sys.argv[1]), sys.argv[2] == "file"
pipe = make_texture_pipeline(window_frames=32)
pipe.decoder.iters = 1
pipe.set_progress_bar_config(disable=True)
jd = JointDiffusion(pipe)
out = os.path.join(tempfile.mkdtemp(), "x.wav")
kw = dict(num_inference_steps=2, output_path=out if streamed else None)
jd("", 10.0, **kw)  # warm-up on the same code paths (tiled decode), FFT plans, soundfile

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

gc.collect()
try:  # glibc: hand the warm-up's freed memory back, so that the baseline is what is alive
    ctypes.CDLL("libc.so.6").malloc_trim(0)
except OSError:
    pass
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS")
estimate = jd.estimate_memory(seconds, output_path=kw["output_path"])
jd("", seconds, **kw)
print(json.dumps({"measured": status("VmHWM") - base, "estimated": estimate.peak, "phase": estimate.peak_phase}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS reset needs Linux")
@pytest.mark.parametrize("seconds,output", [(120.0, "memory"), (600.0, "file")])
def test_estimate_is_within_2x_of_the_measured_peak(seconds, output):
    """A fresh process per length: peak RSS above the warmed-up baseline against the estimate."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(seconds), output], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    ratio = got["estimated"] / got["measured"]
    assert 0.5 <= ratio <= 2.0, got


# -- the command line -------------------------------------------------------------------------
def test_cli_refuses_an_impossible_length_in_one_line(tmp_path, capsys):
    started = time.perf_counter()
    code = main(["generate", "--seconds", "1e9", "--steps", "2", "--quiet", "--out", str(tmp_path / "x.wav")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "seconds=1e+09 needs about" in err and "is available" in err and "Traceback" not in err
    assert time.perf_counter() - started < 30
    assert _leftovers(tmp_path) == []


def test_cli_streams_and_reports_step_and_decode_time(tmp_path, capsys):
    out = tmp_path / "wind.flac"
    code = main(["generate", "--prompt", "wind", "--seconds", "60", "--steps", "2", "--quiet", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data, sr = sf.read(str(out))
    assert sr == SR and data.shape == (60 * SR,)
    line = captured.out.strip().splitlines()[-1]
    assert "2 steps in" in line and "s/step), decoded and written in" in line
    assert _leftovers(tmp_path) == ["wind.flac", "wind.png"]
