"""Measuring a joint-diffusion step: run a few steps under ``torch.profiler`` and split each one.

Each step (the sampler's ``safa.step`` range) is split into

- **model**: everything inside the sampler's ``safa.model`` range (the denoiser, CFG);
- **scheduler**: inside ``safa.scheduler`` (``scale_model_input`` and ``step``);
- **merge**: inside ``safa.merge``, plus any ``safa::merge_*`` op wherever it runs;
- **other**: the rest of the step (views of the state, the callback, the progress bar).

Counts are *top-level dispatcher ops* (an ``aten::add_`` that calls ``aten::empty`` counts
once) and, on CUDA, *launches* (kernel launches, graph launches, memcpy/memset calls made
by the CPU). Times are the CPU-side durations of the ranges (on CUDA, where launches are
asynchronous, the device time of each category's ops is kept too). Profiling adds a
per-op cost, which inflates op-heavy code (the naive merge) more than one-op code, so
:func:`profile_steps` also times the same steps without the profiler.

:func:`naive_merge_step` is the per-step merge written as the hand-written loop of
:mod:`safa_kernels.naive`, for ``JointDiffusion(pipe, merge_step=naive_merge_step)``: what
``safa profile --compare`` runs beside the one-op merge. Printing is in
:mod:`safa.profiling.report`.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from safa_kernels import ViewLayout, naive

from ..files import atomic_path

__all__ = ["CATEGORIES", "RANGES", "NAIVE_METHODS", "StepBreakdown", "ProfileResult", "analyse", "profile_steps",
           "naive_merge_step"]

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


# -- the naive merge (for --compare) -----------------------------------------------------------
def naive_merge_step(views: torch.Tensor, reference: Optional[torch.Tensor], layout: ViewLayout, dim: int,
                     mode: str, swap_interval: int, reference_axis: Optional[int]) -> None:
    """A drop-in for the sampler's per-step merge (``JointDiffusion(pipe, merge_step=...)``, the
    signature of :func:`safa.accel.merge_step`) built from :mod:`safa_kernels.naive`."""
    naive.sync_(views, layout, dim, mode, swap_interval, reference,
                reference_axis if reference is not None else None)


NAIVE_METHODS = ("safa", "safa_selfloop", "multidiffusion")  # the methods whose modes naive implements


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
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null for the block: the profiler's C++ library (kineto) prints
    its start / stop lines there, past Python's logging and warnings."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def profile_steps(jd: Any, call_kwargs: Dict[str, Any], *, label: str,
                  warmup_steps: int = 2, trace: Optional[str] = None, seed: int = 0,
                  quiet: bool = False) -> ProfileResult:
    """Run ``jd(**call_kwargs)`` under ``torch.profiler`` and break its steps down.

    A warm-up call of ``warmup_steps`` steps first (plans, compilation, allocator), then a
    timed call without the profiler (per-step wall time from step-end callbacks), then the
    profiled call. The merge backend is the one a call picks (``SAFA_BACKEND``; ``safa profile
    --backend`` sets it around this call). To profile another merge, pass a
    ``JointDiffusion(pipe, merge_step=...)``. ``trace``: a Chrome trace is written there
    (whole or not at all). ``quiet``: the profiler library's own lines are not printed.
    """
    device = torch.device(jd.adapter.device)

    def call(steps: Optional[int] = None, callback: Optional[Callable[..., None]] = None) -> None:
        kwargs = dict(call_kwargs, generator=torch.Generator(device=device).manual_seed(seed), output_type="latent")
        if steps is not None:
            kwargs["num_inference_steps"] = steps
        if callback is not None:
            kwargs["callback_on_step_end"] = callback
        jd(**kwargs)

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
    with (native_stderr_silenced() if quiet else contextlib.nullcontext()), \
            profile(activities=activities) as prof:
        call()
    _sync(device)
    if trace:
        os.makedirs(os.path.dirname(os.path.abspath(trace)), exist_ok=True)
        with atomic_path(trace) as tmp:
            prof.export_chrome_trace(tmp)
    return ProfileResult(label=label, device=str(device), steps=analyse(prof.events()),
                         unprofiled_step_ms=unprofiled, trace=trace)
