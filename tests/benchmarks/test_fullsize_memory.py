"""The sampler's memory estimate before a call against the call's measured live peak (the check
benchmarks/bench_fullsize.py makes on the full-size models), on the tiny pipelines: every
method, SyncDiffusion's gradient through the UNet and the VAE decoder included.

The estimate models live tensor bytes above the memory before the call (the weights are loaded
already, so they are not counted): what :class:`safa.profiling.memory.LiveTensorPeak` measures
on the CPU and ``torch.cuda.max_memory_allocated`` on CUDA. It must not overshoot the peak by
more than 1.3x (the issue's bar) and not fall short of it (the sampler refuses calls on it) by
more than :data:`SHORT`: it does not model the prompt embeddings, timesteps and the like, nor
everything of SaFa's reference step (measured 3% short here on the tiny pipelines, whose
windows are small beside those; 1.00x on the full-size models' calls without it).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from safa.adapters.working_memory import unet_graph_bytes, vae_decode_bytes
from safa.profiling.memory import LiveTensorPeak

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_fullsize  # noqa: E402
import fullsize  # noqa: E402

sys.path.remove(str(ROOT / "benchmarks"))
CPU = torch.device("cpu")
SHORT = 0.95  # the lowest estimate / live peak accepted


@pytest.fixture(scope="module", params=["audio", "image"])
def tiny(request):
    build = fullsize.audioldm_pipeline if request.param == "audio" else fullsize.sd2_pipeline
    return request.param, build("tiny")


@pytest.mark.parametrize("name, steps", [(name, 3) for name in bench_fullsize.ALL_AUDIO] + [("safa", 1)])
def test_call_estimate_within_1_to_1_3x_of_the_live_peak(tiny, name, steps):
    """At 3 steps SaFa's reference window guides one of them (r_guide 0.2: round(0.6)) and
    SyncDiffusion makes one gradient step; at 1 step neither (SaFa's views alone)."""
    kind, pipe = tiny
    size = dict(seconds=24.0) if kind == "audio" else dict(height=512, width=1024)
    config = next(c for c in bench_fullsize.configurations(kind, pipe, size, steps, [name], CPU))
    with LiveTensorPeak() as live:
        config["run"]()
    assert SHORT <= config["estimate"] / live.peak <= 1.3, (config["estimate"], live.peak)


@pytest.mark.parametrize("kind", ["audio", "image"])
def test_unet_and_decoder_graph_estimates_hold_for_a_gradient_to_the_input(kind):
    """SyncDiffusion's gradient step: the UNet's forward (guidance: 2 rows) and the VAE decode,
    both graphs alive until the backward pass to the noisy latent (frozen weights)."""
    pipe = (fullsize.audioldm_pipeline if kind == "audio" else fullsize.sd2_pipeline)("tiny")
    unet, vae = pipe.unet, pipe.vae
    shape = (1, unet.config.in_channels, 64, 16) if kind == "audio" else (1, unet.config.in_channels, 32, 32)
    cond = (dict(encoder_hidden_states=None, class_labels=torch.randn(2, unet.config.projection_class_embeddings_input_dim))
            if kind == "audio" else dict(encoder_hidden_states=torch.randn(2, 77, unet.config.cross_attention_dim)))
    leaf = torch.randn((2,) + shape[1:]).requires_grad_(True)
    with LiveTensorPeak() as live:
        out = unet(leaf, torch.tensor(500), **cond).sample
        (grad,) = torch.autograd.grad(out.square().sum(), leaf)
        del out, grad
    estimate = 2 * unet_graph_bytes(unet.config, shape, 4)
    assert SHORT <= estimate / live.peak <= 1.3, (estimate, live.peak)
    latent = torch.randn((1, vae.config.latent_channels) + shape[2:]).requires_grad_(True)
    with LiveTensorPeak() as live:
        decoded = vae.decode(latent).sample
        (grad,) = torch.autograd.grad(decoded.square().sum(), latent)
        del decoded, grad
    estimate = vae_decode_bytes(vae.config, latent.shape, 4, grad=True)
    assert SHORT <= estimate / live.peak <= 1.3, (estimate, live.peak)
