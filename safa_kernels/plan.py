"""Kernel plans: the merge rules (docs/kernels.md, section 2) compiled to a per-column table.

Every kernel backend (CPU C++, CUDA, Triton) executes the same dumb loop over a plan;
all knowledge of layouts and modes lives here, once. A plan is built on the host the
first time a (layout, op, mode, ...) combination is used, copied to a device the first time
it is used there, and kept in the op layer's one cache (``cache.py``) with its layout, so
the per-step merge allocates nothing.

Plan semantics (the contract every kernel implements). Tensors are canonical 4-D:
``out`` is ``(D, O, Ld, I)``, ``src`` is ``(S, O, Ls, I)`` (``src`` is ``out`` itself for
in-place sync) and ``reference`` is ``(O, window, I)``, all with arbitrary strides.
``index`` is int32 ``(P, 1 + K + T)`` and ``weight`` float64 ``(P, K)``. Row ``r``::

    ref_col = index[r, 0]                 # -1: no reference swap in this row
    sources = index[r, 1 : 1 + K]         # flat src positions s * Ls + col, -1 = padding
    targets = index[r, 1 + K :]           # flat out positions d * Ld + col, -1 = padding
    for every (o, i):
        if ref_col >= 0 and takes_reference(o, i):   value = reference[o, ref_col, i]
        elif sources[0] >= 0:                        value = sum_k weight[r, k] * src[sources[k]][o, :, i]
        else:                                        continue   # nothing to write
        for t in targets (t >= 0):                   out[t][o, :, i] = value

``takes_reference`` is the runtime parity of the reference swap when it runs along an
axis other than the long one: ``parity = [axis_part, div, size, swap_interval]`` with
``axis_part`` 0 (always true: the long-axis parity is resolved into the plan), 1 (the
axis is inside ``O``) or 2 (inside ``I``); then ``h = (x // div) % size`` for ``x = o``
or ``i`` and the reference is taken iff ``(h // swap_interval) % 2 == 1``.

A row whose only source has weight exactly 1.0 is a copy, and a kernel computes it as one,
so swap, gather and stitch are bitwise copies; any other row is a weighted sum in the
accumulation type (fp32, fp64 for fp64), a single source of weight ``w != 1`` included.
The weights are stored in float64 and each kernel rounds them once to its accumulation
type: float32, float16 and bfloat16 merges use the float32 weights (the nearest float32 to
each float64 weight), and float64 merges are exact to float64 (a mean of 3 views is within
an ulp or two of ``(a + b + c) / 3``, not 1e-8 away as with float32 weights).
In-place execution is race-free because no row reads a cell that another row writes (a
row reads and writes only cells of its own column of the long latent), and a row reads
its sources before writing its targets.

Adjoint plans. ``gather`` and ``stitch`` are linear maps, so their backward passes are
the transposed tables, executed by the same kernels (``ADJOINTS``):

- ``gather_adjoint`` (views -> latent): per column, the sum of every view cell over it;
- ``stitch_adjoint`` (latent -> views): per view cell, ``w * latent[column]`` with the
  cell's weight in the stitch; nothing for cells the stitch did not read (the losing side
  of a swap, the reference's positions). Where the reference's parity runs along another
  axis the row keeps its reference column and the caller passes a zero reference, so the
  kernel writes 0 exactly where the stitch took the reference;
- ``reference_adjoint`` (latent -> one view): per reference column, the sum of the latent
  columns that took it (the caller masks the parity of another axis).

Only cells a plan targets are written: the caller zero-fills the outputs of the last two.

Runs (grids). A grid's plan rows are built per canvas cell as above, then grouped into runs
(:func:`_group_runs`): consecutive rows whose every position (sources, targets, reference
column) advances by the same ``step`` and whose weights are equal become one row; then the
runs that repeat on the canvas rows below, every ``d`` rows, are stacked into one
(:func:`_stack_runs`). ``runs[r] = (count, step, rows, src_row_stride, out_row_stride,
ref_row_stride)`` (``RUN_COLUMNS``): row ``r`` stands for the ``rows x count`` cells at
positions ``p + j * step + i * row_stride`` for ``j < count``, ``i < rows``, with the row
stride of the operand ``p`` addresses (``src``, ``out``, or the reference column's), each
merged as above, and never leaves the view it starts in. A strip's plan has ``runs = None``
(every row one cell): its rows already carry ``outer * inner`` elements each, a grid's cell
only the channels.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch

from . import cache
from ._compile import constant_under_compile
from .layout import AnyLayout, GridLayout, ViewLayout
from .library import axis_weights

__all__ = ["Plan", "get_plan", "OPS", "ADJOINTS", "REF_NONE", "REF_LONG_AXIS", "REF_OTHER_AXIS"]

ADJOINTS = ("gather_adjoint", "stitch_adjoint", "reference_adjoint")
OPS = ("gather", "stitch", "sync") + ADJOINTS
REF_NONE, REF_LONG_AXIS, REF_OTHER_AXIS = 0, 1, 2


RUN_COLUMNS = ("count", "step", "rows", "src_row_stride", "out_row_stride", "ref_row_stride")


class Plan(NamedTuple):
    index: torch.Tensor   # int32 (P, 1 + K + T)
    weight: torch.Tensor  # float64 (P, K)
    runs: Optional[torch.Tensor] = None  # int32 (P, 6), RUN_COLUMNS per row; None: every row one cell


def _odd(offset: int, swap_interval: int) -> bool:
    return (offset // swap_interval) % 2 == 1


def _swap_owner(cover, swap_interval: int):
    """Of the two ``(view, local)`` cells over one column, the one the swap keeps (Eq. 9).

    The pair (i, j): view i holds the overlap in its right part (the larger local column),
    view j in its left part at overlap offset q = kj; p = floor(q / w_swap) mod 2 picks j when odd.
    """
    (vi, ki), (vj, kj) = cover if cover[0][1] > cover[1][1] else cover[::-1]
    return (vj, kj) if _odd(kj, swap_interval) else (vi, ki)


def _strip_merges(layout: ViewLayout, mode: str, swap_interval: int, ref: int, gather: bool):
    """Yield ``(column, cells, ref_col, sources, weights)`` per column of a strip (sources None for gather)."""
    w = layout.window
    weight_of = None if mode == "swap" or gather else axis_weights(mode, w)
    for col in range(layout.length):
        cover = layout.coverage(col)                      # [(view, local)]
        cells = [v * w + k for v, k in cover]
        if gather:
            yield col, cells, -1, None, None
            continue
        ref_col = -1
        if len(cover) == 1 and ref != REF_NONE:
            view, local = cover[0]
            lo, hi = layout.middle(view)
            if lo <= local < hi and (ref == REF_OTHER_AXIS or _odd(local - lo, swap_interval)):
                ref_col = local
        if len(cover) == 1:
            yield col, cells, ref_col, cells, [1.0]
        elif mode == "swap":
            v, k = _swap_owner(cover, swap_interval)
            yield col, cells, ref_col, [v * w + k], [1.0]
        else:
            raw = [weight_of[k] for _, k in cover]
            total = sum(raw)
            yield col, cells, ref_col, cells, [x / total for x in raw]


def _grid_merges(grid: GridLayout, mode: str, swap_interval: int, ref: int, gather: bool):
    """:func:`_strip_merges` of a grid, per cell of the merged axis (``row * cols.length + col``).

    A cell's covering tiles are the product of its row's and its column's covering views. The
    swap keeps the tile ``(row owner, column owner)`` of the two axes' 1-D swaps; averages weigh
    a tile by the product of its two axes' weights; the reference swap applies to the cells of
    a tile's middle (row middle x column middle), alternating along the rows (section 8).
    """
    rows, cols = grid.rows, grid.cols
    nc, wc, tile_cells = cols.num_views, cols.window, grid.view_cells
    row_cover = [rows.coverage(r) for r in range(rows.length)]
    col_cover = [cols.coverage(c) for c in range(cols.length)]
    swap = mode == "swap" and not gather
    if swap:
        row_owner = [cv[0] if len(cv) == 1 else _swap_owner(cv, swap_interval) for cv in row_cover]
        col_owner = [cv[0] if len(cv) == 1 else _swap_owner(cv, swap_interval) for cv in col_cover]
    elif not gather:
        row_weight, col_weight = axis_weights(mode, rows.window), axis_weights(mode, wc)
    for r, rcover in enumerate(row_cover):
        for c, ccover in enumerate(col_cover):
            cover = [(a * nc + b, kr, kc) for a, kr in rcover for b, kc in ccover]
            cells = [v * tile_cells + kr * wc + kc for v, kr, kc in cover]
            col = r * cols.length + c
            if gather:
                yield col, cells, -1, None, None
                continue
            ref_col = -1
            if len(cover) == 1 and ref != REF_NONE:
                (a, kr), (b, kc) = rcover[0], ccover[0]
                (row_lo, row_hi), (col_lo, col_hi) = rows.middle(a), cols.middle(b)
                if (row_lo <= kr < row_hi and col_lo <= kc < col_hi
                        and (ref == REF_OTHER_AXIS or _odd(kr - row_lo, swap_interval))):
                    ref_col = kr * wc + kc
            if len(cover) == 1:
                yield col, cells, ref_col, cells, [1.0]
            elif swap:
                (a, kr), (b, kc) = row_owner[r], col_owner[c]
                yield col, cells, ref_col, [(a * nc + b) * tile_cells + kr * wc + kc], [1.0]
            else:
                raw = [row_weight[kr] * col_weight[kc] for _, kr, kc in cover]
                total = sum(raw)
                yield col, cells, ref_col, cells, [x / total for x in raw]


def _follows(first, row, shift: int, src_long: int, out_long: int) -> bool:
    """Whether ``row`` is ``first`` with every position advanced by ``shift`` in the same view."""
    ref_col, sources, weights, targets = first
    if row[2] != weights or len(row[1]) != len(sources) or len(row[3]) != len(targets):
        return False
    if row[0] != (ref_col + shift if ref_col >= 0 else -1):
        return False
    for long_size, old, new in ((src_long, sources, row[1]), (out_long, targets, row[3])):
        for p, q in zip(old, new):
            if q != p + shift or q // long_size != p // long_size:
                return False
    return True


def _group_runs(rows, src_long: int, out_long: int):
    """Per-cell rows grouped into runs: ``(ref_col, sources, weights, targets, count, step)``.

    First consecutive rows advancing by one cell (a tile's span of a canvas row); then, among
    the rows left single, every other row advancing by two (the alternating overlap columns
    of a swap at ``swap_interval`` 1, where the owner changes at every column).
    """
    rows = list(rows)
    count = [1] * len(rows)
    step = [1] * len(rows)
    head = [True] * len(rows)  # False: the row is part of an earlier row's run

    def extend(i: int, stride: int, shift: int) -> int:
        n = 1
        while (i + n * stride < len(rows) and head[i + n * stride] and count[i + n * stride] == 1
               and _follows(rows[i], rows[i + n * stride], n * shift, src_long, out_long)):
            head[i + n * stride] = False
            n += 1
        count[i], step[i] = n, shift
        return n

    i = 0
    while i < len(rows):  # runs of consecutive cells
        i += extend(i, 1, 1)
    for i in range(len(rows)):  # the cells left single, two apart: next in the list, or every other one
        if head[i] and count[i] == 1 and extend(i, 1, 2) == 1:
            extend(i, 2, 2)
    for i, row in enumerate(rows):
        if head[i]:
            yield row + (count[i], step[i] if count[i] > 1 else 1)


def _stack_runs(runs, longs, widths):
    """Runs of :func:`_group_runs` stacked into rectangles: ``(ref_col, sources, weights, targets,
    count, step, rows, src_row_stride, out_row_stride, ref_row_stride)``.

    Runs that are the same run moved down by ``d`` canvas rows (every position ``d`` rows of its
    own operand further, ``d * width`` positions: a tile's span of one canvas row repeated on the
    rows below) become one row standing for ``rows`` of them: first ``d = 1`` (a middle, a span of
    a column overlap one tile owns), then among the runs left single ``d = 2`` (the rows of a row
    overlap, whose owner alternates row by row at ``swap_interval`` 1). ``longs`` and ``widths``:
    ``(src, out, reference)`` long sizes and row widths, in cells.
    """
    runs = list(runs)

    def split(pos: int, which: int):
        view, local = divmod(pos, longs[which])
        return (view, local % widths[which]), local // widths[which]

    by_shape = {}  # (what stays, relative rows) -> {first row: index}
    tops = []
    for n, (ref_col, sources, weights, targets, count, step) in enumerate(runs):
        parts = [split(p, 0) for p in sources] + [split(p, 1) for p in targets]
        parts += [split(ref_col, 2)] if ref_col >= 0 else []
        top = parts[0][1]
        shape = (tuple(x for x, _ in parts), tuple(y - top for _, y in parts), ref_col >= 0, len(sources),
                 tuple(weights), count, step)
        by_shape.setdefault(shape, {})[top] = n
        tops.append((shape, top))
    height = [1] * len(runs)
    row_step = [1] * len(runs)
    taken = [False] * len(runs)
    for d in (1, 2):
        for n in range(len(runs)):
            if taken[n] or height[n] > 1:
                continue
            shape, top = tops[n]
            same = by_shape[shape]
            while True:
                below = same.get(top + height[n] * d)
                if below is None or taken[below] or height[below] > 1 or below == n:
                    break
                taken[below] = True
                height[n] += 1
            row_step[n] = d
    for n, run in enumerate(runs):
        if not taken[n]:
            strides = [row_step[n] * w if height[n] > 1 else 0 for w in widths]
            yield run + (height[n], *strides)


def _long_sizes(grid: GridLayout, op: str):
    """The long sizes of ``(src, out)`` of a grid plan's operands (the merged axis: cells)."""
    tile, canvas = grid.view_cells, grid.canvas_cells
    return {"gather": (canvas, tile), "stitch": (tile, canvas), "sync": (tile, tile),
            "gather_adjoint": (tile, canvas), "stitch_adjoint": (canvas, tile),
            "reference_adjoint": (canvas, tile)}[op]


def _rows(layout: AnyLayout, op: str, mode: str, swap_interval: int, ref: int):
    """Yield ``(ref_col, sources, weights, targets)`` per row, in column order."""
    merges = _grid_merges if isinstance(layout, GridLayout) else _strip_merges
    for col, cells, ref_col, sources, weights in merges(layout, mode, swap_interval, ref, op == "gather"):
        if op == "gather":
            yield -1, [col], [1.0], cells
        elif op == "stitch":
            yield ref_col, sources, weights, [col]
        elif len(cells) == 1:  # sync: a lone column changes only by the reference swap
            if ref_col >= 0:
                yield ref_col, ([] if ref == REF_OTHER_AXIS else sources), weights, cells
        elif mode == "swap":  # sync: only the losing views' cells change
            yield -1, sources, weights, [c for c in cells if c != sources[0]]
        else:
            yield -1, sources, weights, cells


def _adjoint_rows(rows, ref: int):
    """The transpose of a gather or stitch plan's source part: ``out[t] += w * src[s]`` becomes
    ``grad_src[s] += w * grad_out[t]``, one row per source position, in position order."""
    into = {}  # source position -> (reference column, [(target, weight)])
    for ref_col, sources, weights, targets in rows:
        if ref_col >= 0 and ref == REF_LONG_AXIS:
            continue  # the reference always wins here: the sources were not read
        for s, w in zip(sources, weights):
            into.setdefault(s, (ref_col, []))[1].extend((t, w) for t in targets)
    for s in sorted(into):
        ref_col, terms = into[s]
        yield ref_col, [t for t, _ in terms], [w for _, w in terms], [s]


def _reference_adjoint_rows(rows):
    """Per reference column, every target (latent column) that took it, summed."""
    into = {}
    for ref_col, _, _, targets in rows:
        if ref_col >= 0:
            into.setdefault(ref_col, []).extend(targets)
    for ref_col in sorted(into):
        yield -1, into[ref_col], [1.0] * len(into[ref_col]), [ref_col]


def cell_rows(layout: AnyLayout, op: str, mode: str, swap_interval: int, ref: int) -> list:
    """The plan's rows one cell each, ``(ref_col, sources, weights, targets)``, before any grouping."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if op == "gather_adjoint":
        return list(_adjoint_rows(_rows(layout, "gather", mode, swap_interval, REF_NONE), REF_NONE))
    if op == "stitch_adjoint":
        return list(_adjoint_rows(_rows(layout, "stitch", mode, swap_interval, ref), ref))
    if op == "reference_adjoint":
        return list(_reference_adjoint_rows(_rows(layout, "stitch", mode, swap_interval, ref)))
    return list(_rows(layout, op, mode, swap_interval, ref))


def build_plan(layout: AnyLayout, op: str, mode: str, swap_interval: int, ref: int) -> Plan:
    rows = cell_rows(layout, op, mode, swap_interval, ref)
    runs = None
    if isinstance(layout, GridLayout):
        longs = _long_sizes(layout, op)
        widths = [layout.cols.length if n == layout.canvas_cells else layout.cols.window for n in longs]
        rows = list(_stack_runs(_group_runs(rows, *longs), longs + (layout.view_cells,),
                                widths + [layout.cols.window]))
        runs = torch.tensor([r[4:] for r in rows], dtype=torch.int32).reshape(len(rows), len(RUN_COLUMNS))
    K = max([len(r[1]) for r in rows] + [1])
    T = max([len(r[3]) for r in rows] + [1])
    index: List[List[int]] = []
    weight: List[List[float]] = []
    for ref_col, sources, weights, targets, *_ in rows:
        index.append([ref_col] + sources + [-1] * (K - len(sources)) + targets + [-1] * (T - len(targets)))
        weight.append(list(weights[: len(sources)]) + [0.0] * (K - len(sources)))
    return Plan(torch.tensor(index, dtype=torch.int32).reshape(len(rows), 1 + K + T),
                torch.tensor(weight, dtype=torch.float64).reshape(len(rows), K), runs)


# torch.compile calls this eagerly while tracing and treats the plan as a constant
# (tracing the Python loops of `build_plan` would unroll them into the graph builder).
@constant_under_compile
def get_plan(layout: AnyLayout, op: str, mode: str, swap_interval: int, ref: int,
             device: torch.device) -> Plan:
    """The plan on ``device``, from the cache of layouts equal to ``layout`` (``cache.py``).

    Built on the host on first use (a Python loop over every column), copied to a
    device on its first use there: equal layouts built afresh per call (as a sampler does per
    generation) share both."""
    if op in ("gather", "gather_adjoint"):  # one plan whatever the merge arguments
        mode, swap_interval = "swap", 1
    elif op == "reference_adjoint":  # the reference's columns do not depend on the mode
        mode = "mean"
    plans = cache.memo(layout)
    key = (op, mode, swap_interval, ref, str(device))
    plan: Optional[Plan] = plans.get(key)  # type: ignore[assignment]
    if plan is None:
        host_key = key[:-1] + ("cpu",)
        host = plans.get(host_key)
        if host is None:
            host = plans[host_key] = build_plan(layout, op, mode, swap_interval, ref)
        plan = plans[key] = Plan(host.index.to(device), host.weight.to(device),
                                 None if host.runs is None else host.runs.to(device))
    return plan
