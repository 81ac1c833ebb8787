"""Two-dimensional view grids (docs/kernels.md, section 8): every backend against an oracle.

The oracle here is written separately from ``safa_kernels/reference.py`` (which stitches a
grid as two 1-D stitches): a per-cell loop over the tiles, with its own coverage, owners,
weights and middles computed from the axes' ``starts`` alone. Then every backend is compared
with the reference (bitwise for the copy rules, to the 1-D tolerances for averages), over
awkward grids (one row, one column, loops on either or both axes, odd sizes, spaced axes),
every dtype and memory layout; plus the properties the docs state, opcheck and gradcheck.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import safa_kernels as sk
from safa_kernels import GridLayout, ViewLayout, gather, naive, stitch, sync_
from safa_kernels.plan import get_plan, REF_LONG_AXIS, REF_NONE
from op_args import DTYPES, assert_merged_equal

KERNELS = [b for b in sk.available_backends("cpu") if b != "reference"]
BACKENDS = ["reference"] + KERNELS


# -- the independent oracle ------------------------------------------------------------------
def axis_cover(axis: ViewLayout):
    """{canvas index: [(view, local)]} from the starts alone."""
    cover = {}
    for v, start in enumerate(axis.starts):
        for k in range(axis.window):
            cover.setdefault((start + k) % axis.length, []).append((v, k))
    return cover


def axis_owner(pairs, swap_interval):
    """Eq. 9 on one axis: of two views over an index, the one holding it in its left part at
    offset q takes it when floor(q / w_swap) is odd, the other (right part) otherwise."""
    if len(pairs) == 1:
        return pairs[0]
    left_part, right_part = sorted(pairs, key=lambda p: p[1])
    return left_part if (left_part[1] // swap_interval) % 2 else right_part


def oracle_weight(mode, k, w):
    if mode == "mean":
        return 1.0
    if mode == "triangular":
        return float(min(k + 1, w - k))
    return math.exp(-((k - (w - 1) / 2) ** 2) / (2 * (0.1 * w) ** 2))  # Mixture of Diffusers: sigma = 0.1 w


def oracle_stitch(tiles, grid, mode, swap_interval, reference=None):
    """``tiles``: (num_views, wr, wc, E) float64; returns (H, W, E) by the rules of section 8."""
    rows, cols = axis_cover(grid.rows), axis_cover(grid.cols)
    nc = grid.cols.num_views
    row_solo = {a: [k for k in range(grid.rows.window) if len(rows[(grid.rows.starts[a] + k) % grid.rows.length]) == 1]
                for a in range(grid.rows.num_views)}
    out = torch.empty(grid.rows.length, grid.cols.length, tiles.shape[-1], dtype=tiles.dtype)
    for r in range(grid.rows.length):
        for c in range(grid.cols.length):
            cover = [(a * nc + b, kr, kc) for a, kr in rows[r] for b, kc in cols[c]]
            if len(cover) == 1:
                v, kr, kc = cover[0]
                parity = ((kr - min(row_solo[v // nc])) // swap_interval) % 2
                out[r, c] = reference[kr, kc] if reference is not None and parity else tiles[v, kr, kc]
            elif mode == "swap":
                (a, kr), (b, kc) = axis_owner(rows[r], swap_interval), axis_owner(cols[c], swap_interval)
                out[r, c] = tiles[a * nc + b, kr, kc]
            else:
                wts = [oracle_weight(mode, kr, grid.rows.window) * oracle_weight(mode, kc, grid.cols.window)
                       for _, kr, kc in cover]
                out[r, c] = sum(wt * tiles[v, kr, kc] for wt, (v, kr, kc) in zip(wts, cover)) / sum(wts)
    return out


# -- random grids -----------------------------------------------------------------------------
@st.composite
def axes(draw, swap):
    loop = draw(st.booleans())
    window = draw(st.integers(1, 6))
    overlap = draw(st.integers(0, window // 2 if swap else window - 1))
    stride = window - overlap
    min_views = max(2, -(-window // stride)) if loop else 1
    num_views = draw(st.integers(min_views, max(min_views, 4)))
    length = num_views * stride if loop else window + (num_views - 1) * stride
    extra = draw(st.integers(0, max(0, num_views - (1 if loop else 2)))) if overlap >= 1 else 0
    return (ViewLayout.spaced(length + extra, window, num_views, loop) if extra
            else ViewLayout(length, window, overlap, loop))


@st.composite
def grid_cases(draw):
    mode = draw(st.sampled_from(sk.MODES))
    grid = GridLayout(draw(axes(mode == "swap")), draw(axes(mode == "swap")))
    ndim = draw(st.integers(2, 4))
    dims = draw(st.permutations(range(ndim)))[:2]
    shape = [draw(st.integers(1, 2)) for _ in range(ndim)]
    shape[dims[0]], shape[dims[1]] = grid.rows.length, grid.cols.length
    with_reference = draw(st.booleans())
    others = [d for d in range(ndim) if d not in dims]
    axis = draw(st.sampled_from([None, dims[0]] + others)) if with_reference else None
    return dict(grid=grid, dims=tuple(dims), shape=shape, mode=mode, swap_interval=draw(st.integers(1, 3)),
                with_reference=with_reference, reference_axis=axis,
                strided=draw(st.sampled_from(["contiguous", "permuted", "sliced"])))


def laid_out(x, how, g):
    """``x``'s values in memory of another layout: permuted dims, or a slice of a wider tensor."""
    if how == "permuted" and x.ndim > 1:
        perm = torch.randperm(x.ndim, generator=g).tolist()
        return x.permute(perm).contiguous().permute(np.argsort(perm).tolist())
    if how == "sliced":
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1] + 1, dtype=x.dtype)
        wide[..., 1::2] = x
        return wide[..., 1::2]
    return x


