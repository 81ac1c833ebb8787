"""pytest glue of the op benchmarks (bench_ops.py): options, the ``op_timer`` fixture, the results file.

    pytest benchmarks/bench_ops.py [--bench-mode smoke|quick|full] [--bench-devices cpu,cuda]
                                   [--bench-threads N]

pytest-benchmark runs the rounds (``benchmark.pedantic``, its tables show seconds per call);
the mode's warm-up, rounds and calls per round come from harness.py, and so do the clock
(harness.timer) and the statistics. At the end of a complete
run (no failure, no ``-k`` / ``-m`` selection) the records go to the ``ops`` section of
``benchmarks/results/<machine>.json``, one file per device's machine.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List

import pytest
import torch

import harness

RECORDS: List[Dict[str, Any]] = []


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("safa benchmarks")
    group.addoption("--bench-mode", choices=harness.MODES, default=None,
                    help="smoke / quick / full (default: SAFA_BENCH_MODE, else quick)")
    group.addoption("--bench-devices", default=None,
                    help="comma-separated devices to benchmark: cpu, cuda (default: cpu, plus cuda when available)")
    group.addoption("--bench-threads", type=int, default=None,
                    help="torch CPU threads (default: SAFA_BENCH_THREADS, else 1)")


def pytest_configure(config: Any) -> None:
    # Before collection: bench_ops.py builds its parameter lists from these at import.
    if config.getoption("--bench-mode"):
        harness.set_mode(config.getoption("--bench-mode"))
    devices = config.getoption("--bench-devices")
    if devices is None:
        devices = os.environ.get("SAFA_BENCH_DEVICES") or ("cpu,cuda" if torch.cuda.is_available() else "cpu")
    wanted = [d.strip() for d in devices.split(",") if d.strip()]
    for d in wanted:
        if d not in ("cpu", "cuda"):
            raise pytest.UsageError(f"--bench-devices: unknown device {d!r} (allowed: cpu, cuda)")
        if d == "cuda" and not torch.cuda.is_available():
            raise pytest.UsageError("--bench-devices cuda: torch sees no CUDA device here")
    os.environ["SAFA_BENCH_DEVICES"] = ",".join(wanted)
    config.safa_threads = harness.set_threads(config.getoption("--bench-threads"))


@pytest.fixture
def op_timer(benchmark: Any, request: Any) -> Callable[..., Any]:
    """``op_timer(fn, device, units_per_call=1, **info)``: time ``fn`` and keep a record.

    ``units_per_call``: how many operations one ``fn()`` performs (a CUDA graph replay of
    100 launches is 100), so the record is per operation.
    """
    def run(fn: Callable[[], Any], device: torch.device, units_per_call: int = 1, **info: Any) -> Any:
        if benchmark.disabled:  # --benchmark-disable: run once as a test
            fn()
            return None
        plan = harness.budget()
        for _ in range(plan.warmup):
            fn()
        calls = harness.calibrate(fn, device, plan.round_seconds)
        # pytest-benchmark keeps per-call samples (round time / iterations); its clock is
        # harness.timer(device) (see pytest_collection_modifyitems).
        benchmark.pedantic(fn, rounds=plan.rounds, iterations=calls)
        stats = harness.Stats.of(benchmark.stats.stats.data, units_per_call)
        benchmark.extra_info.update(info, calls_per_round=calls, units_per_call=units_per_call)
        RECORDS.append(dict(info, device=device.type, calls_per_round=calls, units_per_call=units_per_call,
                            stats=stats.to_dict()))
        return stats
    return run


def pytest_collection_modifyitems(items: List[Any]) -> None:
    """pytest-benchmark measures with the harness's clock for the item's device (synchronised
    wall time on CUDA, the process's CPU time on one CPU thread)."""
    for item in items:
        device = getattr(getattr(item, "callspec", None), "params", {}).get("device")
        if isinstance(device, torch.device):
            item.add_marker(pytest.mark.benchmark(timer=harness.timer(device)))


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    config = session.config
    if not RECORDS:
        return
    if exitstatus != 0 or config.getoption("keyword") or config.getoption("markexpr"):
        print(f"\nbench: results not recorded ({'a benchmark failed' if exitstatus else 'a -k/-m selection'}: "
              "the ops section is written only by a complete run)")
        return
    for device_type in sorted({r["device"] for r in RECORDS}):
        device = torch.device(device_type)
        records = [r for r in RECORDS if r["device"] == device_type]
        path = harness.record("ops", device, records, config.safa_threads)
        print(f"\nbench: {len(records)} {device_type} op records -> {path}")
