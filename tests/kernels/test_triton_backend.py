"""Triton-specific tests of ``safa::merge_triton_`` (``safa_kernels/triton_merge.py``).

On a machine without CUDA these run the kernel in Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``, which must be set before triton and safa_kernels are imported;
tests/conftest.py does that, and this module does it too when run on its own). The
generic backend-parametrised property and opcheck tests live in tests/kernels/test_ops.py; these
cover what is particular to this kernel: block boundaries, int64 offsets, strides, padding.
"""
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import safa_kernels  # noqa: E402
from safa_kernels import ViewLayout, gather, reference, stitch, sync_  # noqa: E402
from safa_kernels import triton_merge  # noqa: E402
from safa_kernels.backends import has_kernel  # noqa: E402
from safa_kernels.plan import get_plan, REF_NONE, REF_LONG_AXIS  # noqa: E402

from plan_executor import execute  # noqa: E402

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
MODES = ("swap", "mean", "triangular")

cpu_interpreter = pytest.mark.skipif(
    not (triton_merge.AVAILABLE and triton_merge.INTERPRET),
    reason="needs triton and TRITON_INTERPRET=1 set before safa_kernels was imported")
gpu = pytest.mark.skipif(not (triton_merge.AVAILABLE and torch.cuda.is_available()), reason="needs triton and CUDA")


