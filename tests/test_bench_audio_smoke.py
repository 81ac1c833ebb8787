"""Smoke test of ``benchmarks/bench_audio.py --quick``: the script runs and prints every table.

It runs the whole script in a subprocess (memory children included) at tiny sizes; its
numbers mean nothing, only that the measurements still run and report the expected rows.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _rows(text: str, heading: str) -> list:
    """The data rows (cells) of the first markdown table after the line starting with ``heading``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    table = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            table.append([c.strip() for c in line.strip("|").split("|")])
        elif table:
            break
    return table[2:]  # header and separator dropped


@pytest.mark.slow  # ~10 s: a subprocess that imports torch + diffusers, and a memory child
def test_bench_audio_quick(tmp_path):
    out_json = tmp_path / "bench_audio.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_audio.py"), "--quick",
                           "--json", str(out_json)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout

    scaling = _rows(text, "### Scaling with length")
    assert [(r[0], r[1], r[2]) for r in scaling] == [
        ("safa", "None (all)", "3 s"), ("multidiffusion", "None (all)", "3 s"),
        ("safa", "None (all)", "6 s"), ("multidiffusion", "None (all)", "6 s"),
        ("safa", "1", "3 s"), ("safa", "1", "6 s")]
    assert all(float(r[5]) > 0 for r in scaling)  # s / step
    assert [r[0] for r in _rows(text, "### With decoding")] == ["3 s"]
    memory = _rows(text, "### Peak RSS")
    assert [(r[0], r[1], r[2]) for r in memory] == [("3 s", "1", "latent")]
    assert float(memory[0][-2]) > 0  # peak RSS MiB
    share = _rows(text, "### Machinery share of a step")
    assert [r[0] for r in share] == ["model", "scheduler", "merge", "other", "merge + other (machinery)",
                                     "step (profiled)", "step (no profiler)"]
    call = _rows(text, "### The whole call")
    assert call[-1][0] == "call" and float(call[-1][1]) > 0

    res = json.loads(out_json.read_text())
    assert 0 < res["share"]["machinery_pct"] < 100
    assert len(res["scaling"]["latent"]) == 6 and len(res["memory"]["rows"]) == 1
