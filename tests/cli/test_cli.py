"""``safa generate`` end to end on a tiny AudioLDM saved with ``save_pretrained`` (CPU, offline)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

import safa.testing.pipelines as tp
from safa.files import atomic_path
from safa.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = ["--prompt", "rain", "--window", "1.28", "--overlap", "0.25", "--steps", "2", "--quiet"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_audioldm")
    tp.tiny_audioldm_pipeline().save_pretrained(str(d))
    return str(d)


def _run(*args: str):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "safa", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def _only_inputs(directory) -> list:
    return sorted(os.listdir(directory))


def test_generate_subprocess_writes_audio_and_spectrogram(model_dir, tmp_path):
    out = tmp_path / "rain.wav"
    fast = [a for a in FAST if a != "rain"]
    fast.remove("--prompt")
    proc = _run("generate", "--model", model_dir, *fast, "--view-prompt", "rain", "--view-prompt", "wind",
                "--view-prompt", "calm", "--seconds", "2.9", "--scheduler", "DPMSolverMultistep", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    data, sr = sf.read(str(out))
    assert sr == 16000 and data.shape == (round(2.9 * 16000),) and np.isfinite(data).all()
    spec = Image.open(tmp_path / "rain.png")  # the annotated spectrogram (tests/cli/test_plots.py)
    assert spec.size[0] > 1000 and spec.size[1] > 300
    assert "3 views" in proc.stdout
    assert _only_inputs(tmp_path) == ["rain.png", "rain.wav"]  # no temporary files left


def test_generate_flac_loop_in_process(model_dir, tmp_path, capsys):
    out = tmp_path / "loop.flac"
    code = main(["generate", "--model", model_dir, *FAST, "--seconds", "3.84", "--loop", "--method",
                 "multidiffusion", "--decode", "tiled", "--out", str(out), "--no-spectrogram"])
    assert code == 0, capsys.readouterr().err
    data, sr = sf.read(str(out))
    assert data.shape == (round(3.84 * 16000),)
    assert _only_inputs(tmp_path) == ["loop.flac"]


def _assert_one_line_error(code_or_proc, err, pattern, tmp_path):
    code = code_or_proc if isinstance(code_or_proc, int) else code_or_proc.returncode
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and pattern in lines[0] and lines[0].startswith("safa generate: error:"), err
    assert _only_inputs(tmp_path) == []  # nothing written, no partial file


def test_missing_model_directory_subprocess(tmp_path):
    out = tmp_path / "x.wav"
    proc = _run("generate", "--model", str(tmp_path / "nope"), *FAST, "--seconds", "3", "--out", str(out))
    _assert_one_line_error(proc, proc.stderr, "does not exist", tmp_path)


def test_unsupported_pipeline(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code = main(["generate", "--model", str(model), *FAST, "--seconds", "3", "--out", str(out_dir / "x.wav")])
    err = capsys.readouterr().err
    assert "supported: " in err and "AudioLDMPipeline" in err
    _assert_one_line_error(code, err, "unsupported pipeline KandinskyPipeline", out_dir)


@pytest.mark.parametrize("extra,pattern", [
    (["--seconds", "0.5", "--loop"], "no seamless loop of exactly 0.5 s"),
    (["--seconds", "3", "--device", "nope"], "is not a torch device"),
    (["--seconds", "3", "--method", "multidiffusion", "--guide", "0.5"], "guide does not apply"),
    (["--seconds", "3", "--method", "multidiffusion", "--overlap", "1.0"], "argument --overlap: must be in"),
    (["--seconds", "3", "--overlap", "0.7"], "overlap must be in [0.0, 0.5]"),
])
def test_impossible_length_and_overlap(model_dir, tmp_path, capsys, extra, pattern):
    args = ["generate", "--model", model_dir, *FAST, *extra, "--out", str(tmp_path / "x.wav")]
    args[args.index("--overlap") + 1] = extra[extra.index("--overlap") + 1] if "--overlap" in extra else "0.25"
    code = main(args)
    _assert_one_line_error(code, capsys.readouterr().err, pattern, tmp_path)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA error")
def test_unavailable_device_is_one_line(model_dir, tmp_path, capsys):
    for device in ("cuda", "cuda:1"):
        code = main(["generate", "--model", model_dir, *FAST, "--seconds", "3", "--device", device,
                     "--out", str(tmp_path / "x.wav")])
        _assert_one_line_error(code, capsys.readouterr().err, "this machine has no CUDA device", tmp_path)


@pytest.mark.parametrize("value,pattern", [("foo", "the SAFA_BACKEND environment variable must be one of"),
                                           ("cuda", "SAFA_BACKEND environment variable: backend 'cuda' is not available "
                                                    "for cpu")])
def test_bad_backend_variable_is_one_line(model_dir, tmp_path, capsys, monkeypatch, value, pattern):
    monkeypatch.setenv("SAFA_BACKEND", value)
    code = main(["generate", "--model", model_dir, *FAST, "--seconds", "3", "--out", str(tmp_path / "x.wav")])
    _assert_one_line_error(code, capsys.readouterr().err, pattern, tmp_path)


def test_builtin_model_is_built_for_the_window(tmp_path, capsys):
    out = tmp_path / "t.wav"
    code = main(["generate", "--prompt", "rain", "--window", "0.96", "--seconds", "2.4", "--loop", "--steps", "2",
                 "--quiet", "--out", str(out), "--no-spectrogram"])
    assert code == 0, capsys.readouterr().err
    assert "views of 0.96 s (24 latent frames)" in capsys.readouterr().out
    assert sf.read(str(out))[0].shape == (round(2.4 * 16000),)
    code = main(["generate", "--window", "0.97", "--seconds", "2.4", "--out", str(out)])
    assert code == 2 and "whole number" in capsys.readouterr().err


def test_unwritable_output(model_dir, tmp_path, capsys):
    code = main(["generate", "--model", model_dir, *FAST, "--seconds", "3",
                 "--out", str(tmp_path / "missing_dir" / "x.wav")])
    _assert_one_line_error(code, capsys.readouterr().err, "cannot write", tmp_path)
    code = main(["generate", "--model", model_dir, *FAST, "--seconds", "3", "--out", str(tmp_path / "x.mp3")])
    _assert_one_line_error(code, capsys.readouterr().err, "--out must end in", tmp_path)


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "a.wav"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(str(target)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise KeyboardInterrupt
    assert _only_inputs(tmp_path) == []
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(str(target)) as tmp:
            raise RuntimeError("boom")
    assert target.read_text() == "old" and _only_inputs(tmp_path) == ["a.wav"]


def test_help_lists_generate(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "generate" in capsys.readouterr().out
    assert main([]) == 2


def test_generate_takes_method_specs_as_evaluate_does(tmp_path, capsys):
    # `--method name:param=value` builds the method object; the written audio is the Python
    # call's with that object (the built-in model, same seed).
    import torch
    from safa import JointDiffusion, SaFa
    from safa.commands.common import BUILTIN_MODEL, load_pipeline

    out = tmp_path / "spec.wav"
    code = main(["generate", "--prompt", "rain", "--window", "0.96", "--seconds", "2.4", "--steps", "3", "--quiet",
                 "--method", "safa:guide=0.6:swap_interval=2", "--out", str(out), "--no-spectrogram"])
    assert code == 0, capsys.readouterr().err
    pipe = load_pipeline(BUILTIN_MODEL, 0.96)
    pipe.set_progress_bar_config(disable=True)
    expected = JointDiffusion(pipe)("rain", seconds=2.4, num_inference_steps=3,  # the pipeline's guidance, as the CLI
                                    method=SaFa(guide=0.6, swap_interval=2),
                                    generator=torch.Generator().manual_seed(0)).audio[0]
    np.testing.assert_allclose(sf.read(str(out), dtype="float32")[0], expected, atol=1e-6)


@pytest.mark.parametrize("method,extra,pattern", [
    ("safa_stats:snr=-1", [], "snr must be"),
    ("safa:guide=0.5", ["--guide", "0.4"], "guide given both"),
    ("safa:gide=0.5", [], "gide does not apply"),
    ("multidiffusion", ["--guide", "0.5"], "guide does not apply"),
    ("nope", [], "unknown method 'nope'"),
])
def test_bad_method_spec_is_one_line(model_dir, tmp_path, capsys, method, extra, pattern):
    code = main(["generate", "--model", model_dir, *FAST, "--seconds", "3", "--method", method, *extra,
                 "--out", str(tmp_path / "x.wav")])
    _assert_one_line_error(code, capsys.readouterr().err, pattern, tmp_path)


def test_sigterm_unwinds_like_ctrl_c_and_leaves_no_file(tmp_path):
    # A job scheduler's (or `timeout`'s) SIGTERM while the output is being written: exit 143,
    # one line, and neither the output nor its temporary file is left behind.
    import signal
    import time
    out = tmp_path / "long.flac"
    proc = subprocess.Popen([sys.executable, "-m", "safa", "generate", "--prompt", "rain", "--seconds", "600",
                             "--steps", "1", "--quiet", "--no-spectrogram", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 120
    while not any(p.name.endswith(".part.flac") for p in tmp_path.iterdir()) and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "safa generate: terminated"
    assert list(tmp_path.iterdir()) == []


# -- what a new user trips on: every bad input is one line, every crash has a test ---------------------
BUILTIN_FAST = ["--prompt", "rain", "--window", "0.96", "--seconds", "2.4", "--steps", "1", "--quiet"]


def _one_line(code, err, command, pattern):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"safa {command}: error:") and pattern in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("argv,pattern", [
    (["generate", "--seed", "-1"], "argument --seed: must be an int in [0, 18446744073709551615], got -1"),
    (["generate", "--seed", str(2 ** 64)], "argument --seed: must be an int in [0,"),
    (["generate", "--seed", "x"], "argument --seed: must be an int in"),
    (["generate", "--steps", "0"], "argument --steps: must be an int >= 1, got 0"),
    (["generate", "--guidance-scale", "-5"], "argument --guidance-scale: must be in [0.0, inf), got -5.0"),
    (["generate", "--seconds", "ten"], "argument --seconds: must be a finite number > 0, got 'ten'"),
    (["generate", "--seconds", "nan"], "argument --seconds: must be a finite number > 0"),
    (["generate", "--sed", "1"], "unrecognized arguments: --sed 1 (did you mean --seed?)"),
    (["profile", "--threads", "0"], "argument --threads: must be an int >= 1, got 0"),
    (["profile", "--warmup", "-1"], "argument --warmup: must be an int >= 0"),
    (["evaluate", "--samples", "1"], "argument --samples: must be an int >= 2"),
    (["evaluate", "--seed", "-1"], "argument --seed: must be an int in"),
    (["evaluate", "--overlap", "1"], "argument --overlap: must be in [0.0, 1.0)"),
])
def test_argparse_errors_are_one_line_naming_the_subcommand(capsys, argv, pattern):
    code = main(argv)
    line = _one_line(code, capsys.readouterr().err, argv[0], pattern)
    assert line.endswith(f"(see safa {argv[0]} --help)")  # the subcommand's help, not the top-level usage


def test_a_mistyped_flag_of_the_top_level_is_one_line(capsys):
    assert main(["--nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["safa: error: unrecognized arguments: --nope (see safa --help)"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA error")
@pytest.mark.parametrize("command", ["profile", "generate", "evaluate"])
def test_backend_flag_is_checked_before_any_work_and_named(capsys, command, monkeypatch):
    # `--backend cuda` on a CPU machine was a 32-line traceback after the header; `bogus` blamed
    # SAFA_BACKEND although the flag was given.
    monkeypatch.delenv("SAFA_BACKEND", raising=False)
    code = main([command, "--backend", "cuda"])
    captured = capsys.readouterr()
    _one_line(code, captured.err, command, "--backend: backend 'cuda' is not available for cpu tensors")
    assert captured.out == ""  # nothing printed before the error
    code = main([command, "--backend", "bogus"])
    line = _one_line(code, capsys.readouterr().err, command, "--backend must be one of")
    assert "SAFA_BACKEND" not in line


def test_generate_takes_backend_and_notices_overlap_zero(tmp_path, capsys):
    out = tmp_path / "x.wav"
    code = main(["generate", *BUILTIN_FAST[:-1], "--overlap", "0", "--backend", "reference", "--seed", "3",
                 "--out", str(out), "--no-spectrogram"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "notice: --overlap 0: the windows do not overlap" in captured.err
    assert "seed 3;" in captured.out and "1 steps" in captured.out


def test_read_only_out_is_refused_and_kept(tmp_path, capsys):
    out = tmp_path / "keep.wav"
    out.write_bytes(b"mine")
    out.chmod(0o444)
    code = main(["generate", *BUILTIN_FAST, "--out", str(out)])
    _one_line(code, capsys.readouterr().err, "generate", "exists and is read-only (mode 444)")
    assert out.read_bytes() == b"mine" and _only_inputs(tmp_path) == ["keep.wav"]
    # The Python writers refuse it too (the rename would replace it whatever its mode).
    from safa.audio_io import write_audio
    with pytest.raises(PermissionError, match="read-only"):
        write_audio(str(out), np.zeros(16), 16000)
    assert out.read_bytes() == b"mine" and _only_inputs(tmp_path) == ["keep.wav"]


def test_out_under_a_file_says_it_is_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code = main(["generate", *BUILTIN_FAST, "--out", str(tmp_path / "afile" / "x.wav")])
    _one_line(code, capsys.readouterr().err, "generate", f"{tmp_path / 'afile'} is a file, not a directory")


def test_evaluate_plot_needs_png(tmp_path, capsys):
    code = main(["evaluate", "--plot", str(tmp_path / "myplot"), "--out", str(tmp_path)])
    _one_line(code, capsys.readouterr().err, "evaluate", "--plot must end in one of .png (image output), got")
    assert _only_inputs(tmp_path) == []


def test_a_huge_prompt_is_not_echoed_whole(tmp_path, capsys):
    code = main(["generate", *BUILTIN_FAST[2:], "--prompt", "rain " * 5000, "--out", str(tmp_path / "x.wav")])
    line = _one_line(code, capsys.readouterr().err, "generate", "unknown texture prompt")
    assert len(line) < 700 and "characters in all" in line
    assert _only_inputs(tmp_path) == []


def test_free_space_check_counts_the_spectrogram(tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple
    audio_bytes = round(2.4 * 16000) * 4
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 9, 0, audio_bytes + 1024))
    code = main(["generate", *BUILTIN_FAST, "--out", str(tmp_path / "x.wav")])
    line = _one_line(code, capsys.readouterr().err, "generate", "not enough disk space for --out: x.wav, x.png need")
    assert "MiB free" in line and _only_inputs(tmp_path) == []


def test_disk_full_while_writing_the_png_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    import safa.plots

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safa.plots, "save_figure", full)
    out = tmp_path / "x.wav"
    code = main(["generate", *BUILTIN_FAST, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == [f"safa generate: error: wrote {out} but not its spectrogram {tmp_path / 'x.png'}: "
                                 "No space left on device"]
    assert _only_inputs(tmp_path) == ["x.wav"]  # the audio is complete, and said so


def test_generate_takes_the_tiny_audioldm_and_the_pipelines_steps(tmp_path, capsys):
    from safa.cli import build_parser
    assert build_parser().parse_args(["generate"]).steps is None  # the pipeline's own, as the Python call
    out = tmp_path / "t.wav"
    code = main(["generate", "--model", "builtin:tiny-audioldm", "--prompt", "rain", "--seconds", "1.6", "--window",
                 "0.64", "--quiet", "--out", str(out), "--no-spectrogram"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "10 steps" in captured.out  # AudioLDM's own default
    assert sf.read(str(out))[0].shape == (round(1.6 * 16000),)


def test_demo_bad_input_leaves_no_directory(tmp_path, capsys):
    from safa.demo import main as demo
    target = tmp_path / "new"
    assert demo(["--out", str(target), "--prompt", "nope"]) == 2
    assert "unknown texture prompt" in capsys.readouterr().err and not target.exists()
    assert demo(["--out", str(target), "--seconds", "-1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "python -m safa.demo: error: argument --seconds: must be a finite number > 0, got -1.0 "
        "(see python -m safa.demo --help)"]
    assert not target.exists()


def test_third_party_notices_are_filtered():
    import logging

    from safa.commands.common import _OncePerMessage
    once = _OncePerMessage()

    def record(message):
        return logging.LogRecord("diffusers", logging.WARNING, __file__, 1, message, None, None)

    assert not once.filter(record("The AudioLDMPipeline has been deprecated and will not receive bug fixes or "
                                  "feature updates after Diffusers version 0.33.1. "))
    assert not once.filter(record("`CLIPImageProcessor` requires torchvision (not installed); falling back to x"))
    assert once.filter(record("a notice about the user's run")) and not once.filter(record("a notice about the "
                                                                                          "user's run"))


def test_decode_choices_are_the_decoders():
    from safa.commands.generate import DECODE_CHOICES
    from safa.decode import DECODE_MODES
    assert sorted(DECODE_CHOICES) == sorted(DECODE_MODES)


def test_generate_with_your_audio_marks_it_on_the_spectrogram(model_dir, tmp_path, monkeypatch):
    """``--audio --at``: the clip's span is hatched on the spectrogram PNG."""
    import safa.plots as plots
    clip = tmp_path / "clip.wav"
    sf.write(str(clip), 0.1 * np.sin(np.linspace(0, 400, 16000)).astype(np.float32), 16000)  # 1 s
    drawn = {}
    original = plots.spectrogram_figure

    def spy(*args, **kwargs):
        fig = original(*args, **kwargs)
        drawn["given"] = kwargs.get("given_spans")
        drawn["labels"] = [h.get_label() for ax in fig.axes for h in ax.patches]
        return fig
    monkeypatch.setattr(plots, "spectrogram_figure", spy)
    out = tmp_path / "x.wav"
    assert main(["generate", "--model", model_dir, *FAST, "--seconds", "2.4", "--audio", str(clip), "--at", "1.0",
                 "--out", str(out)]) == 0
    assert drawn["given"] == [(1.0, 2.0)]
    assert "your audio" in drawn["labels"]
    assert (tmp_path / "x.png").exists()
