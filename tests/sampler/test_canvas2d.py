"""Images beyond the window in both directions, and tileable textures, on a tiny SD pipeline.

A call whose height exceeds one window runs on a :class:`~safa_kernels.GridLayout` (rows over
the latent height, cols over the width) and merges every step with one 2-D op call; ``loop``
loops the width, ``loop="both"`` (or ``(height, width)`` flags) both axes: a torus. The tiny
pipeline has 16 x 16 latent windows (128 px) so that a grid of a few tiles stays cheap.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from safa import JointDiffusion
from safa.testing import pipelines as tp
from safa_kernels import GridLayout, gather

WINDOW = 16  # latent cells per tile side (sample_size of the tiny UNet)
GRID_METHODS = ("safa", "safa_selfloop", "multidiffusion", "multidiffusion_triangular", "multidiffusion_gaussian")
STEPS = dict(num_inference_steps=3, guidance_scale=3.0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def jd():
    return JointDiffusion(tp.tiny_sd_pipeline(seed=0, sample_size=WINDOW))


def _run_keeping_last_views(jd, **call):
    """The call's result and the views right after the last step's merge (callback 7.7)."""
    kept = {}

    def keep(_jd, i, t, kwargs):
        kept["views"] = kwargs["views"].clone()
    return jd("a stone wall", callback_on_step_end=keep, **call), kept["views"]


def test_one_tile_is_the_pipelines_own_output(jd):
    """A canvas of exactly one tile is one view: the wrapped pipeline's own call."""
    side = WINDOW * jd.pipe.vae_scale_factor
    latents = torch.randn(jd.adapter.latent_shape(1, WINDOW, side), generator=_gen(7))
    for method in GRID_METHODS:
        ours = jd("a stone wall", width=side, height=side, method=method, latents=latents, generator=_gen(),
                  output_type="np", **STEPS)
        theirs = jd.pipe("a stone wall", width=side, height=side, latents=latents.clone(), generator=_gen(),
                         output_type="np", **STEPS).images
        assert ours.layout.num_views == 1
        np.testing.assert_allclose(ours.images, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", GRID_METHODS)
def test_a_canvas_beyond_the_window_both_ways_has_the_requested_size(jd, method):
    # 200 x 232 px: 25 x 29 latent cells, covered by 2 x 3 tiles of 16 overlapping by 4, cropped.
    r, views = _run_keeping_last_views(jd, width=232, height=200, method=method, overlap=0.25,
                                       generator=_gen(), output_type="np", **STEPS)
    layout = r.layout
    assert isinstance(layout, GridLayout)
    assert (layout.rows.num_views, layout.cols.num_views) == (2, 3) and layout.rows.window == WINDOW
    assert r.images.shape == (1, 200, 232, 3) and np.isfinite(r.images).all()
    assert r.latent.shape == (1, 4, layout.rows.length, layout.cols.length)
    assert views.shape == (6, 1, 4, WINDOW, WINDOW)
    # After the final merge every tile is its window of the stitched canvas: the views agree on
    # every overlap (a swap copies, so bitwise; a weighted mean of equal values within rounding).
    tiles = gather(r.latent, layout, (-2, -1))
    if method.startswith("safa"):
        assert torch.equal(tiles, views)
    else:
        torch.testing.assert_close(tiles, views, rtol=1e-5, atol=1e-6)
    assert "2 x 3 tiles of 128 x 128 px" in jd.describe_layout(layout) and "\n" not in jd.describe_layout(layout)


def test_the_methods_differ_on_a_grid(jd):
    """Each method's merge acts: same noise, different canvases (one call per method)."""
    latents = {m: jd("a stone wall", width=232, height=200, method=m, overlap=0.25, generator=_gen(),
                     output_type="latent", **STEPS).latent for m in GRID_METHODS}
    for a in GRID_METHODS:
        for b in GRID_METHODS:
            if a < b:
                assert not torch.equal(latents[a], latents[b]), (a, b)


@pytest.mark.parametrize("loop", ["both", (True, True)], ids=["both", "pair"])
def test_a_torus_tiles_bitwise_at_its_edges(jd, loop):
    # 200 x 272 px: rows loop 25 cells in 2 tiles, cols loop 34 cells in 3 tiles (spaced, exact).
    r, views = _run_keeping_last_views(jd, width=272, height=200, loop=loop, method="safa_selfloop", overlap=0.25,
                                       generator=_gen(), output_type="latent", **STEPS)
    layout = r.layout
    assert layout.rows.loop and layout.cols.loop
    assert (layout.rows.length, layout.cols.length) == (25, 34) and r.latent.shape[-2:] == (25, 34)
    # The last tile of each axis runs past the edge and wraps to the start.
    assert layout.rows.starts[-1] + WINDOW > 25 and layout.cols.starts[-1] + WINDOW > 34
    # Every tile, wrapped ones included, is bitwise its window of the stitched torus: the views
    # agree on every overlap, across both seams, so the canvas repeats without a seam.
    assert torch.equal(gather(r.latent, layout, (-2, -1)), views)
    a, b = layout.tile(layout.num_views - 1)  # the corner tile wraps on both axes
    rows = [(layout.rows.starts[a] + k) % 25 for k in range(WINDOW)]
    cols = [(layout.cols.starts[b] + k) % 34 for k in range(WINDOW)]
    assert torch.equal(r.latent[..., rows, :][..., cols], views[-1])


def test_loop_on_the_width_only_is_a_cylinder(jd):
    r = jd("a stone wall", width=272, height=200, loop=(False, True), method="multidiffusion", overlap=0.25,
           generator=_gen(), output_type="np", **STEPS)
    assert not r.layout.rows.loop and r.layout.cols.loop
    assert r.images.shape == (1, 200, 272, 3)


def test_a_torus_decodes_to_the_requested_size(jd):
    r = jd("a stone wall", width=272, height=200, loop="both", method="safa", overlap=0.25, generator=_gen(),
           output_type="np", **STEPS)
    assert r.images.shape == (1, 200, 272, 3) and np.isfinite(r.images).all()


def test_below_one_window_in_height_is_todays_strip(jd):
    r = jd("a stone wall", width=272, height=64, method="safa", overlap=0.25, generator=_gen(), output_type="latent",
           **STEPS)
    assert not isinstance(r.layout, GridLayout) and r.latent.shape[-2] == 8


def test_the_memory_estimate_counts_every_tile(jd):
    itemsize = 4  # the tiny pipeline is float32
    tile = 4 * WINDOW * WINDOW * itemsize
    strip = jd.estimate_memory(width=232, height=64, overlap=0.25, method="multidiffusion")
    grid = jd.estimate_memory(width=232, height=200, overlap=0.25, method="multidiffusion")
    assert grid.phases["prepare"]["views"] == 6 * tile  # 2 x 3 tiles of 16 x 16
    assert grid.phases["prepare"]["initial noise"] >= 4 * 25 * 29 * itemsize  # at least the canvas
    assert grid.peak > strip.peak


@pytest.mark.parametrize("call,message", [
    (dict(loop="yes"), r"loop must be a bool \(the width\), 'both' or a pair of bools \(height, width\)"),
    (dict(loop=(True,)), r"loop must be a bool \(the width\), 'both' or a pair"),
    (dict(loop=(1, 0)), r"loop must be a bool \(the width\), 'both' or a pair"),
    (dict(method="safa_stats"), r"method 'safa_stats' runs on strips only"),
    (dict(width=100), r"width must be at least one window \(128 px\) when the height exceeds one window"),
    (dict(decode="views"), r"decode='views' decodes a strip along the width; .* use decode='auto', 'full', 'tiled' or 'tiled-disk'"),
    (dict(loop="both", height=224), r"loop on the height: no seamless loop of exactly 224 px .*nearest loopable"),
    (dict(method="safa", overlap=0.6), r"overlap must be"),
])
def test_bad_input_is_one_clear_line(jd, call, message):
    args = dict(width=232, height=200, overlap=0.25, num_inference_steps=1, output_type="latent")
    args.update(call)
    with pytest.raises(ValueError, match=message) as info:
        jd("x", **args)
    assert "\n" not in str(info.value)


def test_cli_makes_a_tileable_texture(jd, tmp_path, capsys):
    # safa generate --loop both: the same torus from the command line, a PNG of the size asked.
    from PIL import Image

    from safa.cli import main
    model = tmp_path / "tiny-sd"
    jd.pipe.save_pretrained(str(model))
    out = tmp_path / "wall.png"
    assert main(["generate", "--model", str(model), "--prompt", "a stone wall", "--width", "272", "--height", "200",
                 "--loop", "both", "--overlap", "0.25", "--steps", "2", "--quiet", "--out", str(out)]) == 0
    assert "tiles" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.size == (272, 200)
    assert main(["generate", "--model", str(model), "--width", "272", "--loop", "sideways", "--out",
                 str(tmp_path / "x.png")]) == 2
    assert "argument --loop: takes no value, or 'both'" in capsys.readouterr().err