# -- helpers ------------------------------------------------------------------------------
def bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern, so that -0.0 != 0.0 and nan payloads count."""
    return x.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def assert_bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(bits(a), bits(b)), f"max abs diff {(a.double() - b.double()).abs().max()}"


def assert_merged(a: torch.Tensor, b: torch.Tensor, mode: str) -> None:
    """Swap is a copy (bitwise); the means differ from the reference only by rounding.

    The reference accumulates sum(x * w) / sum(w) in fp32 (fp64 for fp64); the kernel sums
    x * (w / sum(w)) in fp32 (fp64 with fp64 weights for fp64). For half types that may flip
    the last bit.
    """
    if mode == "swap":
        assert_bitwise(a, b)
        return
    eps = {torch.float64: 1e-13, torch.float32: 2e-6}.get(a.dtype, torch.finfo(a.dtype).eps)
    torch.testing.assert_close(a, b, rtol=eps, atol=eps)


def special(x: torch.Tensor) -> torch.Tensor:
    """Sprinkle -0.0 into ``x`` (a copy must keep its sign bit)."""
    flat = x.view(-1)
    flat[::7] = -0.0
    return x


def audio_latent(length, dtype, device="cpu", batch=1):
    # AudioLDM layout (B, 8, T, 16), long axis -2.
    g = torch.Generator().manual_seed(length)
    return special(torch.randn(batch, 8, length, 16, generator=g).to(dtype=dtype, device=device))


OPEN = ViewLayout(length=8 + 3 * 6, window=8, overlap=2)            # 4 views, stride 6
LOOP = ViewLayout(length=4 * 5, window=8, overlap=3, loop=True)     # 4 views, wraps
WIDE_OVERLAP = ViewLayout(length=12 + 3 * 3, window=12, overlap=9)  # 3 views cover some columns (means only)


# -- registration ---------------------------------------------------------------------------
@cpu_interpreter
def test_registered_for_cpu_under_interpreter():
    assert has_kernel("triton", "cpu")
    assert "triton" in safa_kernels.available_backends("cpu")


def test_cuda_registration_follows_availability():
    assert has_kernel("triton", "cuda") == triton_merge.AVAILABLE


def test_without_triton_nothing_is_registered():
    # A fresh interpreter where `import triton` fails: the package still imports and works,
    # and neither dispatch key gets a triton kernel.
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, safa_kernels\n"
            "from safa_kernels import triton_merge\n"
            "from safa_kernels.backends import has_kernel\n"
            "assert not triton_merge.AVAILABLE\n"
            "assert not has_kernel('triton', 'cpu') and not has_kernel('triton', 'cuda')\n"
            "assert 'triton' not in safa_kernels.available_backends('cpu')\n"
            "x = torch.randn(2, 26)\n"
            "assert safa_kernels.gather(x, safa_kernels.ViewLayout(26, 8, 2), -1).shape == (4, 2, 8)\n")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.skipif(not triton_merge.AVAILABLE, reason="needs triton")
def test_kernel_lowers_for_sm90_without_a_gpu(monkeypatch):
    # The interpreter accepts code the compiler rejects (dtype mixing, int1 arithmetic):
    # compile a few specialisations to PTX and cubin for an H100 target, which needs
    # triton's bundled ptxas but no GPU. Uses triton internals, hence the skips.
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.runtime.jit import JITFunction
        import triton.language as tl
    except ImportError as exc:
        pytest.skip(f"triton compiler internals moved: {exc}")
    kernel, _ = triton_merge._build_kernel()
    kernel = JITFunction(getattr(kernel, "fn", kernel)) if triton_merge.INTERPRET else kernel
    if triton_merge.INTERPRET:  # the helpers it calls, compiled too (found among the module's globals)
        for name in ("merge_cells", "larger"):
            helper = getattr(triton_merge, name)
            monkeypatch.setattr(triton_merge, name, JITFunction(getattr(helper, "fn", helper)))
    names = kernel.arg_names
    meta = ("K", "T", "IN_PLACE", "HAS_REF", "AXIS_PART", "HAS_RUNS", "LANES", "ACC", "WIDE", "BLOCK")
    cases = [("*bf16", tl.float32, 1, 2, False, False, 0, False, False),
             ("*fp16", tl.float32, 3, 3, True, True, 1, True, False),
             ("*fp64", tl.float64, 2, 1, False, True, 2, False, False),
             ("*fp32", tl.float32, 4, 4, True, True, 0, False, True),   # a grid's plan: rows are runs
             ("*bf16", tl.float32, 1, 1, False, False, 0, True, True)]
    for ptr, acc, K, T, in_place, has_ref, axis, wide, runs in cases:
        sig = {}
        for n in names:
            if n in meta:
                sig[n] = "constexpr"
            elif n.endswith("_ptr"):
                sig[n] = {"index_ptr": "*i32", "weight_ptr": "*fp32", "runs_ptr": "*i32"}.get(n, ptr)
            else:  # a stride or size past int32 arrives as i64
                sig[n] = "i64" if wide and n in ("N", "os0") else "i32"
        values = dict(K=K, T=T, IN_PLACE=in_place, HAS_REF=has_ref, AXIS_PART=axis, HAS_RUNS=runs,
                      LANES=triton_merge.RUN_LANES if runs else 1, ACC=acc, WIDE=wide, BLOCK=triton_merge.GPU_BLOCK)
        constexprs = {(names.index(n),): v for n, v in values.items()}
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                                      target=GPUTarget("cuda", 90, 32), options=triton_merge.LAUNCH_OPTIONS)
        except (RuntimeError, FileNotFoundError) as exc:
            if "ptxas" in str(exc).lower():
                pytest.skip(f"no ptxas: {exc}")
            raise
        assert compiled.asm.get("cubin"), (ptr, K, T)


# -- public API against the reference, interpreter on CPU -------------------------------------
@cpu_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", [OPEN, LOOP], ids=["open", "loop"])
def test_gather_is_bitwise_copy(dtype, layout):
    x = audio_latent(layout.length, dtype)
    x.view(-1)[3] = float("nan")
    assert_bitwise(gather(x, layout, -2, backend="triton"), reference.gather(x, layout, 2))


@cpu_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", [OPEN, LOOP], ids=["open", "loop"])
def test_stitch_and_sync_match_reference(dtype, mode, layout):
    views = reference.gather(audio_latent(layout.length, dtype), layout, 2)
    views = views + special(torch.randn(views.shape).to(dtype))  # views disagree in overlaps
    expected = reference.stitch(views, layout, 2, mode)
    assert_merged(stitch(views, layout, -2, mode, backend="triton"), expected, mode)
    synced = views.clone()
    assert sync_(synced, layout, -2, mode, backend="triton") is synced
    assert_merged(synced, reference.sync_(views.clone(), layout, 2, mode), mode)


@cpu_interpreter
@pytest.mark.parametrize("mode", ("mean", "triangular"))
def test_three_way_overlap_means(mode):
    layout = WIDE_OVERLAP
    views = torch.randn(layout.num_views, 2, layout.window, 3)
    assert get_plan(layout, "stitch", mode, 1, REF_NONE, torch.device("cpu")).weight.shape[1] >= 3
    assert_merged(stitch(views, layout, -2, mode, backend="triton"), reference.stitch(views, layout, -2, mode), mode)
    synced = views.clone()
    sync_(synced, layout, -2, mode, backend="triton")
    assert_merged(synced, reference.sync_(views.clone(), layout, -2, mode), mode)


@cpu_interpreter
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("swap_interval", (1, 2))
@pytest.mark.parametrize("axis", (None, 1, 3), ids=["long", "outer", "inner"])
def test_reference_swap_audio(dtype, mode, swap_interval, axis):
    # (B, 8, T, 16), long axis 2: reference parity along T (in the plan), along the 8
    # channels (inside O: parity axis_part 1) or along the 16 features (inside I: part 2).
    layout = OPEN
    views = torch.randn(layout.num_views, 2, 8, layout.window, 16).to(dtype)
    ref = torch.randn(2, 8, layout.window, 16).to(dtype)
    expected = reference.stitch(views, layout, 2, mode, swap_interval, ref, axis)
    assert_merged(stitch(views, layout, -2, mode, swap_interval, ref, axis, backend="triton"), expected, mode)
    synced = views.clone()
    sync_(synced, layout, -2, mode, swap_interval, ref, axis, backend="triton")
    assert_merged(synced, reference.sync_(views.clone(), layout, 2, mode, swap_interval, ref, axis), mode)


@cpu_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", [OPEN, LOOP], ids=["open", "loop"])
def test_reference_swap_image_rows(dtype, layout):
    # Image latents (B, 4, H, W), panorama along W (dim -1, inner 1), reference parity over
    # rows H (dim 2, inside O with div = 1, size = H).
    views = torch.randn(layout.num_views, 1, 4, 6, layout.window).to(dtype)
    ref = special(torch.randn(1, 4, 6, layout.window).to(dtype))
    expected = reference.sync_(views.clone(), layout, 3, "swap", 2, ref, 2)
    synced = views.clone()
    sync_(synced, layout, -1, "swap", 2, ref, -2, backend="triton")
    assert_bitwise(synced, expected)
    assert_bitwise(stitch(views, layout, -1, "swap", 2, ref, -2, backend="triton"),
                   reference.stitch(views, layout, 3, "swap", 2, ref, 2))


# -- strides ------------------------------------------------------------------------------------
def check_non_contiguous_in_place_sync(dtype, device):
    layout = OPEN
    n, C, I = layout.num_views, 3, 5
    # The view axis is not outermost and every other inner element belongs to someone else:
    # views (n, C, w, I) with strides (w*2I, n*w*2I, 2I, 2), a 4-D view without any copy.
    base = torch.randn(C, n, layout.window, 2 * I).to(dtype=dtype, device=device)
    views = base.transpose(0, 1)[..., ::2]
    assert not views.is_contiguous()
    before = base.clone()
    ref = torch.randn(C, layout.window, 2 * I).to(dtype=dtype, device=device)[..., 1::2]  # strided too
    expected = reference.sync_(views.clone(), layout, -2, "swap", 1, ref, None)
    sync_(views, layout, -2, "swap", 1, ref, backend="triton")
    assert_bitwise(views, expected)
    assert_bitwise(base[..., 1::2], before[..., 1::2])  # the interleaved neighbours are untouched


@cpu_interpreter
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
def test_non_contiguous_in_place_sync_writes_through_strides(dtype):
    check_non_contiguous_in_place_sync(dtype, "cpu")


@cpu_interpreter
@pytest.mark.parametrize("mode", MODES)
def test_strided_long_axis_and_outer_dims(mode):
    layout = LOOP
    # Long axis with stride != 1 (W is the slowest dim in memory), outer dims (B, 4) merged.
    latent = torch.randn(layout.length, 2, 4, 3).permute(1, 2, 3, 0)  # (B, 4, H, W), W long
    views = gather(latent, layout, -1, backend="triton")
    assert_bitwise(views, reference.gather(latent, layout, 3))
    vs = views.permute(0, 4, 1, 2, 3).contiguous().permute(0, 2, 3, 4, 1)  # long axis outermost per view
    assert_merged(stitch(vs, layout, -1, mode, backend="triton"), reference.stitch(vs, layout, 3, mode), mode)


def _huge_storage(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised CPU storage; untouched pages cost no memory (skip where overcommit refuses)."""
    try:
        return torch.empty(numel, dtype=dtype)
    except RuntimeError as exc:  # e.g. vm.overcommit_memory = 2
        pytest.skip(f"cannot reserve {numel} elements of address space: {exc}")


