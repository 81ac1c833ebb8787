"""Per-step profile of joint diffusion: where a step's time and launches go.

``safa profile`` (``safa/commands/profile.py``) and ``benchmarks/profile_step.py`` call
:func:`main`. A few steps of a pipeline run under ``torch.profiler``; each step (the
sampler's ``safa.step`` range) is split into

- **model**: everything inside the sampler's ``safa.model`` range (the denoiser, CFG);
- **scheduler**: inside ``safa.scheduler`` (``scale_model_input`` and ``step``);
- **merge**: inside ``safa.merge``, plus any ``safa::merge_*`` op wherever it runs;
- **other**: the rest of the step (views of the state, the callback, the progress bar).

Counts are *top-level dispatcher ops* (an ``aten::add_`` that calls ``aten::empty`` counts
once) and, on CUDA, *launches* (kernel launches, graph launches, memcpy/memset calls made
by the CPU). Times are the CPU-side durations of the ranges (on CUDA, where launches are
asynchronous, the device time of each category's ops is shown too). Profiling adds a
per-op cost, which inflates op-heavy code (the naive merge) more than one-op code: the
un-profiled step time of the same configuration is printed beside it.

``--compare`` runs the naive eager merge (``benchmarks/naive.py``: per-view slicing with
value/count accumulation, diffusers' panorama-pipeline loop; plus the per-view reference
swap below) in place of ``safa_kernels``' one op, in the same process, and prints the two
breakdowns side by side.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from safa_kernels import ViewLayout


__all__ = ["CATEGORIES", "StepBreakdown", "ProfileResult", "analyse", "profile_steps", "naive_merge_step",
           "naive_reference_swap_", "load_naive", "format_breakdown", "format_comparison", "add_arguments",
           "main", "TINY_AUDIOLDM"]

CATEGORIES = ("model", "scheduler", "merge", "other")
RANGES = {"safa.model": "model", "safa.scheduler": "scheduler", "safa.merge": "merge"}
MERGE_OP_PREFIX = "safa::merge_"
# CPU-side calls that submit work to the GPU; a CUDA graph replay is one launch.
LAUNCH_NAMES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                "cudaGraphLaunch", "cudaMemcpyAsync", "cudaMemsetAsync")
# Ops that only make a new view of existing memory: no kernel, no data moved.
VIEW_OPS = frozenset({"aten::as_strided", "aten::slice", "aten::select", "aten::view", "aten::alias",
                      "aten::narrow", "aten::unsqueeze", "aten::squeeze", "aten::reshape", "aten::expand",
                      "aten::permute", "aten::t", "aten::transpose", "aten::detach", "aten::lift_fresh"})
TINY_AUDIOLDM = "builtin:tiny-audioldm"


# -- the naive merge (for --compare) -----------------------------------------------------------
def load_naive() -> ModuleType:
    """``benchmarks/naive.py`` of this checkout (the one copy of the naive loop), loaded by path.

    ``benchmarks/`` is not an installed package, so this works in a source checkout (editable
    install) only; elsewhere it raises a clear error.
    """
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "naive.py"
    if not path.is_file():
        raise RuntimeError(f"--compare needs benchmarks/naive.py of a source checkout ({path} is missing)")
    module = sys.modules.get("safa_benchmarks_naive")
    if module is None:
        spec = importlib.util.spec_from_file_location("safa_benchmarks_naive", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["safa_benchmarks_naive"] = module
    return module


def naive_reference_swap_(views: torch.Tensor, reference: torch.Tensor, layout: ViewLayout, dim: int,
                          swap_interval: int, reference_axis: Optional[int]) -> None:
    """SaFa's reference-guided swap (Eq. 10) as user code writes it: per view, slice the
    middle, build a parity mask, ``torch.where``, copy back. ``benchmarks/naive.py`` has the
    overlap merge only; this is the missing half of the naive SaFa step."""
    ndim = views.ndim - 1
    dim %= ndim
    axis = dim if reference_axis is None else reference_axis % ndim
    for i in range(layout.num_views):
        lo, hi = layout.middle(i)
        if hi <= lo:
            continue
        own = views[i].narrow(dim, lo, hi - lo)
        ref = reference.narrow(dim, lo, hi - lo)
        positions = torch.arange(hi - lo if axis == dim else own.shape[axis], device=views.device)
        mask_shape = [1] * ndim
        mask_shape[axis] = positions.numel()
        take_reference = ((positions // swap_interval) % 2 == 1).view(mask_shape)
        own.copy_(torch.where(take_reference, ref, own))


def naive_merge_step(views: torch.Tensor, reference: Optional[torch.Tensor], layout: ViewLayout, dim: int,
                     mode: str, swap_interval: int, reference_axis: Optional[int]) -> None:
    """Drop-in for :func:`safa.accel.merge_step` built from the naive loop (modes 'mean', 'swap'; open layouts)."""
    load_naive().naive_sync_(views, layout, dim, mode, swap_interval)
    if reference is not None:
        naive_reference_swap_(views, reference, layout, dim, swap_interval, reference_axis)


NAIVE_METHODS = ("safa", "safa_selfloop", "multidiffusion")  # the modes naive.py implements


@contextlib.contextmanager
def _backend(name: Optional[str]) -> Iterator[None]:
    """``SAFA_BACKEND`` for the block (the sampler's merge has no backend argument)."""
    if name is None or name == "auto":
        yield
        return
    saved = os.environ.get("SAFA_BACKEND")
    os.environ["SAFA_BACKEND"] = name
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("SAFA_BACKEND", None)
        else:
            os.environ["SAFA_BACKEND"] = saved


# -- analysis of a profile ----------------------------------------------------------------------------
@dataclass
class StepBreakdown:
    """One step: CPU-side ms, top-level ops, launches and device ms per category."""

    step: int
    total_ms: float
    ms: Dict[str, float] = field(default_factory=dict)
    ops: Dict[str, int] = field(default_factory=dict)
    launches: Dict[str, int] = field(default_factory=dict)
    device_ms: Dict[str, float] = field(default_factory=dict)
    merge_ops: int = 0          # safa::merge_* calls in the step
    merge_compute_ops: int = 0  # top-level ops in the merge that are not pure views


def _is_range(event: Any) -> bool:
    return bool(getattr(event, "is_user_annotation", False)) or event.name.startswith("safa.")


def _category(event: Any, step: Any) -> str:
    if event.name.startswith(MERGE_OP_PREFIX):
        return "merge"
    parent = event.cpu_parent
    while parent is not None and parent is not step:
        if parent.name in RANGES:
            return RANGES[parent.name]
        parent = parent.cpu_parent
    return "other"


def _top_level(event: Any, step: Any) -> bool:
    """An op whose callers up to the step are all ranges (not other ops)."""
    parent = event.cpu_parent
    while parent is not None and parent is not step:
        if not _is_range(parent):
            return False
        parent = parent.cpu_parent
    return parent is step


def _descendants(event: Any) -> Iterator[Any]:
    stack = list(event.cpu_children)
    while stack:
        e = stack.pop()
        yield e
        stack.extend(e.cpu_children)


def analyse(events: Sequence[Any]) -> List[StepBreakdown]:
    """Per-step breakdowns from ``profiler.events()`` (the sampler's ``safa.step`` ranges, in order)."""
    steps = sorted((e for e in events if e.name == "safa.step"), key=lambda e: e.time_range.start)
    out = []
    for index, step in enumerate(steps):
        b = StepBreakdown(step=index, total_ms=step.time_range.elapsed_us() / 1e3,
                          ms=dict.fromkeys(CATEGORIES, 0.0), ops=dict.fromkeys(CATEGORIES, 0),
                          launches=dict.fromkeys(CATEGORIES, 0), device_ms=dict.fromkeys(CATEGORIES, 0.0))
        for e in step.cpu_children:  # the category ranges' own durations
            if e.name in RANGES:
                b.ms[RANGES[e.name]] += e.time_range.elapsed_us() / 1e3
        b.ms["other"] = max(0.0, b.total_ms - sum(b.ms[c] for c in CATEGORIES[:3]))
        for e in _descendants(step):
            if e.name in LAUNCH_NAMES:
                b.launches[_category(e, step)] += 1
                continue
            if e.name.startswith(MERGE_OP_PREFIX):
                b.merge_ops += 1
            if _is_range(e) or not _top_level(e, step):
                continue
            cat = _category(e, step)
            b.ops[cat] += 1
            b.device_ms[cat] += float(getattr(e, "device_time_total", 0.0) or 0.0) / 1e3
            if cat == "merge" and e.name not in VIEW_OPS:
                b.merge_compute_ops += 1
        out.append(b)
    return out


@dataclass
class ProfileResult:
    """What :func:`profile_steps` measured for one configuration."""

    label: str
    device: str
    steps: List[StepBreakdown]
    unprofiled_step_ms: List[float]  # the same steps run again without the profiler
    trace: Optional[str] = None

    def median(self, what: str, category: str) -> float:
        return statistics.median(getattr(s, what)[category] for s in self.steps)

    @property
    def median_total_ms(self) -> float:
        return statistics.median(s.total_ms for s in self.steps)

    @property
    def median_unprofiled_ms(self) -> float:
        return statistics.median(self.unprofiled_step_ms) if self.unprofiled_step_ms else float("nan")


# -- running ---------------------------------------------------------------------------------------------
def load(model: str) -> Any:
    """The pipeline ``model`` names: :data:`TINY_AUDIOLDM` or anything ``safa generate --model`` accepts."""
    if model == TINY_AUDIOLDM:
        from .testing import tiny_audioldm_pipeline
        return tiny_audioldm_pipeline()
    from .commands.generate import load_pipeline
    return load_pipeline(model)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_steps(jd: Any, call_kwargs: Dict[str, Any], *, label: str, backend: Optional[str] = None, warmup_steps: int = 2, trace: Optional[str] = None,
                  seed: int = 0) -> ProfileResult:
    """Run ``jd(**call_kwargs)`` under ``torch.profiler`` and break its steps down.

    A warm-up call of ``warmup_steps`` steps first (plans, compilation, allocator), then a
    timed call without the profiler (per-step wall time from step-end callbacks), then the
    profiled call. ``backend`` sets ``SAFA_BACKEND`` for the call. To profile another merge,
    pass a ``JointDiffusion(pipe, merge_step=...)``.
    """
    device = torch.device(jd.adapter.device)

    def call(steps: Optional[int] = None, callback: Optional[Callable[..., None]] = None) -> None:
        kwargs = dict(call_kwargs, generator=torch.Generator(device=device).manual_seed(seed), output_type="latent")
        if steps is not None:
            kwargs["num_inference_steps"] = steps
        if callback is not None:
            kwargs["callback_on_step_end"] = callback
        jd(**kwargs)

    with _backend(backend):
        if warmup_steps:
            call(warmup_steps)
        ends: List[float] = []

        def stamp(_jd: Any, _i: int, _t: Any, _kw: Dict[str, Any]) -> None:
            _sync(device)
            ends.append(time.perf_counter())

        _sync(device)
        ends.append(time.perf_counter())
        call(callback=stamp)
        # ends[0] is before the call: the first interval also holds the call's setup (prompt
        # encoding, noise), so it is dropped.
        unprofiled = [(b - a) * 1e3 for a, b in zip(ends[1:], ends[2:])]
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            call()
        _sync(device)
    if trace:
        os.makedirs(os.path.dirname(os.path.abspath(trace)), exist_ok=True)
        prof.export_chrome_trace(trace)
    return ProfileResult(label=label, device=str(device), steps=analyse(prof.events()),
                         unprofiled_step_ms=unprofiled, trace=trace)


# -- printing ---------------------------------------------------------------------------------------------
def format_breakdown(result: ProfileResult) -> str:
    cuda = result.device.startswith("cuda")
    unit = "launches" if cuda else "ops"
    head = f"{'step':>4} {'total ms':>9} | " + " | ".join(f"{c + ' ms':>12} {unit:>8}" for c in CATEGORIES) \
        + f" | {'merge ops':>9}"
    lines = [f"{result.label} on {result.device}" + (f" (trace: {result.trace})" if result.trace else ""), head]
    for s in result.steps:
        counts = s.launches if cuda else s.ops
        lines.append(f"{s.step:>4} {s.total_ms:>9.2f} | "
                     + " | ".join(f"{s.ms[c]:>12.3f} {counts[c]:>8}" for c in CATEGORIES)
                     + f" | {s.merge_ops:>9}")
    lines.append(f"median step {result.median_total_ms:.2f} ms under the profiler, "
                 f"{result.median_unprofiled_ms:.2f} ms without it")
    return "\n".join(lines)


def format_comparison(a: ProfileResult, b: ProfileResult) -> str:
    """Medians of two breakdowns side by side, with ``b / a``."""
    cuda = a.device.startswith("cuda")
    lines = [f"medians over {len(a.steps)} steps, same process ({a.device})",
             f"{'':<22} {a.label:>18} {b.label:>18} {'ratio':>8}"]

    def row(name: str, x: float, y: float, fmt: str) -> None:
        ratio = y / x if x else float("inf") if y else 1.0
        lines.append(f"{name:<22} {format(x, fmt):>18} {format(y, fmt):>18} {ratio:>8.2f}")

    row("step ms (no profiler)", a.median_unprofiled_ms, b.median_unprofiled_ms, ".3f")
    row("step ms (profiled)", a.median_total_ms, b.median_total_ms, ".3f")
    for c in CATEGORIES:
        row(f"{c} ms", a.median("ms", c), b.median("ms", c), ".3f")
        row(f"{c} ops", a.median("ops", c), b.median("ops", c), ".0f")
        if cuda:
            row(f"{c} launches", a.median("launches", c), b.median("launches", c), ".0f")
            row(f"{c} device ms", a.median("device_ms", c), b.median("device_ms", c), ".3f")
    return "\n".join(lines)


# -- command line ------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=TINY_AUDIOLDM,
                   help=f"pipeline directory / cached hub id / builtin:texture (default {TINY_AUDIOLDM}: "
                        "the tiny random AudioLDM of safa.testing)")
    p.add_argument("--seconds", type=float, default=None, help="audio length (default 30 for audio pipelines)")
    p.add_argument("--width", type=int, default=None, help="panorama width in pixels (image pipelines)")
    p.add_argument("--window", type=float, default=None,
                   help="window: seconds for audio, latent columns for images (default: the model's native one)")
    p.add_argument("--method", choices=tuple(accel_methods()), default="safa", help="default safa")
    p.add_argument("--backend", default="auto", help="merge backend: auto, cpp, cuda, triton, reference")
    p.add_argument("--steps", type=int, default=4, help="profiled steps (default 4)")
    p.add_argument("--warmup", type=int, default=2, help="steps of the warm-up call (default 2)")
    p.add_argument("--guide", type=float, default=None,
                   help="SaFa's r_guide (default 1.0 for safa: the reference swap in every profiled step)")
    p.add_argument("--guidance", type=float, default=2.5, help="classifier-free guidance scale (default 2.5)")
    p.add_argument("--compile", action="store_true", help="JointDiffusion(compile=True)")
    p.add_argument("--cuda-graphs", action="store_true", help="JointDiffusion(cuda_graphs=True) (CUDA only)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--compare", action="store_true",
                   help="also run the naive eager merge (benchmarks/naive.py) and print both side by side")
    p.add_argument("--trace", default="out/profile_trace.json",
                   help="Chrome trace path (default out/profile_trace.json; --compare adds .naive before .json)")


