"""Per-step cost of joint diffusion with the tiny AudioLDM: eager, torch.compile, CUDA graphs, the naive merge.

    python benchmarks/bench_steps.py [--mode smoke|quick|full] [--device cpu|cuda] [--threads N]
                                     [--compile | --no-compile]

One process, one random-weight AudioLDM (``safa.testing.tiny_audioldm_pipeline``), SaFa
with the reference swap in every step (``guide=1.0``: the worst case for the merge).
Workload: 30 s at the native 10.24 s window (4 views + the reference window), classifier-free
guidance 2.5, DDIM; smoke mode: 1.6 s in 0.64 s windows without guidance.

Variants: ``eager``; ``naive merge`` (eager, with the per-step merge replaced by the
hand-written per-view loop of safa_kernels.naive: ``JointDiffusion(pipe,
merge_step=safa.profiling.naive_merge_step)``); ``compile`` (``compile=True``: on CUDA
always, on CPU in full mode or with --compile); ``cuda_graphs`` (CUDA only).

Measured per variant, after one first call (compilation, capture, plans: ``first call s``):
the variants take turns, one call each, for the mode's rounds, and **step** is the median
of every step interval from step 1 on (harness.StepClock). **model alone** is the
denoiser's forward time inside each of those steps (harness.ModelClock, on the variants
whose model runs eagerly; a compiled or graph-replayed model runs no hooks, so those two
are compared with the eager variant's model time): **step / model** is what the step costs
beyond the work of the model alone. Then
each variant once under ``torch.profiler`` (``safa.profiling.profile_steps``): per-step
ms, ops (CPU) or launches (CUDA) of model / scheduler / merge / other, and the merge's
``safa::merge_*`` op count.
"""
from __future__ import annotations

import statistics
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch

import harness
import report

SETTINGS = {  # per harness mode: call arguments, steps per call, interleaved rounds
    "smoke": dict(call=dict(seconds=1.6, window=0.64, guidance_scale=1.0), steps=3, rounds=1),
    "quick": dict(call=dict(seconds=30.0, guidance_scale=2.5), steps=6, rounds=2),
    "full": dict(call=dict(seconds=30.0, guidance_scale=2.5), steps=10, rounds=3),
}


EAGER_MODEL = ("eager", "naive merge")  # variants whose model runs eagerly: ModelClock sees its calls


def measure(device: torch.device, mode: str, with_compile: bool) -> List[Dict[str, Any]]:
    from safa.profiling import CATEGORIES, naive_merge_step, profile_steps
    from safa.sampler import JointDiffusion
    from safa.testing import tiny_audioldm_pipeline

    settings = SETTINGS[mode]
    pipe = tiny_audioldm_pipeline().to(device)
    pipe.set_progress_bar_config(disable=True)
    variants = [("eager", JointDiffusion(pipe)), ("naive merge", JointDiffusion(pipe, merge_step=naive_merge_step))]
    if with_compile:
        variants.append(("compile", JointDiffusion(pipe, compile=True)))
    if device.type == "cuda":
        variants.append(("cuda_graphs", JointDiffusion(pipe, cuda_graphs=True)))
    call_kwargs = dict(settings["call"], prompt="rain on a tin roof", method="safa", guide=1.0)
    layout = variants[0][1].layout_for(call_kwargs["seconds"], window=call_kwargs.get("window"))

    def call(jd: Any, clock: harness.StepClock) -> None:
        jd(num_inference_steps=settings["steps"], output_type="latent", callback_on_step_end=clock,
           generator=torch.Generator(device=device).manual_seed(0), **call_kwargs)

    first_call_s: Dict[str, float] = {}
    read = harness.timer(device)
    for name, jd in variants:
        start = read()
        call(jd, harness.StepClock(device))
        first_call_s[name] = read() - start
    steps: Dict[str, List[float]] = {name: [] for name, _ in variants}
    model: Dict[str, List[float]] = {name: [] for name in EAGER_MODEL}
    for _ in range(settings["rounds"]):
        for name, jd in variants:
            if name in EAGER_MODEL:
                with harness.ModelClock(pipe.unet, device) as model_clock:
                    clock = harness.StepClock(device, model_clock)
                    call(jd, clock)
                model[name] += clock.model
            else:
                clock = harness.StepClock(device)
                call(jd, clock)
            steps[name] += clock.intervals
    records = []
    for name, jd in variants:
        model_stats = harness.Stats.of(model[name if name in EAGER_MODEL else "eager"])
        prof = profile_steps(jd, dict(call_kwargs, num_inference_steps=settings["steps"]), label=name,
                             warmup_steps=0)
        step_stats = harness.Stats.of(steps[name])
        records.append(dict(
            variant=name, views=layout.num_views, window=layout.window, overlap=layout.overlap,
            steps_per_call=settings["steps"], rounds=settings["rounds"], step=step_stats.to_dict(),
            model_alone=model_stats.to_dict(), step_over_model=step_stats.median / model_stats.median,
            first_call_s=first_call_s[name],
            profile=dict(step_ms=prof.median_total_ms, unprofiled_step_ms=prof.median_unprofiled_ms,
                         ms={c: prof.median("ms", c) for c in CATEGORIES},
                         ops={c: prof.median("ops", c) for c in CATEGORIES},
                         launches={c: prof.median("launches", c) for c in CATEGORIES},
                         merge_ops=statistics.median(s.merge_ops for s in prof.steps))))
    return records


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = harness.argument_parser(__doc__)
    p.add_argument("--compile", dest="with_compile", action="store_true", default=None,
                   help="include compile=True (default: on CUDA, and on CPU in full mode)")
    p.add_argument("--no-compile", dest="with_compile", action="store_false")
    args = p.parse_args(argv)
    mode, threads, device = harness.configure(args, p)
    with_compile = args.with_compile if args.with_compile is not None else (device.type == "cuda" or mode == "full")
    path = harness.record("steps", device, measure(device, mode, with_compile), threads)
    print(report.render_file_section("steps", path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
