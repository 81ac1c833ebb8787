"""Image regions with their own prompts (safa.regions, docs/timelines.md) on tiny SD / SDXL / SD3 / FLUX pipelines."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import safa.testing.pipelines as tp
from safa import JointDiffusion
from safa.cli import main
from safa.commands.generate import parse_regions
from safa.regions import Bootstrap, region_masks

WINDOW = 8  # latent cells per window side (64 px) of the tiny UNets
STEPS = dict(num_inference_steps=3, output_type="latent")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _jd(builder):
    pipe = builder(sample_size=WINDOW)
    pipe.set_progress_bar_config(disable=True)
    return JointDiffusion(pipe)


@pytest.fixture(scope="module")
def sd():
    return _jd(tp.tiny_sd_pipeline)


@pytest.mark.parametrize("builder", [tp.tiny_sd_pipeline, tp.tiny_sdxl_pipeline, tp.tiny_sd3_pipeline])
def test_a_full_canvas_region_is_the_plain_prompt_bitwise(builder):
    jd = _jd(builder)
    kw = dict(height=64, width=192, negative_prompt="blurry", **STEPS)
    plain = jd("a red bird", generator=_gen(), **kw)
    region = jd("a forest", regions=[((0, 0, 64, 192), "a red bird")], generator=_gen(), **kw)
    assert torch.equal(plain.latent, region.latent) and region.extra_window_evaluations == 0
    boxed = jd("a forest", regions=[((8, 16, 48, 80), "a red bird", {"guidance_scale": 5.0})], generator=_gen(), **kw)
    assert boxed.extra_window_evaluations > 0 and not torch.equal(plain.latent, boxed.latent)


def test_flux_regions_run():
    jd = JointDiffusion(tp.tiny_flux_pipeline())
    jd.pipe.set_progress_bar_config(disable=True)
    kw = dict(height=64, width=64, num_inference_steps=2, output_type="latent")
    plain = jd("a red bird", generator=_gen(), **kw)
    full = jd("a forest", regions=[((0, 0, 64, 64), "a red bird")], generator=_gen(), **kw)
    half = jd("a forest", regions=[((0, 0, 64, 32), "a red bird")], bootstrap=0.5, generator=_gen(), **kw)
    assert torch.equal(plain.latent, full.latent)
    assert half.extra_window_evaluations == 2 and torch.isfinite(half.latent).all()


def test_regions_on_a_grid_and_a_loop(sd):
    grid = sd("a forest", regions=[((8, 16, 96, 80), "a red bird")], height=128, width=128, generator=_gen(), **STEPS)
    assert type(grid.layout).__name__ == "GridLayout" and grid.extra_window_evaluations > 0
    loop = sd("a forest", regions=[((0, 150, 64, 170), "a red bird")], height=64, width=192, loop=True,
              generator=_gen(), **STEPS)
    assert loop.extra_window_evaluations > 0 and torch.isfinite(loop.latent).all()


def test_region_guidance_scale_equal_to_the_calls_changes_nothing(sd):
    kw = dict(height=64, width=192, guidance_scale=4.0, bootstrap=0.0, **STEPS)
    a = sd("a forest", regions=[((8, 16, 48, 80), "a red bird")], generator=_gen(), **kw)
    b = sd("a forest", regions=[((8, 16, 48, 80), "a red bird", {"guidance_scale": 4.0})], generator=_gen(), **kw)
    c = sd("a forest", regions=[((8, 16, 48, 80), "a red bird", {"guidance_scale": 9.0})], generator=_gen(), **kw)
    assert torch.equal(a.latent, b.latent) and not torch.equal(a.latent, c.latent)


def test_masks_as_boxes_images_arrays_and_tensors_agree():
    h, w, scale = 64, 128, 8
    arr = np.zeros((h, w))
    arr[8:48, 16:80] = 1.0
    forms = [(8, 16, 48, 80), Image.fromarray((arr * 255).astype(np.uint8)), arr, torch.from_numpy(arr).bool()]
    masks = [region_masks([(m, "x")], h, w, scale)[0] for m in forms]
    for m in masks[1:]:
        np.testing.assert_array_equal(m, masks[0])
    assert masks[0].shape == (8, 16) and masks[0][1, 2] == 1.0 and masks[0][0, 0] == 0.0 and masks[0][5, 5] == 1.0
    half = np.zeros((h, w))
    half[:, :4] = 1.0  # half of each latent cell of column 0
    assert region_masks([(half, "x")], h, w, scale)[0][0, 0] == 0.5


def test_weights_are_a_partition_of_unity_with_overlapping_regions(sd):
    from safa.regions import canvas_prompts
    from safa.request import build_request
    request = build_request(sd.adapter, width=192, height=64, num_inference_steps=2)
    layout, _, _ = sd.prepare_layout(request)
    canvas = canvas_prompts(sd.adapter, request, layout, timeline=None, transition=None, bootstrap=None,
                            regions=[((0, 0, 32, 96), "a"), ((16, 48, 64, 192), "b")], prompt="bg", view_prompts=None)
    w = canvas.weights.numpy()
    assert w.shape == (3, 8, layout.length) and (w >= 0).all()
    np.testing.assert_allclose(w.sum(0), 1.0, atol=1e-12)
    assert w[1, 3, 7] == 0.5 and w[2, 3, 7] == 0.5 and w[0, 3, 7] == 0.0  # overlap: shared
    assert w[0, 7, 0] == 1.0 and w[1, 0, 0] == 1.0  # background elsewhere; region a alone


def test_bootstrap_replaces_the_input_outside_the_region_only(sd):
    from safa.regions import build_mix, canvas_prompts
    from safa.request import build_request
    request = build_request(sd.adapter, width=192, height=64, num_inference_steps=10)
    layout, _, _ = sd.prepare_layout(request)
    canvas = canvas_prompts(sd.adapter, request, layout, timeline=None, transition=None, bootstrap=0.3,
                            regions=[((0, 0, 32, 96), "a")], prompt="bg", view_prompts=None)
    shape = (1, 4, 8, 8)
    mix, keys = build_mix(canvas, layout, 1, shape, -1, lambda k, b: k, 7.5, 10, torch.device("cpu"), torch.float32)
    assert mix.bootstrap_steps == 3 and len(keys) == mix.num_branches
    timesteps = sd.adapter.set_timesteps(10, shape)
    boot = Bootstrap(sd.adapter, sd.pipe.scheduler, timesteps, mix, shape, 0)
    x = torch.randn(mix.num_branches, *shape[1:], generator=_gen(1))
    y = boot.apply(x, 0)
    assert torch.equal(boot.apply(x, 3), x)  # after the bootstrapping steps: untouched
    rows = set(mix.bootstrap_rows.tolist())
    for m in range(mix.num_branches):
        if m not in rows:
            assert torch.equal(y[m], x[m])  # the background's branches are never replaced
    for j, m in enumerate(mix.bootstrap_rows.tolist()):
        inside = (mix.masks[j] == 1).expand_as(x[m])
        outside = (mix.masks[j] == 0).expand_as(x[m])
        assert torch.equal(y[m][inside], x[m][inside]) and not torch.equal(y[m][outside], x[m][outside])


@pytest.mark.parametrize("kwargs,match", [
    (dict(regions=[(np.ones((32, 32)), "x")]), r"the mask must be the canvas's size in pixels, \(height, width\) = \(64, 192\)"),
    (dict(regions=[((0, 0, 65, 10), "x")]), r"regions\[0\]: a box is \(top, left, bottom, right\)"),
    (dict(regions=[((10, 0, 5, 10), "x")]), r"regions\[0\]: a box"),
    (dict(regions=[(np.full((64, 192), 2.0), "x")]), r"mask values must be in \[0, 1\]"),
    (dict(regions=[("nope", "x")]), "a mask is a PIL image"),
    (dict(regions=[((0, 0, 8, 8),)]), r"regions\[0\] must be \(mask, prompt\)"),
    (dict(regions=[((0, 0, 8, 8), "x", {"scale": 1})]), "options are negative_prompt and guidance_scale"),
    (dict(regions=[]), "regions must be a non-empty list"),
    (dict(regions=[((0, 0, 8, 8), "x")], prompt=None), "give prompt"),
    (dict(regions=[((0, 0, 8, 8), "x")], prompt=["a", "b"]), "give prompt"),
    (dict(regions=[((0, 0, 8, 8), "x")], bootstrap=2.0), "bootstrap must be a fraction"),
    (dict(regions=[((0, 0, 8, 8), "x")], view_prompts=["a"] * 4, prompt=None), "give either view_prompts"),
    (dict(regions=[((0, 0, 8, 8), "x")], method="mad"), "couples the views"),
    (dict(timeline=[(0, "x")], prompt=None), "timeline is for audio pipelines"),
])
def test_bad_regions_are_one_clear_value_error(sd, kwargs, match):
    call = dict(prompt="a forest", height=64, width=192, num_inference_steps=1, output_type="latent")
    call.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sd(**call)


def test_cli_parses_regions(tmp_path):
    mask = tmp_path / "m.png"
    Image.fromarray(np.zeros((64, 192), np.uint8)).save(mask)
    parsed = parse_regions(["0,16,48,80:a red: bird", f"{mask}:a lake"])
    assert parsed[0] == ((0, 16, 48, 80), "a red: bird") and parsed[1][1] == "a lake"
    assert parsed[1][0].size == (192, 64)


@pytest.mark.parametrize("argv,match", [
    (["--region", "1,2,3:x"], "is neither a box"),
    (["--region", "a,b,c,d:x"], "a box is four integers"),
    (["--region", "0,0,8,8"], "--region takes TOP,LEFT,BOTTOM,RIGHT:PROMPT"),
    (["--bootstrap", "0.5"], "--bootstrap is for --region"),
])
def test_cli_bad_regions_are_one_line(tmp_path, capsys, argv, match):
    code = main(["generate", "--model", str(tmp_path / "nothing"), "--width", "192", "--prompt", "a forest",
                 "--out", str(tmp_path / "o.png"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and match in err and len(err.splitlines()) == 1, err