@cpu_interpreter
def test_offsets_beyond_int32():
    # Strides that fit int32 whose products do not: element offsets (not the element
    # count) overflow int32, so the kernel's address arithmetic must be int64.
    layout = OPEN
    big = _huge_storage(2**31 + 2**16, torch.float16)
    latent = big.as_strided((3, layout.length), (2**30 + 7, 1))  # outer index 2 sits past 2**31
    latent.copy_(torch.randn(latent.shape).half())
    assert_bitwise(gather(latent, layout, -1, backend="triton"), reference.gather(latent, layout, 1))
    # In place, with the view axis 2**31 / 3 + 5 elements apart (view 3 sits past 2**31).
    views = big.as_strided((layout.num_views, 2, layout.window), (2**31 // 3 + 5, layout.window, 1))
    views.copy_(torch.randn(views.shape).half())
    expected = reference.sync_(views.clone(), layout, 1, "swap")
    sync_(views, layout, -1, "swap", backend="triton")
    assert_bitwise(views, expected)


# -- the op against the plan executor: block boundaries, padding, wide numbering ------------------
def _random_plan(g, P, K, T, Ls, S, Ld, D, with_ref, window, in_place):
    """A random plan within the contract: rows write disjoint cells and, in place, no row
    reads a cell that another row writes (the kernel runs rows in parallel)."""
    index = torch.full((P, 1 + K + T), -1, dtype=torch.int32)
    weight = torch.zeros(P, K, dtype=torch.float64)
    cells = torch.randperm(D * Ld, generator=g)[: P * T].view(P, T)
    counts = torch.randint(1, T + 1, (P,), generator=g)
    written = {int(c) for r in range(P) for c in cells[r, :counts[r]]}
    for r in range(P):
        t = int(counts[r])
        index[r, 1 + K:1 + K + t] = cells[r, :t]
        own = {int(c) for c in cells[r, :t]}
        pool = [c for c in range(S * Ls) if not in_place or c not in written or c in own]
        k = int(torch.randint(0, K + 1, (1,), generator=g))  # 0 sources: a ref-only or an empty row
        picks = torch.randint(0, len(pool), (k,), generator=g)
        index[r, 1:1 + k] = torch.tensor([pool[i] for i in picks], dtype=torch.int32)
        w = torch.rand(k, generator=g, dtype=torch.float64)
        weight[r, :k] = 1.0 if k == 1 else w / w.sum()
        if with_ref and bool(torch.rand(1, generator=g) < 0.5):
            index[r, 0] = int(torch.randint(0, window, (1,), generator=g))
    return index, weight


def _expected(out, src, ref, index, weight, parity):
    """What tests/plan_executor.py makes of the plan (on copies)."""
    expected = out.clone()
    execute(expected, None if src is None else src.clone(), ref, index, weight, parity)
    return expected


@cpu_interpreter
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("in_place", (False, True))
@pytest.mark.parametrize("wide", (False, True))
def test_random_plans_across_blocks(seed, in_place, wide, monkeypatch):
    # Tiny blocks so that one call spans many programs with a ragged last one; `wide` forces
    # the int64 element numbering that only > 2**31 elements would otherwise select.
    monkeypatch.setattr(triton_merge, "INTERPRET_MAX_BLOCK", 64)
    g = torch.Generator().manual_seed(seed)
    dtype = DTYPES[seed % len(DTYPES)]
    O, I, window = 3, [1, 5, 16, 2][seed], 6
    K, T = [1, 2, 3, 4][seed], [1, 3, 2, 2][seed]
    D, Ld = 4, 11
    S, Ls = (D, Ld) if in_place else (3, 9)
    P = 13
    with_ref = seed % 2 == 1
    index, weight = _random_plan(g, P, K, T, Ls, S, Ld, D, with_ref, window, in_place)
    out = torch.randn(D, O, Ld, I, generator=g).to(dtype)
    src = None if in_place else torch.randn(S, O, Ls, I, generator=g).to(dtype)
    ref = torch.randn(O, window, I, generator=g).to(dtype) if with_ref else None
    parity = [[0, 1, 1, 1], [1, 1, O, 1], [0, 1, 1, 2], [2, 1, I, 1]][seed]
    expected = _expected(out, src, ref, index, weight, parity)
    triton_merge.merge_(out, src, ref, index, weight, parity, wide=wide)
    if K == 1:
        assert_bitwise(out, expected)
    else:
        eps = {torch.float64: 1e-13, torch.float32: 1e-6}.get(dtype, torch.finfo(dtype).eps)
        torch.testing.assert_close(out, expected, rtol=eps, atol=eps)


@cpu_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_padding_is_never_read_and_single_sources_copy(dtype):
    # K = 3 slots; only the listed sources are live. Every other cell (wherever a "-1" slot
    # might decode to) holds inf or nan, which would poison a 0 * x, and the live single
    # sources are -0.0 and nan: outputs must be exact copies.
    S, Ls, O, I = 3, 4, 2, 3
    # src sits inside an inf-filled buffer, so that even an address computed from a "-1"
    # slot that falls before src's first element (col -1 of view 0) would read inf.
    buf = torch.full((64 + S * O * Ls * I,), float("inf"), dtype=dtype)
    src = buf[64:].view(S, O, Ls, I)
    src[0, :, 0] = float("nan")
    src[1, :, 1] = -0.0
    src[1, :, 2] = float("nan")
    src[2, :, 3] = torch.tensor(1.5, dtype=dtype)
    src[1, :, 3] = torch.tensor(0.5, dtype=dtype)
    index = torch.tensor([[-1, 1 * Ls + 1, -1, -1, 0],            # -0.0 copied
                          [-1, 1 * Ls + 2, -1, -1, 1],            # nan copied
                          [-1, 2 * Ls + 3, 1 * Ls + 3, -1, 2],    # two live sources, one padding slot
                          [-1, -1, -1, -1, 3]], dtype=torch.int32)  # nothing to write
    weight = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0.25, 0.75, 0], [0, 0, 0]], dtype=torch.float64)
    out = torch.full((1, O, 4, I), 7.0, dtype=dtype)
    triton_merge.merge_(out, src, None, index, weight, [0, 1, 1, 1])
    assert_bitwise(out[0, :, 0], src[1, :, 1])
    assert_bitwise(out[0, :, 1], src[1, :, 2])
    assert_bitwise(out[0, :, 2], torch.full((O, I), 0.25 * 1.5 + 0.75 * 0.5, dtype=dtype))
    assert_bitwise(out[0, :, 3], torch.full((O, I), 7.0, dtype=dtype))


