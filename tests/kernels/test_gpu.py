"""The CUDA and Triton kernels on a GPU: every backend against the reference, every dtype, opcheck,
torch.compile, CUDA graphs with no host synchronisation, one launch per call.

Needs torch with CUDA and nothing else (no diffusers): benchmarks/gpu.sh runs this file on a
bare GPU machine, and runs :func:`test_every_path_matches_the_reference` (small sizes, every
branch of both kernels) under compute-sanitizer's memcheck and racecheck. Skipped without
CUDA; a backend that is not built or not installed is skipped by name, so the run says so.
"""
import contextlib

import pytest
import torch

import safa_kernels as sk
from safa_kernels import GridLayout, ViewLayout, gather, reference, stitch, sync_
from op_args import op_args

HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
BACKENDS = ("cuda", "triton")


def need(backend: str) -> None:
    if backend not in sk.available_backends("cuda"):
        why = "the extension was built without CUDA" if backend == "cuda" else "triton is not installed"
        pytest.skip(f"the {backend} backend is not available ({why})")


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def assert_merged(actual: torch.Tensor, expected: torch.Tensor, mode: str) -> None:
    """Copies (gather, swap, reference swap) bitwise; weighted means to rounding."""
    if mode == "swap":
        assert torch.equal(bits(actual), bits(expected))
    else:
        tol = {torch.float64: 1e-6, torch.float32: 2e-6}.get(actual.dtype, torch.finfo(actual.dtype).eps)
        torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


@contextlib.contextmanager
def sync_debug_error():
    """torch.cuda.set_sync_debug_mode("error") for the block: any host synchronisation raises."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def randn(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", generator=g).to(dtype)


# -- correctness (also the compute-sanitizer set: keep it small) ------------------------------------
@pytest.mark.parametrize("loop", [False, True], ids=["open", "loop"])
@pytest.mark.parametrize("mode", sk.MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_path_matches_the_reference(backend, dtype, mode, loop):
    """gather, stitch and in-place sync_, with no reference and a reference alternating along the
    long axis, the outer axis or the inner axis, swap_interval 1 and 2, dense and strided views."""
    need(backend)
    overlap = 5 if mode == "swap" else 9
    layout = ViewLayout.covering(50, 16, overlap, loop=loop)
    views = randn(layout.num_views, 2, 3, 16, 5, dtype=dtype, seed=1)
    strided_views = randn(layout.num_views, 2, 3, 16, 10, dtype=dtype, seed=2)[..., ::2]
    ref = randn(2, 3, 16, 5, dtype=dtype, seed=3)
    latent = randn(2, 3, layout.length, 5, dtype=dtype, seed=4)
    assert_merged(gather(latent, layout, -2, backend=backend), reference.gather(latent, layout, 2), "swap")
    for v in (views, strided_views):
        for r, axis in ((None, None), (ref, None), (ref, 1), (ref, 3)):
            for interval in (1, 2):
                expected = reference.stitch(v, layout, 2, mode, interval, r, axis)
                assert_merged(stitch(v, layout, -2, mode, interval, r, axis, backend=backend), expected, mode)
                synced = sync_(v.clone(), layout, -2, mode, interval, r, axis, backend=backend)
                assert_merged(synced, reference.sync_(v.clone(), layout, 2, mode, interval, r, axis), mode)


@pytest.mark.parametrize("grid", [GridLayout(ViewLayout(11, 5, 2), ViewLayout(12, 6, 2, loop=True)),
                                  GridLayout.covering(112, 112, 64, 16)], ids=["small-cylinder", "image-tiles"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_grid_path_matches_the_reference(backend, dtype, grid):
    """2-D grids (plan rows that are runs of cells, docs/kernels.md section 8): gather, stitch and
    sync_ in every mode, no reference / one alternating along the rows or along the channels,
    swap_interval 1 (the overlaps alternate cell by cell: runs two apart) and 2."""
    need(backend)
    shape = (1, 3, grid.rows.length, grid.cols.length)
    latent = randn(*shape, dtype=dtype, seed=4)
    views = randn(grid.num_views, 1, 3, grid.rows.window, grid.cols.window, dtype=dtype, seed=1)
    ref = randn(1, 3, grid.rows.window, grid.cols.window, dtype=dtype, seed=3)
    assert_merged(gather(latent, grid, backend=backend), gather(latent, grid, backend="reference"), "swap")
    for mode in sk.MODES:
        for r, axis in ((None, None), (ref, None), (ref, 1)):
            for interval in (1, 2):
                kw = dict(mode=mode, swap_interval=interval, reference=r, reference_axis=axis)
                expected = stitch(views, grid, backend="reference", **kw)
                assert_merged(stitch(views, grid, backend=backend, **kw), expected, mode)
                assert_merged(sync_(views.clone(), grid, backend=backend, **kw),
                              gather(expected, grid, backend="reference"), mode)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_audio_and_image_latents_match_the_reference(backend, dtype):
    """Real shapes: 30 s of AudioLDM latent (inner 16) and an SD panorama latent (long axis last)."""
    need(backend)
    audio = ViewLayout.covering(750, 256, 51)
    views = randn(audio.num_views, 2, 8, 256, 16, dtype=dtype)
    ref = randn(2, 8, 256, 16, dtype=dtype, seed=1)
    expected = reference.stitch(views, audio, 2, "swap", 1, ref)
    assert_merged(stitch(views, audio, -2, "swap", 1, ref, backend=backend), expected, "swap")
    assert_merged(sync_(views.clone(), audio, -2, "swap", 1, ref, backend=backend),
                  reference.gather(expected, audio, 2), "swap")
    image = ViewLayout.covering(256, 64, 13)
    views = randn(image.num_views, 1, 4, 64, 64, dtype=dtype, seed=2)
    ref = randn(1, 4, 64, 64, dtype=dtype, seed=3)
    for mode in sk.MODES:
        r = ref if mode == "swap" else None
        axis = -2 if mode == "swap" else None  # SaFa's image reference alternates by rows
        assert_merged(stitch(views, image, -1, mode, 1, r, axis, backend=backend),
                      reference.stitch(views, image, 3, mode, 1, r, 2 if r is not None else None), mode)


@pytest.mark.parametrize("backend", BACKENDS)
def test_element_count_beyond_int32(backend):
    """gather's flattened (outer, column, inner) space past 2**31 elements: 64-bit indexing."""
    need(backend)
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs ~20 GiB of GPU memory")
    layout = ViewLayout(length=8 + 3 * 6, window=8, overlap=2)
    outer = 2**31 // layout.length + 4096
    latent = torch.randn(outer, layout.length, device="cuda", dtype=torch.float16)
    views = gather(latent, layout, -1, backend=backend)
    for i, start in enumerate(layout.starts):
        assert torch.equal(views[i], latent[:, start:start + layout.window]), i


