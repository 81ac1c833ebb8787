"""The benchmark half of benchmarks/gpu.sh: op bars, launch latency, pipeline steps -> RESULTS.md.

    python benchmarks/gpu_bench.py                  # on a CUDA machine (what gpu.sh runs)
    python benchmarks/gpu_bench.py --smoke          # anywhere: tiny sizes, CPU ok (tests run this)

Ops (median of CUDA-event timings per call; perf_counter on CPU), every kernel backend of
the device side by side:

- ``sync swap+ref`` (SaFa's guided step, in place) and ``stitch swap`` on 10-minute
  AudioLDM latents ``(2, 8, 15000, 16)`` (window 256, overlap 51) and on 4096 x 16384
  panorama latents ``(1, 4, 512, 2048)`` (window 64, overlap 13, long axis = width);
- ``copy_``: a device-to-device copy moving the same bytes as the op (half read, half
  written), the ceiling of a memory-bound op; ``% copy`` = op GB/s / copy GB/s;
- ``launch``: ``sync_`` on a 10 s latent ``(2, 8, 250, 16)`` in windows of 64: per call
  from the host (validation + plan lookup + launch) and, replayed from a CUDA graph of
  100 calls, the device time of one launch.

Bytes an op must move are ``bench_ops.plan_bytes`` (each source and reference cell read
once, each target cell written once); the reference swap runs along the long axis in both
cases so that count is exact. Pipeline: per-step median of the tiny random AudioLDM
(safa.testing) eager, ``compile=True`` and ``cuda_graphs=True``, in one process.

Rows are appended to ``--results`` (default benchmarks/RESULTS.md) with the card, driver,
torch/triton versions, date and command; a short table is printed last.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_ops / naive when run as a script

import torch  # noqa: E402

from safa_kernels import ViewLayout, stitch, sync_  # noqa: E402
from safa_kernels.ops import available_backends  # noqa: E402
from safa_kernels.plan import REF_LONG_AXIS, REF_NONE  # noqa: E402

from bench_ops import plan_bytes  # noqa: E402  (the one definition of "bytes an op must move")


# -- environment -----------------------------------------------------------------------------------
def environment(device: torch.device) -> Dict[str, str]:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "none"
    if device.type == "cuda":
        env["card"] = torch.cuda.get_device_name(device)
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader",
                                  f"--id={device.index or 0}"], capture_output=True, text=True, timeout=30)
            name, driver = [x.strip() for x in out.stdout.strip().split(",")[:2]]
            env["card"], env["driver"] = name, driver
        except (OSError, ValueError, subprocess.SubprocessError):
            env["driver"] = "unknown (nvidia-smi failed)"
        env["cuda"] = str(torch.version.cuda)
    else:
        env["card"] = f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        env["driver"] = "-"
    return env


# -- timing ------------------------------------------------------------------------------------------
def time_calls(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int) -> float:
    """Median microseconds of one ``fn()`` call."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        return statistics.median(s.elapsed_time(e) * 1e3 for s, e in events)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def time_graph_replay(fn: Callable[[], Any], device: torch.device, calls: int = 100, reps: int = 20) -> float:
    """Median device microseconds per call of ``fn`` replayed ``calls`` times from one CUDA graph."""
    fn()  # plans, compilation
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return time_calls(graph.replay, device, reps, warmup=3) / calls


# -- cases ----------------------------------------------------------------------------------------
class Case:
    """A merge workload: views of a latent with ``long_dim`` as the long axis."""

    def __init__(self, name: str, latent_shape: List[int], long_dim: int, window: int, overlap: int) -> None:
        self.name, self.long_dim = name, long_dim
        self.layout = ViewLayout.covering(latent_shape[long_dim], window, overlap)
        shape = list(latent_shape)
        shape[long_dim] = window
        self.view_shape = [self.layout.num_views] + shape
        self.cells_per_column = 1
        for i, n in enumerate(shape):
            if i != long_dim % len(shape):
                self.cells_per_column *= n

    def tensors(self, device: torch.device, dtype: torch.dtype):
        g = torch.Generator(device=device).manual_seed(0)
        views = torch.randn(self.view_shape, generator=g, device=device, dtype=dtype)
        return views, views[0].clone()

    def bytes(self, op: str, ref: int, itemsize: int) -> int:
        return plan_bytes(self.layout, op, "swap", ref, self.cells_per_column, itemsize)