def accel_methods() -> List[str]:
    from .sampler import METHODS
    return list(METHODS)


def run(args: argparse.Namespace) -> int:
    """``safa profile``: print the breakdown(s); returns the exit code."""
    from .sampler import JointDiffusion

    if args.steps < 1 or args.warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps}, {args.warmup}")
    if args.compare and args.method not in NAIVE_METHODS:
        raise ValueError(f"--compare: the naive merge implements {NAIVE_METHODS}, not {args.method!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.cuda_graphs and torch.device(device).type != "cuda":
        raise ValueError(f"--cuda-graphs needs a CUDA device; this run is on {device}")
    pipe = load(args.model)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    jd = JointDiffusion(pipe, compile=args.compile, cuda_graphs=args.cuda_graphs)
    guide = args.guide if args.guide is not None or args.method != "safa" else 1.0
    kwargs: Dict[str, Any] = dict(prompt="rain on a tin roof", method=args.method, num_inference_steps=args.steps,
                                  guide=guide, guidance_scale=args.guidance, window=args.window)
    if jd.adapter.kind == "audio":
        kwargs["seconds"] = args.seconds if args.seconds is not None else 30.0
    else:
        if args.width is None:
            raise ValueError("this is an image pipeline: give --width")
        kwargs["width"] = args.width
    layout = jd.layout_for(kwargs.get("seconds"), kwargs.get("width"), window=args.window, method=args.method)
    if args.compare and layout.loop:
        raise ValueError("--compare: the naive merge handles open layouts only")
    print(f"{args.model}: {layout.num_views} views of {layout.window} columns (overlap {layout.overlap}), "
          f"{args.method}, backend {args.backend}, compile={args.compile}, cuda_graphs={args.cuda_graphs}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    ours = profile_steps(jd, kwargs, label="safa_kernels", backend=args.backend, warmup_steps=args.warmup,
                         trace=args.trace)
    print(format_breakdown(ours))
    if args.compare:
        trace = None if not args.trace else os.path.splitext(args.trace)[0] + ".naive.json"
        naive_jd = JointDiffusion(pipe, compile=args.compile, cuda_graphs=args.cuda_graphs,
                                  merge_step=naive_merge_step)
        naive = profile_steps(naive_jd, kwargs, label="naive eager", warmup_steps=args.warmup, trace=trace)
        print()
        print(format_breakdown(naive))
        print()
        print(format_comparison(ours, naive))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="profile_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
