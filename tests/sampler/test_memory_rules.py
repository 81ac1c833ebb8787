"""Memory sync_ may not write: overlapping elements, a reference sharing memory with views.

Refused before any write on every backend, with PyTorch's wording; the tests of overlap
(``safa_kernels/_memory.py``) are checked against brute force over every element.
"""
import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st

import safa_kernels as sk
from safa_kernels import ViewLayout, stitch, sync_
from safa_kernels._memory import has_internal_overlap, shares_memory

BACKENDS = list(sk.available_backends("cpu"))
INTERNAL = "more than one element of the written-to tensor refers to a single memory location"
PARTIAL = "some elements of the input tensor and the written-to tensor refer to a single memory location"
LAYOUT = ViewLayout(28, 16, 4)  # two views


def addresses(x):
    """Brute force: the memory offset of every element."""
    return [x.storage_offset() + sum(i * s for i, s in zip(index, x.stride()))
            for index in itertools.product(*map(range, x.shape))]


def aliased_views():
    """Two views of 16 that share their first 8 elements' memory (as_strided with stride 8)."""
    return torch.arange(40.0).as_strided((2, 1, 16), (8, 16, 1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [lambda: torch.arange(16.0).view(1, 1, 16).expand(2, 1, 16), aliased_views],
                         ids=["expanded", "as_strided"])
def test_sync_refuses_views_with_internal_overlap(backend, make):
    views = make()
    before = views.clone()
    for mode in sk.MODES:
        with pytest.raises(RuntimeError, match=f"sync_: views: unsupported operation: {INTERNAL}"):
            sync_(views, LAYOUT, -1, mode=mode, reference=torch.zeros(1, 16), backend=backend)
    assert torch.equal(views, before)
    stitch(views, LAYOUT, -1, backend=backend)  # reading overlapping memory is fine


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pick", [lambda v: v[0], lambda v: v.view(-1)[8:24].view(1, 16),
                                  lambda v: v.view(-1)[1::2].view(1, 16)],
                         ids=["a view", "straddling two views", "every other element"])