# -- registration, compile, graphs, launches ----------------------------------------------------------
def _op_args(mode: str = "swap", in_place: bool = False, with_reference: bool = True):
    return op_args(mode, in_place, with_reference, torch.device("cuda"))


@pytest.mark.parametrize("mode,in_place,with_reference",
                         [("swap", False, True), ("swap", True, True), ("mean", True, False), ("triangular", False, False)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, mode, in_place, with_reference):
    need(backend)
    torch.library.opcheck(getattr(torch.ops.safa, f"merge_{backend}_").default, _op_args(mode, in_place, with_reference))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_with_inductor(backend):
    need(backend)
    layout = ViewLayout.covering(50, 16, 4, loop=True)

    def step(views, ref):
        views = views * 0.5
        sync_(views, layout, dim=-2, reference=ref, backend=backend)
        return stitch(views, layout, dim=-2, mode="triangular", backend=backend)

    views, ref = randn(layout.num_views, 2, 16, 4), randn(2, 16, 4, seed=1)
    compiled = torch.compile(step, fullgraph=True)  # inductor: the fake kernels must hold up there too
    torch.testing.assert_close(compiled(views, ref), step(views, ref), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graphs_and_no_host_sync(backend):
    """After a first call (plans to the device, Triton compiled), the public ops make no host
    synchronisation (sync debug mode "error") and replay from a CUDA graph bitwise."""
    need(backend)
    layout = ViewLayout.covering(300, 64, 13)
    views, ref = randn(layout.num_views, 2, 8, 64, 16), randn(2, 8, 64, 16, seed=1)
    latent = randn(2, 8, layout.length, 16, seed=2)

    def calls(v):
        sync_(v, layout, -2, "swap", 1, ref, backend=backend)
        return stitch(v, layout, -2, "mean", backend=backend), gather(latent, layout, -2, backend=backend)

    calls(views.clone())
    torch.cuda.synchronize()
    with sync_debug_error():
        calls(views.clone())  # the eager hot path
    static = views.clone()
    side = torch.cuda.Stream()  # warm-up on a side stream, as torch.cuda.graph asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        calls(static.clone())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        with sync_debug_error():
            stitched, gathered = calls(static)
    static.copy_(views)
    graph.replay()
    torch.cuda.synchronize()
    expected = reference.sync_(views.clone(), layout, 2, "swap", 1, ref)
    assert torch.equal(static, expected)
    assert_merged(stitched, reference.stitch(expected, layout, 2, "mean"), "mean")
    assert torch.equal(gathered, reference.gather(latent, layout, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_kernel_launch_per_call(backend):
    need(backend)
    from torch.profiler import ProfilerActivity, profile
    layout = ViewLayout.covering(300, 64, 13)
    views, ref = randn(layout.num_views, 2, 8, 64, 16), randn(2, 8, 64, 16, seed=1)
    sync_(views, layout, -2, "swap", 1, ref, backend=backend)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        sync_(views, layout, -2, "swap", 1, ref, backend=backend)
        torch.cuda.synchronize()
    launches = [e for e in prof.events() if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                                                        "cudaLaunchKernelExC", "cudaMemcpyAsync", "cudaMemsetAsync")]
    assert len(launches) == 1, [e.name for e in launches]
