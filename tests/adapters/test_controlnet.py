"""Canvas-sized per-pixel conditions, cropped per view (safa.adapters.canvas, docs/conditions.md).

The crop rule against slicing by hand (open strips, loops that wrap, 2-D grids); ``Conditions.take``
giving every scheduler row its view's crop; ControlNet (SD and SDXL) and the x4 upscaler on tiny
offline pipelines: one view is the pipeline's own output, the ControlNet sees at every call the
crop of the view each row belongs to, a feature in the control image changes only what the views
covering it produce; and every bad input is one clear ValueError.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from safa import JointDiffusion
from safa.adapters import Conditions
from safa.adapters.canvas import crop_per_view, pad_to, read_image
from safa.testing import pipelines as tp
from safa_kernels import GridLayout, ViewLayout

# Windows of 16 latent columns (128 px): the tiny pipelines' real layout, at a CPU test's size.
WINDOW = 16


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def controlnet():
    return tp.tiny_controlnet_pipeline(sample_size=WINDOW)


@pytest.fixture(scope="module")
def upscaler():
    return tp.tiny_upscale_pipeline(sample_size=WINDOW)


# -- the crop rule ----------------------------------------------------------------------------------
def _columns_of(layout: ViewLayout, v: int) -> list:
    return [(layout.starts[v] + j) % layout.length for j in range(layout.window)]


@pytest.mark.parametrize("scale", [1, 8])
@pytest.mark.parametrize("loop", [False, True])
def test_a_strip_view_gets_the_pixels_under_its_window(scale, loop):
    layout = ViewLayout.spaced(40, 16, 3, loop=True) if loop else ViewLayout.covering(37, 16, 5)
    canvas = torch.rand(2, 3, 3 * scale, layout.length * scale)
    crops = crop_per_view(canvas, layout, scale)
    assert crops.shape == (layout.num_views * 2, 3, 3 * scale, 16 * scale)
    for v in range(layout.num_views):
        pixels = [c * scale + k for c in _columns_of(layout, v) for k in range(scale)]  # a loop wraps
        for b in range(2):
            assert torch.equal(crops[v * 2 + b], canvas[b][..., pixels])


def test_a_grid_view_is_its_tile_in_the_layouts_order():
    grid = GridLayout(ViewLayout(36, 12, 3, loop=True), ViewLayout.covering(40, 16, 4))
    canvas = torch.rand(1, 3, grid.rows.length * 4, grid.cols.length * 4)
    crops = crop_per_view(canvas, grid, 4)
    for a in range(grid.rows.num_views):
        for b in range(grid.cols.num_views):
            rows = [r * 4 + k for r in _columns_of(grid.rows, a) for k in range(4)]
            cols = [c * 4 + k for c in _columns_of(grid.cols, b) for k in range(4)]
            assert torch.equal(crops[a * grid.cols.num_views + b], canvas[0][:, rows][..., cols])


def test_the_canvas_is_padded_by_its_edge_never_resized():
    image = torch.rand(1, 3, 5, 7)
    padded = pad_to(image, 8, 11)
    assert torch.equal(padded[..., :5, :7], image)
    assert torch.equal(padded[..., :5, 7:], image[..., 6:7].expand(-1, -1, -1, 4))
    assert torch.equal(padded[..., 5:, :7], image[..., 4:5, :].expand(-1, -1, 3, -1))
    with pytest.raises(ValueError, match="larger than the canvas"):
        pad_to(image, 4, 7)


def test_images_are_read_as_diffusers_reads_them():
    array = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    from diffusers.image_processor import VaeImageProcessor
    ours = read_image(Image.fromarray(array))
    theirs = VaeImageProcessor.numpy_to_pt(VaeImageProcessor.pil_to_numpy(Image.fromarray(array)))
    assert torch.equal(ours, theirs)
    assert torch.equal(read_image(array), ours)
    assert torch.equal(read_image([Image.fromarray(array)] * 2), torch.cat([ours, ours]))
    for bad, message in ((Image.fromarray(array[..., 0]), "RGB image.*mode 'L'"),
                         (torch.rand(1, 1, 4, 4), "RGB image"), (np.zeros((4, 4, 4)), "RGB array"),
                         (torch.zeros(1, 3, 4, 4, dtype=torch.uint8), "floating point"), ("x.png", "PIL image")):
        with pytest.raises(ValueError, match=message):
            read_image(bad)


def test_take_gives_every_row_its_prompt_and_its_crop():
    positive = {"encoder_hidden_states": torch.arange(3.0).view(3, 1)}
    negative = {"encoder_hidden_states": -torch.arange(3.0).view(3, 1)}
    crops = torch.arange(5.0).view(5, 1) * 10
    cond = Conditions(positive, negative, {"x": 1}, windows={"controlnet_cond": crops})
    rows = cond.row(torch.tensor([2, 0, 1, 1]), torch.tensor([4, 4, 0, 3]))
    taken = cond.take(rows)
    assert taken.positive["encoder_hidden_states"].flatten().tolist() == [2, 0, 1, 1]
    assert taken.negative["encoder_hidden_states"].flatten().tolist() == [-2, 0, -1, -1]
    for branch in (taken.positive, taken.negative):  # the same crop in both guidance branches
        assert branch["controlnet_cond"].flatten().tolist() == [40, 40, 0, 30]
    assert taken.extra == {"x": 1} and not taken.windows
    plain = Conditions(positive, None).take(torch.tensor([1, 1]))  # without crops: prompt rows, as before
    assert plain.positive["encoder_hidden_states"].flatten().tolist() == [1, 1]


# -- ControlNet -------------------------------------------------------------------------------------
def test_one_view_is_the_controlnet_pipelines_own_output(controlnet):
    control = torch.rand(1, 3, 128, 128, generator=_gen(1))
    kw = dict(num_inference_steps=2, guidance_scale=7.5, controlnet_conditioning_scale=0.7)
    theirs = controlnet("a cat", image=control, generator=_gen(), output_type="pt", **kw).images
    out = JointDiffusion(controlnet)("a cat", image=control, generator=_gen(), output_type="pt", **kw)
    assert out.layout.num_views == 1
    torch.testing.assert_close(out.images, theirs, rtol=0, atol=1e-6)


def test_one_view_is_the_sdxl_controlnet_pipelines_own_output():
    pipe = tp.tiny_sdxl_controlnet_pipeline(sample_size=WINDOW)
    control = torch.rand(1, 3, 128, 128, generator=_gen(1))
    kw = dict(num_inference_steps=2, guidance_scale=5.0, output_type="latent")
    theirs = pipe("a cat", image=control, generator=_gen(), **kw).images
    out = JointDiffusion(pipe)("a cat", image=control, generator=_gen(), **kw)
    torch.testing.assert_close(out.latent, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("view_batch_size", [None, 1])
def test_every_controlnet_call_sees_the_crops_of_its_rows_views(controlnet, view_batch_size):
    """Two outputs, guidance on, one or many views per call: row (view v, output b) of every
    ControlNet call holds view v's crop of output b's control image, in both branches."""
    images = torch.rand(2, 3, 128, 360, generator=_gen(2))
    seen = []
    handle = controlnet.controlnet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["controlnet_cond"].clone()), with_kwargs=True)
    try:
        out = JointDiffusion(controlnet)(["a", "b"], image=images, num_inference_steps=2, guidance_scale=7.5,
                                         method="safa_selfloop", view_batch_size=view_batch_size,
                                         output_type="latent", generator=_gen())
    finally:
        handle.remove()
    layout = out.layout
    canvas = pad_to(images, 128, layout.length * 8)
    expected = torch.stack([canvas[b][..., layout.starts[v] * 8:(layout.starts[v] + WINDOW) * 8]
                            for v in range(layout.num_views) for b in range(2)])
    per_step = torch.cat([x.chunk(2)[1] for x in seen[:len(seen) // 2]])  # the first step's calls
    for x in seen:  # the unconditional and the text branch take the same crops
        assert torch.equal(*x.chunk(2))
    assert torch.equal(per_step, expected)


def test_a_control_feature_changes_only_the_views_covering_it(controlnet):
    control = torch.rand(1, 3, 128, 440, generator=_gen(3))
    changed = control.clone()
    changed[..., 20:28] = 1 - changed[..., 20:28]  # latent columns 2-3: the first view only
    jd = JointDiffusion(controlnet)
    kw = dict(num_inference_steps=1, guidance_scale=7.5, method="safa_selfloop", output_type="latent")
    a = jd("a cat", image=control, generator=_gen(), **kw)
    b = jd("a cat", image=changed, generator=_gen(), **kw)
    layout = a.layout
    differs = (a.latent - b.latent).abs().amax(dim=(0, 1, 2)) > 0
    first_view = set(range(layout.starts[0], layout.starts[0] + WINDOW))
    assert differs[2:4].all()
    assert set(torch.nonzero(differs).flatten().tolist()) <= first_view
    # Over more steps the change travels through the overlaps one view per step, never further.
    kw["num_inference_steps"] = 2
    a, b = jd("a cat", image=control, generator=_gen(), **kw), jd("a cat", image=changed, generator=_gen(), **kw)
    far = layout.starts[2] + layout.overlap  # view 2's columns that view 1 does not reach
    assert layout.num_views == 4 and torch.equal(a.latent[..., far:], b.latent[..., far:])
    assert not torch.equal(a.latent[..., :far], b.latent[..., :far])


def test_controlnet_loops_and_grids(controlnet):
    jd = JointDiffusion(controlnet)
    kw = dict(num_inference_steps=1, guidance_scale=1.0, generator=_gen())
    out = jd("a cat", image=torch.rand(1, 3, 128, 320), loop=True, **kw)
    assert out.layout.loop and out.images[0].size == (320, 128)
    out = jd("a cat", image=Image.new("RGB", (200, 256)), **kw)  # taller than a window: a grid of tiles
    assert isinstance(out.layout, GridLayout) and out.images[0].size == (200, 256)


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "image is required for StableDiffusionControlNetPipeline: the control image"),
    (dict(image=torch.rand(1, 3, 128, 256), width=512), r"width=512 disagrees with the image \(256 x 128 px"),
    (dict(image=torch.rand(1, 3, 128, 256), height=256), "never resized"),
    (dict(image=Image.new("L", (256, 128))), "RGB image"),
    (dict(image=torch.rand(1, 3, 100, 256)), "output 100 px high, and height must be a positive multiple of 8"),
    (dict(image=torch.rand(1, 3, 128, 256), strength=0.5), "strength is not an option of"),
    (dict(image=torch.rand(1, 3, 128, 256), controlnet_conditioning_scale="1"), "finite number"),
    (dict(image=torch.rand(1, 3, 128, 256), guide=0.3), "reference window has no place"),
    (dict(image=torch.rand(1, 3, 128, 256), method="mad"), "does not take image="),
    (dict(image=torch.rand(3, 3, 128, 256), prompt=["a", "b"]), "3 images but this call makes 2"),
])
def test_controlnet_bad_input_is_one_clear_error(controlnet, kwargs, message):
    kwargs = {"prompt": "a cat", **kwargs}
    with pytest.raises(ValueError, match=message):
        JointDiffusion(controlnet)(num_inference_steps=1, **kwargs)


# -- the x4 upscaler --------------------------------------------------------------------------------
def test_one_view_is_the_upscalers_own_output(upscaler):
    low = torch.rand(1, 3, 16, 16, generator=_gen(4))
    kw = dict(num_inference_steps=2, noise_level=30, guidance_scale=9.0, output_type="pt")
    theirs = upscaler("a cat", image=low, generator=_gen(), **kw).images
    out = JointDiffusion(upscaler)("a cat", image=low, generator=_gen(), **kw)
    assert out.images.shape == (1, 3, 64, 64)
    torch.testing.assert_close(out.images, theirs, rtol=0, atol=1e-6)


def test_the_upscaler_gives_4x_at_any_size_over_a_grid(upscaler):
    low = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 50, 3), dtype=np.uint8))
    seen = []
    handle = upscaler.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0][:, 4:].clone()))
    try:
        out = JointDiffusion(upscaler)("a cat", image=low, num_inference_steps=1, guidance_scale=1.0,
                                       noise_level=0, generator=_gen())
    finally:
        handle.remove()
    assert out.images[0].size == (200, 148)
    grid = out.layout
    assert isinstance(grid, GridLayout) and (grid.rows.num_views, grid.cols.num_views) == (3, 4)
    # The UNet's image channels: the low-res image noised whole as the pipeline does (its noise is
    # the generator's first draw), each tile its crop.
    pixels = read_image(low) * 2 - 1
    noise = torch.randn(pixels.shape, generator=_gen())
    noised = upscaler.low_res_scheduler.add_noise(pixels, noise, torch.tensor([0]))
    canvas = pad_to(noised, grid.rows.length, grid.cols.length)
    tiles = crop_per_view(canvas, grid, 1)
    torch.testing.assert_close(seen[0], tiles, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "image is required for StableDiffusionUpscalePipeline: the low-resolution image"),
    (dict(image=torch.rand(1, 3, 16, 16), noise_level=351), r"noise_level must be an int in \[0, 350\]"),
    (dict(image=torch.rand(1, 3, 16, 16), width=16), "an output of 64 x 64 px"),
    (dict(image=torch.rand(1, 3, 16, 16), controlnet_conditioning_scale=1.0), "not an option"),
])
def test_upscaler_bad_input_is_one_clear_error(upscaler, kwargs, message):
    with pytest.raises(ValueError, match=message):
        JointDiffusion(upscaler)("a cat", num_inference_steps=1, **kwargs)

