"""Outpainting on SD 1.x/2.x and SDXL (``image=`` narrower than ``width``, no ``strength``; safa.known).

The image is encoded once (the VAE posterior's mode) into the latent columns it covers; every
step those columns of every view hold the known latent at the step's noise level, the final
latent holds it clean; the decoded output gets the user's pixels back (raised-cosine crossfade at
each junction), in every output type and in streamed PNG files; a loop places it across the seam.
Every bad input is one ValueError naming the parameter.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from safa import JointDiffusion
from safa import known as known_module
from safa.cli import main
from safa.known import noised_known
from safa.testing import pipelines as tp

FADE = 16


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def sd():
    return tp.tiny_sd_pipeline(sample_size=16)  # windows of 128 px


@pytest.fixture(scope="module")
def photo():
    """A 96 x 128 px RGB image, exact in uint8 (so that PIL round trips keep it)."""
    return np.random.default_rng(0).integers(0, 256, (128, 96, 3), dtype=np.uint8)


def _pixels(photo):
    return torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255


def _captured(monkeypatch):
    """The call's KnownColumns, as prepare_known_image returns it."""
    seen = []
    original = known_module.prepare_known_image
    monkeypatch.setattr(known_module, "prepare_known_image", lambda *a, **k: seen.append(original(*a, **k)) or seen[-1])
    return seen


def _inside(start, width, fade=FADE):
    return slice(start + fade, start + width - fade)


@pytest.mark.parametrize("output_type", ["pt", "np", "pil"])
def test_the_users_pixels_come_back_exactly_and_the_rest_is_generated(sd, photo, output_type):
    jd = JointDiffusion(sd)
    out = jd("a castle", image=Image.fromarray(photo), width=384, image_start=64, num_inference_steps=3,
             generator=_gen(), output_type=output_type)
    images = out.images
    if output_type == "pil":
        assert images[0].size == (384, 128)
        got = np.asarray(images[0])
    else:
        got = images[0].permute(1, 2, 0).numpy() if output_type == "pt" else images[0]
        assert got.shape == (128, 384, 3)
        got = np.round(got * 255).astype(np.uint8)
    assert np.array_equal(got[:, _inside(64, 96)], photo[:, FADE:-FADE])
    assert out.output_length == 384 and out.columns == 48


def test_paste_image_false_is_the_decoded_generation(sd, photo):
    """Opted out: the decoded latent there; the paste changes the image's columns only, and only
    by the crossfade's weights at its two junctions."""
    jd = JointDiffusion(sd)
    kw = dict(image=_pixels(photo), width=384, image_start=64, num_inference_steps=3, output_type="pt")
    pasted = jd("a castle", generator=_gen(), **kw).images
    decoded = jd("a castle", generator=_gen(), paste_image=False, **kw).images
    assert torch.equal(pasted[..., :64], decoded[..., :64])
    assert torch.equal(pasted[..., 160:], decoded[..., 160:])
    assert not torch.allclose(decoded[..., _inside(64, 96)], _pixels(photo)[..., FADE:-FADE], atol=1e-2)
    # At the junction's first column the user's weight is sin^2(pi/2 * 0.5/16): mostly the generation.
    w = np.sin(0.5 * np.pi * 0.5 / FADE) ** 2
    torch.testing.assert_close(pasted[..., 64], decoded[..., 64] * (1 - w) + _pixels(photo)[..., 0] * w)


def test_known_columns_hold_the_noised_known_latent_every_step(sd, photo, monkeypatch):
    """After every step (merge, then impose) every view's known columns are the known latent at that
    step's noise level, with one fixed noise; SaFa's X^0 holds it while it guides; the final latent
    holds the clean known latent, the VAE posterior's mode of the image."""
    seen = _captured(monkeypatch)
    jd = JointDiffusion(sd)
    steps, checked = [], []

    def check(_jd, i, t, state):
        known = seen[0]
        views, timesteps = state["views"], sd.scheduler.timesteps
        view_idx, local_idx, src_idx = known._index
        want = noised_known(sd.scheduler, known.latent, known.noise, timesteps, i)
        got = views.movedim(-1, 1)[view_idx, local_idx]
        assert torch.equal(got, want.movedim(-1, 0)[src_idx])
        if state["reference"] is not None:
            local, clip, noise = known._reference
            reference = state["reference"].index_select(-1, local)
            torch.testing.assert_close(reference, noised_known(sd.scheduler, clip, noise, timesteps, i))
            checked.append(i)
        steps.append(i)
    out = jd("a castle", image=_pixels(photo), width=384, image_start=64, num_inference_steps=4, generator=_gen(),
             output_type="latent", method="safa:guide=0.5", callback_on_step_end=check)
    assert steps == [0, 1, 2, 3] and checked == [0, 1]
    x = _pixels(photo) * 2 - 1
    mode = sd.vae.encode(x).latent_dist.mode() * sd.vae.config.scaling_factor
    torch.testing.assert_close(seen[0].latent, mode, rtol=0, atol=1e-6)
    assert torch.equal(out.latent[..., 8:20], seen[0].latent)
    assert seen[0].columns == list(range(8, 20))