def tile_block(views, dims):
    """(num_views, *view shape) -> (num_views, wr, wc, E): the grid axes first, the rest flattened."""
    moved = views.movedim((dims[0] + 1, dims[1] + 1), (1, 2))
    return moved.reshape(moved.shape[0], moved.shape[1], moved.shape[2], -1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grid_cases())
def test_every_backend_follows_the_oracle(case):
    grid, dims, mode, si = case["grid"], case["dims"], case["mode"], case["swap_interval"]
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(case["shape"], generator=g, dtype=torch.float64)
    vshape = list(case["shape"])
    vshape[dims[0]], vshape[dims[1]] = grid.rows.window, grid.cols.window
    views = torch.randn([grid.num_views] + vshape, generator=g, dtype=torch.float64)
    reference = torch.randn(vshape, generator=g, dtype=torch.float64) if case["with_reference"] else None
    kw = dict(mode=mode, swap_interval=si, reference=reference, reference_axis=case["reference_axis"])
    views_in = laid_out(views, case["strided"], g)
    expected_views = gather(latent, grid, dims, backend="reference")
    expected = stitch(views, grid, dims, backend="reference", **kw)
    if reference is None or case["reference_axis"] in (None, dims[0]):  # the oracle's parity runs along the rows
        ref_block = None if reference is None else tile_block(reference[None], dims)[0]
        want = oracle_stitch(tile_block(views, dims), grid, mode, si, ref_block)
        got = expected.movedim(dims, (0, 1)).reshape(want.shape)
        torch.testing.assert_close(got, want, atol=1e-13, rtol=1e-13)
    for backend in KERNELS:
        assert torch.equal(gather(laid_out(latent, case["strided"], g), grid, dims, backend=backend), expected_views)
        assert_merged_equal(stitch(views_in, grid, dims, backend=backend, **kw), expected, mode)
        synced = sync_(views_in.clone(), grid, dims, backend=backend, **kw)
        assert_merged_equal(synced, gather(expected, grid, dims, backend="reference"), mode)


