"""``safa generate --image / --strength / --control-image`` on tiny SD, ControlNet and x4 upscaler
pipelines saved with ``save_pretrained`` (``--model`` finds the new pipeline classes), in process."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import safa.testing.pipelines as tp
from safa.cli import main

FAST = ["--prompt", "a castle", "--steps", "2", "--quiet"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    dirs = {}
    for name, build in (("sd", tp.tiny_sd_pipeline), ("controlnet", tp.tiny_controlnet_pipeline),
                        ("upscaler", tp.tiny_upscale_pipeline)):
        d = tmp_path_factory.mktemp(name)
        build(sample_size=16).save_pretrained(str(d))
        dirs[name] = str(d)
    return dirs


def _png(path, width, height, mode="RGB"):
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return str(path)


@pytest.mark.parametrize("model, flags, size", [
    ("sd", ["--image", "{wide}", "--strength", "0.5"], (296, 128)),
    ("controlnet", ["--control-image", "{wide}", "--control-scale", "0.5"], (296, 128)),
    ("upscaler", ["--image", "{small}", "--noise-level", "10"], (200, 128)),
])
def test_the_image_sets_the_output(models, tmp_path, capsys, model, flags, size):
    images = {"wide": _png(tmp_path / "wide.png", 296, 128), "small": _png(tmp_path / "small.png", 50, 32)}
    out = tmp_path / "out.png"
    code = main(["generate", "--model", models[model], *FAST, *[f.format(**images) for f in flags],
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert Image.open(out).size == size
    assert f"{size[0]}x{size[1]} px" in capsys.readouterr().out


@pytest.mark.parametrize("model, flags, pattern", [
    ("sd", ["--control-image", "{wide}"], "--control-image is for ControlNet pipelines, not StableDiffusionPipeline"),
    ("controlnet", ["--image", "{wide}"], "takes its control image with --control-image"),
    ("controlnet", [], "image is required for StableDiffusionControlNetPipeline"),
    ("sd", ["--image", "{wide}", "--strength", "2"], "strength must be in [0.0, 1.0]"),
    ("sd", ["--image", "{gray}"], "RGB image"),
    ("sd", ["--image", "{small}"], "at least one window (128 x 128 px)"),
    ("sd", ["--image", "{wide}", "--width", "256"], "wider than the canvas (width=256)"),
    ("sd", ["--strength", "0.3", "--width", "256"], "strength is given without image"),
    ("sd", ["--image", "{missing}"], "--image: cannot read an image from"),
])
def test_bad_image_flags_are_one_line(models, tmp_path, capsys, model, flags, pattern):
    images = {"wide": _png(tmp_path / "wide.png", 296, 128), "small": _png(tmp_path / "small.png", 64, 64),
              "gray": _png(tmp_path / "gray.png", 256, 128, "L"), "missing": str(tmp_path / "nope.png")}
    code = main(["generate", "--model", models[model], *FAST, *[f.format(**images) for f in flags],
                 "--out", str(tmp_path / "out.png")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and pattern in lines[0], err
    assert not (tmp_path / "out.png").exists()