@cpu_interpreter
def test_empty_problems_launch_nothing():
    plan = get_plan(OPEN, "gather", "", 0, REF_NONE, torch.device("cpu"))
    out = torch.empty(OPEN.num_views, 0, OPEN.window, 16)
    triton_merge.merge_(out, torch.empty(1, 0, OPEN.length, 16), None, plan.index, plan.weight, [0, 1, 1, 1])
    empty_plan = (torch.empty(0, 3, dtype=torch.int32), torch.empty(0, 1, dtype=torch.float64))
    out = torch.zeros(1, 2, 3, 4)
    torch.ops.safa.merge_triton_(out, torch.ones(1, 2, 3, 4), None, *empty_plan, [0, 1, 1, 1])
    assert not out.any()


@cpu_interpreter
def test_bad_arguments_raise():
    plan = get_plan(OPEN, "stitch", "swap", 1, REF_LONG_AXIS, torch.device("cpu"))
    out = torch.empty(1, 2, OPEN.length, 3)
    src = torch.randn(OPEN.num_views, 2, OPEN.window, 3)
    with pytest.raises(RuntimeError, match="int32"):
        torch.ops.safa.merge_triton_(out, src, None, plan.index.long(), plan.weight, [0, 1, 1, 1])
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.safa.merge_triton_(out, src.double(), None, plan.index, plan.weight, [0, 1, 1, 1])
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.safa.merge_triton_(out, src[:, :1], None, plan.index, plan.weight, [0, 1, 1, 1])
    with pytest.raises(RuntimeError, match="parity"):
        torch.ops.safa.merge_triton_(out, src, torch.randn(2, OPEN.window, 3), plan.index, plan.weight, [1, 0, 1, 1])