def test_loop_makes_a_360_panorama_with_the_image_across_the_seam(sd, photo, monkeypatch):
    seen = _captured(monkeypatch)
    out = JointDiffusion(sd)("a castle", image=_pixels(photo), width=384, image_start=320, loop=True,
                             num_inference_steps=3, generator=_gen(), output_type="pt")
    assert out.layout.loop and out.layout.length == 48 and out.images.shape == (1, 3, 128, 384)
    given = _pixels(photo)
    torch.testing.assert_close(out.images[..., 320 + FADE:], given[..., FADE:64], rtol=0, atol=0)
    torch.testing.assert_close(out.images[..., :32 - FADE], given[..., 64:96 - FADE], rtol=0, atol=0)
    assert seen[0].columns == list(range(40, 52))  # 48..51 wrap to 0..3
    assert torch.equal(out.latent[..., 40:48], seen[0].latent[..., :8])
    assert torch.equal(out.latent[..., :4], seen[0].latent[..., 8:])


def test_streamed_png_has_the_pixels_pasted_before_its_rows_are_written(sd, photo, tmp_path, monkeypatch):
    from safa import output
    streamed = []
    original = output._stream_images
    monkeypatch.setattr(output, "_stream_images", lambda *a: streamed.append(a[-1]) or original(*a))
    path = tmp_path / "pano.png"
    JointDiffusion(sd)("a castle", image=Image.fromarray(photo), width=384, image_start=128, num_inference_steps=2,
                       generator=_gen(), output_path=str(path), decode="tiled")
    got = np.asarray(Image.open(path))
    assert got.shape == (128, 384, 3)
    assert np.array_equal(got[:, _inside(128, 96)], photo[:, FADE:-FADE])
    assert len(streamed) == 1 and streamed[0] is not None  # band by band (PngRows), the paste inside


def test_sdxl_outpaints_too():
    pipe = tp.tiny_sdxl_pipeline(sample_size=16)
    image = torch.rand(2, 3, 128, 64, generator=_gen(3))  # one image per output
    out = JointDiffusion(pipe)(["a castle", "a lake"], image=image, width=256, image_start=192, num_inference_steps=2,
                               generator=_gen(), output_type="pt", image_crossfade=0)
    assert out.images.shape == (2, 3, 128, 256)
    assert torch.equal(out.images[..., 192:], image)


def test_no_image_is_the_call_without_one(sd):
    """The outpainting arguments at their defaults change nothing (the golden outputs hold it bitwise too)."""
    jd = JointDiffusion(sd)
    kw = dict(width=256, num_inference_steps=2, output_type="latent")
    plain = jd("a castle", generator=_gen(), **kw).latent
    again = jd("a castle", generator=_gen(), image_start=0, image_crossfade=16, paste_image=True, **kw).latent
    assert torch.equal(plain, again)


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=256), r"image is 128 px high but height=256"),
    (dict(width=64), r"image is 96 px wide, wider than the canvas \(width=64\)"),
    (dict(image_start=296), r"image_start must be in \[0, 288\]"),
    (dict(image_start=12), r"image_start must be an int multiple of 8"),
    (dict(image_start=(0, 8)), r"2-D placement \(top, left\) is not supported"),
    (dict(image_start=384, loop=True), r"image_start must be in \[0, 383\]"),
    (dict(strength=0.5), r"strength is img2img's"),
    (dict(image_crossfade=-1), r"image_crossfade must be an int >= 0"),
    (dict(paste_image="yes"), r"paste_image must be a bool"),
    (dict(loop="both"), r"loop must be a bool when outpainting"),
    (dict(image=torch.rand(1, 3, 128, 100)), r"multiple of 8 px on both sides"),
    (dict(image=torch.rand(1, 3, 256, 96), height=None), r"more than one window"),
    (dict(image=Image.new("RGBA", (96, 128))), r"RGB image.*'RGBA'"),
    (dict(image=torch.rand(1, 3, 128, 128), width=None, image_start=8), r"image_start is for outpainting"),
    (dict(image=None, image_start=8), r"image_start places the user's image"),
    (dict(image=torch.rand(2, 3, 128, 96)), r"image has 2 images but this call makes 1 output"),
])
def test_bad_input_is_one_clear_error(sd, photo, kwargs, message):
    call = dict(image=_pixels(photo), width=384, num_inference_steps=1, output_type="latent")
    call.update(kwargs)
    with pytest.raises(ValueError, match=message):
        JointDiffusion(sd)("a castle", **call)


def test_sd3_says_where_outpainting_runs():
    pipe = tp.tiny_sd3_pipeline()
    with pytest.raises(ValueError, match=r"outpainting \(an image narrower than width\) run on SD 1.x/2.x and SDXL"):
        JointDiffusion(pipe)("a castle", image=torch.rand(1, 3, 64, 64), width=256, num_inference_steps=1)


def test_cli_outpaints_a_png(sd, photo, tmp_path, capsys):
    model = tmp_path / "sd"
    sd.save_pretrained(str(model))
    Image.fromarray(photo).save(tmp_path / "in.png")
    out = tmp_path / "pano.png"
    code = main(["generate", "--model", str(model), "--prompt", "a castle", "--steps", "2", "--quiet",
                 "--image", str(tmp_path / "in.png"), "--width", "384", "--at", "64", "--loop", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    got = np.asarray(Image.open(out))
    assert got.shape == (128, 384, 3)
    assert np.array_equal(got[:, _inside(64, 96)], photo[:, FADE:-FADE])
    capsys.readouterr()
    code = main(["generate", "--model", str(model), "--prompt", "a castle", "--steps", "2", "--quiet",
                 "--image", str(tmp_path / "in.png"), "--width", "384", "--at", "12", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "image_start must be an int multiple of 8" in err[0]
    assert not (tmp_path / "x.png").exists()