def test_sync_refuses_a_reference_sharing_memory_with_views(backend, pick):
    views = torch.randn(2, 1, 16)
    reference = pick(views)
    before = views.clone()
    with pytest.raises(RuntimeError, match=f"sync_: views and reference: unsupported operation: {PARTIAL}"):
        sync_(views, LAYOUT, -1, reference=reference, backend=backend)
    assert torch.equal(views, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_interleaved_but_disjoint_memory_is_accepted(backend):
    # views and reference in one buffer, every other element each: no element shared.
    buffer = torch.randn(2, 1, 32)
    views, reference = buffer[..., ::2], buffer[0, :, 1::2]
    expected = sk.reference.sync_(views.clone(), LAYOUT, 1, reference=reference.clone())
    sync_(views, LAYOUT, -1, reference=reference, backend=backend)
    assert torch.equal(views, expected)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_raw_op_refuses_overlapping_out(backend):
    from safa_kernels.plan import REF_NONE, build_plan
    plan = build_plan(LAYOUT, "sync", "mean", 1, REF_NONE)
    op = getattr(torch.ops.safa, f"merge_{backend}_").default
    out = torch.zeros(1, 1, 16, 1).expand(2, 1, 16, 1)
    with pytest.raises(RuntimeError, match=INTERNAL):
        op(out, None, None, plan.index, plan.weight, [0, 1, 1, 1])
    views = torch.randn(2, 1, 16, 1)
    plan = build_plan(LAYOUT, "stitch", "mean", 1, REF_NONE)
    with pytest.raises(RuntimeError, match=PARTIAL):  # the latent written over the views it reads
        op(views.view(1, 1, 32, 1)[:, :, :28], views, None, plan.index, plan.weight, [0, 1, 1, 1])


# -- the overlap tests against brute force ------------------------------------------------
@st.composite
def strided(draw):
    """A tensor over a small buffer with arbitrary sizes, strides (zero included) and offset."""
    ndim = draw(st.integers(0, 3))
    shape = [draw(st.integers(0, 4)) for _ in range(ndim)]
    stride = [draw(st.integers(0, 6)) for _ in range(ndim)]
    offset = draw(st.integers(0, 3))
    extent = offset + sum((n - 1) * s for n, s in zip(shape, stride) if n > 0) + 1
    return torch.zeros(extent).as_strided(shape, stride, offset)


@settings(max_examples=300, deadline=None)
@given(x=strided())
def test_has_internal_overlap_matches_brute_force(x):
    offsets = addresses(x)
    assert has_internal_overlap(x) == (len(set(offsets)) < len(offsets))


@settings(max_examples=300, deadline=None)
@given(a=strided(), b=strided())
def test_shares_memory_matches_brute_force(a, b):
    # Put both over one buffer (b's storage offset after a's), as tensors sliced from it.
    buffer = torch.zeros(64)
    a = buffer.as_strided(a.shape, a.stride(), a.storage_offset())
    b = buffer.as_strided(b.shape, b.stride(), b.storage_offset() + 2)
    assert shares_memory(a, b) == bool(set(addresses(a)) & set(addresses(b)))
    assert not shares_memory(a, torch.zeros(64).as_strided(b.shape, b.stride(), b.storage_offset()))


# -- the denoisers' working memory against measured live peaks (tiny pipelines) -------------------
def _wider_stable_audio_3_dit(config):
    from diffusers import StableAudio3DiTModel
    kept = ("io_channels", "cond_token_dim", "global_cond_dim", "local_add_cond_dim", "timestep_features_dim")
    return StableAudio3DiTModel(embed_dim=256, depth=1, num_heads=4, **{k: config[k] for k in kept}).eval()


def _wider_longcat_dit(config):
    from diffusers import LongCatAudioDiTTransformer
    return LongCatAudioDiTTransformer(dit_dim=256, dit_depth=2, dit_heads=4, dit_text_dim=config["dit_text_dim"],
                                      latent_dim=config["latent_dim"]).eval()


def _wider_stable_audio_dit(config, heads=4):
    from diffusers import StableAudioDiTModel
    kept = ("sample_size", "in_channels", "out_channels", "cross_attention_dim", "cross_attention_input_dim",
            "global_states_input_dim", "time_proj_dim")
    return StableAudioDiTModel(num_layers=1, attention_head_dim=64, num_attention_heads=heads,
                               num_key_value_attention_heads=heads // 2, **{k: config[k] for k in kept}).eval()


_WIDER = {"tiny_stable_audio_pipeline": _wider_stable_audio_dit, "tiny_stable_audio_3_pipeline": _wider_stable_audio_3_dit,
          "tiny_longcat_audio_pipeline": _wider_longcat_dit}


@pytest.mark.parametrize("factory", ["tiny_sd_pipeline", "tiny_sdxl_pipeline", "tiny_audioldm_pipeline",
                                     "tiny_audioldm2_pipeline", "tiny_sd3_pipeline", "tiny_flux_pipeline",
                                     "tiny_stable_audio_pipeline:wide", "tiny_stable_audio_3_pipeline:wide",
                                     "tiny_longcat_audio_pipeline:wide"])
def test_denoiser_memory_within_1_3x_of_the_measured_live_peak(factory):
    """The adapters' estimate (a walk of the UNet's config, the DiT families' maps per token)
    against the live tensor bytes of predict()."""
    import safa.adapters
    from safa.profiling.memory import LiveTensorPeak
    from safa.testing import pipelines
    name, _, variant = factory.partition(":")
    pipe = getattr(pipelines, name)()
    if variant == "wide":
        # The tiny DiTs are 16-32 channels wide, so their in / out projections and conditioning
        # (outside the blocks the estimate counts) dominate; at 256 channels they no longer do.
        pipe.transformer = _WIDER[name](pipe.transformer.config)
    adapter = safa.adapters.get_adapter(pipe)
    shape = tuple(adapter.latent_shape(1, adapter.native_window(), None))
    cond = adapter.encode_prompts(["a"] * 4, None, 3.0)
    t = adapter.set_timesteps(2, shape)[0]
    with torch.no_grad(), LiveTensorPeak() as live:
        adapter.predict(torch.randn((4,) + shape[1:]), t, cond, 3.0)
    estimate = adapter.denoiser_memory(4, True, shape)
    assert live.peak / 1.3 <= estimate <= live.peak * 1.3, (estimate, live.peak)
