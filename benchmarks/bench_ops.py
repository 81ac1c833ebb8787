"""Op benchmarks: gather, stitch and sync_ per backend vs the naive eager loop and copy_.

Run (not part of `make test`):

    pytest benchmarks/bench_ops.py --benchmark-json=out/bench_ops.json
    python benchmarks/report.py out/bench_ops.json      # the tables of benchmarks/README.md

AudioLDM-shaped float32 latents (2, 8, T, 16), long axis dim -2, T = 25 frames per second
(256 per 10.24 s), window 256, overlap round(0.2 * 256) = 51, open layout covering 1, 2,
5 and 10 minutes. Every case records in ``extra_info`` the bytes the op must move (read
each source cell once, write each target cell once, from its plan), so GB/s and the
fraction of the measured ``copy_`` bandwidth compare like with like.

Threads: SAFA_BENCH_THREADS, default 1, set explicitly for every implementation and the
copy_ baseline alike. On a shared 2-core machine two OpenMP threads measure the OS
scheduler (a parallel region waits for a descheduled thread: copy_ medians of ~12 ms at
every size were seen), so one thread is the honest default there.
"""
from __future__ import annotations

import os
from typing import List, Optional

import pytest
import torch

import safa_kernels as sk
from safa_kernels import ViewLayout, gather, stitch, sync_
from safa_kernels.plan import REF_LONG_AXIS, REF_NONE, build_plan

from safa_kernels.naive import gather as naive_gather, stitch as naive_stitch, sync_ as naive_sync_

THREADS = int(os.environ.get("SAFA_BENCH_THREADS", "1"))
torch.set_num_threads(THREADS)

FPS = 25  # AudioLDM latent frames per second: 256 frames per 10.24 s
WINDOW, OVERLAP = 256, round(0.2 * 256)
MINUTES = [1, 2, 5, 10]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def layout_for(seconds: float) -> ViewLayout:
    return ViewLayout.covering(round(seconds * FPS), WINDOW, OVERLAP)


def latent_shape(layout: ViewLayout) -> List[int]:
    return [2, 8, layout.length, 16]


def view_shape(layout: ViewLayout) -> List[int]:
    return [layout.num_views, 2, 8, layout.window, 16]


def plan_bytes(layout: ViewLayout, op: str, mode: str, ref: int, cells_per_column: int, itemsize: int) -> int:
    """Bytes the op must move: every valid source (and reference) cell read once, every
    target cell written once."""
    plan = build_plan(layout, op, mode, 1, ref)
    K = plan.weight.shape[1]
    index = plan.index
    cells = (index[:, 1:] >= 0).sum().item() + (index[:, 0] >= 0).sum().item()
    return int(cells) * cells_per_column * itemsize


def impls(device: str) -> List[str]:
    # Interpreted Triton on CPU measures the interpreter, not a kernel: left out.
    return [b for b in sk.available_backends(device)
            if not (b == "triton" and device == "cpu")] + ["naive"]


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def run(benchmark, fn, device: str, **info):
    benchmark.extra_info.update(info, device=device, threads=THREADS, torch=torch.__version__)
    if device == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()
        benchmark(timed)
    else:
        benchmark(fn)


CASES = [(device, minutes) for device in DEVICES for minutes in MINUTES]
IDS = [f"{d}-{m}min" for d, m in CASES]


@pytest.mark.parametrize("device,minutes", CASES, ids=IDS)
def test_copy(benchmark, device, minutes):
    """copy_ of one latent: the bandwidth ceiling of this run."""
    benchmark.group = f"{device} {minutes} min"
    layout = layout_for(minutes * 60)
    src = torch.randn(latent_shape(layout), device=device)
    dst = torch.empty_like(src)
    run(benchmark, lambda: dst.copy_(src), device, op="copy", impl="torch", minutes=minutes,
        bytes=2 * src.numel() * src.element_size(), views=layout.num_views)


def _params(device_list=DEVICES):
    return [(d, m, b) for d in device_list for m in MINUTES for b in impls(d)]


@pytest.mark.parametrize("device,minutes,impl", _params(), ids=[f"{d}-{m}min-{b}" for d, m, b in _params()])
def test_gather(benchmark, device, minutes, impl):
    benchmark.group = f"{device} {minutes} min"
    layout = layout_for(minutes * 60)
    latent = torch.randn(latent_shape(layout), device=device)
    fn = (lambda: naive_gather(latent, layout, -2)) if impl == "naive" else \
        (lambda: gather(latent, layout, -2, backend=impl))
    run(benchmark, fn, device, op="gather", impl=impl, minutes=minutes, views=layout.num_views,
        bytes=plan_bytes(layout, "gather", "swap", REF_NONE, 2 * 8 * 16, 4))


MODE_PARAMS = [(d, m, b, mode) for d, m, b in _params() for mode in ("swap", "mean")]
MODE_IDS = [f"{d}-{m}min-{b}-{mode}" for d, m, b, mode in MODE_PARAMS]


@pytest.mark.parametrize("device,minutes,impl,mode", MODE_PARAMS, ids=MODE_IDS)
def test_stitch(benchmark, device, minutes, impl, mode):
    benchmark.group = f"{device} {minutes} min"
    layout = layout_for(minutes * 60)
    views = torch.randn(view_shape(layout), device=device)
    fn = (lambda: naive_stitch(views, layout, -2, mode)) if impl == "naive" else \
        (lambda: stitch(views, layout, -2, mode, backend=impl))
    run(benchmark, fn, device, op=f"stitch {mode}", impl=impl, minutes=minutes, views=layout.num_views,
        bytes=plan_bytes(layout, "stitch", mode, REF_NONE, 2 * 8 * 16, 4))


