"""JointDiffusion over Wan (``WanPipeline``): long video along latent frames, on a tiny offline pipeline.

Latent ``(B, 16, F, H, W)`` with frames on dim -3; the causal VAE makes ``4 (F - 1) + 1`` frames
of an open video (``4 F`` of a loop) at 16 fps. Frames of 32 x 32 px (4 x 4 latent). Below one
window the call is the pipeline's own (to float rounding: the two guidance branches run as one
batch here); long videos and loops with every method; the decode in chunks that carry the VAE's
causal cache IS the whole decode; a loop is the periodic video's period; MP4 files; bad input.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from merge_asserts import assert_merged_as_the_method_says, keep_last_views

from safa import JointDiffusion
from safa.layouts import LoopLengthError
from safa.methods import SyncDiffusion
from safa.testing import pipelines as tp

METHODS = ("safa", "safa_selfloop", "multidiffusion", "multidiffusion_triangular")
SIZE = dict(height=32, width=32)
FPS = 16
WINDOW = 24 / FPS  # 1.5 s: 6 latent frames (24 frames of a long video)
OPEN_FRAMES = 61   # 16 latent frames
LOOP_FRAMES = 60   # 15 latent frames, every one 4 frames


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def wan():
    return tp.tiny_wan_pipeline(seed=0)


@pytest.fixture(scope="module")
def jd(wan):
    return JointDiffusion(wan)


@pytest.mark.parametrize("guidance,negative", [(1.0, None), (5.0, None), (5.0, "blurry")],
                         ids=["no-cfg", "cfg", "cfg-negative"])
@pytest.mark.parametrize("output_type", ["np", "pt"])
def test_wan_one_view_equals_pipeline(wan, jd, guidance, negative, output_type):
    """At most one window: the pipeline's own noise, text, schedule and decode."""
    kw = dict(num_inference_steps=2, guidance_scale=guidance, negative_prompt=negative, output_type=output_type,
              **SIZE)
    theirs = wan("a cat on a boat", num_frames=21, generator=_gen(), **kw).frames
    ours = jd("a cat on a boat", 21 / FPS, generator=_gen(), **kw)
    assert ours.layout.num_views == 1 and ours.layout.window == 6 and ours.output_length == 21
    assert tuple(ours.frames.shape) == tuple(theirs.shape) == ((1, 21, 32, 32, 3) if output_type == "np"
                                                               else (1, 21, 3, 32, 32))
    np.testing.assert_allclose(np.asarray(ours.frames), np.asarray(theirs), rtol=0, atol=1e-5)


def test_wan_geometry_is_the_pipelines(wan, jd):
    adapter = JointDiffusion(wan).adapter
    assert adapter.frame_size == (480, 832)  # the pipeline's defaults before any call
    assert adapter.native_window() == 21 and adapter.fps == FPS and adapter.temporal_compression == 4
    out = jd("a cat", 81 / FPS, num_inference_steps=1, generator=_gen(), output_type="latent", **SIZE)
    assert out.layout.num_views == 1 and out.latent.shape == (1, 16, 21, 4, 4)
    assert jd.layout_for(161 / FPS, **SIZE).num_views == 3


@pytest.mark.parametrize("loop", [False, True], ids=["open", "loop"])
@pytest.mark.parametrize("method", METHODS)
def test_wan_long_video_every_method(jd, method, loop):
    frames = LOOP_FRAMES if loop else OPEN_FRAMES
    last: list = []
    r = jd("waves", frames / FPS, method=method, loop=loop, window=WINDOW, num_inference_steps=2, generator=_gen(),
           callback_on_step_end=keep_last_views(last), **SIZE)
    assert r.frames.shape == (1, frames, 32, 32, 3) and np.isfinite(r.frames).all()
    assert r.frames.min() >= 0 and r.frames.max() <= 1
    assert r.layout.loop is loop and r.layout.num_views >= 3 and r.layout.window == 6
    assert r.latent.shape[:2] == (1, 16) and r.latent.shape[2] == r.layout.length
    if loop:
        assert r.layout.length == r.columns == 15
    assert_merged_as_the_method_says(r, last[0], jd.adapter.long_dim)


@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_wan_chunked_decode_is_the_whole_decode(jd, chunk):
    """The causal cache carried from chunk to chunk: frame for frame the pipeline's vae.decode."""
    latent = torch.randn(1, 16, 13, 4, 4, generator=_gen(3))
    adapter = jd.adapter
    with torch.no_grad():
        whole = adapter.finalize(adapter.decode_latents(latent))
        pieces = list(adapter.decode_frames(latent, False, "tiled", chunk))
    assert whole.shape[-1] == 4 * 12 + 1
    assert [start for start, _ in pieces] == [0] + [1 + 4 * (k * chunk - 1) for k in range(1, len(pieces))]
    torch.testing.assert_close(torch.cat([p for _, p in pieces], dim=-1), whole, rtol=0, atol=1e-6)


