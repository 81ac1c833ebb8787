"""``safa evaluate --task seams2d``: the 2-D seam table and figure end to end (tiny settings), and
its flags' errors as one line before any work."""
from __future__ import annotations

import os

import pytest

from safa.cli import main


def _one_line(code, err, pattern):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("safa evaluate: error:") and pattern in lines[0], lines[0]


def test_seams2d_writes_the_open_and_torus_tables_and_the_figure(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["evaluate", "--task", "seams2d", "--methods", "safa,multidiffusion_gaussian,syncdiffusion,mad",
                 "--tiles", "2", "--scheduler", "DDIM", "--steps", "2", "--samples", "2", "--overlap", "0.25",
                 "--prompts", "marble,clouds", "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    text = (out / "seams2d.txt").read_text()
    assert os.path.getsize(out / "seams2d.png") > 10_000
    tables = text.split("\n\n")
    assert len(tables) == 2 and "(open;" in tables[0] and "(torus;" in tables[1]
    for table in tables:
        lines = table.splitlines()
        assert "2 canvases/row" in lines[0] and "2 steps DDIMScheduler" in lines[0]
        names = [ln.split()[0] for ln in lines[3:] if ln.split() and ln[0] != " "]
        assert names[:5] == ["true", "one", "safa", "multidiffusion_gaussian", "syncdiffusion"]
        assert "note: syncdiffusion: loss style_distance" in table
        assert "mad: not applicable: MAD merges a UNet's self-attention layers; TexturePipeline2D" in table
    assert "HF wrap" in tables[1] and "HF wrap" not in tables[0]
    assert "wrote" in printed and str(out / "seams2d.txt") in printed


@pytest.mark.parametrize("argv,pattern", [
    (["--loop"], "--loop: --task seams2d measures both the open canvas and the torus"),
    (["--tiles", "1"], "--tiles must be an int in [2, 16], got 1"),
    (["--seconds", "10"], "--seconds / --window are for the audio tasks"),
    (["--prompts", "brick", "--quick"], "unknown texture prompt 'brick'"),
])
def test_seams2d_flag_errors_are_one_line(argv, pattern, tmp_path, capsys):
    code = main(["evaluate", "--task", "seams2d", "--out", str(tmp_path), *argv])
    _one_line(code, capsys.readouterr().err, pattern)


def test_seams2d_with_guidance_on_a_tiny_pipeline():
    from safa.evaluate2d import evaluate_seams2d, format_seams2d_table
    from safa.testing import tiny_texture2d_pipeline
    res = evaluate_seams2d(["multidiffusion"], samples=2, tiles=2, steps=2, prompts=["marble"], guidance_scale=2.0,
                           pipe=tiny_texture2d_pipeline(window=16))
    table = format_seams2d_table(res)
    assert "guidance 2, probes 8 x 8" in table.splitlines()[0]
    assert [r.name for r in res.rows] == ["true", "one window", "multidiffusion"]
    assert res.rows[-1].stats.consistent.shape == (2,) and res.example_prompt == "marble"
