"""Tests specific to the compiled CPU kernel (`safa::merge_cpp_`, csrc/merge_cpu.cpp).

The generic backend-vs-reference suite is tests/kernels/test_ops.py; this file covers what only
the C++ kernel can get wrong: loading, its copy-run fast path (runs must stop at view
boundaries), parallel chunks on larger plans, strides the fast paths do not expect,
empty work, bit-exact copies of arbitrary bit patterns, and its argument checks.
"""
import pytest
import torch

import safa_kernels as sk
from safa_kernels import ViewLayout, _extension, reference, stitch, sync_
from safa_kernels.plan import REF_LONG_AXIS, REF_NONE, REF_OTHER_AXIS, build_plan

from plan_executor import execute

needs_cpp = pytest.mark.skipif(not _extension.LOADED, reason="safa_kernels._C is not built")
merge_cpp_ = torch.ops.safa.merge_cpp_.default
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
        torch.bfloat16: torch.int16}


def test_extension_loads_and_registers_the_cpu_kernel():
    assert _extension.LOADED, f"safa_kernels._C failed to import: {_extension.ERROR}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("safa::merge_cpp_", "CPU")
    assert sk.available_backends("cpu")[0] == "cpp"


def strided(shape, dtype=torch.float32, inner_step=3, seed=0):
    """A 4-D tensor whose inner axis has stride `inner_step` and whose memory order is
    (long, view, inner-ish, outer): none of the kernel's dense fast paths apply."""
    g = torch.Generator().manual_seed(seed)
    D, O, L, I = shape
    base = torch.randn(L, D, I * inner_step, O, generator=g).to(dtype)
    return base[:, :, ::inner_step, :].permute(1, 3, 0, 2)


def random_bits(shape, dtype, seed=0):
    """Every bit pattern is possible, NaN payloads, infinities and subnormals included."""
    g = torch.Generator().manual_seed(seed)
    info = torch.iinfo(BITS[dtype])
    return torch.randint(info.min, info.max, shape, generator=g, dtype=BITS[dtype]).view(dtype)


def plan_case(op, mode, ref_kind, layout):
    plan = build_plan(layout, op, mode, 2, ref_kind)
    return plan.index, plan.weight


# -- the kernel against the row-by-row model of the plan contract --------------------------
STRIDED_CASES = [("gather", "swap", "none"), ("gather_adjoint", "swap", "none")] + [
    (op, mode, ref) for op in ("stitch", "sync", "stitch_adjoint") for mode in ("swap", "mean", "triangular")
    for ref in ("none", "long", "outer", "inner")] + [("reference_adjoint", "mean", ref) for ref in ("long", "outer")]


@needs_cpp
@pytest.mark.parametrize("op,mode,ref", STRIDED_CASES, ids=["-".join(c) for c in STRIDED_CASES])
def test_strided_operands_match_plan_executor(op, mode, ref):
    # Mean runs on a loop layout so that the wrap-around pair is covered too.
    layout = (ViewLayout(length=4 * 5, window=8, overlap=3, loop=True) if mode == "mean"
              else ViewLayout(length=8 + 3 * 5, window=8, overlap=3))
    O, I = 6, 5
    ref_kind = {"none": REF_NONE, "long": REF_LONG_AXIS}.get(ref, REF_OTHER_AXIS)
    parity = {"outer": [1, 2, 3, 1], "inner": [2, 1, I, 1]}.get(ref, [0, 1, 1, 2])
    index, weight = plan_case(op, mode, ref_kind, layout)
    n, w, W = layout.num_views, layout.window, layout.length
    if op in ("gather", "stitch_adjoint"):
        out, src = strided((n, O, w, I), seed=1), strided((1, O, W, I), seed=2)
    elif op in ("stitch", "gather_adjoint"):
        out, src = strided((1, O, W, I), seed=1), strided((n, O, w, I), seed=2)
    elif op == "reference_adjoint":
        out, src = strided((1, O, w, I), seed=1), strided((1, O, W, I), seed=2)
    else:
        out, src = strided((n, O, w, I), seed=1), None
    ref_t = strided((1, O, w, I), seed=3)[0] if ref != "none" else None
    expected = out.clone()
    execute(expected, None if src is None else src.clone(), ref_t, index, weight, parity)
    merge_cpp_(out, src, ref_t, index, weight, parity)
    if mode == "swap":
        assert torch.equal(out, expected)
    else:
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