def test_wan_tiled_call_equals_full_call(jd):
    kw = dict(window=WINDOW, num_inference_steps=2, output_type="pt", **SIZE)
    full = jd("waves", OPEN_FRAMES / FPS, decode="full", generator=_gen(), **kw)
    tiled = jd("waves", OPEN_FRAMES / FPS, decode="tiled", decode_tile=3, generator=_gen(), **kw)
    assert torch.equal(full.latent, tiled.latent)
    torch.testing.assert_close(tiled.frames, full.frames, rtol=0, atol=1e-6)


def test_wan_loop_is_the_period_of_the_repeated_video(jd):
    """A loop decoded after its own end is the second period of the periodic latent decoded whole:
    its first frame follows its last as frame 4L follows frame 4L - 1 of that video."""
    r = jd("waves", LOOP_FRAMES / FPS, loop=True, window=WINDOW, num_inference_steps=2, generator=_gen(),
           output_type="pt", **SIZE)
    latent = r.latent
    L = latent.shape[2]
    assert L <= jd.adapter.loop_context
    with torch.no_grad():
        periodic = jd.adapter.finalize(jd.adapter.decode_latents(torch.cat([latent, latent], dim=2)))
    second = periodic[..., 4 * L - 3:8 * L - 3].permute(0, 4, 1, 2, 3)
    torch.testing.assert_close(r.frames, second, rtol=0, atol=1e-5)


def test_wan_writes_mp4_frame_by_frame(jd, tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "waves.mp4"
    kw = dict(window=WINDOW, num_inference_steps=2, **SIZE)
    frames = jd("waves", OPEN_FRAMES / FPS, decode="tiled", generator=_gen(), **kw).frames
    r = jd("waves", OPEN_FRAMES / FPS, decode="tiled", output_path=str(path), generator=_gen(), **kw)
    assert r.frames is None and r.output_paths == [str(path)]
    assert [p for p in os.listdir(tmp_path) if p != "waves.mp4"] == []  # no temporary file left
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.average_rate) == ("h264", FPS)
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    assert decoded.shape == (OPEN_FRAMES, 32, 32, 3)
    # H.264 at crf 18 is lossy (chroma subsampled): close to the returned frames, not equal
    assert np.abs(decoded / 255.0 - frames[0]).mean() < 0.05


def test_wan_view_prompts_and_memory_estimate(jd):
    n = jd.layout_for(OPEN_FRAMES / FPS, window=WINDOW, **SIZE).num_views
    kw = dict(window=WINDOW, num_inference_steps=2, output_type="latent", **SIZE)
    one = jd("waves", OPEN_FRAMES / FPS, generator=_gen(), **kw)
    per_view = jd(view_prompts=["waves"] * (n - 1) + ["a storm"], seconds=OPEN_FRAMES / FPS, generator=_gen(), **kw)
    assert not torch.equal(one.latent, per_view.latent)
    estimate = jd.estimate_memory(OPEN_FRAMES / FPS, window=WINDOW, **SIZE)
    assert estimate.not_estimated == () and estimate.peak > 0


def test_wan_syncdiffusion_with_a_loss(jd):
    kw = dict(window=WINDOW, num_inference_steps=2, output_type="latent", **SIZE)

    def loss(a, b):
        assert a.shape[1:3] == (3, 21)  # decoded clips (B, 3, frames, H, W)
        return ((a - b) ** 2).mean()
    zero = jd("waves", OPEN_FRAMES / FPS, method=SyncDiffusion(weight=0.0, steps=1.0, loss=loss), generator=_gen(),
              **kw)
    sync = jd("waves", OPEN_FRAMES / FPS, method=SyncDiffusion(steps=1.0, loss=loss), generator=_gen(), **kw)
    assert torch.isfinite(sync.latent).all() and not torch.equal(zero.latent, sync.latent)


@pytest.mark.parametrize("kwargs,error", [
    (dict(seconds=80.5 / FPS), r"80.5 frames at 16 fps: give a whole number of frames, e\.g\. 77 frames .* or 81"),
    (dict(seconds=80 / FPS), r"80 frames does not fit .*\(frames - 1\) % 4 == 0.*nearest 77 frames \(seconds=4.8125\) "
                             r"or 81 frames \(seconds=5.0625\)"),
    (dict(seconds=61 / FPS, loop=True), r"no seamless loop of exactly .*61 frames.*nearest loopable"),
    (dict(seconds=1.0, height=40), r"height must be a positive multiple of 16 pixels for WanPipeline"),
    (dict(seconds=1.0, width=0), r"width must be a positive multiple of 16"),
    (dict(seconds=OPEN_FRAMES / FPS, decode="views"), r"decode='views' .* not available for video"),
    (dict(seconds=1.0, output_path="x.wav"), r"output_path must end in one of \.mp4"),
    (dict(seconds=OPEN_FRAMES / FPS, method="mad"), r"MAD merges a UNet's self-attention layers; WanPipeline"),
    (dict(seconds=OPEN_FRAMES / FPS, method="syncdiffusion"), r"SyncDiffusion has no default loss for video"),
    (dict(seconds=1.0, loop="both"), r"loop must be a bool for video pipelines"),
    (dict(seconds=17 / FPS, audio=np.zeros(100), sample_rate=100),
     r"audio= is for audio pipelines; WanPipeline makes videos"),
    (dict(seconds=1.0, output_type="mel"), r"output_type must be one of \('np', 'pt', 'pil', 'latent'\)"),
], ids=["fractional-frames", "open-count", "loop-count", "height", "width", "views-decode", "wav", "mad",
        "syncdiffusion", "loop-both", "audio", "output-type"])