KERNEL_ONLY = [("stitch", "swap", 1), ("stitch", "swap", 64), ("stitch", "mean", 1), ("sync", "swap", 1)]


@pytest.mark.skipif("cpp" not in sk.available_backends("cpu"), reason="safa_kernels._C is not built")
@pytest.mark.parametrize("op,mode,interval", KERNEL_ONLY, ids=[f"{o}-{m}-interval{i}" for o, m, i in KERNEL_ONLY])
@pytest.mark.parametrize("minutes", MINUTES)
def test_kernel_only(benchmark, minutes, op, mode, interval):
    """The raw C++ op: no public-API Python, and stitch writes into a preallocated latent
    instead of allocating (and page-faulting) a fresh one per call. swap_interval 64 turns
    each overlap into two runs instead of 51 alternating single-column copies."""
    benchmark.group = f"cpu {minutes} min"
    layout = layout_for(minutes * 60)
    views = torch.randn(view_shape(layout)).view(layout.num_views, 16, WINDOW, 16)
    plan = build_plan(layout, op, mode, interval, REF_NONE)
    kernel = torch.ops.safa.merge_cpp_.default
    parity = [0, 1, 1, interval]
    if op == "stitch":
        latent = torch.empty(1, 16, layout.length, 16)
        fn = lambda: kernel(latent, views, None, plan.index, plan.weight, parity)  # noqa: E731
    else:
        fn = lambda: kernel(views, None, None, plan.index, plan.weight, parity)  # noqa: E731
    impl = "cpp op" if interval == 1 else f"cpp op, interval {interval}"
    run(benchmark, fn, "cpu", op=f"{'sync_' if op == 'sync' else op} {mode}", impl=impl, minutes=minutes,
        views=layout.num_views, bytes=plan_bytes(layout, op, mode, REF_NONE, 2 * 8 * 16, 4))


@pytest.mark.parametrize("device,minutes,impl,mode", MODE_PARAMS, ids=MODE_IDS)
def test_sync(benchmark, device, minutes, impl, mode):
    benchmark.group = f"{device} {minutes} min"
    layout = layout_for(minutes * 60)
    views = torch.randn(view_shape(layout), device=device)
    fn = (lambda: naive_sync_(views, layout, -2, mode)) if impl == "naive" else \
        (lambda: sync_(views, layout, -2, mode, backend=impl))
    run(benchmark, fn, device, op=f"sync_ {mode}", impl=impl, minutes=minutes, views=layout.num_views,
        bytes=plan_bytes(layout, "sync", mode, REF_NONE, 2 * 8 * 16, 4))


# -- per-call overhead: public API vs the raw op vs a torch.library.custom_op wrapper ------
@torch.library.custom_op("safa_bench::merge_wrapped_", mutates_args=("out",))
def merge_wrapped_(out: torch.Tensor, src: Optional[torch.Tensor], reference: Optional[torch.Tensor],
                   index: torch.Tensor, weight: torch.Tensor, parity: List[int]) -> None:
    """What registering the op with custom_op would cost: a Python layer around the kernel."""
    torch.ops.safa.merge_cpp_.default(out, src, reference, index, weight, parity)


def _overhead_setup(with_reference: bool):
    layout = layout_for(10.0)  # 10 s: one view of 256 frames
    g = torch.Generator().manual_seed(0)
    views = torch.randn(view_shape(layout), generator=g)
    ref = torch.randn(view_shape(layout)[1:], generator=g) if with_reference else None
    plan = build_plan(layout, "sync", "swap", 1, REF_LONG_AXIS if with_reference else REF_NONE)
    out = views.permute(0, 1, 2, 3, 4).reshape(1, 16, 256, 16)  # canonical (views, outer, long, inner)
    ref4 = None if ref is None else ref.reshape(16, 256, 16)
    return layout, views, ref, plan, out, ref4


OVERHEAD = ["public sync_", "raw op", "custom_op wrapper"]


@pytest.mark.skipif("cpp" not in sk.available_backends("cpu"), reason="safa_kernels._C is not built")
@pytest.mark.parametrize("with_reference", [False, True], ids=["swap-no-work", "swap+reference"])
@pytest.mark.parametrize("caller", OVERHEAD)
def test_call_overhead(benchmark, caller, with_reference):
    """10 s latent (one view). Without a reference sync_ has nothing to do (its plan is
    empty: the public API returns before any op call, while the raw op and the wrapper
    are called with the empty plan, i.e. dispatch and checks only). With a reference
    the plan has 128 rows of real work."""
    benchmark.group = "call overhead, 10 s latent"
    layout, views, ref, plan, out, ref4 = _overhead_setup(with_reference)
    parity = [0, 1, 1, 1]
    if caller == "public sync_":
        fn = lambda: sync_(views, layout, -2, "swap", 1, ref, backend="cpp")  # noqa: E731
    elif caller == "raw op":
        op = torch.ops.safa.merge_cpp_.default
        fn = lambda: op(out, None, ref4, plan.index, plan.weight, parity)  # noqa: E731
    else:
        fn = lambda: merge_wrapped_(out, None, ref4, plan.index, plan.weight, parity)  # noqa: E731
    run(benchmark, fn, "cpu", op="overhead", impl=caller, minutes=10 / 60, rows=plan.index.shape[0],
        reference=with_reference, bytes=0)
