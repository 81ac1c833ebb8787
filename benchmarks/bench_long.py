"""Hours of audio on one machine: peak memory and time of long generations, and the decode="auto" threshold.

Two measurements, each configuration in a FRESH process (peak RSS is a high-water mark):

1. ``generate``: ``safa generate --seconds S --steps 2`` with the built-in model and otherwise
   default settings (decode auto, view_batch_size default, guidance 2.5, the empty prompt,
   WAV out, spectrogram on). Reports the child's peak RSS (``os.wait4``), wall time, the step
   and decode times the command prints, and the sampler's own memory estimate for the same
   request (:meth:`safa.JointDiffusion.estimate_memory`; it counts what the call adds to the
   loaded process, so the baseline row, one window, is the fixed cost).
2. ``decode``: whole (``decode_full``) against one-window tiles (``decode_tiled``) on the same
   latent of 1 to 16 windows, for the built-in model and the tiny AudioLDM: median time of 3
   and the peak RSS above the warmed-up process (Linux: ``/proc/self/clear_refs``). This is
   what ``safa.decode.AUTO_WHOLE_WINDOWS`` was chosen from.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_long.py generate --seconds 600 3600 28800 --threads 1
    PYTHONPATH=. .venv/bin/python benchmarks/bench_long.py decode --threads 1

``--threads N`` sets ``OMP_NUM_THREADS`` for the children (default: torch's own choice). Results
are printed as markdown tables; docs/long-audio.md records a run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(threads: Optional[int]) -> Dict[str, str]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _run_measured(cmd: List[str], env: Dict[str, str]) -> Dict[str, object]:
    """Run ``cmd``; its wall time, peak RSS (bytes) and output."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {"wall": time.perf_counter() - started, "peak": usage.ru_maxrss * 1024, "code": child.returncode,
                "stdout": out.read(), "stderr": err.read()}


def _estimate(seconds: float) -> int:
    from safa import JointDiffusion
    from safa.texture import make_texture_pipeline
    return JointDiffusion(make_texture_pipeline()).estimate_memory(seconds, output_path="out.wav").peak


def bench_generate(seconds: List[float], threads: Optional[int], steps: int) -> None:
    env = _env(threads)
    rows = []
    for s in [10.24] + list(seconds):
        with tempfile.TemporaryDirectory(dir=ROOT) as d:
            out = os.path.join(d, "out.wav")
            r = _run_measured([sys.executable, "-m", "safa", "generate", "--seconds", f"{s:g}", "--steps",
                               str(steps), "--quiet", "--out", out], env)
            if r["code"] != 0:
                print(f"{s:g} s: exit {r['code']}: {str(r['stderr']).strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            size = os.path.getsize(out)
        last = str(r["stdout"]).strip().splitlines()[-1]
        step_s = float(re.search(r"steps in ([\d.]+) s", last).group(1))
        decode_s = float(re.search(r"decoded and written in ([\d.]+) s", last).group(1))
        rows.append((s, r["peak"], _estimate(s), r["wall"], step_s, decode_s, size))
        print(f"done {s:g} s: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    print(f"\nsafa generate, built-in model, --steps {steps}, threads {threads or 'torch default'}\n")
    print("| seconds | peak RSS MiB | estimate MiB (call only) | wall s | steps s | decode + write s | "
          "decode s per audio hour | WAV MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for s, peak, est, wall, step_s, decode_s, size in rows:
        print(f"| {s:g} | {peak / 2**20:.0f} | {est / 2**20:.0f} | {wall:.1f} | {step_s:.1f} | {decode_s:.1f} | "
              f"{decode_s / s * 3600:.0f} | {size / 2**20:.0f} |")


_DECODE = r"""
import json, statistics, sys, time
import torch
torch.set_grad_enabled(False)
from safa import JointDiffusion
from safa.decode import decode_full, decode_tiled
which, windows, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if which == "texture":
    from safa.texture import make_texture_pipeline
    pipe = make_texture_pipeline()
else:
    from safa.testing.pipelines import tiny_audioldm_pipeline
    pipe = tiny_audioldm_pipeline()
adapter = JointDiffusion(pipe).adapter
W = adapter.native_window()
latent = torch.randn(adapter.latent_shape(1, windows * W), generator=torch.Generator().manual_seed(0))
run = (lambda: decode_full(adapter, latent, False)) if mode == "full" else \
    (lambda: decode_tiled(adapter, latent, False, W))
decode_tiled(adapter, latent[..., :W + 8, :], False, W // 2)  # warm-up: both code paths' kernels

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
times = []
for _ in range(3):
    started = time.perf_counter()
    run()
    times.append(time.perf_counter() - started)
print(json.dumps({"seconds": statistics.median(times), "peak": status("VmHWM") - base}))
"""


def bench_decode(windows: List[int], threads: Optional[int]) -> None:
    env = _env(threads)
    print(f"\nwhole vs one-window tiles, threads {threads or 'torch default'} "
          "(median of 3; peak RSS above the warmed-up process)\n")
    print("| decoder | windows | whole s | tiled s | whole / tiled | whole MiB | tiled MiB |")
    print("|---|---|---|---|---|---|---|")
    for which in ("texture", "audioldm"):
        for n in windows:
            got = {}
            for mode in ("full", "tiled"):
                r = subprocess.run([sys.executable, "-c", _DECODE, which, str(n), mode], capture_output=True,
                                   text=True, env=env, cwd=ROOT)
                if r.returncode != 0:
                    raise SystemExit(r.stderr)
                got[mode] = json.loads(r.stdout.strip().splitlines()[-1])
            full, tiled = got["full"], got["tiled"]
            print(f"| {which} | {n} | {full['seconds']:.2f} | {tiled['seconds']:.2f} | "
                  f"{full['seconds'] / tiled['seconds']:.2f} | {full['peak'] / 2**20:.0f} | "
                  f"{tiled['peak'] / 2**20:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--seconds", type=float, nargs="+", default=[600.0, 3600.0, 28800.0])
    g.add_argument("--steps", type=int, default=2)
    g.add_argument("--threads", type=int, default=None)
    d = sub.add_parser("decode")
    d.add_argument("--windows", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 12, 16])
    d.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.what == "generate":
        bench_generate(args.seconds, args.threads, args.steps)
    else:
        bench_decode(args.windows, args.threads)


if __name__ == "__main__":
    main()