def test_wan_bad_input_is_one_clear_error(jd, kwargs, error):
    kwargs = {**SIZE, "window": WINDOW, **kwargs}
    with pytest.raises(ValueError, match=error):
        jd("waves", num_inference_steps=1, **kwargs)


def test_wan_loop_length_error_is_a_loop_length_error(jd):
    with pytest.raises(LoopLengthError):
        jd("waves", 62 / FPS, loop=True, window=WINDOW, num_inference_steps=1, **SIZE)


def test_cli_generate_writes_mp4(tmp_path, capsys):
    from safa.cli import main
    out = tmp_path / "waves.mp4"
    common = ["generate", "--model", "builtin:tiny-wan", "--prompt", "waves", "--width", "32", "--height", "32",
              "--window", str(WINDOW), "--steps", "1", "--quiet"]
    assert main([*common, "--frames", str(OPEN_FRAMES), "--out", str(out)]) == 0
    assert out.is_file() and f"wrote {out}: {OPEN_FRAMES} frames of 32x32 px at 16 fps" in capsys.readouterr().out
    assert main([*common, "--frames", "60", "--out", str(tmp_path / "bad.mp4")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "nearest 57 frames" in error[0] and "or 61 frames" in error[0]
    assert not (tmp_path / "bad.mp4").exists()
    assert main(["generate", "--frames", "61", "--out", str(tmp_path / "x.wav"), "--quiet"]) == 2
    assert "--frames is for video pipelines" in capsys.readouterr().err


def test_wan_pil_and_tuple_outputs_are_the_pipelines(wan, jd):
    kw = dict(num_inference_steps=1, output_type="pil", **SIZE)
    theirs = wan("a cat", num_frames=9, generator=_gen(), return_dict=False, **kw)
    ours = jd("a cat", 9 / FPS, generator=_gen(), return_dict=False, **kw)
    assert len(ours) == len(theirs) == 1 and len(ours[0]) == 1 and len(ours[0][0]) == len(theirs[0][0]) == 9
    for a, b in zip(ours[0][0], theirs[0][0]):
        assert a.size == b.size == (32, 32)
        assert np.abs(np.asarray(a, int) - np.asarray(b, int)).max() <= 1


def _wan_video(group):
    jd = JointDiffusion(tp.tiny_wan_pipeline(seed=0), process_group=group)
    out = jd("waves", OPEN_FRAMES / FPS, method="safa_selfloop", window=WINDOW, num_inference_steps=2,
             view_batch_size=1, decode="tiled", decode_tile=3, output_type="pt", generator=_gen(), **SIZE)
    return None if out.frames is None else out.frames.numpy()


def test_wan_two_processes_equal_one(jd):
    """Views sharded over 2 gloo processes; the causal decode runs on rank 0 alone, in order."""
    from safa.testing.distributed import RankError, run_processes
    results = run_processes(_wan_video, 2)
    assert not any(isinstance(r, RankError) for r in results), results
    assert results[1] is None
    np.testing.assert_array_equal(results[0], _wan_video(None))


def test_serve_refuses_video_and_profile_takes_it(jd, tmp_path, capsys, monkeypatch):
    from safa.cli import main
    from safa.serve.jobs import Studio
    with pytest.raises(ValueError, match="safa serve makes audio and images; WanPipeline makes video"):
        Studio(jd, "builtin:tiny-wan", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    args = ["profile", "--model", "builtin:tiny-wan", "--width", "32", "--height", "32", "--window", str(WINDOW),
            "--steps", "1", "--quiet"]
    assert main(args) == 2 and "this is a video pipeline: give --seconds" in capsys.readouterr().err
    assert main([*args, "--seconds", str(OPEN_FRAMES / FPS)]) == 0
    assert "builtin:tiny-wan: 3 views of 1.5 s (6 latent frames, 24 frames)" in capsys.readouterr().out


def test_wan_videos_per_prompt(jd):
    out = jd("waves", 9 / FPS, num_videos_per_prompt=2, num_inference_steps=1, generator=[_gen(1), _gen(2)], **SIZE)
    assert out.frames.shape == (2, 9, 32, 32, 3) and not np.array_equal(out.frames[0], out.frames[1])
    with pytest.raises(ValueError, match="num_images_per_prompt is for image pipelines; give num_videos_per_prompt"):
        jd("waves", 9 / FPS, num_images_per_prompt=2, num_inference_steps=1, **SIZE)


def test_wan_mp4_without_pyav_fails_before_any_work(jd, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # an import of av raises ImportError
    with pytest.raises(ValueError, match=r"writing video needs PyAV: pip install av"):
        jd("waves", OPEN_FRAMES / FPS, output_path=str(tmp_path / "w.mp4"), num_inference_steps=1,
           callback_on_step_end=lambda *a: pytest.fail("a step ran"), **SIZE)
