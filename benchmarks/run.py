"""Every benchmark in one command: the op microbenchmarks, then the pipeline benchmarks.

    python benchmarks/run.py [--mode smoke|quick|full] [--device cpu|cuda] [--only PART ...]
                             [--threads N] [--no-report]

``make bench`` is ``--mode quick`` (under 15 minutes on a 2-core machine), ``make
bench-full`` ``--mode full``, and CI runs ``--mode smoke`` (tiny sizes, a minute or two)
so that a broken benchmark fails there. Parts, in order:

- ``ops``: ``pytest benchmarks/bench_ops.py`` (torch.utils.benchmark through harness.py);
- ``steps``: benchmarks/bench_steps.py (per-step cost: eager / compile / CUDA graphs / naive merge);
- ``panorama``: benchmarks/bench_panorama.py (SaFa vs diffusers' MultiDiffusion panorama);
- ``methods``: benchmarks/bench_methods.py (every method's cost per generation, image and audio);
- ``fullsize``: benchmarks/bench_fullsize.py (every method and diffusers' panorama pipeline on
  full-size random-weight SD 2.0 and AudioLDM: time per step, window evaluations, peak memory
  against the sampler's estimate; in quick mode on CPU only with ``--only fullsize``: its
  quick run alone takes about 10 minutes of CPU here);
- ``audio``: benchmarks/bench_audio.py (long audio; CPU only);
- ``long``: benchmarks/bench_long.py (hours of audio: ``safa generate`` in fresh processes, peak
  RSS and time, and whole vs tiled decoding; CPU only);
- ``distributed``: benchmarks/bench_distributed.py (2 processes against 1, counted bytes and
  FLOPs, the modelled GPU table; CPU only).

The pipeline parts need diffusers; without it they are skipped, and said so. Each part
records its section of ``benchmarks/results/<machine>.json`` (smoke runs: out/bench-smoke/);
then, except in smoke mode, benchmarks/report.py regenerates the tables of
benchmarks/README.md. Exit status: 0 when every part that ran succeeded, 1 otherwise.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PARTS = ("ops", "steps", "panorama", "methods", "fullsize", "audio", "long", "distributed", "vae")
PIPELINE_PARTS = ("steps", "panorama", "methods", "fullsize", "audio", "long", "distributed", "vae")
CPU_PARTS = ("audio", "long", "distributed")  # skipped with --device cuda
# Left out of a plain quick run (make bench) on CPU: full-size models take minutes per step
# there. ``--only fullsize`` (``--only vae``) runs it; make bench-full and make bench-smoke include them.
NOT_IN_PLAIN_QUICK = ("fullsize", "vae")


def commands(mode: str, device: Optional[str]) -> Dict[str, List[str]]:
    py = sys.executable
    ops = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "bench_ops.py"), "--bench-mode", mode]
    if device:
        ops += ["--bench-devices", device]
    dev = ["--device", device] if device else []
    return {"ops": ops,
            "steps": [py, str(HERE / "bench_steps.py"), "--mode", mode] + dev,
            "panorama": [py, str(HERE / "bench_panorama.py"), "--mode", mode] + dev,
            "methods": [py, str(HERE / "bench_methods.py"), "--mode", mode] + dev,
            "fullsize": [py, str(HERE / "bench_fullsize.py"), "--mode", mode] + dev,
            "audio": [py, str(HERE / "bench_audio.py"), "--mode", mode],
            "long": [py, str(HERE / "bench_long.py"), "--mode", mode],
            "distributed": [py, str(HERE / "bench_distributed.py"), "--mode", mode],
            "vae": [py, str(HERE / "bench_vae.py"), "--mode", mode] + dev}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("smoke", "quick", "full"), default="quick")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="device of the op and pipeline benchmarks (default: each script's own: cuda when available)")
    p.add_argument("--only", nargs="+", choices=PARTS, default=None, help="run only these parts")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    p.add_argument("--no-report", action="store_true", help="do not regenerate benchmarks/README.md")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    parts = args.only or [p for p in PARTS if not (args.mode == "quick" and p in NOT_IN_PLAIN_QUICK
                                                   and args.device != "cuda")]
    if args.device == "cuda":
        for part in (p for p in CPU_PARTS if p in parts):
            parts.remove(part)
            print(f"run: skipping {part} (CPU only; on CUDA bench_steps.py measures the steps)")
    env = dict(os.environ, SAFA_BENCH_MODE=args.mode,
               SAFA_BENCH_COMMAND=" ".join(["python benchmarks/run.py"] + [shlex.quote(a) for a in argv]))
    if args.threads:
        env["SAFA_BENCH_THREADS"] = str(args.threads)
    try:
        importlib.import_module("diffusers")
        has_diffusers = True
    except ImportError:
        has_diffusers = False
    started = time.perf_counter()
    status: Dict[str, str] = {}
    for part in parts:
        if part in PIPELINE_PARTS and not has_diffusers:
            status[part] = "skipped (diffusers is not installed: the pipeline benchmarks need it)"
            print(f"\n== run: {part}: {status[part]}", flush=True)
            continue
        cmd = commands(args.mode, args.device)[part]
        print(f"\n== run: {part}: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        status[part] = f"{'ok' if rc == 0 else f'FAILED (exit {rc})'} in {time.perf_counter() - t0:.0f} s"
    failed = [part for part, s in status.items() if s.startswith("FAILED")]
    if args.mode != "smoke" and not args.no_report and len(failed) < len([s for s in status.values()
                                                                         if not s.startswith("skipped")]):
        print("\n== run: report", flush=True)
        if subprocess.call([sys.executable, str(HERE / "report.py")], cwd=ROOT, env=env) != 0:
            failed.append("report")
    print(f"\n== run: {args.mode} mode done in {time.perf_counter() - started:.0f} s")
    for part, s in status.items():
        print(f"   {part:<11} {s}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
