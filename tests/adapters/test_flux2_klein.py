"""JointDiffusion over FLUX.2 [klein] (``Flux2KleinPipeline``) on a tiny offline pipeline.

The sampler's latent is the pipeline's patchified noise ``(B, 4C, H/s, W/s)`` (8 px per column
for the tiny VAE /4, 16 px for the released models); each view is packed into tokens with its
own window's 4-D ids. Below one window the call is the pipeline's (bitwise without guidance,
to float rounding with true CFG, whose two branches run here as one batch); panoramas with
every method; the distilled rule; embeddings; MAD refused.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from merge_asserts import assert_merged_as_the_method_says, keep_last_views

from safa import JointDiffusion
from safa.testing import pipelines as tp

METHODS = ("safa", "safa_selfloop", "multidiffusion", "multidiffusion_triangular")
KW = dict(height=32, num_inference_steps=2)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def klein():
    return tp.tiny_flux2_klein_pipeline(seed=0)


@pytest.mark.parametrize("guidance", [1.0, 4.0], ids=["no-cfg", "true-cfg"])
def test_klein_one_view_equals_pipeline(klein, guidance):
    theirs = klein(prompt="a red fox", width=64, guidance_scale=guidance, generator=_gen(), output_type="np",
                   **KW).images
    ours = JointDiffusion(klein)("a red fox", width=64, guidance_scale=guidance, generator=_gen(), output_type="np",
                                 **KW)
    assert ours.layout.num_views == 1 and ours.latent.shape == (1, 16, 4, 8)
    assert ours.images.shape == theirs.shape == (1, 32, 64, 3)
    np.testing.assert_allclose(ours.images, theirs, rtol=0, atol=0 if guidance == 1.0 else 1e-5)


def test_klein_geometry(klein):
    adapter = JointDiffusion(klein).adapter
    assert adapter.decoded_scale == 8 and adapter.native_window() == 64  # 512 px: the pipeline's default size
    assert adapter.latent_shape(1, 10, 48) == (1, 16, 6, 10)
    with pytest.raises(ValueError, match="height must be a positive multiple of 8 pixels"):
        JointDiffusion(klein)("a fox", width=128, height=36, num_inference_steps=1)


@pytest.mark.parametrize("loop", [False, True], ids=["open", "loop"])
@pytest.mark.parametrize("method", METHODS)
def test_klein_panorama_every_method(klein, method, loop):
    jd = JointDiffusion(klein)
    last: list = []
    r = jd("a mountain range", width=256, window=8, method=method, loop=loop, generator=_gen(), output_type="np",
           callback_on_step_end=keep_last_views(last), **KW)
    assert r.images.shape == (1, 32, 256, 3) and np.isfinite(r.images).all()
    assert r.layout.num_views >= 3 and r.layout.window == 8 and r.layout.loop is loop
    assert_merged_as_the_method_says(r, last[0], jd.adapter.long_dim)


def test_klein_guidance_rules_and_embeddings(klein):
    jd = JointDiffusion(klein)
    kw = dict(width=128, window=8, output_type="latent", **KW)
    plain = jd("a fox", guidance_scale=4.0, generator=_gen(), **kw).latent
    negative = jd("a fox", guidance_scale=4.0, negative_prompt="snow", generator=_gen(), **kw).latent
    assert not torch.equal(plain, negative)  # the negative prompt replaces the empty one
    embeds, _ = klein.encode_prompt(prompt=["a fox"], device="cpu")
    empty, _ = klein.encode_prompt(prompt=[""], device="cpu")
    from_embeds = jd(prompt_embeds=embeds, negative_prompt_embeds=empty, guidance_scale=4.0, generator=_gen(), **kw)
    torch.testing.assert_close(from_embeds.latent, plain, rtol=0, atol=1e-6)
    distilled = tp.tiny_flux2_klein_pipeline(seed=0, is_distilled=True)
    guided = JointDiffusion(distilled)("a fox", guidance_scale=4.0, generator=_gen(), **kw).latent
    unguided = JointDiffusion(distilled)("a fox", guidance_scale=1.0, generator=_gen(), **kw).latent
    assert torch.equal(guided, unguided)  # the distilled models take no guidance, as the pipeline
    with pytest.raises(ValueError, match="MAD merges a UNet's self-attention layers; Flux2KleinPipeline"):
        jd("a fox", width=128, method="mad", num_inference_steps=1)


def test_klein_grid_beyond_one_window_in_height(klein):
    out = JointDiffusion(klein)("a cat", height=128, width=128, window=8, num_inference_steps=2, generator=_gen(),
                                output_type="np")
    assert out.images.shape == (1, 128, 128, 3) and np.isfinite(out.images).all()
    assert (out.layout.rows.num_views, out.layout.cols.num_views) == (3, 3)
