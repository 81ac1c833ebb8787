"""safa_kernels.naive (the hand-written baseline loop) against safa_kernels.reference."""
import pytest
import torch

from safa_kernels import ViewLayout, naive, reference


def _views(layout, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((layout.num_views, *shape), generator=g)


@pytest.mark.parametrize("dim", [-2, -1, 0])
@pytest.mark.parametrize("swap_interval", [1, 2, 5])
def test_swap_stitch_and_gather_equal_the_reference_bitwise(dim, swap_interval):
    layout = ViewLayout.covering(70, 16, 5)
    shape = [2, 3, 4]
    shape[dim] = 16
    views = _views(layout, shape)
    latent = naive.stitch(views, layout, dim, "swap", swap_interval)
    assert torch.equal(latent, reference.stitch(views, layout, dim, "swap", swap_interval))
    assert torch.equal(naive.gather(latent, layout, dim), reference.gather(latent, layout, dim))


def test_mean_stitch_equals_the_reference():
    layout = ViewLayout.covering(70, 16, 7)
    views = _views(layout, [2, 16, 3])
    torch.testing.assert_close(naive.stitch(views, layout, -2, "mean"), reference.stitch(views, layout, -2, "mean"),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["swap", "mean"])
@pytest.mark.parametrize("reference_axis", [None, -2, 1], ids=["no-reference", "long-axis", "rows"])
def test_sync_with_and_without_reference_equals_the_reference(mode, reference_axis):
    layout = ViewLayout.covering(60, 16, 4)
    views = _views(layout, [2, 6, 16])
    ref = torch.randn(2, 6, 16) if reference_axis is not None else None
    axis = None if reference_axis == -2 else reference_axis
    expected = reference.sync_(views.clone(), layout, -1, mode, 2, ref, axis)
    got = naive.sync_(views.clone(), layout, -1, mode, 2, ref, axis)
    if mode == "swap":
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert not torch.equal(got, views)


def test_refuses_what_the_loop_cannot_do():
    loop = ViewLayout.covering(64, 16, 4, loop=True)
    with pytest.raises(ValueError, match="layout.loop must be False"):
        naive.stitch(_views(loop, [16]), loop, 0, "swap")
    layout = ViewLayout.covering(40, 16, 4)
    with pytest.raises(ValueError, match="mode must be one of"):
        naive.stitch(_views(layout, [16]), layout, 0, "triangular")
    with pytest.raises(ValueError, match="reference_axis was given without a reference"):
        naive.sync_(_views(layout, [16]), layout, 0, "swap", reference_axis=0)
