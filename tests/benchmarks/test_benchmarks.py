"""The benchmark harness, the report that makes benchmarks/README.md's tables, and the measured
backend table of safa_kernels/tuning.py (the benchmarks themselves run in CI's smoke mode)."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from safa_kernels import ViewLayout, tuning

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_fullsize  # noqa: E402
import bench_long  # noqa: E402
import fullsize  # noqa: E402
import bench_ops  # noqa: E402
import harness  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402

sys.path.remove(str(ROOT / "benchmarks"))
CPU = torch.device("cpu")


def test_stats_of_known_samples():
    s = harness.Stats.of([4.0, 1.0, 3.0, 2.0, 5.0], calls_per_sample=2)
    assert (s.median, s.min, s.max, s.rounds) == (1.5, 0.5, 2.5, 5)
    assert s.iqr == pytest.approx(1.0)  # quartiles 1.0 and 2.0 of the per-call times
    assert s.spread == pytest.approx(1.0 / 1.5)
    with pytest.raises(ValueError, match="no samples"):
        harness.Stats.of([])


def test_time_calls_warms_up_then_times_blocks_with_the_harness_clock():
    """A clock that only moves when fn runs (1 ms per call): every timed call reads 1 ms,
    whatever the block size torch chooses, and the warm-up calls come first."""
    now = [0.0]
    calls = []

    def fn():
        calls.append(now[0])
        now[0] += 1e-3
    stats, per_block = harness.time_calls(fn, CPU, harness.Budget(warmup=2, min_run_time=0.05),
                                          clock=lambda: now[0])
    assert stats.median == pytest.approx(1e-3) and stats.iqr == pytest.approx(0, abs=1e-12)
    assert (stats.min, stats.max) == (pytest.approx(1e-3), pytest.approx(1e-3))
    assert per_block >= 1 and stats.rounds * per_block * 1e-3 >= 0.05  # blocks cover min_run_time
    assert len(calls) >= 2 + stats.rounds * per_block


def test_time_calls_keeps_the_thread_count():
    before = torch.get_num_threads()
    seen = []
    try:
        torch.set_num_threads(2)
        harness.time_calls(lambda: seen.append(torch.get_num_threads()), CPU, harness.Budget(0, 0.001))
    finally:
        torch.set_num_threads(before)
    assert set(seen) == {2}  # torch's Timer alone would run the statement on one thread


def test_set_threads_is_explicit(monkeypatch):
    monkeypatch.delenv("SAFA_BENCH_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        assert harness.set_threads() == 1 and torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="threads must be >= 1"):
            harness.set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_mode_is_validated(monkeypatch):
    monkeypatch.setenv("SAFA_BENCH_MODE", "fast")
    with pytest.raises(ValueError, match="SAFA_BENCH_MODE must be one of"):
        harness.mode()


def test_record_replaces_one_section_whole(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFA_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setenv("SAFA_BENCH_MODE", "quick")
    harness.record("ops", CPU, [{"a": 1}], 1)
    harness.record("audio", CPU, [], 1, scaling={"x": 2})
    path = harness.record("ops", CPU, [{"a": 2}], 1)
    data = json.loads(path.read_text())
    assert data["benchmarks"]["ops"]["records"] == [{"a": 2}] and data["benchmarks"]["audio"]["scaling"] == {"x": 2}
    assert data["machine"]["id"] == path.stem and data["benchmarks"]["ops"]["mode"] == "quick"

    def broken(*_a, **_k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(harness.json, "dump", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        harness.record("ops", CPU, [{"a": 3}], 1)
    assert json.loads(path.read_text()) == data  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no partial file left


def test_smoke_results_never_go_to_benchmarks_results(monkeypatch):
    monkeypatch.delenv("SAFA_BENCH_RESULTS", raising=False)
    monkeypatch.setenv("SAFA_BENCH_MODE", "smoke")
    assert harness.results_dir() == ROOT / "out" / "bench-smoke"
    monkeypatch.setenv("SAFA_BENCH_MODE", "quick")
    assert harness.results_dir() == ROOT / "benchmarks" / "results"


def test_machine_id_is_a_plain_file_name():
    assert re.fullmatch(r"[a-z0-9-]+-\d+cpu", harness.machine_id(CPU))


# -- bytes an op must move: an independent count ---------------------------------------------------------
def test_plan_bytes_match_a_count_by_hand():
    case = bench_ops.Case("t", (2, 3, ViewLayout.covering(60, 16, 5).length, 4), -2, 16, 5)
    layout, cell = case.layout, 2 * 3 * 4 * 4  # bytes of one column
    V, L, o = layout.num_views, layout.length, layout.overlap
    assert bench_ops.plan_bytes(case, "gather", "swap", False) == (L + V * 16) * cell  # read once, write each view
    assert bench_ops.plan_bytes(case, "stitch", "swap", False) == 2 * L * cell  # one source per column
    assert bench_ops.plan_bytes(case, "sync", "swap", False) == 2 * (V - 1) * o * cell  # the losing halves
    assert bench_ops.plan_bytes(case, "stitch", "mean", False) == (V * 16 + L) * cell  # every view cell read


def test_one_view_diagnostic_reads_each_line_of_one_view_once():
    layout = ViewLayout.covering(400, 64, 13)
    real = bench_ops.build_plan(layout, "stitch", "swap", 1, bench_ops.REF_NONE).index
    diag = bench_ops.one_view_plan(layout)
    assert torch.equal(diag[:, 2], real[:, 2])  # same targets
    sources = diag[:, 1].tolist()
    assert len(set(sources)) == len(sources)  # no line read twice
    for col in range(layout.length):
        cover = layout.coverage(col)
        if len(cover) == 2:
            left = min(cover, key=lambda c: c[0])[0]
            assert sources[col] // 64 == left  # only the left view of each pair


# -- the report -----------------------------------------------------------------------------------------------
def _op(device, op, impl, case, seconds, nbytes=100):
    return dict(device=device, op=op, impl=impl, case=case, bytes=nbytes, views=3,
                stats=dict(median=seconds, q1=seconds, q3=seconds, min=seconds, max=seconds, rounds=3))


CUDA_RECORDS = [_op("cuda", "copy_", "torch", "audio 1 min", 1.0), _op("cuda", "copy_", "torch", "audio 10 min", 2.0, 200),
                _op("cuda", "stitch swap", "cuda", "audio 1 min", 1.25), _op("cuda", "stitch swap", "triton", "audio 1 min", 1.0),
                _op("cuda", "stitch swap", "cuda", "audio 10 min", 2.6, 200),
                _op("cuda", "stitch swap", "triton", "audio 10 min", 2.2, 200),
                _op("cuda", "sync_ swap+ref", "cuda", "audio 1 min", 1.0), _op("cuda", "sync_ swap+ref", "triton", "audio 1 min", 2.0)]


def test_share_of_copy_and_the_gpu_targets():
    floor = report.copy_floor(CUDA_RECORDS)
    assert report.share_of_copy(CUDA_RECORDS[2], floor) == pytest.approx(0.8)
    lines = "\n".join(report.bars(CUDA_RECORDS, floor))
    assert "`stitch swap`, triton, audio >= 1 min: worst 91% of copy_ (target >= 80%: met)" in lines
    assert "`stitch swap`, cuda, audio >= 1 min: worst 77% of copy_ (target >= 80%: NOT met)" in lines


def test_backend_choice_per_op_lands_in_tuning(monkeypatch):
    assert report.choose_backends(CUDA_RECORDS) == {"stitch": "triton", "sync": "cuda"}
    results = [(Path("nvidia-h200.json"), {"machine": {"gpu": "NVIDIA H200", "capability": "9.0"},
                                          "benchmarks": {"ops": {"records": CUDA_RECORDS}}})]
    namespace: dict = {}
    exec(report.rewrite_tuning((ROOT / "safa_kernels" / "tuning.py").read_text(), results), namespace)
    assert namespace["MEASURED"] == {"NVIDIA H200": {"capability": "9.0", "stitch": "triton", "sync": "cuda"}}
    monkeypatch.setattr(tuning, "MEASURED", namespace["MEASURED"])
    assert tuning.measured_backend("NVIDIA H200", "9.0", "stitch") == "triton"
    assert tuning.measured_backend("NVIDIA H100 80GB HBM3", "9.0", "sync") == "cuda"  # same capability
    assert tuning.measured_backend("NVIDIA H200", "9.0", "gather") is None  # not measured: default order
    assert tuning.measured_backend("NVIDIA A100-SXM4-80GB", "8.0", "stitch") is None


def test_long_table_measures_the_estimate_against_the_peak_above_the_baseline():
    mib = 2**20
    section = {"steps": 2, "decode": [], "records": [
        # one window: peak 700 MiB, of which its estimate 70 MiB is the call: baseline 630 MiB
        dict(seconds=10.24, one_window=True, peak_bytes=700 * mib, estimate_bytes=70 * mib, wall_s=5.0, steps_s=0.1,
             decode_s=0.4, wav_bytes=mib),
        # 10 min: 1130 - 630 = 500 MiB above the baseline, estimated 550 (1.10x); 20 s of decode for 600 s
        dict(seconds=600.0, one_window=False, peak_bytes=1130 * mib, estimate_bytes=550 * mib, wall_s=30.0,
             steps_s=5.0, decode_s=20.0, wav_bytes=37 * mib)]}
    text = report.render_long(section, {})
    assert "Baseline = the one-window run's peak less its own estimate: 630 MiB" in text
    assert "| 10 min | 1130 | 500 | 550 (1.10x) | 30.0 | 5.0 | 20.0 | 120 | 37 |" in text
    assert "| 10.24 s (one window) | 700 | 70 | 70 (1.00x) |" in text
    assert [report._duration(s) for s in (30, 600, 3600, 28800, 90)] == ["30 s", "10 min", "1 h", "8 h", "90 s"]


# -- full-size architectures ----------------------------------------------------------------------------
def test_full_size_configs_build_the_published_parameter_counts():
    """On the meta device (no memory): SD 2.0 base's UNet has 865,910,724 parameters (its model card's ~865 M)."""
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(**fullsize.SD2_UNET)
    assert fullsize.parameters(unet) == 865_910_724
    assert unet.config.cross_attention_dim == 1024 and unet.config.use_linear_projection


def test_peak_memory_sees_an_allocation_inside_the_block():
    with bench_fullsize.PeakMemory(CPU) as memory:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert 60 * 2**20 <= memory.peak < 200 * 2**20


def _fullsize_record(name, step_s, estimate, peak, evals):
    return dict(name=name, kind="image", height=512, width=1024, threads=1, steps=1, overlap=0.2, views=3,
                call_s=step_s, step_s=step_s, model_s=step_s * 0.9, window_evals=evals, peak_bytes=peak,
                estimate_bytes=estimate, model="SD 2.0", weights="full", unet_parameters=865_910_724,
                clock="process CPU time")


def test_fullsize_table_ratios_estimate_and_syncdiffusion_generation():
    mib = 2**20
    section = {"paper_seconds": {"safa": 35.2, "multidiffusion": 40.1, "syncdiffusion": 401.0}, "records": [
        dict(_fullsize_record("safa", 10.0, 260 * mib, 300 * mib, 4), live_bytes=200 * mib),
        _fullsize_record("multidiffusion", 15.0, 300 * mib, 400 * mib, 6),
        _fullsize_record("syncdiffusion", 60.0, None, 1000 * mib, 12),
        _fullsize_record("panorama vbs all", 22.0, None, 500 * mib, 9),
        dict(_fullsize_record("safa", 30.0, 100 * mib, 150 * mib, 4), kind="audio", seconds=60.0, dtype="bf16")]}
    text = report.render_fullsize(section, {})
    # estimate / live: the live tensor peak (live_bytes) where recorded, else the allocator's peak (CUDA)
    assert "| SaFa | 0.2 | 3 | 4 | 10.00 | 9.00 | 10.0% | 1.00 | 1.00 | 300 | 200 | 260 | 1.30 |" in text
    assert "| MD | 0.2 | 3 | 6 | 15.00 | 13.50 | 10.0% | 1.50 | 1.14 | 400 | 400 | 300 | 0.75 |" in text
    assert ", fp32, CFG, DDIM" in text and ", bf16, CFG, DDIM" in text
    assert "| diffusers panorama, stride 8, view_batch_size all | 0.2 | 3 | 9 | 22.00 |" in text
    # 0.2 x 60 + 0.8 x 15 = 24 s per step on average: 2.4x SaFa; the paper's 401.0 / 35.2 = 11.39x
    assert "= 24.0 s per step on average, 2.40x SaFa (paper: 11.39x)" in text


def test_every_part_has_a_generated_block_and_a_line_in_the_readme():
    readme = report.README.read_text()
    for part in run.PARTS:
        assert report.begin_marker(part) in readme and report.end_marker(part) in readme, part
        assert f"`{part}`" in readme, part  # named where the README lists the parts


def test_bench_long_names_a_wrong_part(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_long.main(["generat", "--mode", "smoke"])
    assert exit_.value.code == 2 and "parts must be among generate, decode, got generat" in capsys.readouterr().err


def test_readme_and_tuning_are_generated_from_the_committed_results():
    assert report.main(["--check"]) == 0, "run: python benchmarks/report.py"


def test_benchmarks_stand_on_their_own():
    """No issue numbers, no pointer outside the repository."""
    for path in sorted((ROOT / "benchmarks").glob("*")):
        if path.suffix in (".py", ".md", ".sh"):
            text = path.read_text()
            assert not re.search(r"\bissue \d|#\d{1,3}\b|\.\./shared|SPEC\b", text), path.name
