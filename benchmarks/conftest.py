"""pytest glue of the op benchmarks (bench_ops.py): options, the ``op_timer`` fixture, the results file.

    pytest benchmarks/bench_ops.py [--bench-mode smoke|quick|full] [--bench-devices cpu,cuda]
                                   [--bench-threads N]

Each op is timed by harness.time_calls: the mode's warm-up calls, then
``torch.utils.benchmark.Timer.blocked_autorange`` with the harness clock (harness.timer), the
statistics read from its Measurement. At the end of a complete
run (no failure, no ``-k`` / ``-m`` selection) the records go to the ``ops`` section of
``benchmarks/results/<machine>.json``, one file per device's machine.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List

import pytest
import torch

import harness
import report

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
def op_timer() -> Callable[..., Any]:
    """``op_timer(fn, device, units_per_call=1, **info)``: time ``fn`` and keep a record.

    ``units_per_call``: how many operations one ``fn()`` performs (a CUDA graph replay of
    100 launches is 100), so the record is per operation.
    """
    def run(fn: Callable[[], Any], device: torch.device, units_per_call: int = 1, **info: Any) -> Any:
        per_call, calls = harness.time_calls(fn, device)
        stats = harness.Stats(*(v / units_per_call for v in (per_call.median, per_call.iqr, per_call.min,
                                                             per_call.max)), per_call.rounds)
        RECORDS.append(dict(info, device=device.type, calls_per_round=calls, units_per_call=units_per_call,
                            stats=stats.to_dict()))
        return stats
    return run


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
        print(report.render_file_section("ops", path))
