"""Op microbenchmarks: gather, stitch and sync_ per backend, the naive loop, and the copy_ floor.

    pytest benchmarks/bench_ops.py [--bench-mode smoke|quick|full] [--bench-devices cpu,cuda]

Workloads (``Case``): AudioLDM-shaped float32 latents ``(2, 8, T, 16)``, long axis dim -2,
T = 25 frames per second (256 per 10.24 s), window 256, overlap round(0.2 * 256) = 51,
open layouts covering 1 to 10 minutes (20 in full mode); a 4096 x 16384 px SD panorama latent
``(1, 4, 512, 2048)``, long axis dim -1, window 64, overlap 13; and 2-D grids (``GridLayout``,
axes dims (-2, -1)): SD 1.5 at 2048 x 2048 px, latent ``(1, 4, 256, 256)`` covered by 64 x 64
tiles overlapping by 16 on both axes (1024 x 1024 px in smoke mode), and in full mode SDXL at
4096 x 4096 px, 128 x 128 tiles overlapping by 32. Their naive baseline is the per-tile loop of
tiled-diffusion code (``naive.gather_grid`` / ``stitch_grid`` / ``sync_grid_``, mean only).

Ops: ``gather``; ``stitch`` and ``sync_`` in swap (``swap_interval`` 1) and mean mode; and
``sync_ swap+ref``, SaFa's guided step (the self-loop swap and the reference swap in one
call; the reference alternates along the long axis so the bytes it moves are exact).
Implementations: every kernel backend of the device (Triton on CPU would be its
interpreter: left out), ``reference`` (safa_kernels.reference), ``naive`` (the
hand-written per-view loop of safa_kernels.naive); on CPU also the raw C++ op (``cpp op``:
no Python, stitch into a preallocated latent), and for stitch swap two diagnostics of
where its time goes: the raw op at ``swap_interval`` 64 (each overlap one run instead of
alternating lone columns) and ``cpp op, one view`` (the same lone-column jobs reading one
view instead of two interleaved ones: :func:`one_view_plan`).

The physical floor: every op record carries the bytes the op must move (each source and
reference cell read once, each target cell written once, counted from its plan), and
``test_copy`` times ``copy_`` moving exactly those bytes (half read, half written) in the
same run. benchmarks/report.py divides the two: the op's share of copy_ bandwidth.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch

import harness
import safa_kernels as sk
from safa_kernels import GridLayout, ViewLayout, gather, naive, stitch, sync_
from safa_kernels.plan import REF_LONG_AXIS, REF_NONE, build_plan

FPS = 25  # AudioLDM latent frames per second: 256 frames per 10.24 s
MODE = harness.mode()
DEVICES = [torch.device(d) for d in os.environ.get("SAFA_BENCH_DEVICES", "cpu").split(",")]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    latent_shape: Tuple[int, ...]  # with the layout's length on long_dim
    long_dim: int
    window: int
    overlap: int

    @functools.cached_property
    def layout(self) -> ViewLayout:
        return ViewLayout(self.latent_shape[self.long_dim], self.window, self.overlap)

    @property
    def view_shape(self) -> Tuple[int, ...]:
        shape = list(self.latent_shape)
        shape[self.long_dim] = self.window
        return (self.layout.num_views, *shape)

    @property
    def cells_per_column(self) -> int:
        n = 1
        for i, size in enumerate(self.latent_shape):
            if i != self.long_dim % len(self.latent_shape):
                n *= size
        return n


def audio(minutes: float) -> Case:
    layout = ViewLayout.covering(round(minutes * 60 * FPS), 256, 51)
    name = f"audio {minutes:g} min" if minutes >= 1 else f"audio {minutes * 60:g} s"
    return Case(name, (2, 8, layout.length, 16), -2, 256, 51)


def panorama(height_px: int, width_px: int) -> Case:
    layout = ViewLayout.covering(width_px // 8, 64, 13)  # what the sampler does: cover, then crop
    return Case(f"panorama {height_px}x{width_px} px", (1, 4, height_px // 8, layout.length), -1, 64, 13)


@dataclasses.dataclass(frozen=True)
class GridCase:
    """A 2-D canvas ``(1, 4, H, W)`` of square tiles, axes dims (-2, -1): the ``Case`` interface."""
    name: str
    latent_shape: Tuple[int, ...]
    window: int
    overlap: int
    long_dim: Tuple[int, int] = (-2, -1)

    @functools.cached_property
    def layout(self) -> GridLayout:
        return GridLayout.covering(self.latent_shape[-2], self.latent_shape[-1], self.window, self.overlap)

    @property
    def view_shape(self) -> Tuple[int, ...]:
        return (self.layout.num_views, *self.latent_shape[:-2], self.window, self.window)

    @property
    def cells_per_column(self) -> int:  # per cell of the merged (H * W) axis
        return self.latent_shape[0] * self.latent_shape[1]


def image_grid(side_px: int, window: int, overlap: int, model: str) -> GridCase:
    grid = GridLayout.covering(side_px // 8, side_px // 8, window, overlap)  # cover, then crop
    return GridCase(f"grid {model} {side_px}x{side_px} px", (1, 4, grid.rows.length, grid.cols.length), window,
                    overlap)


def cases(device: torch.device) -> List[Case]:
    if MODE == "smoke":
        return [audio(1), panorama(512, 2048), image_grid(1024, 64, 16, "SD")]
    grids = [image_grid(2048, 64, 16, "SD")] + ([image_grid(4096, 128, 32, "SDXL")] if MODE == "full" else [])
    if device.type == "cuda":
        minutes = [1, 10] if MODE == "quick" else [1, 2, 5, 10, 20]
        return [audio(m) for m in minutes] + [panorama(4096, 16384)] + grids
    if MODE == "quick":
        return [audio(m) for m in (1, 2, 5, 10)] + [panorama(4096, 16384)] + grids
    return [audio(m) for m in (1, 2, 5, 10, 20)] + [panorama(4096, 16384)] + grids


# (name, plan op, mode, with reference)
OPS = [("gather", "gather", "swap", False), ("stitch swap", "stitch", "swap", False),
       ("stitch mean", "stitch", "mean", False), ("sync_ swap", "sync", "swap", False),
       ("sync_ swap+ref", "sync", "swap", True), ("sync_ mean", "sync", "mean", False)]
# CPU raw op variants per op: "cpp op" (swap_interval 1), "cpp op, one view" (a diagnostic: see
# one_view_plan) and "cpp op, interval 64" (each overlap one run).
RAW_OPS = {"stitch swap": ["cpp op", "cpp op, one view", "cpp op, interval 64"], "stitch mean": ["cpp op"],
           "sync_ swap": ["cpp op"]}


@functools.lru_cache(maxsize=None)
def plan_bytes(case: Case, op: str, mode: str, with_reference: bool, itemsize: int = 4) -> int:
    """Bytes the op must move: every valid source and reference cell read once, every target
    cell written once (counted from the plan, so sync_ swap counts only the losing halves)."""
    plan = build_plan(case.layout, op, mode, 1, REF_LONG_AXIS if with_reference else REF_NONE)
    entries = (plan.index[:, 1:] >= 0).sum(dim=1) + (plan.index[:, 0] >= 0)
    count = plan.runs[:, 0] * plan.runs[:, 2] if plan.runs is not None else 1  # a grid's row: count x rows cells
    return int((entries * count).sum()) * case.cells_per_column * itemsize


def impls(device: torch.device, op: str, grid: bool = False) -> List[str]:
    kernels = [b for b in sk.available_backends(device) if b != "reference" and not
               (b == "triton" and device.type == "cpu")]
    raw = RAW_OPS.get(op, []) if device.type == "cpu" and "cpp" in kernels else []
    if grid:  # the naive per-tile loop merges by mean only; the raw op as is (no strip diagnostics)
        return (kernels + raw[:1] + ["reference"]
                + (["naive"] if op in ("gather", "stitch mean", "sync_ mean") else []))
    return kernels + raw + ["reference", "naive"]


OP_PARAMS = [(d, c, name, impl) for d in DEVICES for c in cases(d) for name, *_ in OPS
             for impl in impls(d, name, isinstance(c, GridCase))]
COPY_PARAMS = sorted({(d, c, plan_bytes(c, op, mode, ref)) for d in DEVICES for c in cases(d)
                      for _, op, mode, ref in OPS}, key=lambda p: (p[0].type, p[2]))


def _id(*parts: Any) -> str:
    return "-".join(str(p).replace(" ", "_") for p in parts)


def _tensors(case: Case, device: torch.device) -> Dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    views = torch.randn(case.view_shape, generator=g, device=device)
    return dict(views=views, reference=torch.randn(case.view_shape[1:], generator=g, device=device),
                latent=torch.randn(case.latent_shape, generator=g, device=device))


@pytest.mark.parametrize("device,case,nbytes", COPY_PARAMS, ids=[_id(d, c.name, f"{b}B") for d, c, b in COPY_PARAMS])
def test_copy(op_timer, device, case, nbytes):
    """copy_ moving ``nbytes`` (reading half, writing half): the floor of an op moving as many."""
    assert nbytes % 8 == 0, nbytes
    src = torch.empty(nbytes // 8, device=device).normal_()
    dst = torch.empty_like(src)
    op_timer(lambda: dst.copy_(src), device, case=case.name, op="copy_", impl="torch", bytes=nbytes)


def one_view_plan(layout: ViewLayout) -> torch.Tensor:
    """The stitch swap plan at swap_interval 1 with every overlap column read from the LEFT view
    of its pair, at the neighbouring column of the same pair (local ^ 1): the same lone-column
    copy jobs as the real plan, but reading one view's lines, each once, instead of two
    interleaved views' alternate lines. Wrong output on purpose; it isolates the memory cost
    of the interleaving from the per-job cost."""
    index = build_plan(layout, "stitch", "swap", 1, REF_NONE).index.clone()
    w, stride = layout.window, layout.stride
    for col in range(layout.length):
        cover = layout.coverage(col)
        if len(cover) == 2:
            view, local = cover[0] if cover[0][1] >= stride else cover[1]
            swapped = local ^ 1
            index[col, 1] = view * w + (swapped if stride <= swapped < w else local)
    return index


def _raw_op_call(case: Case, t: Dict[str, torch.Tensor], op: str, mode: str, variant: str):
    """A raw C++ op variant (RAW_OPS) on canonical 4-D tensors (views (V, outer, window, inner);
    a grid's two axes merged into one of cells, with the plan's runs)."""
    grid = isinstance(case, GridCase)
    dim = len(case.latent_shape) - 2 if grid else case.long_dim % len(case.latent_shape)
    outer = 1
    for n in case.latent_shape[:dim]:
        outer *= n
    inner = 1 if grid else case.cells_per_column // outer
    views = t["views"].view(case.layout.num_views, outer, case.layout.view_cells, inner)
    interval = 64 if variant == "cpp op, interval 64" else 1
    plan = build_plan(case.layout, op, mode, interval, REF_NONE)
    if variant == "cpp op, one view":
        plan = plan._replace(index=one_view_plan(case.layout))
    kernel = torch.ops.safa.merge_cpp_.default
    parity = [0, 1, 1, interval]
    runs = () if plan.runs is None else (plan.runs,)
    if op == "stitch":
        latent = t["latent"].view(1, outer, case.layout.canvas_cells, inner)
        return lambda: kernel(latent, views, None, plan.index, plan.weight, parity, *runs)
    return lambda: kernel(views, None, None, plan.index, plan.weight, parity, *runs)


@pytest.mark.parametrize("device,case,op_name,impl", OP_PARAMS,
                         ids=[_id(d, c.name, o, i) for d, c, o, i in OP_PARAMS])
def test_op(op_timer, device, case, op_name, impl):
    _, op, mode, with_reference = next(o for o in OPS if o[0] == op_name)
    t = _tensors(case, device)
    d = case.long_dim
    ref = t["reference"] if with_reference else None
    ref_axis = (d if isinstance(d, int) else d[0]) if with_reference else None  # a grid: along its rows
    if impl.startswith("cpp op"):
        fn = _raw_op_call(case, t, op, mode, impl)
    elif isinstance(case, GridCase) and impl == "naive":
        fn = {"gather": lambda: naive.gather_grid(t["latent"], case.layout, d),
              "stitch": lambda: naive.stitch_grid(t["views"], case.layout, d, mode),
              "sync": lambda: naive.sync_grid_(t["views"], case.layout, d, mode)}[op]
    elif op == "gather":
        fn = (lambda: naive.gather(t["latent"], case.layout, d)) if impl == "naive" else \
            (lambda: gather(t["latent"], case.layout, d, backend=impl))
    elif op == "stitch":
        fn = (lambda: naive.stitch(t["views"], case.layout, d, mode)) if impl == "naive" else \
            (lambda: stitch(t["views"], case.layout, d, mode, backend=impl))
    else:
        fn = (lambda: naive.sync_(t["views"], case.layout, d, mode, 1, ref, ref_axis)) if impl == "naive" else \
            (lambda: sync_(t["views"], case.layout, d, mode, 1, ref, ref_axis, backend=impl))
    op_timer(fn, device, case=case.name, op=op_name, impl=impl, views=case.layout.num_views,
             bytes=plan_bytes(case, op, mode, with_reference))


# -- per-call overhead -------------------------------------------------------------------------
@torch.library.custom_op("safa_bench::merge_wrapped_", mutates_args=("out",))
def merge_wrapped_(out: torch.Tensor, src: Optional[torch.Tensor], reference: Optional[torch.Tensor],
                   index: torch.Tensor, weight: torch.Tensor, parity: List[int]) -> None:
    """What registering the op with custom_op would cost: a Python layer around the kernel."""
    torch.ops.safa.merge_cpp_.default(out, src, reference, index, weight, parity)


def _overhead_params() -> List[Tuple[torch.device, str, str]]:
    params = []
    for device in DEVICES:
        if device.type == "cpu" and "cpp" in sk.available_backends(device):
            params += [(device, c, "cpp") for c in ("public sync_", "raw op", "custom_op wrapper")]
        if device.type == "cuda":
            params += [(device, c, b) for b in sk.available_backends(device) if b not in ("reference", "cpp")
                       for c in ("public sync_", "CUDA graph replay")]
    return params


OVERHEAD_PARAMS = _overhead_params()


@pytest.mark.parametrize("with_reference", [False, True], ids=["swap-no-work", "swap+reference"])
@pytest.mark.parametrize("device,caller,backend", OVERHEAD_PARAMS, ids=[_id(*p) for p in OVERHEAD_PARAMS])
def test_call_overhead(op_timer, device, caller, backend, with_reference):
    """10 s of AudioLDM latent: one view of 256 frames. Without a reference sync_ has nothing
    to do (its plan is empty: the public API returns before any op call, while the raw op and
    the wrapper are called with the empty plan: dispatch and checks only); with a reference
    the plan has 128 rows of real work. On CUDA: per call from the host, and per launch
    replayed from a CUDA graph of 100 calls (the device side of a launch)."""
    case = audio(10 / 60)
    t = _tensors(case, device)
    views, ref = t["views"], (t["reference"] if with_reference else None)
    plan = build_plan(case.layout, "sync", "swap", 1, REF_LONG_AXIS if with_reference else REF_NONE)
    units = 1
    if caller == "public sync_":
        fn = lambda: sync_(views, case.layout, -2, "swap", 1, ref, backend=backend)  # noqa: E731
    elif caller in ("raw op", "custom_op wrapper"):
        op = torch.ops.safa.merge_cpp_.default if caller == "raw op" else merge_wrapped_
        out, ref3 = views.view(1, 16, 256, 16), (None if ref is None else ref.view(16, 256, 16))
        index, weight = plan.index, plan.weight
        fn = lambda: op(out, None, ref3, index, weight, [0, 1, 1, 1])  # noqa: E731
    else:
        units = 100
        fn = _graph_of(lambda: sync_(views, case.layout, -2, "swap", 1, ref, backend=backend), device, units)
    op_timer(fn, device, units_per_call=units, case=case.name, op="overhead", impl=f"{caller} ({backend})",
             rows=int(plan.index.shape[0]), reference=with_reference, bytes=0)


def _graph_of(fn, device: torch.device, calls: int):
    """``calls`` calls of ``fn`` captured in one CUDA graph; returns its replay."""
    fn()  # plans on the device, Triton compiled
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay
