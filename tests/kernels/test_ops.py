"""Every kernel backend against the reference (docs/kernels.md, sections 2-3), plus API contracts.

Copies (gather, swap stitch/sync, reference swap) must be bitwise equal to the reference
on every backend and dtype; averages agree to a tight tolerance.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import safa_kernels as sk
from safa_kernels import ViewLayout, gather, reference, stitch, sync_
from op_args import DTYPES, assert_merged_equal, op_args

KERNELS = [b for b in sk.available_backends("cpu") if b != "reference"]


# -- a random case: layout, latent shape, dim, layout of memory ---------------------------
@st.composite
def cases(draw, modes=sk.MODES):
    mode = draw(st.sampled_from(modes))
    loop = draw(st.booleans())
    window = draw(st.integers(1, 12))
    overlap = draw(st.integers(0, window // 2 if mode == "swap" else window - 1))
    stride = window - overlap
    min_views = max(2, -(-window // stride)) if loop else 1
    num_views = draw(st.integers(min_views, max(min_views, 9)))
    length = num_views * stride if loop else window + (num_views - 1) * stride
    # Spaced layouts: a few more columns spread over the strides (overlaps o and o - 1).
    extra = draw(st.integers(0, max(0, num_views - (1 if loop else 2)))) if overlap >= 1 else 0
    layout = (ViewLayout.spaced(length + extra, window, num_views, loop) if extra
              else ViewLayout(length, window, overlap, loop))
    length = layout.length
    ndim = draw(st.integers(1, 4))
    shape = [draw(st.integers(1, 3)) for _ in range(ndim)]
    dim = draw(st.integers(-ndim, ndim - 1))
    shape[dim] = length
    with_reference = draw(st.booleans())
    reference_axis = draw(st.one_of(st.none(), st.integers(0, ndim - 1))) if with_reference else None
    return dict(layout=layout, shape=shape, dim=dim, mode=mode, swap_interval=draw(st.integers(1, 4)),
                with_reference=with_reference, reference_axis=reference_axis,
                strided=draw(st.sampled_from(["contiguous", "permuted", "sliced"])))


def brute_force_stitch(views, layout, mode, swap_interval, reference=None):
    """The merge rules written out column by column on a 1-D latent (an oracle independent of
    the reference's per-pair vectorised code): one view -> copy, or the reference where the
    column is in the view's middle at an odd parity (Eq. 10); swap -> of the two views, the
    one holding the column in its right part (the larger local column) unless the other's
    local column q has floor(q / w_swap) odd; mean / triangular weights otherwise."""
    w = layout.window
    out = []
    for col in range(layout.length):
        cover = layout.coverage(col)
        assert cover and all(layout.columns(v)[k] == col for v, k in cover)
        if len(cover) == 1:
            v, k = cover[0]
            lo, hi = layout.middle(v)
            take_reference = reference is not None and lo <= k < hi and ((k - lo) // swap_interval) % 2 == 1
            out.append(reference[k] if take_reference else views[v, k])
        elif mode == "swap":
            (vi, ki), (vj, kj) = sorted(cover, key=lambda c: -c[1])
            out.append(views[vj, kj] if (kj // swap_interval) % 2 else views[vi, ki])
        else:
            wts = [1.0 if mode == "mean" else float(min(k + 1, w - k)) if mode == "triangular"
                   else math.exp(-((k - (w - 1) / 2) / w) ** 2 / 0.02) for _, k in cover]  # gaussian: sigma 0.1 w
            out.append(sum(wt * views[v, k] for wt, (v, k) in zip(wts, cover)) / sum(wts))
    return torch.stack(out)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sk.MODES), st.booleans(), st.integers(2, 12), st.integers(1, 8), st.integers(0, 7),
       st.integers(1, 3))
def test_layouts_follow_the_merge_rules(mode, loop, window, num_views, extra, swap_interval):
    # Views spread evenly over lengths that no uniform stride fits.
    overlap = min(window // 3 + 1, window // 2) if mode == "swap" else window - 1
    stride = window - overlap
    num_views = max(num_views, 2 if loop else 1, -(-window // stride) if loop else 1)
    length = (num_views * stride if loop else window + (num_views - 1) * stride) + extra % num_views
    layout = ViewLayout.spaced(length, window, num_views, loop)
    assert layout.length == length and layout.num_views == num_views
    strides = [layout.view_stride(v) for v in range(num_views - (0 if loop else 1))]
    assert max(strides, default=0) - min(strides, default=0) <= 1
    # coverage() is the exact inverse of columns(): every cell over exactly one column
    cells = sorted((v, k) for c in range(length) for v, k in layout.coverage(c))
    assert cells == [(v, k) for v in range(num_views) for k in range(window)]
    if mode == "swap" and 2 * layout.overlap > window:
        return
    views = torch.randn(num_views, window, dtype=torch.float64)
    ref = torch.randn(window, dtype=torch.float64)
    for with_ref in (None, ref):
        expected = brute_force_stitch(views, layout, mode, swap_interval, with_ref)
        torch.testing.assert_close(reference.stitch(views, layout, 0, mode, swap_interval, with_ref), expected)
        # sync_ leaves every view equal to its window of the merged latent
        synced = reference.sync_(views.clone(), layout, 0, mode, swap_interval, with_ref)
        torch.testing.assert_close(synced, torch.stack([expected[layout.columns(v)] for v in range(num_views)]))
        for backend in KERNELS:
            torch.testing.assert_close(stitch(views, layout, 0, mode, swap_interval, with_ref, backend=backend),
                                       expected)


def make(shape, strided, generator, dtype=torch.float32, lead=0):
    """A tensor of `shape` (after `lead` leading dims) laid out contiguously, permuted or sliced."""
    if strided == "permuted":  # memory order reversed: no dims collapse
        base = torch.randn(list(reversed(shape)), generator=generator).to(dtype)
        return base.permute(*reversed(range(len(shape))))
    if strided == "sliced":  # every other element of a bigger buffer on the last dim
        base = torch.randn(shape[:-1] + [2 * shape[-1]], generator=generator).to(dtype)
        return base[..., ::2]
    return torch.randn(shape, generator=generator).to(dtype)


def run_case(case, backend, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    layout, dim = case["layout"], case["dim"]
    latent = make(case["shape"], case["strided"], g, dtype)
    view_shape = list(case["shape"])
    view_shape[dim] = layout.window
    views = make([layout.num_views] + view_shape, case["strided"], g, dtype)
    ref = make(view_shape, case["strided"], g, dtype) if case["with_reference"] else None
    kw = dict(mode=case["mode"], swap_interval=case["swap_interval"], reference=ref,
              reference_axis=case["reference_axis"])

    assert torch.equal(gather(latent, layout, dim, backend=backend), reference.gather(latent, layout, dim))
    expected = reference.stitch(views, layout, dim, **kw)
    assert_merged_equal(stitch(views, layout, dim, backend=backend, **kw), expected, case["mode"])
    synced = views.clone()  # keeps `views`' strides, so sync_ runs on a strided tensor
    assert sync_(synced, layout, dim, backend=backend, **kw) is synced
    assert_merged_equal(synced, reference.gather(expected, layout, dim), case["mode"])


@pytest.mark.parametrize("backend", KERNELS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_backend_matches_reference(backend, case):
    run_case(case, backend)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", sk.MODES)
@pytest.mark.parametrize("loop", [False, True])
def test_every_dtype(backend, dtype, mode, loop):
    layout = ViewLayout.covering(40, 12, 6 if mode == "swap" else 9, loop=loop)
    for dim, axis in [(-2, None), (-2, 1), (-1, -2)]:
        shape = [2, 3, 5, 4]
        shape[dim] = layout.length
        case = dict(layout=layout, shape=shape, dim=dim, mode=mode, swap_interval=2, with_reference=True,
                    reference_axis=axis, strided="contiguous")
        run_case(case, backend, dtype)


# -- docs/kernels.md section 3 equivalences, on every kernel backend (the reference's sync_ is
# gather(stitch()) by definition: it is checked against the brute-force oracle above instead) --
@pytest.mark.parametrize("backend", KERNELS)
@settings(max_examples=25, deadline=None)
@given(case=cases())
def test_sync_equals_gather_of_stitch(backend, case):
    g = torch.Generator().manual_seed(1)
    layout, dim = case["layout"], case["dim"]
    shape = list(case["shape"])
    shape[dim] = layout.window
    views = torch.randn([layout.num_views] + shape, generator=g)
    ref = torch.randn(shape, generator=g) if case["with_reference"] else None
    kw = dict(mode=case["mode"], swap_interval=case["swap_interval"], reference=ref,
              reference_axis=case["reference_axis"], backend=backend)
    expected = gather(stitch(views, layout, dim, **kw), layout, dim, backend=backend)
    assert_merged_equal(sync_(views, layout, dim, **kw), expected, case["mode"])


@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
@settings(max_examples=25, deadline=None)
@given(case=cases(modes=("swap",)))
def test_stitch_inverts_gather_in_swap_mode(backend, case):
    latent = torch.randn(case["shape"], generator=torch.Generator().manual_seed(2))
    layout, dim = case["layout"], case["dim"]
    views = gather(latent, layout, dim, backend=backend)
    assert torch.equal(stitch(views, layout, dim, swap_interval=case["swap_interval"], backend=backend), latent)


@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
@pytest.mark.parametrize("mode", sk.MODES)
def test_loop_layout_is_shift_equivariant(backend, mode):
    # Rolling the views by one (view i takes view i-1's content) rolls J by one stride.
    layout = ViewLayout.covering(60, 16, 8 if mode == "swap" else 12, loop=True)
    views = torch.randn(layout.num_views, 2, 16, 3, generator=torch.Generator().manual_seed(3))
    merged = stitch(views, layout, -2, mode=mode, backend=backend)
    rolled = stitch(views.roll(1, dims=0), layout, -2, mode=mode, backend=backend)
    assert_merged_equal(rolled, merged.roll(layout.stride, dims=-2), mode)


def test_swap_parity_follows_spec_by_hand():
    # window 8, overlap 4, swap_interval 1: overlap offsets 0, 2 keep view 0; 1, 3 take view 1.
    layout = ViewLayout(12, 8, 4)
    views = torch.stack([torch.zeros(8), torch.ones(8)])
    assert stitch(views, layout, dim=0).tolist() == [0, 0, 0, 0, 0, 1, 0, 1, 1, 1, 1, 1]
    # swap_interval 2 alternates in pairs; the reference fills odd pairs of each middle.
    ref = torch.full((8,), 7.0)
    merged = stitch(views, layout, dim=0, swap_interval=2, reference=ref)
    assert merged.tolist() == [0, 0, 7, 7, 0, 0, 1, 1, 1, 1, 7, 7]


# -- float64 averages: exact to float64 --------------------------------------------------------
def numpy_average(views: np.ndarray, layout: ViewLayout, mode: str) -> np.ndarray:
    """The weighted mean of every covering view in float64, column by column (views (n, rows, window))."""
    total = np.zeros(views.shape[1:2] + (layout.length,))
    weights = np.zeros(layout.length)
    window = layout.window
    tri = np.minimum(np.arange(window) + 1, window - np.arange(window)).astype(np.float64)
    for view, start in enumerate(layout.starts):
        columns = (start + np.arange(window)) % layout.length
        w = np.ones(window) if mode == "mean" else tri
        np.add.at(total, (slice(None), columns), views[view] * w)
        np.add.at(weights, columns, w)
    return total / weights


@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
@pytest.mark.parametrize("mode", ["mean", "triangular"])
@pytest.mark.parametrize("layout", [ViewLayout(12, 6, 4), ViewLayout(20, 10, 8), ViewLayout(24, 10, 8, loop=True)],
                         ids=["3-views", "5-views", "5-views-loop"])
def test_float64_averages_are_exact(backend, mode, layout):
    # Columns covered by 3 (resp. 5) views: their mean in float64 is what numpy computes in
    # float64, to rounding (the plan's weights are float64; float32 ones were 1e-8 off).
    assert max(len(layout.coverage(c)) for c in range(layout.length)) == (3 if layout.length == 12 else 5)
    views = torch.randn(layout.num_views, 4, layout.window, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(11)) * 100
    expected = numpy_average(views.numpy(), layout, mode)
    merged = stitch(views, layout, dim=-1, mode=mode, backend=backend)
    synced = sync_(views.clone(), layout, dim=-1, mode=mode, backend=backend)
    scale = np.abs(expected).max()
    assert np.abs(merged.numpy() - expected).max() <= 1e-15 * scale
    assert np.abs(synced.numpy() - reference.gather(torch.from_numpy(expected), layout, -1).numpy()).max() \
        <= 1e-15 * scale


# -- op registration ------------------------------------------------------------------------
def _op_args(mode: str = "swap", in_place: bool = False, with_reference: bool = True):
    return op_args(mode, in_place, with_reference, torch.device("cpu"))


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("mode,in_place,with_reference",
                         [("swap", False, True), ("swap", True, True), ("mean", True, False), ("triangular", False, False)])
def test_opcheck(backend, mode, in_place, with_reference):
    op = getattr(torch.ops.safa, f"merge_{backend}_").default
    torch.library.opcheck(op, _op_args(mode, in_place, with_reference))


@pytest.mark.parametrize("backend", KERNELS)
def test_torch_compile_fullgraph(backend):
    layout = ViewLayout.covering(50, 16, 4, loop=True)

    def step(views, ref):
        views = views * 0.5
        sync_(views, layout, dim=-2, reference=ref, backend=backend)
        return stitch(views, layout, dim=-2, mode="triangular", backend=backend)

    views, ref = torch.randn(layout.num_views, 2, 16, 4), torch.randn(2, 16, 4)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(views, ref), step(views, ref))


def test_backend_selection():
    assert sk.available_backends("cpu")[-1] == "reference"
    assert sk.resolve_backend(None, torch.device("cpu")) == sk.available_backends("cpu")[0]
    assert sk.resolve_backend("reference", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        sk.resolve_backend("fast", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="not available"):
        sk.resolve_backend("cuda", torch.device("cpu"))


def test_backend_environment_variable(monkeypatch):
    monkeypatch.setenv("SAFA_BACKEND", "reference")
    assert sk.resolve_backend(None, torch.device("cpu")) == "reference"
    monkeypatch.setenv("SAFA_BACKEND", "nope")
    with pytest.raises(ValueError, match="SAFA_BACKEND|backend must be one of"):
        gather(torch.randn(2, 8, 3), ViewLayout(8, 8, 0), dim=1)


# -- bad input: a clear error naming the parameter ------------------------------------------
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(length=10, window=4, overlap=4), ValueError, "overlap must be in"),
    (dict(length=10, window=4, overlap=-1), ValueError, "overlap must be >= 0"),
    (dict(length=3, window=4, overlap=1), ValueError, r"window \(4\) must be <= length"),
    (dict(length=10, window=0, overlap=0), ValueError, "window must be >= 1"),
    (dict(length=11, window=4, overlap=1), ValueError, "do not cover length 11 exactly"),
    (dict(length=10, window=4, overlap=1, loop=True), ValueError, "multiple of stride"),
    (dict(length=4, window=4, overlap=0, loop=True), ValueError, "at least 2 views"),
    (dict(length=10.0, window=4, overlap=1), TypeError, "length must be an int"),
])
def test_layout_rejects(kwargs, error, match):
    with pytest.raises(error, match=match):
        ViewLayout(**kwargs)


def test_covering():
    layout = ViewLayout.covering(1000, 256, 51)
    assert layout.length >= 1000 and layout.length - layout.stride < 1000 and not layout.loop
    assert ViewLayout.covering(10, 256, 51).num_views == 1
    loop = ViewLayout.covering(1000, 256, 51, loop=True)
    assert loop.length == loop.num_views * loop.stride >= 1000 > loop.length - loop.stride
    assert ViewLayout.covering(10, 64, 56, loop=True).length >= 64  # window <= length holds
    with pytest.raises(ValueError, match="min_length must be >= 1"):
        ViewLayout.covering(0, 8, 2)


def _bad_calls():
    layout = ViewLayout(20, 8, 2)
    views = torch.randn(3, 2, 8, 4)
    ok = dict(views=views, layout=layout, dim=-2)
    yield dict(ok, mode="median"), ValueError, "mode must be one of"
    yield dict(ok, swap_interval=0), ValueError, "swap_interval must be >= 1"
    yield dict(ok, swap_interval=1.5), TypeError, "swap_interval must be an int"
    yield dict(ok, dim=3), ValueError, r"dim must be in \[-3, 2\] for a 3-d latent"
    yield dict(ok, views=torch.randn(2, 2, 8, 4)), ValueError, "views must have 3 views"
    yield dict(ok, views=torch.randn(3, 2, 7, 4)), ValueError, "window 8"
    yield dict(ok, views=torch.randn(3, 2, 8, 4).int()), TypeError, "floating dtype"
    yield dict(ok, views=[1, 2]), TypeError, "views must be a torch.Tensor"
    yield dict(ok, layout=(20, 8, 2)), TypeError, "layout must be a ViewLayout"
    yield dict(ok, reference=torch.randn(2, 8, 5)), ValueError, "reference must have one view's shape"
    yield dict(ok, reference=torch.randn(2, 8, 4).double()), ValueError, "reference must match"
    yield dict(ok, reference=torch.randn(2, 8, 4), reference_axis=3), ValueError, "reference_axis must be in"
    yield dict(ok, reference_axis=0), ValueError, "reference_axis was given without a reference"
    yield dict(ok, layout=ViewLayout(11, 8, 5), views=torch.randn(2, 2, 8, 4)), ValueError, "overlap <= window / 2"


@pytest.mark.parametrize("fn", [stitch, sync_])
@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
def test_merge_rejects(fn, backend):
    for kwargs, error, match in _bad_calls():
        with pytest.raises(error, match=match):
            fn(backend=backend, **kwargs)


@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
def test_gather_rejects(backend):
    layout = ViewLayout(20, 8, 2)
    with pytest.raises(ValueError, match="latent has 21 columns on dim 1, layout.length is 20"):
        gather(torch.randn(2, 21, 4), layout, dim=1, backend=backend)
    with pytest.raises(ValueError, match=r"dim must be in \[-3, 2\]"):
        gather(torch.randn(2, 20, 4), layout, dim=-4, backend=backend)


def test_averaging_accepts_large_overlap():
    # MultiDiffusion's own default is window 64, stride 8: seven eighths overlap.
    layout = ViewLayout.covering(200, 64, 56)
    views = torch.randn(layout.num_views, 1, 4, 64)
    for mode in ("mean", "triangular"):
        assert stitch(views, layout, dim=-1, mode=mode).shape == (1, 4, layout.length)


def test_package_works_without_the_extension(tmp_path):
    # A copy of the Python sources without the built _C: one warning that names it, and the
    # reference does the merging.
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    shutil.copytree(Path(sk.__file__).parent, tmp_path / "safa_kernels",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    code = """
import sys, warnings
# An editable install maps the package to the source tree, built _C included: drop that finder.
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, safa_kernels as sk
assert sk.__file__.startswith(%r), sk.__file__
mine = [str(w.message) for w in caught if "safa_kernels" in str(w.message)]
assert len(mine) == 1 and "safa_kernels._C is not built" in mine[0], mine
assert "cpp" not in sk.available_backends("cpu")
layout = sk.ViewLayout(20, 8, 2)
x = torch.randn(2, 20, 3)
assert torch.equal(sk.stitch(sk.gather(x, layout, 1), layout, 1), x)
print("ok")
""" % str(tmp_path)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)}, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_plan_rejects_unknown_op():
    from safa_kernels.plan import REF_NONE, build_plan
    with pytest.raises(ValueError, match="op must be one of"):
        build_plan(ViewLayout(20, 8, 2), "scatter", "swap", 1, REF_NONE)