def cases(smoke: bool) -> List[Case]:
    if smoke:
        return [Case("audio 40 s (smoke)", [2, 8, 1000, 16], -2, 256, 51),
                Case("panorama 512x2048 (smoke)", [1, 4, 64, 256], -1, 64, 13)]
    return [Case("audio 10 min", [2, 8, 15000, 16], -2, 256, 51),
            Case("panorama 4096x16384", [1, 4, 512, 2048], -1, 64, 13)]


def bench_ops(device: torch.device, backends: List[str], smoke: bool) -> List[Dict[str, Any]]:
    dtype = torch.float32
    reps, warmup = (5, 1) if smoke else (50, 10)
    rows: List[Dict[str, Any]] = []
    for case in cases(smoke):
        views, ref = case.tensors(device, dtype)
        d = case.long_dim
        ops = {
            "sync swap+ref": ("sync", REF_LONG_AXIS,
                              lambda b: sync_(views, case.layout, d, "swap", 1, ref, d, backend=b)),
            "stitch swap": ("stitch", REF_NONE, lambda b: stitch(views, case.layout, d, "swap", backend=b)),
        }
        for op_name, (op, ref_kind, call) in ops.items():
            nbytes = case.bytes(op, ref_kind, views.element_size())
            # copy_ of half the bytes: it reads them and writes them, moving `nbytes` in all.
            src = torch.empty(nbytes // 2 // views.element_size(), device=device, dtype=dtype).normal_()
            dst = torch.empty_like(src)
            copy_us = time_calls(lambda: dst.copy_(src), device, reps, warmup)
            copy_gbps = nbytes / copy_us / 1e3
            rows.append(dict(case=case.name, op="copy_", of=op_name, backend="-", bytes=nbytes,
                             median_us=copy_us, gbps=copy_gbps, frac_copy=1.0))
            for b in backends:
                us = time_calls(lambda: call(b), device, reps, warmup)
                rows.append(dict(case=case.name, op=op_name, backend=b, bytes=nbytes, median_us=us,
                                 gbps=nbytes / us / 1e3, frac_copy=(nbytes / us / 1e3) / copy_gbps))
            del src, dst
        del views, ref
    # Launch latency: a 10 s latent in windows of 64 (5 views), SaFa's guided sync.
    case = Case("10 s latent", [2, 8, 250, 16], -2, 64, 13)
    views, ref = case.tensors(device, dtype)
    for b in backends:
        call = lambda: sync_(views, case.layout, -2, "swap", 1, ref, -2, backend=b)  # noqa: E731
        rows.append(dict(case=case.name, op="launch (host, per call)", backend=b, bytes=0,
                         median_us=time_calls(call, device, reps * 4, warmup), gbps=0.0, frac_copy=0.0))
        if device.type == "cuda":
            rows.append(dict(case=case.name, op="launch (device, graph replay)", backend=b, bytes=0,
                             median_us=time_graph_replay(call, device), gbps=0.0, frac_copy=0.0))
    return rows


def choose_backend(rows: List[Dict[str, Any]], backends: List[str]) -> str:
    """The backend that is fastest on most bandwidth ops (ties: the larger total speed)."""
    wins = dict.fromkeys(backends, 0)
    speed = dict.fromkeys(backends, 0.0)
    by_op: Dict[tuple, Dict[str, float]] = {}
    for r in rows:
        if r["backend"] in wins and r["bytes"]:
            by_op.setdefault((r["case"], r["op"]), {})[r["backend"]] = r["median_us"]
    for timings in by_op.values():
        wins[min(timings, key=timings.get)] += 1
        for b, us in timings.items():
            speed[b] += 1.0 / us
    return max(backends, key=lambda b: (wins[b], speed[b]))


# -- pipeline -----------------------------------------------------------------------------------------
def bench_pipeline(device: torch.device, smoke: bool, with_compile: bool, steps: int,
                   rounds: int = 3) -> List[Dict[str, Any]]:
    """Per-step median of the tiny AudioLDM, eager / compile / CUDA graphs, same process.

    After one first call per mode (compilation, capture, plans: reported as ``first_call_s``),
    the modes take turns for ``rounds`` rounds (A B C A B C ...), so that a machine whose
    load changes during the run slows every mode alike; the median is over every step
    interval (step 1 on) of every round.
    """
    from safa.sampler import JointDiffusion
    from safa.testing import tiny_audioldm_pipeline

    pipe = tiny_audioldm_pipeline().to(device)
    kwargs = dict(seconds=1.6, window=0.64, guidance_scale=1.0) if smoke else dict(seconds=30.0, guidance_scale=2.5)
    modes = [("eager", {})]
    if with_compile:
        modes.append(("compile", {"compile": True}))
    if device.type == "cuda":
        modes.append(("cuda_graphs", {"cuda_graphs": True}))
    runners = [(name, JointDiffusion(pipe, **flags)) for name, flags in modes]
    ends: List[float] = []

    def stamp(*_: Any) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ends.append(time.perf_counter())

    def call(jd: Any) -> List[float]:
        ends.clear()
        jd("rain", num_inference_steps=steps, output_type="latent", callback_on_step_end=stamp,
           generator=torch.Generator(device=device).manual_seed(0), **kwargs)
        return [(b - a) * 1e3 for a, b in zip(ends, ends[1:])]

    first_call_s: Dict[str, float] = {}
    for name, jd in runners:
        t0 = time.perf_counter()
        call(jd)
        first_call_s[name] = time.perf_counter() - t0
    per_step: Dict[str, List[float]] = {name: [] for name, _ in runners}
    for _ in range(rounds):
        for name, jd in runners:
            per_step[name] += call(jd)
    layout = runners[0][1].layout_for(kwargs["seconds"], window=kwargs.get("window"))
    return [dict(mode=name, views=layout.num_views, window=layout.window, steps=steps, rounds=rounds,
                 median_step_ms=statistics.median(per_step[name]), first_call_s=first_call_s[name],
                 step_ms=per_step[name])
            for name, _ in runners]


# -- output -------------------------------------------------------------------------------------------
RESULTS_HEADER = """# GPU benchmark results

Rows appended by `benchmarks/gpu.sh` (`benchmarks/gpu_bench.py`). Medians; `% copy` is the
op's effective bandwidth over a device-to-device `copy_` of the same bytes in the same run.

| run | date | card | driver | torch | triton | case | op | backend | median us | GB/s | % copy | command |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def write_results(path: Path, env: Dict[str, str], rows: List[Dict[str, Any]], pipeline: List[Dict[str, Any]],
                  run: str, command: str) -> None:
    lines = []
    prefix = f"| {run} | {env['date']} | {env['card']} | {env['driver']} | torch {env['torch']} | {env['triton']} |"
    for r in rows:
        pct = f"{100 * r['frac_copy']:.0f}%" if r["bytes"] else "-"
        gbps = f"{r['gbps']:.1f}" if r["bytes"] else "-"
        lines.append(f"{prefix} {r['case']} | {r['op']}{' (' + r['of'] + ')' if r.get('of') else ''} | "
                     f"{r['backend']} | {r['median_us']:.2f} | {gbps} | {pct} | `{command}` |")
    for p in pipeline:
        lines.append(f"{prefix} tiny AudioLDM {p['views']}x{p['window']} | pipeline step | {p['mode']} | "
                     f"{p['median_step_ms'] * 1e3:.0f} | - | - | `{command}` |")
    new = not path.exists() or not path.read_text().strip()
    with open(path, "a") as f:
        if new:
            f.write(RESULTS_HEADER)
        f.write("\n".join(lines) + "\n")


def short_table(rows: List[Dict[str, Any]], pipeline: List[Dict[str, Any]], chosen: str) -> str:
    out = [f"{'case':<26} {'op':<30} {'backend':<8} {'median us':>10} {'GB/s':>8} {'% copy':>7}"]
    for r in rows:
        op = r["op"] + (f" ({r['of']})" if r.get("of") else "")
        pct = f"{100 * r['frac_copy']:.0f}%" if r["bytes"] else "-"
        out.append(f"{r['case']:<26} {op:<30} {r['backend']:<8} {r['median_us']:>10.2f} "
                   f"{(format(r['gbps'], '.1f') if r['bytes'] else '-'):>8} {pct:>7}")
    for p in pipeline:
        out.append(f"{'pipeline ' + str(p['views']) + ' views':<26} {'step (' + p['mode'] + ')':<30} {'':<8} "
                   f"{p['median_step_ms'] * 1e3:>10.0f} {'':>8} {'':>7}   first call {p['first_call_s']:.1f} s")
    out.append(f"default backend by these numbers: {chosen}")
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, few repetitions; runs on CPU")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"), help="markdown file the rows are appended to")
    p.add_argument("--json", default=None, help="also write the raw numbers here")
    p.add_argument("--command", default=None, help="the command recorded in the rows (default: this one)")
    p.add_argument("--no-pipeline", action="store_true", help="ops only")
    p.add_argument("--no-ops", action="store_true", help="pipeline only")
    p.add_argument("--full-window", action="store_true",
                   help="with --smoke: the pipeline at the native 10.24 s window over 30 s (as without --smoke)")
    p.add_argument("--table", default=None, help="also write the short table to this file")
    p.add_argument("--compile", dest="with_compile", action="store_true", default=None,
                   help="include compile=True in the pipeline benchmark (default: on CUDA, not in --smoke)")
    p.add_argument("--rounds", type=int, default=None, help="pipeline rounds per mode (default 3; 2 in --smoke)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--steps", type=int, default=None, help="pipeline steps per call (default 10; 3 in --smoke)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # Kernel backends of the device; on CPU, Triton means its interpreter: far too slow to time.
    backends = [b for b in available_backends(device) if b not in ("reference",) and
                not (device.type == "cpu" and b == "triton")]
    if device.type == "cuda" and not backends:
        print("gpu_bench: no GPU kernel backend is available (neither the CUDA extension nor Triton)", file=sys.stderr)
        return 1
    env = environment(device)
    command = args.command or " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + list(argv or sys.argv[1:]))
    print(f"gpu_bench on {env['card']} (driver {env['driver']}), torch {env['torch']}, triton {env['triton']}, "
          f"backends {backends}", flush=True)
    rows = [] if args.no_ops else bench_ops(device, backends, args.smoke)
    with_compile = args.with_compile if args.with_compile is not None else (device.type == "cuda" and not args.smoke)
    steps = args.steps or (3 if args.smoke else 10)
    pipeline = [] if args.no_pipeline else bench_pipeline(device, args.smoke and not args.full_window,
                                                          with_compile, steps, args.rounds or (2 if args.smoke else 3))
    chosen = choose_backend(rows, backends) if backends and rows else (backends or ["reference"])[0]
    write_results(Path(args.results), env, rows, pipeline, "smoke" if args.smoke else "full", command)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "ops": rows, "pipeline": pipeline,
                                               "default_backend": chosen}, indent=1))
    table = short_table(rows, pipeline, chosen)
    if args.table:
        Path(args.table).write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
