"""SaFa vs diffusers' StableDiffusionPanoramaPipeline (MultiDiffusion) on the same tiny UNet.

    python benchmarks/bench_panorama.py [--steps 6] [--repeats 2] [--height 512] [--width 2048]
                                        [--device cpu|cuda] [--markdown]

Both sides wrap ONE tiny random-weight SD 1.x pipeline (safa.testing.tiny_sd_pipeline: native
window 64 latent columns = 512 px, DDIM), so the UNet, text encoder and scheduler are shared
and only the joint-diffusion scheme differs:

- MultiDiffusion: diffusers' panorama pipeline with its defaults, window 64, stride 8 (overlap
  rate 0.875), ``view_batch_size`` 1 (its default) and also all views in one batch;
- SaFa: ``JointDiffusion(pipe)`` with method "safa", overlap rate 0.2 (stride 51) plus its
  reference window, all windows in one batch (its default) and also one window per call.

Measured per denoising step, with classifier-free guidance (guidance 7.5, both sides):
UNet calls, window evaluations (UNet batch rows / 2 for CFG: one row pair = one window), and
wall time. Wall time per step is the median interval between consecutive
``callback_on_step_end`` calls (model + scheduler + merge of one step; text encoding, set-up
and decoding excluded; ``output_type="latent"`` on both sides). Threads: SAFA_BENCH_THREADS
(default 1: the shared 2-core development machine gives unstable numbers with 2).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from diffusers import StableDiffusionPanoramaPipeline  # noqa: E402

from safa import JointDiffusion  # noqa: E402
from safa.testing import tiny_sd_pipeline  # noqa: E402

PROMPT = "a photo of the dolomites"
GUIDANCE = 7.5


@dataclass
class Row:
    name: str
    windows: int          # windows stepped per step (views, + the reference for SaFa)
    unet_calls: float     # UNet forward calls per step
    window_evals: float   # window evaluations per step (batch rows / CFG factor)
    step_s: float         # median wall time per step


class UNetCounter:
    """Counts UNet forward calls and batch rows (via a forward pre-hook: nothing is patched)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.calls = 0
        self.rows = 0
        self._handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.calls += 1
        self.rows += int(sample.shape[0])

    def reset(self) -> None:
        self.calls = self.rows = 0

    def close(self) -> None:
        self._handle.remove()


def _timed(run: Callable[[Callable], None], steps: int, counter: UNetCounter, sync: Callable[[], None]):
    """Run once; return (UNet calls per step, rows per step, median step interval in s)."""
    stamps: List[float] = []

    def on_step(*args):
        sync()
        stamps.append(time.perf_counter())
        # diffusers expects the callback kwargs back; JointDiffusion accepts None
        return args[-1] if isinstance(args[-1], dict) and "latents" in args[-1] else None

    counter.reset()
    run(on_step)
    assert len(stamps) == steps, (len(stamps), steps)
    intervals = [b - a for a, b in zip(stamps, stamps[1:])]
    return counter.calls / steps, counter.rows / steps, statistics.median(intervals)


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="denoising steps per run (>= 2)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per configuration (the best median is kept)")
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table with the run's details")
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the step time is the interval between steps)")

    threads = int(os.environ.get("SAFA_BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    sd = tiny_sd_pipeline(seed=0).to(device)
    # Same modules (no copies): the panorama pipeline wraps the very UNet / VAE / encoder / scheduler.
    pano = StableDiffusionPanoramaPipeline(**{k: v for k, v in sd.components.items()},
                                           requires_safety_checker=False)
    pano.set_progress_bar_config(disable=True)
    jd = JointDiffusion(sd)
    jd.adapter.height = args.height
    counter = UNetCounter(sd.unet)

    lat_w = args.width // sd.vae_scale_factor
    md_views = len(pano.get_views(args.height, args.width))  # window 64, stride 8: its defaults
    layout = jd.layout_for(width=args.width, overlap=0.2, method="safa")
    safa_windows = layout.num_views + 1  # + the reference window

    def run_md(vbs: int) -> Callable[[Callable], None]:
        def run(cb):
            pano(PROMPT, height=args.height, width=args.width, num_inference_steps=args.steps,
                 guidance_scale=GUIDANCE, view_batch_size=vbs, output_type="latent",
                 generator=torch.Generator(device).manual_seed(0), callback_on_step_end=cb)
        return run

    def run_safa(vbs: int | None) -> Callable[[Callable], None]:
        def run(cb):
            jd(PROMPT, width=args.width, method="safa", overlap=0.2, num_inference_steps=args.steps,
               guidance_scale=GUIDANCE, view_batch_size=vbs, output_type="latent",
               generator=torch.Generator(device).manual_seed(0), callback_on_step_end=cb)
        return run

    configs: Dict[str, tuple] = {
        f"MultiDiffusion (diffusers panorama, window 64, stride 8, view_batch_size 1)": (md_views, run_md(1)),
        f"MultiDiffusion (diffusers panorama, window 64, stride 8, view_batch_size {md_views})":
            (md_views, run_md(md_views)),
        f"SaFa (overlap 0.2, stride {layout.stride}, + reference, view_batch_size all)": (safa_windows, run_safa(None)),
        f"SaFa (overlap 0.2, stride {layout.stride}, + reference, view_batch_size 1)": (safa_windows, run_safa(1)),
    }
    # Warm-up (allocator, lazy inits), then the repeats interleaved so that load drifts on a
    # shared machine hit every configuration alike.
    for _, run in configs.values():
        _timed(run, args.steps, counter, sync)
    best: Dict[str, Row] = {}
    for _ in range(args.repeats):
        for name, (windows, run) in configs.items():
            calls, rows, step_s = _timed(run, args.steps, counter, sync)
            row = Row(name, windows, calls, rows / 2, step_s)  # CFG: 2 rows per window
            if name not in best or step_s < best[name].step_s:
                best[name] = row
    counter.close()

    rows = list(best.values())
    md_ref = rows[0]
    header = ("| configuration | windows | UNet calls / step | window evals / step | s / step | "
              "window evals vs MD | speed-up vs MD (vbs 1) |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.name} | {r.windows} | {r.unet_calls:.0f} | {r.window_evals:.0f} | {r.step_s:.4f} | "
                     f"{md_ref.window_evals / r.window_evals:.2f}x fewer | {md_ref.step_s / r.step_s:.2f}x |")
    if args.markdown:
        cpu = platform.processor() or platform.machine()
        dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu}), {threads} thread(s)"
        print(f"{args.height}x{args.width} px panorama (latent 64 rows x {lat_w} columns), tiny SD 1.x UNet, "
              f"DDIM, {args.steps} steps, CFG {GUIDANCE}; {dev}; torch {torch.__version__}; "
              f"{datetime.date.today().isoformat()}\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
