"""The CPU kernel's copy fast paths (csrc/merge_cpu.cpp), each against the reference.

Swap plans have one source and one target per row and take a short decoder; lone columns
(the alternating overlap columns of ``swap_interval`` 1) are copied with moves of a size
fixed at compile time, one specialisation per column size in bytes (2 to 128), with a
general path for every other size; the plan's index check has a vectorised pass over
chunks of 32 rows and a slow pass that names the bad entry. Each test below reaches one
of those branches with sizes and strides chosen for it.
"""
import pytest
import torch

from safa_kernels import ViewLayout, _extension, gather, reference, stitch, sync_
from safa_kernels.plan import REF_NONE, build_plan

needs_cpp = pytest.mark.skipif(not _extension.LOADED, reason="safa_kernels._C is not built")
merge_cpp_ = torch.ops.safa.merge_cpp_.default

# (dtype, inner): column sizes in bytes 2, 4, 8, 16, 32, 64, 128 (the specialised ones)
# and 6, 12, 256 (the general path).
COLUMNS = [(torch.float16, 1), (torch.float32, 1), (torch.float64, 1), (torch.float32, 4), (torch.float16, 16),
           (torch.float32, 16), (torch.float64, 16), (torch.float16, 3), (torch.float32, 3), (torch.float32, 64)]


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


@needs_cpp
@pytest.mark.parametrize("padded", [False, True], ids=["dense-long-axis", "padded-long-axis"])
@pytest.mark.parametrize("dtype,inner", COLUMNS, ids=[f"{d}-inner{i}".replace("torch.", "") for d, i in COLUMNS])
def test_alternating_lone_columns_copy_bit_exactly(dtype, inner, padded):
    """swap_interval 1: every overlap column is a lone copy from one of two views.

    ``padded``: the views' long axis has a stride larger than ``inner`` (each column is
    contiguous but consecutive columns are not), so runs go column by column.
    """
    layout = ViewLayout.covering(300, window=40, overlap=13)
    g = torch.Generator().manual_seed(inner)
    shape = (layout.num_views, 2, 3, 40, inner)
    if padded:
        views = torch.randn(layout.num_views, 2, 3, 40, inner + 5, generator=g).to(dtype)[..., :inner]
    else:
        views = torch.randn(shape, generator=g).to(dtype)
    assert views[0, 0, 0, 0].is_contiguous() and (views.stride(-2) == inner) != padded
    for interval in (1, 2, 5):
        expected = reference.stitch(views, layout, -2, "swap", interval)
        assert torch.equal(_bits(stitch(views, layout, -2, "swap", interval, backend="cpp")), _bits(expected))
        synced = sync_(views.clone(), layout, -2, "swap", interval, backend="cpp")
        assert torch.equal(_bits(synced), _bits(reference.gather(expected, layout, -2)))
    latent = torch.randn(2, 3, layout.length, inner, generator=g).to(dtype)
    assert torch.equal(_bits(gather(latent, layout, -2, backend="cpp")), _bits(reference.gather(latent, layout, -2)))


@needs_cpp
def test_image_latent_lone_columns_along_the_last_axis():
    """Image latents put the long axis last (inner 1): a lone column is one element per row."""
    layout = ViewLayout.covering(500, window=64, overlap=13)
    views = torch.randn(layout.num_views, 1, 4, 32, 64)
    ref = torch.randn(1, 4, 32, 64)
    for axis in (None, -2):
        expected = reference.stitch(views, layout, -1, "swap", 1, ref, axis)
        assert torch.equal(stitch(views, layout, -1, "swap", 1, ref, axis, backend="cpp"), expected)
        synced = sync_(views.clone(), layout, -1, "swap", 1, ref, axis, backend="cpp")
        assert torch.equal(synced, reference.sync_(views.clone(), layout, -1, "swap", 1, ref, axis))


@needs_cpp
@pytest.mark.parametrize("row", [37, 100], ids=["in-a-chunk", "in-the-tail"])
@pytest.mark.parametrize("value", [-2, 2**31 - 1, -2**31, 110], ids=["minus-2", "int32-max", "int32-min", "one-past"])
@pytest.mark.parametrize("column", [0, 1, 2], ids=["reference", "source", "target"])
def test_bad_index_anywhere_in_a_long_plan_is_named(column, value, row):
    """A bad entry in a 110-row plan, inside a 32-row chunk of the fast pass (row 37) or in
    the rows after the last full chunk (row 100), is caught and named before any write."""
    layout = ViewLayout(length=10 * 10 + 10, window=10, overlap=0)  # 11 views, 110 columns
    plan = build_plan(layout, "stitch", "swap", 1, REF_NONE)
    assert plan.index.shape == (110, 3)
    index = plan.index.clone()
    index[row, column] = value
    out = torch.zeros(1, 2, layout.length, 3)
    src = torch.randn(layout.num_views, 2, 10, 3)
    with pytest.raises(RuntimeError, match=rf"merge_cpp_: index\[{row}, {column}\] .*is {value}, expected -1 or"):
        merge_cpp_(out, src, None, index, plan.weight, [0, 1, 1, 1])
    assert not out.any()