@needs_cpp
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "strided"])
def test_copy_runs_stop_at_view_boundaries(dense):
    """Consecutive rows whose flat positions advance by one but cross from one view into
    the next are not one memory run (view 1 column 0 does not follow view 0's last column)."""
    D, O, L, I = 3, 4, 5, 2
    src = torch.randn(D, O, L, I) if dense else strided((D, O, L, I), seed=4)
    out = torch.zeros(D, O, L, I) if dense else strided((D, O, L, I), seed=5).zero_()
    # sources 3, 4 | 5, 6 cross views 0 -> 1; targets 8, 9 | 10, 11 cross views 1 -> 2.
    sources = torch.arange(3, 3 + 8, dtype=torch.int32)
    targets = torch.arange(L + 3, L + 3 + 8, dtype=torch.int32) % (D * L)
    index = torch.stack([torch.full_like(sources, -1), sources, targets], 1).contiguous()
    weight = torch.ones(len(sources), 1, dtype=torch.float64)
    expected = out.clone()
    execute(expected, src, None, index, weight, [0, 1, 1, 1])
    merge_cpp_(out, src, None, index, weight, [0, 1, 1, 1])
    assert torch.equal(out, expected)


# -- realistic sizes through the public API: several parallel chunks, strided memory ---------
@needs_cpp
@pytest.mark.parametrize("mode", ["swap", "mean", "triangular"])
@pytest.mark.parametrize("with_reference", [False, True])
def test_audio_latent_in_place_sync_and_stitch_match_reference(mode, with_reference):
    # (batch, channels, time, freq) with time on dim -2; 4 views of 128 frames; the
    # freq axis is sliced from a wider buffer, so the inner stride is 2.
    layout = ViewLayout.covering(400, window=128, overlap=25)
    g = torch.Generator().manual_seed(0)
    views = torch.randn(layout.num_views, 2, 8, 128, 32, generator=g)[..., ::2]
    ref = torch.randn(2, 8, 128, 16, generator=g) if with_reference else None
    kw = dict(mode=mode, swap_interval=1, reference=ref)
    expected_latent = reference.stitch(views, layout, -2, **kw)
    latent = stitch(views, layout, -2, backend="cpp", **kw)
    synced = sync_(views.clone(), layout, -2, backend="cpp", **kw)
    expected_views = reference.sync_(views.clone(), layout, -2, **kw)
    if mode == "swap":
        assert torch.equal(latent, expected_latent)
        assert torch.equal(synced, expected_views)
    else:
        torch.testing.assert_close(latent, expected_latent, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(synced, expected_views, atol=1e-6, rtol=1e-6)


@needs_cpp
@pytest.mark.parametrize("mode", ["swap", "mean"])
def test_long_latent_spanning_many_blocks_matches_reference(mode):
    # The kernel decodes ~64 KB of plane per block (1024 columns of 16 floats): 5000
    # columns with a 2-thread split exercise several blocks per chunk and runs cut by them.
    layout = ViewLayout.covering(5000, window=256, overlap=51)
    g = torch.Generator().manual_seed(0)
    views = torch.randn(layout.num_views, 1, 2, 256, 16, generator=g)
    expected = reference.stitch(views, layout, -2, mode)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        latent = stitch(views, layout, -2, mode, backend="cpp")
        synced = sync_(views.clone(), layout, -2, mode, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert_same = torch.equal if mode == "swap" else (lambda a, b: torch.allclose(a, b, atol=1e-6, rtol=1e-6))
    assert assert_same(latent, expected)
    assert assert_same(synced, reference.gather(expected, layout, -2))
    assert torch.equal(sk.gather(expected, layout, -2, backend="cpp"), reference.gather(expected, layout, -2))


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
def test_copies_are_bit_exact_for_every_bit_pattern(dtype):
    layout = ViewLayout(length=64 + 2 * 50, window=64, overlap=14, loop=False)
    latent = random_bits((2, 3, layout.length, 4), dtype, seed=1)
    views = random_bits((layout.num_views, 2, 3, 64, 4), dtype, seed=2)
    ref = random_bits((2, 3, 64, 4), dtype, seed=3)
    bits = BITS[dtype]

    gathered = sk.gather(latent, layout, -2, backend="cpp")
    assert torch.equal(gathered.view(bits), reference.gather(latent, layout, -2).view(bits))
    stitched = stitch(views, layout, -2, "swap", 2, ref, backend="cpp")
    assert torch.equal(stitched.view(bits), reference.stitch(views, layout, -2, "swap", 2, ref).view(bits))
    synced = sync_(views.clone(), layout, -2, "swap", 1, ref, reference_axis=1, backend="cpp")
    expected = reference.sync_(views.clone(), layout, -2, "swap", 1, ref, reference_axis=1)
    assert torch.equal(synced.view(bits), expected.view(bits))


# -- nothing to do --------------------------------------------------------------------------
@needs_cpp
def test_empty_plan_is_a_no_op():
    out = torch.randn(2, 3, 4, 5)
    before = out.clone()
    merge_cpp_(out, None, None, torch.empty(0, 3, dtype=torch.int32), torch.empty(0, 1, dtype=torch.float64),
              [0, 1, 1, 1])
    assert torch.equal(out, before)


@needs_cpp
@pytest.mark.parametrize("shape", [(2, 0, 6, 3), (2, 3, 6, 0)], ids=["no-outer", "no-inner"])
def test_zero_size_outer_or_inner_is_a_no_op(shape):
    # A plan with rows but no element per row: the kernel returns before its work split
    # (which divides by the elements per row), marks `out` written as every in-place op
    # does, and touches nothing else; the same plan on one element per row does write.
    layout = ViewLayout(length=6 + 4, window=6, overlap=2)
    for op in ("stitch", "sync"):
        plan = build_plan(layout, op, "mean", 1, REF_NONE)
        assert plan.index.shape[0] > 0
        for outer, inner in ((shape[1], shape[3]), (1, 1)):
            out = torch.zeros(1 if op == "stitch" else 2, outer, layout.length if op == "stitch" else 6, inner)
            src = torch.ones(2, outer, 6, inner) if op == "stitch" else None
            sources = None if src is None else src.clone()
            version = out._version
            assert merge_cpp_(out, src, None, plan.index, plan.weight, [0, 1, 1, 1]) is None
            assert out._version == version + 1
            assert src is None or torch.equal(src, sources)
            if out.numel() == 0:
                assert out.shape[1] * out.shape[3] == 0
            elif op == "stitch":  # the merged latent of views of ones is ones
                assert torch.equal(out, torch.ones_like(out))


@needs_cpp
def test_public_api_accepts_zero_size_latents():
    layout = ViewLayout(length=6 + 4, window=6, overlap=2)
    views = torch.empty(2, 3, 0, 6)  # (views, batch, channels = 0, time)
    assert stitch(views, layout, -1, "mean", backend="cpp").shape == (3, 0, 10)
    assert sync_(views, layout, -1, "mean", backend="cpp") is views


# -- argument checks: a clear error naming the argument, and nothing written ---------------
def _valid_args():
    layout = ViewLayout(length=6 + 4, window=6, overlap=2)
    plan = build_plan(layout, "stitch", "swap", 1, REF_NONE)
    return dict(out=torch.zeros(1, 3, layout.length, 2), src=torch.randn(2, 3, 6, 2), reference=None,
                index=plan.index, weight=plan.weight, parity=[0, 1, 1, 1])


BAD_ARGS = {
    "index dtype": (dict(index=lambda a: a["index"].long()), "index must be int32"),
    "weight dtype": (dict(weight=lambda a: a["weight"].float()), "weight must be float64"),
    "index strided": (dict(index=lambda a: a["index"].repeat(1, 2)[:, ::2]), "must be contiguous"),
    "weight rows": (dict(weight=lambda a: a["weight"][:-1]), "one row per index row"),
    "index columns": (dict(weight=lambda a: torch.ones(len(a["index"]), 3, dtype=torch.float64)),
                      "1 \\+ K \\+ T columns"),
    "out rank": (dict(out=lambda a: a["out"][0]), "out must be 4-D"),
    "out dtype": (dict(out=lambda a: a["out"].int()), "out must be float32, float64, float16 or bfloat16"),
    "src dtype": (dict(src=lambda a: a["src"].double()), "src must have out's dtype"),
    "src shape": (dict(src=lambda a: a["src"][:, :2]), "src \\(S, O, Ls, I\\) must share"),
    "reference shape": (dict(reference=lambda a: torch.zeros(3, 6, 5)), "reference \\(O, window, I\\) must share"),
    "reference rank": (dict(reference=lambda a: torch.zeros(3, 6)), "reference must be 3-D"),
    "parity length": (dict(parity=lambda a: [0, 1, 1]), "parity must be \\[axis_part"),
    "parity axis": (dict(parity=lambda a: [3, 1, 1, 1]), "axis_part\\) must be 0, 1 or 2"),
    "parity interval": (dict(parity=lambda a: [0, 1, 1, 0]), "swap_interval must be >= 1"),
    "source out of range": (dict(index=lambda a: _poke(a["index"], -1, 1, 99)), "source position in \\[0, 12\\)"),
    "target out of range": (dict(index=lambda a: _poke(a["index"], -1, 2, 10)), "target position in \\[0, 10\\)"),
    "negative index": (dict(index=lambda a: _poke(a["index"], 0, 1, -2)), "expected -1 or"),
    "reference column without reference": (dict(index=lambda a: _poke(a["index"], 0, 0, 0)),
                                            "no reference tensor was given"),
}


def _poke(index, row, col, value):
    index = index.clone()
    index[row, col] = value
    return index


@needs_cpp
@pytest.mark.parametrize("case", list(BAD_ARGS), ids=list(BAD_ARGS))
def test_bad_arguments_raise_a_clear_error_before_writing(case):
    changes, message = BAD_ARGS[case]
    args = _valid_args()
    for name, make_bad in changes.items():
        args[name] = make_bad(args)
    before = args["out"].clone()
    with pytest.raises(RuntimeError, match="merge_cpp_: .*" + message):
        merge_cpp_(args["out"], args["src"], args["reference"], args["index"], args["weight"], args["parity"])
    assert torch.equal(args["out"], before)