# -- on a GPU -------------------------------------------------------------------------------------
@pytest.mark.gpu
@gpu
class TestCUDA:
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("layout", [OPEN, LOOP], ids=["open", "loop"])
    def test_matches_reference(self, dtype, mode, layout):
        views = torch.randn(layout.num_views, 2, 8, layout.window, 16, device="cuda").to(dtype)
        ref = torch.randn(2, 8, layout.window, 16, device="cuda").to(dtype)
        for axis in (None, 1, 3):
            expected = reference.stitch(views, layout, 2, mode, 1, ref, axis)
            assert_merged(stitch(views, layout, -2, mode, 1, ref, axis, backend="triton"), expected, mode)
            synced = views.clone()
            sync_(synced, layout, -2, mode, 1, ref, axis, backend="triton")
            assert_merged(synced, reference.sync_(views.clone(), layout, 2, mode, 1, ref, axis), mode)
        latent = audio_latent(layout.length, dtype, "cuda", batch=2)
        assert_bitwise(gather(latent, layout, -2, backend="triton"), reference.gather(latent, layout, 2))

    @pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
    def test_non_contiguous_in_place_sync(self, dtype):
        check_non_contiguous_in_place_sync(dtype, "cuda")

    def test_element_count_beyond_int32(self):
        # gather's flattened space is outer * length * inner > 2**31: int64 element numbering.
        layout = ViewLayout(length=8 + 3 * 6, window=8, overlap=2)
        outer = 2**31 // layout.length + 4096
        if torch.cuda.get_device_properties(0).total_memory < 12 * 2**30:
            pytest.skip("needs ~10 GiB of GPU memory")
        latent = torch.randn(outer, layout.length, device="cuda", dtype=torch.float16)
        views = gather(latent, layout, -1, backend="triton")
        for i, start in enumerate(layout.starts):
            assert torch.equal(views[i], latent[:, start:start + layout.window]), i

    def test_cuda_graph_capture(self):
        layout = OPEN
        views = torch.randn(layout.num_views, 2, 8, layout.window, 16, device="cuda")
        ref = torch.randn(2, 8, layout.window, 16, device="cuda")
        sync_(views.clone(), layout, -2, "swap", 1, ref, backend="triton")  # compile + build the plan
        static = views.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            sync_(static, layout, -2, "swap", 1, ref, backend="triton")
        static.copy_(views)
        graph.replay()
        assert_bitwise(static, reference.sync_(views.clone(), layout, 2, "swap", 1, ref))
