"""The tiny offline pipelines: each builds, runs its own __call__ for 2 steps, and round-trips
save_pretrained / from_pretrained with no network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safa.testing import pipelines as tp


def _gen() -> torch.Generator:
    return torch.Generator("cpu").manual_seed(0)


def _roundtrip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = type(pipe).from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def _assert_same_weights(a, b) -> None:
    for name, comp in a.components.items():
        if isinstance(comp, torch.nn.Module):
            sa, sb = comp.state_dict(), b.components[name].state_dict()
            assert sa.keys() == sb.keys(), name
            for k in sa:
                assert torch.equal(sa[k], sb[k]), (name, k)


def test_audioldm(tmp_path):
    pipe = tp.tiny_audioldm_pipeline(seed=0)
    kw = dict(num_inference_steps=2, audio_length_in_s=2.56, output_type="np")
    out = pipe("rain on a tin roof", generator=_gen(), **kw).audios
    # 2.56 s at 16 kHz
    assert out.shape == (1, 40960)
    assert np.isfinite(out).all()
    # AudioLDM has no output_type="latent": read the latent through its step callback.
    seen: list[torch.Tensor] = []
    pipe("rain", generator=_gen(), callback=lambda i, t, lat: seen.append(lat), **kw)
    # SPEC layout: (B, 8, T, 16), 25 latent frames per second, time on dim -2
    assert seen[-1].shape == (1, 8, 64, 16)
    loaded = _roundtrip(pipe, tmp_path)
    _assert_same_weights(pipe, loaded)
    again = loaded("rain on a tin roof", generator=_gen(), **kw).audios
    np.testing.assert_allclose(again, out, rtol=1e-5, atol=1e-6)


def test_factories_are_seeded():
    a = tp.tiny_audioldm_pipeline(seed=0).unet.conv_in.weight
    b = tp.tiny_audioldm_pipeline(seed=0).unet.conv_in.weight
    c = tp.tiny_audioldm_pipeline(seed=1).unet.conv_in.weight
    assert torch.equal(a, b) and not torch.equal(a, c)
