"""Smoke test of ``benchmarks/guidance_variants.py`` (the research behind docs/guidance-research.md):
every kind of variant runs, the table has a row per variant, ``--json`` / ``--plot`` and ``--commit``
work. At 2 samples and 2 steps the numbers mean nothing; only that the script cannot rot."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ["safa_snr:snr=0.05", "swap_blocks:block=8", "lowpass:cutoff=0.05:snr=0.05", "ref_noise:band=all",
            "ref_noise:band=low", "ref_spectrum:basis=rows:snr=0.075", "consensus:bands=12:reconcile=swap:snr=0.05",
            "consensus:bands=0:reconcile=vp:snr=0.075", "consensus:basis=pca:reconcile=tri:snr=0.01:init=1"]


@pytest.fixture(scope="module")
def gv():
    spec = importlib.util.spec_from_file_location("guidance_variants", ROOT / "benchmarks" / "guidance_variants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_variant_runs_and_plots(gv, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    assert gv.main(["--samples", "2", "--seconds", "24", "--steps", "2", "--methods", "safa_stats",
                    "--variants", ",".join(VARIANTS), "--json", str(rows)]) == 0
    table = capsys.readouterr().out
    names = [line.split()[0] for line in table.splitlines()[3:] if line and not line.startswith(("mean", "note"))]
    assert names == ["true", "one", "safa_stats", *VARIANTS]
    written = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [r["name"] for r in written] == ["true", "one window", "safa_stats", *VARIANTS]
    assert all(len(r["int_kl"]) == 2 for r in written)
    png = tmp_path / "variants.png"
    assert gv.main(["--plot", str(png), "--json", str(rows)]) == 0
    assert png.stat().st_size > 1000


def test_commit_table(gv, capsys):
    assert gv.main(["--commit", "--steps", "3", "--prompts", "rain"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("DPMSolverMultistepScheduler, 3 steps") and len(lines) == 2 + 3
    committed = [float(line.split()[-1]) for line in lines[2:]]
    assert all(0.0 <= c <= 1.0 for c in committed) and committed[-1] == 1.0  # settled by the last step


def test_unknown_variant(gv):
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        gv.make_variant("nope:snr=0.1")
