"""Hours of audio on one machine: peak memory and time of long generations, and the decode="auto" threshold.

    python benchmarks/bench_long.py [generate] [decode] [--mode smoke|quick|full] [--threads N]
                                    [--seconds S ...] [--windows N ...] [--steps N]
    python benchmarks/run.py --only long          # the same, as a part of make bench

Two measurements (both unless one is named), each configuration in a FRESH process (peak
RSS is a high-water mark):

1. ``generate``: ``safa generate --seconds S --steps 2 --device cpu`` with the built-in model and
   otherwise default settings (decode auto, view_batch_size default, the pipeline's guidance
   scale: 1.0 for the built-in model, whose recorded runs before that default used 2.5; the
   empty prompt, WAV out, spectrogram on), first at one window (10.24 s: the baseline), then at each
   length. Records the child's peak RSS (``os.wait4``), wall time, the step and decode times
   the command prints, and the sampler's own memory estimate for the same request
   (:meth:`safa.JointDiffusion.estimate_memory`; it counts what the call adds to the loaded
   process, so the one-window row gives the fixed cost).
2. ``decode``: whole (``decode_full``) against one-window tiles (``decode_tiled``) on the same
   latent of N windows, for the built-in model and the tiny AudioLDM: median time of 3
   and the peak RSS above the warmed-up process (Linux: ``/proc/self/clear_refs``). This is
   what ``safa.decode.AUTO_WHOLE_WINDOWS`` was chosen from.

The mode sets the lengths and windows (smoke: 30 s and 2 windows; quick: 10 min and 1, 2, 4
windows; full: 10 min, 1 h and 8 h, 1 to 16 windows, the run docs/long-audio.md records);
``--seconds`` / ``--windows`` override them. ``--threads N`` (default 1, harness.py) is the
children's ``OMP_NUM_THREADS``. The results go to the ``long`` section of
benchmarks/results/<machine>.json (harness.record); benchmarks/report.py renders them
(printed at the end, and in benchmarks/README.md).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from typing import Any, Dict, List, Optional, Sequence

import torch

import harness
import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("generate", "decode")
ONE_WINDOW_SECONDS = 10.24  # the built-in model's native window: the baseline row
SETTINGS = {"smoke": dict(seconds=[30.0], windows=[2]),
            "quick": dict(seconds=[600.0], windows=[1, 2, 4]),
            "full": dict(seconds=[600.0, 3600.0, 28800.0], windows=[1, 2, 3, 4, 6, 8, 12, 16])}
DECODERS = {"texture": "built-in", "audioldm": "tiny AudioLDM"}


def _env(threads: int) -> Dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=str(threads))


def _run_measured(cmd: List[str], env: Dict[str, str]) -> Dict[str, Any]:
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


@lru_cache(maxsize=1)
def _sampler() -> Any:
    from safa import JointDiffusion
    from safa.texture import make_texture_pipeline
    return JointDiffusion(make_texture_pipeline())


def _estimate(seconds: float) -> int:
    return _sampler().estimate_memory(seconds, output_path="out.wav").peak


def bench_generate(seconds: Sequence[float], threads: int, steps: int) -> List[Dict[str, Any]]:
    env = _env(threads)
    rows = []
    for s in [ONE_WINDOW_SECONDS] + list(seconds):
        with tempfile.TemporaryDirectory(dir=ROOT) as d:
            out = os.path.join(d, "out.wav")
            r = _run_measured([sys.executable, "-m", "safa", "generate", "--seconds", f"{s:g}", "--steps",
                               str(steps), "--device", "cpu", "--quiet", "--out", out], env)
            if r["code"] != 0:
                raise SystemExit(f"safa generate --seconds {s:g}: exit {r['code']}: {str(r['stderr']).strip()}")
            size = os.path.getsize(out)
        last = str(r["stdout"]).strip().splitlines()[-1]
        rows.append({"seconds": s, "one_window": s == ONE_WINDOW_SECONDS, "peak_bytes": r["peak"],
                     "estimate_bytes": _estimate(s), "wall_s": r["wall"],
                     "steps_s": float(re.search(r"steps in ([\d.]+) s", last).group(1)),
                     "decode_s": float(re.search(r"decoded and written in ([\d.]+) s", last).group(1)),
                     "wav_bytes": size})
        print(f"generate {s:g} s: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    return rows


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


def bench_decode(windows: Sequence[int], threads: int) -> List[Dict[str, Any]]:
    env = _env(threads)
    rows = []
    for which, decoder in DECODERS.items():
        for n in windows:
            got = {}
            for mode in ("full", "tiled"):
                r = subprocess.run([sys.executable, "-c", _DECODE, which, str(n), mode], capture_output=True,
                                   text=True, env=env, cwd=ROOT)
                if r.returncode != 0:
                    raise SystemExit(f"decode {which} {n} {mode}: {r.stderr}")
                got[mode] = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append({"decoder": decoder, "windows": n, "whole_s": got["full"]["seconds"],
                         "tiled_s": got["tiled"]["seconds"], "whole_peak_bytes": got["full"]["peak"],
                         "tiled_peak_bytes": got["tiled"]["peak"]})
            print(f"decode: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = harness.argument_parser(__doc__, device=False)
    ap.add_argument("parts", nargs="*", metavar="generate|decode", help="what to measure (default: both)")
    ap.add_argument("--seconds", type=float, nargs="+", default=None, help="lengths of the generate rows")
    ap.add_argument("--windows", type=int, nargs="+", default=None, help="windows of the decode rows")
    ap.add_argument("--steps", type=int, default=2, help="denoising steps of safa generate (default 2)")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        ap.error(f"parts must be among {', '.join(PARTS)}, got {', '.join(unknown)}")
    mode, threads, _ = harness.configure(args, ap)
    parts = args.parts or list(PARTS)
    seconds = args.seconds or SETTINGS[mode]["seconds"]
    windows = args.windows or SETTINGS[mode]["windows"]
    if any(s <= 0 for s in seconds):
        ap.error("--seconds must be > 0")
    if any(n < 1 for n in windows):
        ap.error("--windows must be >= 1")
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    rows = bench_generate(seconds, threads, args.steps) if "generate" in parts else []
    decode = bench_decode(windows, threads) if "decode" in parts else []
    path = harness.record("long", torch.device("cpu"), rows, threads, steps=args.steps, decode=decode,
                          clock="wall time of fresh processes (OMP_NUM_THREADS = threads)")
    print(report.render_file_section("long", path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
