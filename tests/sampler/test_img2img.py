"""img2img over the canvas (``image=`` + ``strength=`` on SD 1.x/2.x and SDXL, docs/conditions.md).

One view is ``StableDiffusionImg2ImgPipeline``'s (and SDXL's) own output for the same image and
noise; a wide image keeps its size, is encoded once, whole, through the one swappable function,
and is noised to the strength's first timestep; every bad input is one clear ValueError.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline
from PIL import Image

from safa import JointDiffusion
from safa.adapters import canvas
from safa.testing import pipelines as tp
from safa.texture import make_texture_pipeline


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def sd():
    return tp.tiny_sd_pipeline(sample_size=16)  # windows of 128 px


@pytest.mark.parametrize("strength, steps", [(0.5, 4), (0.3, 10), (1.0, 2)])
def test_one_view_is_the_img2img_pipelines_own_output(sd, strength, steps):
    img2img = StableDiffusionImg2ImgPipeline(**sd.components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 128, 128, generator=_gen(1))
    kw = dict(strength=strength, num_inference_steps=steps, guidance_scale=7.5, output_type="pt")
    theirs = img2img("a cat", image=image, generator=_gen(), **kw).images
    out = JointDiffusion(sd)("a cat", image=image, generator=_gen(), **kw)
    assert out.layout.num_views == 1
    torch.testing.assert_close(out.images, theirs, rtol=0, atol=1e-6)


def test_one_view_is_the_sdxl_img2img_pipelines_own_output():
    pipe = tp.tiny_sdxl_pipeline(sample_size=16)
    img2img = StableDiffusionXLImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 128, 128, generator=_gen(1))
    kw = dict(strength=0.6, num_inference_steps=4, guidance_scale=5.0, output_type="latent")
    theirs = img2img("a cat", image=image, generator=_gen(), **kw).images
    out = JointDiffusion(pipe)("a cat", image=image, generator=_gen(), **kw)
    torch.testing.assert_close(out.latent, theirs, rtol=0, atol=1e-6)


def test_a_wide_image_is_encoded_once_whole_and_noised_to_the_strengths_timestep(sd, monkeypatch):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 296, 3), dtype=np.uint8))
    encoded = []
    whole = canvas.encode_canvas_image
    monkeypatch.setattr(canvas, "encode_canvas_image",
                        lambda adapter, pixels, generator: encoded.append(pixels.shape) or whole(adapter, pixels,
                                                                                                generator))
    first = []
    jd = JointDiffusion(sd)
    out = jd("a cat", image=image, strength=0.3, num_inference_steps=10, method="multidiffusion", generator=_gen(),
             callback_on_step_end=lambda jd, i, t, kw: first.append(int(t)) if i == 0 else None)
    assert encoded == [(1, 3, 128, 296)]
    assert out.images[0].size == (296, 128) and out.layout.num_views == 3
    sd.scheduler.set_timesteps(10)
    assert first == [int(sd.scheduler.timesteps[7])]  # the last int(10 * 0.3) = 3 steps run


def test_a_low_strength_keeps_the_image_and_a_higher_one_moves_further(sd):
    """Over several views: the output's distance to the image grows with the strength."""
    image = torch.rand(1, 3, 128, 296, generator=_gen(5))
    jd = JointDiffusion(sd)
    distance = [float((jd("a cat", image=image, strength=s, num_inference_steps=10, generator=_gen(),
                          output_type="pt").images - image).abs().mean()) for s in (0.1, 0.9)]
    assert distance[0] < distance[1]


@pytest.mark.parametrize("kwargs, message", [
    (dict(image=torch.rand(1, 3, 128, 96)), r"at least one window \(128 x 128 px\)"),
    (dict(image=torch.rand(1, 3, 128, 132)), "multiple of 8 px"),
    (dict(image=torch.rand(1, 3, 128, 256), strength=1.5), r"strength must be in \[0.0, 1.0\], got 1.5"),
    (dict(image=torch.rand(1, 3, 128, 256), strength=-0.1), r"strength must be in \[0.0, 1.0\]"),
    (dict(image=torch.rand(1, 3, 128, 256), strength=0.05), "leaves no denoising step"),
    (dict(image=Image.new("RGBA", (256, 128))), "RGB image.*'RGBA'"),
    (dict(image=torch.rand(1, 4, 128, 256)), "RGB image"),
    (dict(strength=0.5), "strength is given without image"),
    (dict(image=torch.rand(1, 3, 128, 256), noise_level=20), "noise_level is not an option"),
    (dict(image=torch.rand(1, 3, 128, 256), width=128), "never resized"),
])
def test_img2img_bad_input_is_one_clear_error(sd, kwargs, message):
    with pytest.raises(ValueError, match=message):
        JointDiffusion(sd)("a cat", num_inference_steps=4, **kwargs)


def test_image_on_an_audio_family_points_to_audio():
    with pytest.raises(ValueError, match="image is for image pipelines; .* takes audio="):
        JointDiffusion(make_texture_pipeline(window_frames=64))("rain", seconds=4, image=torch.rand(1, 3, 8, 8))


def test_image_on_a_family_without_img2img_is_refused():
    with pytest.raises(ValueError, match="image is not supported for StableDiffusion3Pipeline"):
        JointDiffusion(tp.tiny_sd3_pipeline())("a cat", image=torch.rand(1, 3, 256, 256), num_inference_steps=1)