# -- awkward grids, every dtype ---------------------------------------------------------------
AWKWARD = {
    "one-row": GridLayout(ViewLayout(5, 5, 0), ViewLayout(13, 5, 1)),
    "one-column": GridLayout(ViewLayout(14, 5, 2), ViewLayout(4, 4, 0)),
    "loop-rows": GridLayout(ViewLayout(9, 5, 2, loop=True), ViewLayout(11, 5, 2)),
    "loop-cols": GridLayout(ViewLayout(7, 3, 1), ViewLayout(12, 6, 2, loop=True)),
    "torus": GridLayout(ViewLayout(8, 4, 2, loop=True), ViewLayout(9, 5, 2, loop=True)),
    "spaced": GridLayout(ViewLayout.spaced(14, 5, 3), ViewLayout.spaced(17, 6, 3, loop=True)),
    # one wide column: a run continues across canvas rows, 2 x 70 cells (past the C++ kernel's 64-cell tiles)
    "wide-column": GridLayout(ViewLayout(14, 5, 2), ViewLayout(70, 70, 0)),
}


def awkward_case(grid, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(2, 3, grid.rows.length, grid.cols.length, generator=g).to(dtype)
    views = torch.randn(grid.num_views, 2, 3, grid.rows.window, grid.cols.window, generator=g).to(dtype)
    reference = torch.randn(2, 3, grid.rows.window, grid.cols.window, generator=g).to(dtype)
    return latent, views, reference


def _awkward_params():
    """Every grid x dtype on C++; on Triton (its CPU interpreter runs ~2 ms per program) every grid
    but the wide column (C++'s 64-cell tiles) in float32, and the one-column grid in every dtype."""
    return [pytest.param(name, dtype, backend, id=f"{name}-{dtype}-{backend}")
            for backend in KERNELS for dtype in DTYPES for name in AWKWARD
            if backend != "triton" or (dtype == torch.float32 and name != "wide-column") or name == "one-column"]


@pytest.mark.parametrize("name,dtype,backend", _awkward_params())
def test_awkward_grids_every_dtype(name, dtype, backend):
    grid = AWKWARD[name]
    latent, views, reference = awkward_case(grid, dtype)
    assert torch.equal(gather(latent, grid, backend=backend), gather(latent, grid, backend="reference"))
    for mode in sk.MODES:
        if mode == "swap" and not grid.swappable:
            continue
        # swap_interval 1: the overlaps alternate cell by cell (runs two apart); 2: in pairs
        for interval in ((1, 2) if backend == "cpp" else (1,)):
            # the reference is one more plan source: Triton checks it on the swap alone
            refs = ((None, None), (reference, None), (reference, 1))
            for ref, axis in (refs if backend != "triton" or mode == "swap" else refs[:1]):
                kw = dict(mode=mode, swap_interval=interval, reference=ref, reference_axis=axis)
                expected = stitch(views, grid, backend="reference", **kw)
                assert_merged_equal(stitch(views, grid, backend=backend, **kw), expected, mode)
                assert_merged_equal(sync_(views.clone(), grid, backend=backend, **kw),
                                    gather(expected, grid, backend="reference"), mode)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_means_of_four_tiles_are_exact(backend):
    grid = GridLayout(ViewLayout(7, 4, 1), ViewLayout(9, 4, 1, loop=True))  # corners covered by four tiles
    views = torch.randn(grid.num_views, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = stitch(views, grid, mode="mean", backend=backend)[0]
    # canvas cell (3, 3): rows 3 of tile rows 0 (local 3) and 1 (local 0), likewise the columns
    nc = grid.cols.num_views
    corner = np.mean([views[0, 0, 3, 3].item(), views[1, 0, 3, 0].item(), views[nc, 0, 0, 3].item(),
                      views[nc + 1, 0, 0, 0].item()], dtype=np.float64)
    assert abs(out[3, 3].item() - corner) <= 1e-15 * abs(corner)


# -- the plan's runs ---------------------------------------------------------------------------
def expanded(plan, K):
    """A run plan's rows one cell each: {(ref_col, sources, weights, targets)} with padding dropped."""
    cells = set()
    for row, weights, run in zip(plan.index.tolist(), plan.weight.tolist(), plan.runs.tolist()):
        count, step, rows, src_row, out_row, ref_row = run
        sources = [(p, w) for p, w in zip(row[1:1 + K], weights) if p >= 0]
        targets = [p for p in row[1 + K:] if p >= 0]
        for i in range(rows):
            for j in range(0, count * step, step):
                cells.add((row[0] + j + i * ref_row if row[0] >= 0 else -1,
                           tuple(p + j + i * src_row for p, _ in sources), tuple(w for _, w in sources),
                           tuple(t + j + i * out_row for t in targets)))
    return cells


@pytest.mark.parametrize("name", AWKWARD)
def test_the_runs_are_the_cell_plan_grouped(name):
    """Expanding every run gives back the per-cell plan exactly (each cell once), and no run
    leaves the view it starts in (what the kernels step through by strides)."""
    grid = AWKWARD[name]
    longs = {"gather": (grid.canvas_cells, grid.view_cells), "stitch": (grid.view_cells, grid.canvas_cells),
             "sync": (grid.view_cells, grid.view_cells), "gather_adjoint": (grid.view_cells, grid.canvas_cells),
             "stitch_adjoint": (grid.canvas_cells, grid.view_cells),
             "reference_adjoint": (grid.canvas_cells, grid.view_cells)}
    for op in sk.plan.OPS:
        for mode in sk.MODES if op not in ("gather", "gather_adjoint", "reference_adjoint") else ["mean"]:
            if mode == "swap" and not grid.swappable:
                continue
            for ref in (REF_NONE, REF_LONG_AXIS, sk.plan.REF_OTHER_AXIS):
                for interval in (1, 2):
                    plan = sk.plan.build_plan(grid, op, mode, interval, ref)
                    K = plan.weight.shape[1]
                    cells = sk.plan.cell_rows(grid, op, mode, interval, ref)
                    want = {(r, tuple(s), tuple(w[:len(s)]), tuple(t)) for r, s, w, t in cells}
                    count, step, rows, src_row, out_row, ref_row = plan.runs.T
                    assert int((count * rows).sum()) == len(cells) == len(want)
                    assert expanded(plan, K) == want
                    src_long, out_long = longs[op]
                    last = ((count - 1) * step).view(-1, 1)  # the last cell's shift, per operand
                    T = plan.index.shape[1] - 1 - K
                    last = last + ((rows - 1) * torch.stack([src_row] * K + [out_row] * T, 1).T).T
                    pos, long_size = plan.index[:, 1:], torch.tensor([src_long] * K + [out_long] * T)
                    assert ((pos < 0) | (pos % long_size + last < long_size)).all()
                    ref_last = plan.index[:, 0] + (count - 1) * step + (rows - 1) * ref_row
                    assert ((plan.index[:, 0] < 0) | (ref_last < grid.view_cells)).all()


def test_an_image_grid_plan_is_a_few_runs_per_canvas_row():
    """SD at 2048 x 2048 px (docs/kernels.md section 8): 25 tiles of 64 x 64 overlapping by 16."""
    grid = GridLayout.covering(256, 256, 64, 16)
    stitch_swap = sk.plan.build_plan(grid, "stitch", "swap", 1, REF_NONE)
    # per canvas row: the 5 spans one tile owns, and each of 4 column overlaps as 2 runs two apart;
    # stacked over 13 bands of canvas rows: 5 row middles, and each of 4 row overlaps as 2 bands of
    # every other row
    assert stitch_swap.index.shape[0] == (5 + 4 * 2) * (5 + 4 * 2)
    count, step, rows, src_row, out_row, ref_row = stitch_swap.runs.T
    assert sorted(set(step.tolist())) == [1, 2] and int((count * rows).sum()) == 256 * 256
    assert set(zip(rows.tolist(), src_row.tolist(), out_row.tolist())) == {(49, 64, 256), (34, 64, 256),
                                                                          (7, 128, 512)}
    sync_mean = sk.plan.build_plan(grid, "sync", "mean", 1, REF_NONE)
    # the cells of the 4 row and 4 column overlap bands (16 x 256 each), their crossings once
    assert int((sync_mean.runs[:, 0] * sync_mean.runs[:, 2]).sum()) == 2 * 4 * 16 * 256 - (4 * 16) ** 2
    assert sync_mean.index.shape[0] == 56
    assert sk.plan.build_plan(ViewLayout(26, 10, 2), "stitch", "swap", 1, REF_NONE).runs is None  # strips: none


def test_bad_runs_are_refused_before_any_write():
    grid = AWKWARD["one-column"]
    plan = get_plan(grid, "sync", "mean", 1, REF_NONE, torch.device("cpu"))
    views = torch.randn(grid.num_views, 2, grid.view_cells, 3)
    before = views.clone()
    long_run = plan.runs.clone()
    long_run[0, 0] = grid.view_cells  # past the end of its view
    kernels = [sk.library.merge_op(b) for b in KERNELS]
    for runs, message in [(plan.runs[:, :2].contiguous(), "runs must be a contiguous int32 .P, 6."),
                          (plan.runs.long(), "runs must be a contiguous int32"),
                          (plan.runs[1:], "runs must be a contiguous int32")]:
        for kernel in kernels:
            with pytest.raises(RuntimeError, match=message):
                kernel(views, None, None, plan.index, plan.weight, [0, 1, 1, 1], runs)
    cpp = sk.library.merge_op("cpp")
    zero = plan.runs.clone()
    zero[0, 0] = 0
    negative = plan.runs.clone()
    negative[0, 3] = -1
    tall = plan.runs.clone()
    tall[0, 2:] = torch.tensor([grid.view_cells, 1, 1, 1])  # its rows past the end of its view
    for runs in (zero, negative):
        with pytest.raises(RuntimeError, match=r"merge_cpp_: runs\[0\] is \(.*\), expected a count, a step and "
                                               r"rows >= 1 and row strides >= 0"):
            cpp(views, None, None, plan.index, plan.weight, [0, 1, 1, 1], runs)
    for runs in (long_run, tall):
        with pytest.raises(RuntimeError, match=r"merge_cpp_: runs\[0\] takes index\[0, \d\] = .* past the end of "
                                               r"its view"):
            cpp(views, None, None, plan.index, plan.weight, [0, 1, 1, 1], runs)
    assert torch.equal(views, before)


# -- what section 8 states ------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", AWKWARD)
def test_swap_takes_every_cell_from_exactly_one_tile(name, backend):
    """Tiles of constant value v: the stitch is each cell's owner, and stitch(gather(J)) == J."""
    grid = AWKWARD[name]
    owners = torch.arange(grid.num_views, dtype=torch.float64).view(-1, 1, 1, 1).expand(
        -1, 1, grid.rows.window, grid.cols.window).contiguous()
    tiles = torch.arange(grid.num_views * grid.rows.window * grid.cols.window, dtype=torch.float64).view(
        grid.num_views, grid.rows.window, grid.cols.window, 1)
    got = stitch(tiles.movedim(-1, 1), grid, mode="swap", backend=backend)[0]
    want = oracle_stitch(tiles, grid, "swap", 1)[..., 0]
    assert torch.equal(got, want)  # every cell is one tile's value, bitwise: the owner the oracle derives
    assert set(stitch(owners, grid, mode="swap", backend=backend).unique().tolist()) <= set(range(grid.num_views))
    latent = torch.randn(1, grid.rows.length, grid.cols.length, dtype=torch.float64)
    assert torch.equal(stitch(gather(latent, grid, backend=backend), grid, mode="swap", backend=backend), latent)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", sk.MODES)
def test_a_one_row_grid_is_the_strip(backend, mode):
    """One row of tiles is the 1-D layout along the columns, its reference swap the image's row swap."""
    cols = ViewLayout.covering(20, 6, 2 if mode == "swap" else 4)
    grid = GridLayout(ViewLayout(5, 5, 0), cols)
    g = torch.Generator().manual_seed(1)
    views = torch.randn(cols.num_views, 2, 5, 6, generator=g, dtype=torch.float64)
    reference = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    for ref, axis in ((None, None), (reference, -2)):
        kw = dict(mode=mode, swap_interval=2, reference=ref)
        strip = stitch(views, cols, -1, reference_axis=axis, backend=backend, **kw)
        assert_merged_equal(stitch(views, grid, (-2, -1), backend=backend, **kw), strip, mode)


@pytest.mark.parametrize("name", AWKWARD)
def test_the_in_place_sync_touches_only_the_overlap_cells(name):
    grid = AWKWARD[name]
    rows, cols = axis_cover(grid.rows), axis_cover(grid.cols)
    shared = sum(1 for r in rows for c in cols if len(rows[r]) * len(cols[c]) > 1)
    for mode in sk.MODES:
        if mode == "swap" and not grid.swappable:
            continue
        index, _, runs = get_plan(grid, "sync", mode, 1, REF_NONE, torch.device("cpu"))
        # a cell per canvas cell covered by two tiles or more, nothing else
        assert (runs[:, 0] * runs[:, 2]).sum() == shared
        assert index.shape[0] <= shared  # in runs of cells
    views = torch.randn(grid.num_views, 1, grid.rows.window, grid.cols.window)
    middles = views.clone()
    sync_(views, grid, mode="mean", backend=KERNELS[0])
    for v in range(grid.num_views):
        (r0, r1), (c0, c1) = grid.middle(v)
        assert torch.equal(views[v, :, r0:r1, c0:c1], middles[v, :, r0:r1, c0:c1])


@pytest.mark.parametrize("backend,dims", [(b, d) for b in KERNELS for d in [(1, 3), (3, 1), (-1, -2), (0, 2)]
                                           # Triton's interpreter: one order each way (the others on C++)
                                           if b != "triton" or d in ((3, 1), (0, 2))])
def test_any_two_axes_any_order(backend, dims):
    grid = AWKWARD["torus"]
    shape = [2, 3, 2, 3]
    shape[dims[0]], shape[dims[1]] = grid.rows.length, grid.cols.length
    latent = torch.randn(shape, dtype=torch.float64)
    views = gather(latent, grid, dims, backend=backend)
    assert views.is_contiguous() and torch.equal(views, gather(latent, grid, dims, backend="reference"))
    views = views + torch.randn_like(views)
    for mode in ("swap", "gaussian"):
        expected = stitch(views, grid, dims, mode=mode, backend="reference")
        assert_merged_equal(stitch(views, grid, dims, mode=mode, backend=backend), expected, mode)
        assert_merged_equal(sync_(views.clone(), grid, dims, mode=mode, backend=backend),
                            gather(expected, grid, dims, backend="reference"), mode)


# -- the layout --------------------------------------------------------------------------------
def test_grid_layout_geometry_cache_and_constructors():
    grid = GridLayout.covering(100, 70, window=(32, 24), overlap=(8, 6), loop=(False, True))
    assert (grid.rows, grid.cols) == (ViewLayout.covering(100, 32, 8), ViewLayout.covering(70, 24, 6, loop=True))
    assert grid.num_views == grid.rows.num_views * grid.cols.num_views and grid.swappable
    assert sk.layout.layout_from_geometry(grid.geometry) == grid and hash(GridLayout(grid.rows, grid.cols)) == hash(grid)
    assert sk.intern_layout(GridLayout(grid.rows, grid.cols)) is sk.intern_layout(grid)
    assert grid != grid.rows and GridLayout(grid.cols, grid.rows) != grid
    spaced = GridLayout.spaced(30, 41, 8, (4, 6), loop=(True, False))
    assert spaced.rows == ViewLayout.spaced(30, 8, 4, True) and spaced.cols == ViewLayout.spaced(41, 8, 6)
    assert grid.tile(grid.cols.num_views + 1) == (1, 1)
    assert grid.middle(0) == (grid.rows.middle(0), grid.cols.middle(0))


def test_bad_grids_and_arguments_name_the_parameter():
    with pytest.raises(TypeError, match="rows must be a ViewLayout"):
        GridLayout(5, ViewLayout(5, 5, 0))
    with pytest.raises(ValueError, match=r"cols: .* view cells, more than the kernels address .*cols.num_views must "
                                         r"be <= \d+"):
        GridLayout(ViewLayout.covering(60000, 64, 0), ViewLayout.covering(60000, 64, 0))
    with pytest.raises(ValueError, match="window must be one value or a pair"):
        GridLayout.covering(10, 10, (4, 4, 4), 1)
    grid = AWKWARD["torus"]
    latent = torch.randn(2, grid.rows.length, grid.cols.length)
    views = gather(latent, grid)
    with pytest.raises(ValueError, match=r"dim must be a pair \(rows axis, columns axis\)"):
        gather(latent, grid, -1)
    with pytest.raises(ValueError, match="dim must name two different axes"):
        stitch(views, grid, (-1, 2))
    with pytest.raises(ValueError, match=r"dim\[1\] must be in \[-3, 2\]"):
        stitch(views, grid, (1, 3))
    with pytest.raises(ValueError, match=r"latent must have the layout's length \(8, 9\)"):
        gather(latent[:, 1:], grid)
    with pytest.raises(ValueError, match=r"views must have 12 views on dim 0 and the layout's window \(4, 5\)"):
        sync_(views[:, :, 1:], grid)
    with pytest.raises(ValueError, match="mode='swap' needs overlap <= window / 2"):
        stitch(torch.zeros(4, 1, 5, 4), GridLayout(ViewLayout(7, 5, 3), ViewLayout(7, 4, 1)), mode="swap")
    with pytest.raises(ValueError, match="reference_axis must not be a grid's columns axis"):
        stitch(views, grid, reference=views[0], reference_axis=-1)
    with pytest.raises(ValueError, match="must be one of"):
        stitch(views, grid, mode="median")


# -- opcheck and autograd ----------------------------------------------------------------------
@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck_grid_ops(backend):
    # Triton's interpreter runs ~2 ms per program: a smaller grid (still runs of several cells) there
    grid = AWKWARD["one-column" if backend == "triton" else "spaced"]
    g = torch.Generator().manual_seed(2)
    latent = torch.randn(2, grid.canvas_cells, 3, generator=g, dtype=torch.float64)  # the merged axis
    views = torch.randn(grid.num_views, 2, grid.view_cells, 3, generator=g, dtype=torch.float64)
    reference = torch.randn(2, grid.view_cells, 3, generator=g, dtype=torch.float64)
    geometry = list(grid.geometry)
    for op, args in [("gather", (latent, geometry, 1, backend)), ("gather_adjoint", (views, geometry, 1, backend)),
                     ("stitch", (views, reference, geometry, 1, "gaussian", 2, 1, backend)),
                     ("stitch", (views, reference, geometry, 1, "triangular", 1, 2, backend)),
                     ("stitch_adjoint", (latent, geometry, 1, "mean", 2, 1, backend)),
                     ("reference_adjoint", (latent, geometry, 1, 2, 0, backend))]:
        torch.library.opcheck(getattr(torch.ops.safa, op).default, args)
    # The plan executor itself, with every grid plan's runs: in place, and from latent / views.
    canonical_latent, canonical_views = latent[None], views.clone()
    for op, src, out, ref_kind, ref in [
            ("sync", None, canonical_views, REF_NONE, None),
            ("sync", None, canonical_views, REF_LONG_AXIS, reference),
            ("gather", canonical_latent, canonical_views, REF_NONE, None),
            ("stitch", canonical_views.clone(), canonical_latent.clone(), REF_LONG_AXIS, reference),
            ("gather_adjoint", canonical_views.clone(), canonical_latent.clone(), REF_NONE, None),
            ("stitch_adjoint", canonical_latent.clone(), canonical_views, REF_NONE, None),
            ("reference_adjoint", canonical_latent.clone(), reference.clone()[None], REF_LONG_AXIS, None)]:
        plan = get_plan(grid, op, "triangular", 1, ref_kind, torch.device("cpu"))
        assert plan.runs is not None and plan.runs[:, 0].max() > 1
        torch.library.opcheck(sk.library.merge_op(backend),
                              (out, src, ref, plan.index, plan.weight, [0, 1, 1, 1], plan.runs))


@pytest.mark.parametrize("backend,mode", [(b, m) for b in KERNELS for m in sk.MODES
                                           # Triton's interpreter is slow: the swap's adjoint plan there
                                           if b != "triton" or m == "swap"])
def test_gradcheck_grid(backend, mode):
    """Finite differences (fast mode: random projections of the Jacobian), reverse and forward
    mode, second order, and the same gradients as PyTorch's derivatives of the reference."""
    if mode == "swap":  # Triton's interpreter runs ~2 ms per program: a smaller grid there
        grid = GridLayout(ViewLayout(5, 3, 1), ViewLayout(6, 3, 1, True)) if backend == "triton" else AWKWARD["loop-cols"]
    else:
        grid = GridLayout(ViewLayout(5, 3, 2), ViewLayout(6, 3, 1, True))
    g = torch.Generator().manual_seed(4)
    latent = torch.randn(1, grid.rows.length, grid.cols.length, generator=g, dtype=torch.float64, requires_grad=True)
    views = torch.randn(grid.num_views, 1, grid.rows.window, grid.cols.window, generator=g, dtype=torch.float64,
                        requires_grad=True)
    reference = torch.randn(1, grid.rows.window, grid.cols.window, generator=g, dtype=torch.float64,
                            requires_grad=True)
    check = dict(fast_mode=True, check_forward_ad=True)
    assert torch.autograd.gradcheck(lambda x: gather(x, grid, backend=backend), (latent,), **check)
    for axis in (None, 0):
        def merge(v, r):
            return stitch(v, grid, mode=mode, swap_interval=2, reference=r, reference_axis=axis, backend=backend)

        def synced(v, r):
            return sync_(v.clone(), grid, mode=mode, reference=r, reference_axis=axis, backend=backend)

        assert torch.autograd.gradcheck(merge, (views, reference), **check)
        assert torch.autograd.gradcheck(synced, (views, reference), **check)
        assert torch.autograd.gradgradcheck(merge, (views, reference), fast_mode=True)
        cot = torch.randn(1, grid.rows.length, grid.cols.length, generator=g, dtype=torch.float64)
        ours = torch.autograd.grad(merge(views, reference), (views, reference), cot)
        theirs = torch.autograd.grad(stitch(views, grid, mode=mode, swap_interval=2, reference=reference,
                                            reference_axis=axis, backend="reference"), (views, reference), cot)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dims", [(-2, -1), (-1, -2), (0, 2)])
def test_the_naive_per_tile_loop_is_the_same_merge(dims):
    """safa_kernels.naive's grid loop (the benchmarks' baseline) against the ops."""
    grid = GridLayout.covering(20, 25, (8, 6), (2, 3))
    shape = [3, 2, 2]
    shape[dims[0]], shape[dims[1]] = grid.rows.length, grid.cols.length
    latent = torch.randn(shape, dtype=torch.float64)
    views = gather(latent, grid, dims)
    assert torch.equal(naive.gather_grid(latent, grid, dims), views)
    views = views + torch.randn_like(views)
    for mode in naive.GRID_MODES:
        expected = stitch(views, grid, dims, mode=mode)
        torch.testing.assert_close(naive.stitch_grid(views, grid, dims, mode), expected, atol=1e-13, rtol=1e-13)
        torch.testing.assert_close(naive.sync_grid_(views.clone(), grid, dims, mode), gather(expected, grid, dims),
                                   atol=1e-13, rtol=1e-13)
    with pytest.raises(ValueError, match="mode must be one of"):
        naive.stitch_grid(views, grid, dims, "swap")
    with pytest.raises(ValueError, match="must be False"):
        naive.gather_grid(torch.zeros(8, 9), AWKWARD["torus"])
