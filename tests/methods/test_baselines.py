"""The paper's other baselines on tiny pipelines (CPU, offline): MAD and SyncDiffusion.

- MAD: the merged self- and cross-attention equal a direct construction written out view by
  view (square and non-square views, per-view texts); a whole call equals the authors' loop
  written out independently (their threshold 0 and half of the steps); ``MAD(steps=0,
  cross_attention="views")`` is MultiDiffusion bitwise; one view is the pipeline; the
  processors are gone after a call (also one that raised) and the pipeline gives exactly its
  old output; loops wrap (shift equivariance); every UNet family runs; clear errors elsewhere.
- SyncDiffusion: ``weight=0`` is MultiDiffusion; every gradient step lowers the loss to the
  anchor; ``sync_freq`` picks the authors' steps; the gradient equals central finite
  differences of a loss computed independently (the UNet, DDIM's own ``pred_original_sample``
  and the VAE called by hand, float64); the hand-made x0 equals the schedulers' own; it runs
  and descends with DDIM, DPM-Solver++ and Euler; clear errors for bad parameters and for
  LPIPS without its weights.
"""
from __future__ import annotations

import copy
import math
import os
import warnings

import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler)
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

import safa
import safa.testing.pipelines as tp
from safa import MAD, JointDiffusion, SyncDiffusion
from safa.methods.mad import AttentionCanvas, MergedAttention, TextGroups, attention_factors
from safa.methods import NotApplicable
from safa.schedulers import predict_x0
from safa.methods.syncdiffusion import SyncDiffusionHooks, spectral_distance
from safa_kernels import ViewLayout, gather

WINDOW_S = 1.28  # 32 latent frames of the tiny AudioLDM family
AUDIO = dict(window=WINDOW_S, overlap=0.25, num_inference_steps=3, output_type="latent")
# Tiny SD with a 32-column window, 16 latent rows: 512 px -> 64 columns, 3 views at overlap 8.
IMAGE = dict(width=512, height=128, overlap=0.25, num_inference_steps=3, guidance_scale=2.5, output_type="latent")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).sum()


@pytest.fixture(scope="module")
def audioldm():
    pipe = tp.tiny_audioldm_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


@pytest.fixture(scope="module")
def sd():
    return tp.tiny_sd_pipeline(sample_size=32)


# == MAD =========================================================================================
def _naive_mad_attention(attn: Attention, hidden: torch.Tensor, layout: ViewLayout, g: int, b: int,
                         h: int, w: int, long_rows: bool) -> torch.Tensor:
    """MAD's self-attention as its authors describe it, one view and one token column at a time."""
    n, c = layout.num_views, hidden.shape[-1]
    q, k, v = (proj(hidden).view(g, n, b, h, w, c) for proj in (attn.to_q, attn.to_k, attn.to_v))
    length = layout.length
    shape = (g, b, length, w, c) if long_rows else (g, b, h, length, c)
    sums = [torch.zeros(shape, dtype=hidden.dtype) for _ in range(3)]
    count = torch.zeros(shape, dtype=hidden.dtype)
    for i in range(n):
        for local, col in enumerate(layout.columns(i)):
            for total, x in zip(sums, (q, k, v)):
                if long_rows:
                    total[:, :, col] += x[:, i, :, local]
                else:
                    total[:, :, :, col] += x[:, i, :, :, local]
            if long_rows:
                count[:, :, col] += 1
            else:
                count[:, :, :, col] += 1
    cq, ck, cv = (s / count for s in sums)
    heads, dh = attn.heads, c // attn.heads
    out = torch.empty_like(cq)
    flat = lambda x: x.reshape(g * b, -1, heads, dh).transpose(1, 2)  # noqa: E731
    scores = flat(cq) @ flat(ck).transpose(-1, -2) / math.sqrt(dh)
    attended = (scores.softmax(-1) @ flat(cv)).transpose(1, 2).reshape(out.shape)
    views = torch.empty(g, n, b, h, w, c, dtype=hidden.dtype)
    for i in range(n):
        for local, col in enumerate(layout.columns(i)):
            if long_rows:
                views[:, i, :, local] = attended[:, :, col]
            else:
                views[:, i, :, :, local] = attended[:, :, :, col]
    return attn.to_out[1](attn.to_out[0](views.reshape(g * n * b, h * w, c)))


@pytest.mark.parametrize("long_rows", [False, True], ids=["image_cols", "audio_rows"])
@pytest.mark.parametrize("loop", [False, True], ids=["open", "loop"])
def test_merged_attention_equals_naive_canvas_attention(long_rows, loop):
    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4).double().eval()
    factor, g, b = 2, 2, 2
    layout = ViewLayout(24, 8, 4, loop=True) if loop else ViewLayout(24, 8, 4)  # latent columns
    # latent windows (B, C, H, W): the long axis is W for images, H (time) for audio
    window_shape = (b, 4, 8, 6) if long_rows else (b, 4, 6, 8)
    h, w = window_shape[-2] // factor, window_shape[-1] // factor
    canvas = AttentionCanvas(layout, window_shape, -2 if long_rows else -1)
    attn.set_processor(MergedAttention(AttnProcessor2_0(), canvas, factor))
    hidden = torch.randn(g * layout.num_views * b, h * w, 8, dtype=torch.float64)
    scaled = ViewLayout(layout.length // factor, layout.window // factor, layout.overlap // factor, loop=loop)
    with torch.no_grad():
        expected = _naive_mad_attention(attn, hidden, scaled, g, b, h, w, long_rows)
        canvas.merge_self = True
        merged = attn(hidden)
        canvas.merge_self = False
        off = attn(hidden)
        attn.set_processor(AttnProcessor2_0())
        plain = attn(hidden)
    torch.testing.assert_close(merged, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(off, plain)  # off: the original processor, bitwise
    assert not torch.allclose(merged, plain)  # on: the views do see each other


def test_merged_attention_on_one_view_is_the_default_attention():
    torch.manual_seed(1)
    attn = Attention(query_dim=8, heads=2, dim_head=4).eval()
    hidden = torch.randn(2 * 3, 4 * 8, 8)  # g=2 guidance halves, B=3, a 4 x 8 token grid
    with torch.no_grad():
        plain = attn(hidden)
        canvas = AttentionCanvas(ViewLayout(16, 16, 0), (3, 4, 8, 16), -1)
        attn.set_processor(MergedAttention(AttnProcessor2_0(), canvas, 2))
        canvas.merge_self = True
        merged = attn(hidden)
    torch.testing.assert_close(merged, plain, rtol=1e-6, atol=1e-6)


def _direct_cross_attention(attn: Attention, hidden: torch.Tensor, text: torch.Tensor, layout: ViewLayout,
                            labels: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """MAD's cross-attention built directly, one (branch, view, item, token column) at a time.

    The canvas query of a column is the mean of the queries of the views that cover it and
    attend to the same text (``labels``: ``(g, n, B)``); each view's window of it attends, by
    softmax, to the view's own text; then the output projection. (The processor attends on
    the canvas and cuts after; a query's attention does not depend on the other queries.)
    """
    g, n, b = labels.shape
    q = attn.to_q(hidden).view(g, n, b, h, w, -1)
    k = attn.to_k(text).view(g, n, b, text.shape[1], -1)
    v = attn.to_v(text).view(g, n, b, text.shape[1], -1)
    c, heads = q.shape[-1], attn.heads
    dh = c // heads
    out = torch.empty_like(q)
    for gi in range(g):
        for bi in range(b):
            for i in range(n):
                peers = [j for j in range(n) if labels[gi, j, bi] == labels[gi, i, bi]]
                kh, vh = (x[gi, i, bi].view(-1, heads, dh).transpose(0, 1) for x in (k, v))
                for local, col in enumerate(layout.columns(i)):
                    covering = [(j, layout.columns(j).index(col)) for j in peers if col in layout.columns(j)]
                    query = sum(q[gi, j, bi, :, lj] for j, lj in covering) / len(covering)  # (h, C)
                    qh = query.view(h, heads, dh).transpose(0, 1)
                    attended = (qh @ kh.transpose(-1, -2) / math.sqrt(dh)).softmax(-1) @ vh
                    out[gi, i, bi, :, local] = attended.transpose(0, 1).reshape(h, c)
    return attn.to_out[1](attn.to_out[0](out.reshape(g * n * b, h * w, c)))


def _tiny_unet_cross_attention(sd) -> Attention:
    """A cross-attention layer of the tiny SD UNet (to_q 32 -> 32, text 32 wide), in float64."""
    attn = next(m for name, m in sd.unet.named_modules() if name.endswith("attn2"))
    assert attn.is_cross_attention
    return copy.deepcopy(attn).double().eval()


@pytest.mark.parametrize("square", [True, False], ids=["square", "non_square"])
@pytest.mark.parametrize("loop", [False, True], ids=["open", "loop"])
@pytest.mark.parametrize("texts", ["one", "per_view"])
def test_merged_cross_attention_equals_a_direct_construction(sd, square, loop, texts):
    torch.manual_seed(2)
    attn = _tiny_unet_cross_attention(sd)
    factor, g, b, width = 2, 2, 2, attn.to_q.in_features
    layout = ViewLayout(24, 8, 4, loop=True) if loop else ViewLayout(24, 8, 4)
    n = layout.num_views
    window_shape = (b, 4, 8, 8) if square else (b, 4, 6, 8)
    h, w = window_shape[-2] // factor, window_shape[-1] // factor
    scaled = ViewLayout(layout.length // factor, layout.window // factor, layout.overlap // factor, loop=loop)
    if texts == "one":
        labels, groups = torch.zeros(g, n, b, dtype=torch.long), None
    else:  # the unconditional branch shares one text; the conditional one has two, in runs of views
        labels = torch.zeros(g, n, b, dtype=torch.long)
        labels[1, n // 2:, 0] = 1
        labels[1, ::2, 1] = 1
        groups = TextGroups(labels, 2)
    per_text = torch.randn(g, 2, b, 5, attn.to_k.in_features, dtype=torch.float64)
    text = per_text[torch.arange(g)[:, None, None], labels, torch.arange(b)[None, None, :]].reshape(g * n * b, 5, -1)
    hidden = torch.randn(g * n * b, h * w, width, dtype=torch.float64)
    canvas = AttentionCanvas(layout, window_shape, -1, groups)
    attn.set_processor(MergedAttention(AttnProcessor2_0(), canvas, factor))
    with torch.no_grad():
        expected = _direct_cross_attention(attn, hidden, text, scaled, labels, h, w)
        canvas.merge_cross = True
        merged = attn(hidden, encoder_hidden_states=text)
        canvas.merge_cross = False
        off = attn(hidden, encoder_hidden_states=text)
        attn.set_processor(AttnProcessor2_0())
        plain = attn(hidden, encoder_hidden_states=text)
    torch.testing.assert_close(merged, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(off, plain) and not torch.allclose(merged, plain)


def test_text_groups_of_a_call():
    from safa.adapters import Conditions
    # 3 distinct prompts (two texts, one repeated with another negative), 3 views, 2 batch items
    pos = torch.stack([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0), torch.full((2, 3), 1.0)])
    neg = torch.stack([torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)])
    view_rows = torch.tensor([0, 0, 1, 0, 2, 0])  # (view, item): item 0 sees prompts 0, 1, 2; item 1 only 0
    groups = TextGroups.of(Conditions({"embeds": pos}, {"embeds": neg}), view_rows, 3, 2)
    assert groups.count == 2
    assert groups.labels[0].tolist() == [[0, 0], [0, 0], [1, 0]]  # uncond: prompt 2's negative differs
    assert groups.labels[1].tolist() == [[0, 0], [1, 0], [0, 0]]  # cond: prompts 0 and 2 share the text
    assert groups.representatives(1).tolist() == [[2, 0], [1, 0]]
    one = TextGroups.of(Conditions({"embeds": pos[:1]}), torch.zeros(6, dtype=torch.long), 3, 2)
    assert one.count == 1 and one.labels.shape == (1, 3, 2)


class _AuthorsMAD:
    """MAD's attention processor as its authors' code computes it, written out here independently.

    One instance on every attention module; rows are ``[uncond views; cond views]`` (one batch
    item); the layer's downsampling factor comes from its token count. Cross-attention: the
    views' queries averaged onto the canvas (sum / count over view spans), attention to the
    text rows 0 (uncond) and -1 (cond), cut back into the views: at every step. Self-attention:
    q, k, v averaged onto the canvas and one attention over it while ``merge_self``, else per view.
    """

    def __init__(self, spans, length: int, height: int, width: int) -> None:
        self.spans, self.length, self.height, self.width = spans, length, height, width
        self.merge_self = False

    def _canvas(self, x, g, h, w, f):
        total = torch.zeros(g, h, self.length // f, x.shape[-1], dtype=x.dtype)
        count = torch.zeros(1, 1, self.length // f, 1, dtype=x.dtype)
        views = x.view(g, len(self.spans), h, w, -1)
        for i, (start, end) in enumerate(self.spans):
            total[:, :, start // f:end // f] += views[:, i]
            count[:, :, start // f:end // f] += 1
        return (total / count).reshape(g, -1, x.shape[-1])

    def _crop(self, canvas, g, h, f):
        canvas = canvas.view(g, h, self.length // f, -1)
        return torch.stack([canvas[:, :, s // f:e // f] for s, e in self.spans], 1).reshape(
            g * len(self.spans), -1, canvas.shape[-1])

    @staticmethod
    def _attention(attn, q, k, v):
        heads = attn.heads
        split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        out = (split(q) @ split(k).transpose(-1, -2) * attn.scale).softmax(-1) @ split(v)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        rows, tokens, _ = hidden_states.shape
        g = rows // len(self.spans)
        f = round(math.sqrt(self.height * self.width / tokens))
        h, w = self.height // f, self.width // f
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if encoder_hidden_states is not None:
            text_k, text_v = torch.stack([k[0], k[-1]]), torch.stack([v[0], v[-1]])
            out = self._crop(self._attention(attn, self._canvas(q, g, h, w, f), text_k, text_v), g, h, f)
        elif self.merge_self:
            merged = [self._canvas(x, g, h, w, f) for x in (q, k, v)]
            out = self._crop(self._attention(attn, *merged), g, h, f)
        else:
            out = self._attention(attn, q, k, v)
        return attn.to_out[1](attn.to_out[0](out))


@pytest.mark.parametrize("height", [256, 128], ids=["square", "non_square"])  # windows 32 x 32, 16 x 32
@pytest.mark.parametrize("steps", [0.0, 0.5], ids=["threshold_0", "half"])
def test_mad_equals_the_authors_loop(height, steps):
    # The authors' loop (merge_attend_stable_diffusion.py) written out: views cut from the long
    # latent, one UNet call for all views x [uncond, cond], CFG, DDIM, value / count averaging;
    # self-attention merged for the first `mad_threshold` steps, cross-attention always.
    pipe = tp.tiny_sd_pipeline(sample_size=32).to(dtype=torch.float64)
    num_steps, g_scale, width = 2, 2.5, 512
    layout = ViewLayout(64, 32, 16)  # their get_views: window 32 latent columns, stride 16, tiling exactly
    spans = [(layout.starts[i], layout.starts[i] + layout.window) for i in range(layout.num_views)]
    noise = torch.randn(1, 4, height // 8, width // 8, generator=gen(4), dtype=torch.float64)
    ours = JointDiffusion(pipe)("a valley", width=width, height=height, window=32, overlap=0.5, latents=noise,
                                method=MAD(steps=steps), num_inference_steps=num_steps, guidance_scale=g_scale,
                                output_type="latent")
    assert ours.layout == layout

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(num_steps)
    pos, neg = pipe.encode_prompt("a valley", "cpu", 1, True)
    n = len(spans)
    text = torch.cat([neg.repeat(n, 1, 1), pos.repeat(n, 1, 1)])
    processor = _AuthorsMAD(spans, layout.length, height // 8, 32)
    pipe.unet.set_attn_processor(processor)
    latent = noise.clone()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            processor.merge_self = i < round(steps * num_steps)
            views = [latent[..., s:e] for s, e in spans]
            uncond, cond = pipe.unet(torch.cat(views * 2), t, encoder_hidden_states=text).sample.chunk(2)
            stepped = sched.step(uncond + g_scale * (cond - uncond), t, torch.cat(views)).prev_sample
            value, count = torch.zeros_like(latent), torch.zeros_like(latent)
            for k, (s, e) in enumerate(spans):
                value[..., s:e] += stepped[k:k + 1]
                count[..., s:e] += 1
            latent = value / count
    torch.testing.assert_close(ours.latent, latent, rtol=1e-10, atol=1e-10)
    md = JointDiffusion(tp.tiny_sd_pipeline(sample_size=32).to(dtype=torch.float64))(
        "a valley", width=width, height=height, window=32, overlap=0.5, latents=noise, method="multidiffusion",
        num_inference_steps=num_steps, guidance_scale=g_scale, output_type="latent")
    assert (ours.latent - md.latent).abs().max() > 1e-4  # threshold 0 is not MultiDiffusion


def test_mad_per_view_prompts(sd):
    # Views with one text share the canvas query (the same call as prompt=); with different
    # texts, each text's views merge among themselves.
    jd = JointDiffusion(sd)
    one = jd("a valley", method="mad", generator=gen(), **IMAGE)
    same = jd(view_prompts=["a valley"] * 3, method="mad", generator=gen(), **IMAGE)
    torch.testing.assert_close(same.latent, one.latent, rtol=1e-6, atol=1e-6)
    mixed = jd(view_prompts=["a valley", "a valley", "a lake"], method="mad", generator=gen(), **IMAGE)
    per_view = jd(view_prompts=["a valley", "a valley", "a lake"], method=MAD(cross_attention="views"),
                  generator=gen(), **IMAGE)
    assert torch.isfinite(mixed.latent).all() and not torch.allclose(mixed.latent, per_view.latent)


@pytest.mark.parametrize("loop", [False, True], ids=["open", "loop"])
def test_mad_steps_zero_with_per_view_cross_attention_is_multidiffusion_bitwise(audioldm, sd, loop):
    jd_a, jd_i = JointDiffusion(audioldm), JointDiffusion(sd)
    seconds = 3.84 if loop else 2.9
    variant = MAD(steps=0.0, cross_attention="views")
    md = jd_a("rain", seconds, method="multidiffusion", loop=loop, generator=gen(), **AUDIO)
    mad = jd_a("rain", seconds, method=variant, loop=loop, generator=gen(), **AUDIO)
    assert mad.layout == md.layout and mad.layout.num_views >= 3
    assert torch.equal(mad.latent, md.latent)
    image = dict(IMAGE, width=576) if loop else IMAGE  # a loop of 72 columns: 3 views at stride 24
    md = jd_i("a valley", method="multidiffusion", loop=loop, generator=gen(), **image)
    mad = jd_i("a valley", method=variant, loop=loop, generator=gen(), **image)
    assert torch.equal(mad.latent, md.latent)
    # ... while the authors' threshold 0 (cross-attention merged) and merged self-attention do change it
    for method in (MAD(steps=0.0), "mad:cross_attention=views"):
        assert not torch.allclose(jd_i("a valley", method=method, loop=loop, generator=gen(), **image).latent,
                                  md.latent)


def test_mad_merges_only_during_its_steps(sd):
    jd = JointDiffusion(sd)
    after = {}

    def keep(name):
        def cb(_, i, t, kw):
            after[name, i] = kw["views"].clone()
        return cb

    kw = dict(IMAGE, num_inference_steps=4)
    for name, method in (("md", "multidiffusion"), ("half", MAD(steps=0.5)), ("all", MAD(steps=1.0))):
        jd("a valley", method=method, generator=gen(), callback_on_step_end=keep(name), **kw)
    assert not torch.allclose(after["half", 0], after["md", 0])
    for i in (0, 1):  # round(0.5 * 4) = 2 merged steps: MAD(0.5) and MAD(1.0) agree so far
        assert torch.equal(after["half", i], after["all", i])
    assert not torch.allclose(after["half", 2], after["all", 2])


def test_mad_one_view_equals_the_pipeline(sd):
    ref = sd("a valley", height=128, width=256, num_inference_steps=3, guidance_scale=2.5, generator=gen(3),
             output_type="latent").images
    out = JointDiffusion(sd)("a valley", method=MAD(steps=1.0), generator=gen(3),
                             **dict(IMAGE, width=256))
    assert out.layout.num_views == 1
    torch.testing.assert_close(out.latent, ref, rtol=1e-5, atol=1e-5)


def test_mad_processors_removed_after_the_call_and_after_an_error(sd):
    unet = sd.unet
    before = dict(unet.attn_processors)
    own = dict(height=128, width=256, num_inference_steps=2, guidance_scale=2.5, output_type="latent")
    ref = sd("a valley", generator=gen(5), **own).images
    jd = JointDiffusion(sd)
    seen = []

    def look(_, i, t, kw):
        seen.append({type(p).__name__ for p in unet.attn_processors.values()})

    jd("a valley", method="mad", generator=gen(), callback_on_step_end=look, **IMAGE)
    assert seen and all(s == {"MergedAttention"} for s in seen)
    assert all(unet.attn_processors[k] is p for k, p in before.items()) and len(unet.attn_processors) == len(before)

    def boom(_, i, t, kw):
        raise RuntimeError("injected")

    with pytest.raises(RuntimeError, match="injected"):
        jd("a valley", method=MAD(steps=1.0), generator=gen(), callback_on_step_end=boom, **IMAGE)
    assert all(unet.attn_processors[k] is p for k, p in before.items())
    assert torch.equal(sd("a valley", generator=gen(5), **own).images, ref)


def test_mad_loop_wraps_around_the_canvas(audioldm):
    # A loop without reference guidance is shift-equivariant only if the merged attention
    # wraps: rolling the initial noise by one stride must roll the output by one stride.
    jd = JointDiffusion(audioldm)
    layout = ViewLayout(96, 32, 8, loop=True)
    noise = torch.randn(1, 8, 96, 16, generator=gen(7))
    kw = dict(AUDIO, method=MAD(steps=1.0), loop=True)
    a = jd("rain", 3.84, latents=noise, **kw)
    b = jd("rain", 3.84, latents=noise.roll(layout.stride, dims=-2), **kw)
    assert a.layout == b.layout == layout
    torch.testing.assert_close(b.latent, a.latent.roll(layout.stride, dims=-2), rtol=1e-4, atol=1e-4)
    md = jd("rain", 3.84, latents=noise, **dict(kw, method="multidiffusion"))
    assert not torch.allclose(a.latent, md.latent)


@pytest.mark.parametrize("factory", ["tiny_audioldm2_pipeline", "tiny_musicldm_pipeline", "tiny_sdxl_pipeline"])
def test_mad_runs_on_every_unet_family(factory):
    pipe = getattr(tp, factory)()
    before = dict(pipe.unet.attn_processors)
    jd = JointDiffusion(pipe)
    size = dict(seconds=2.9, window=WINDOW_S) if jd.adapter.kind == "audio" else dict(width=512, height=128)
    kw = dict(size, overlap=0.25, num_inference_steps=2, guidance_scale=2.5, output_type="latent")
    md = jd("rain", method="multidiffusion", generator=gen(), **kw)
    mad = jd("rain", method=MAD(steps=1.0), generator=gen(), **kw)
    assert torch.isfinite(mad.latent).all() and not torch.allclose(mad.latent, md.latent)
    assert all(pipe.unet.attn_processors[k] is p for k, p in before.items())


def test_mad_layout_is_on_the_attention_grid(audioldm, sd):
    jd = JointDiffusion(sd)
    assert set(attention_factors(jd.adapter).values()) == {4}  # attention only at 1/4 resolution
    for overlap in (0.1, 0.2, 0.3, 0.7):
        layout = jd.layout_for(width=1000, window=32, overlap=overlap, method="mad")
        assert layout.overlap % 4 == 0 and layout.stride % 4 == 0 and layout.overlap > 0
        assert abs(layout.overlap - overlap * 32) <= 2
    loop = jd.layout_for(width=8 * 96, window=32, overlap=0.25, loop=True, method="mad")
    assert loop.length == 96 and loop.uniform and loop.stride == 24  # 96 = 4 x 24: overlap 8
    # a length with no uniform loop on the 4-column grid near the requested overlap: a clear error
    with pytest.raises(ValueError, match=r"no seamless loop of exactly 800 px .*nearest loopable lengths"):
        jd.layout_for(width=8 * 100, window=32, overlap=0.25, loop=True, method="mad")
    with pytest.raises(ValueError, match=r"window must be a multiple of 4 latent columns for method 'mad'"):
        jd.layout_for(width=1000, window=30, method="mad")
    with pytest.raises(ValueError, match=r"rounds to 32, a whole window"):
        jd.layout_for(width=1000, window=32, overlap=0.95, method="mad")


def test_mad_errors(audioldm, sd):
    with pytest.raises(ValueError, match=r"view_batch_size must be None or >= the 3 views"):
        JointDiffusion(sd)("a valley", method="mad", view_batch_size=2, **IMAGE)
    for bad in (-0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match=r"steps must be in \[0.0, 1.0\]"):
            MAD(steps=bad)
    with pytest.raises(ValueError, match="guide does not apply to method 'mad'"):
        JointDiffusion(audioldm)("rain", 2.9, method="mad", guide=0.3, **AUDIO)
    from safa.texture import make_texture_pipeline
    with pytest.raises(NotApplicable, match="MAD merges a UNet's self-attention.*no UNet"):
        JointDiffusion(make_texture_pipeline(window_frames=32))("rain", 3.0, method="mad", num_inference_steps=2)
    with pytest.raises(NotApplicable, match=r"SD3Transformer2DModel \(a DiT"):
        JointDiffusion(tp.tiny_sd3_pipeline())("x", width=512, method="mad", num_inference_steps=1)
    pipe = tp.tiny_sd_pipeline(sample_size=32)
    from diffusers.models.attention_processor import AttnProcessor
    pipe.unet.set_attn_processor({k: AttnProcessor() if "attn1" in k else AttnProcessor2_0()
                                  for k in pipe.unet.attn_processors})
    JointDiffusion(pipe)("x", method="mad", **dict(IMAGE, num_inference_steps=1))  # the other default one: fine
    pipe.unet.set_attn_processor({k: _Custom() for k in pipe.unet.attn_processors})
    with pytest.raises(NotApplicable, match="set_default_attn_processor"):
        JointDiffusion(pipe)("x", method="mad", **IMAGE)


class _Custom(AttnProcessor2_0):
    """A user's processor (e.g. IP-Adapter): MAD would silently drop what it does, so it refuses."""


def test_mad_merge_ops_run_inside_the_model_range(audioldm):
    # What `safa profile` attributes: the latent merge is still one op per step in the merge
    # range; MAD's stitch + gather per self-attention call run inside the model range.
    from torch.profiler import ProfilerActivity, profile, record_function  # noqa: F401
    from safa import profiling
    jd = JointDiffusion(audioldm)
    calls = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, kw: calls.append(1), with_kwargs=True)
             for m in audioldm.unet.modules() if isinstance(m, Attention)]
    try:
        kw = dict(AUDIO, num_inference_steps=2, guidance_scale=1.0)
        jd("rain", 2.9, method=MAD(steps=0.5), generator=gen(), **kw)
        per_call = len(calls) // 2  # attention calls per UNet call (every one is self-attention here)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            jd("rain", 2.9, method=MAD(steps=0.5), generator=gen(), **kw)
    finally:
        for h in hooks:
            h.remove()
    steps = profiling.analyse(prof.events())
    assert [s.merge_ops for s in steps] == [1 + 2 * per_call, 1]


# == SyncDiffusion ===================================================================================
class _RecordingHooks(SyncDiffusionHooks):
    def __init__(self, method, context, records):
        super().__init__(method, context)
        self.records = records

    def gradient(self, v, x_t, i, target):
        g = super().gradient(v, x_t, i, target)
        with torch.no_grad():  # the loss to the anchor before and after the step the hooks take
            step = self.weight * self.decay ** i
            before = float(self.loss(self.decoded_x0(v, x_t, i), target))
            after = float(self.loss(self.decoded_x0(v, x_t - step * g, i), target))
        self.records.append(dict(v=v, i=i, x_t=x_t.clone(), target=target.clone(), grad=g.clone(), hooks=self,
                                 loss_before=before, loss_after=after))
        return g


class _RecordingSync(SyncDiffusion):
    """SyncDiffusion that keeps every gradient it takes (same frozen parameters)."""

    def hooks(self, context):
        return _RecordingHooks(self, context, RECORDS)


RECORDS: list = []


@pytest.mark.parametrize("scheduler", [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler],
                         ids=lambda c: c.__name__)
def test_syncdiffusion_weight_zero_is_multidiffusion_and_each_step_lowers_the_loss(scheduler):
    pipe = tp.tiny_audioldm_pipeline()
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    jd = JointDiffusion(pipe)
    kw = dict(AUDIO, num_inference_steps=4, guidance_scale=2.5)
    md = jd("rain", 2.9, method="multidiffusion", generator=gen(), **kw)
    zero = jd("rain", 2.9, method=SyncDiffusion(weight=0.0, steps=1.0), generator=gen(), **kw)
    torch.testing.assert_close(zero.latent, md.latent, rtol=1e-6, atol=1e-6)
    RECORDS.clear()
    out = jd("rain", 2.9, method=_RecordingSync(steps=0.5), generator=gen(), **kw)
    assert torch.isfinite(out.latent).all() and not torch.allclose(out.latent, md.latent)
    # round(0.5 * 4) = 2 steps, every view but the middle anchor (3 views: anchor 1)
    assert [(r["i"], r["v"]) for r in RECORDS] == [(0, 0), (0, 2), (1, 0), (1, 2)]
    # ... and every gradient step, at the step size taken (weight 20 * 0.95**i), brings the
    # view's decoded clean prediction closer to the anchor's
    for r in RECORDS:
        assert r["loss_after"] < r["loss_before"], (r["i"], r["v"], r["loss_before"], r["loss_after"])
    if getattr(pipe.scheduler, "step_index", None) is not None:
        assert pipe.scheduler.step_index == len(pipe.scheduler.timesteps)  # never an extra scheduler.step


def test_syncdiffusion_gradient_is_a_descent_direction():
    # Inside the step (the scheduler where the sampler has it): a small step along -grad
    # lowers the loss, with the default audio loss, for a multistep and a sigma scheduler.
    for scheduler in (DPMSolverMultistepScheduler, EulerDiscreteScheduler):
        pipe = tp.tiny_audioldm_pipeline()
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
        lowered = []

        class Probe(_RecordingHooks):
            def gradient(self, v, x_t, i, target):
                g = super().gradient(v, x_t, i, target)
                with torch.no_grad():
                    before = spectral_distance(self.decoded_x0(v, x_t, i), target)
                    after = spectral_distance(self.decoded_x0(v, x_t - 1e-2 * g / g.abs().max(), i), target)
                lowered.append(bool(after < before))
                return g

        class ProbeSync(SyncDiffusion):
            def hooks(self, context):
                return Probe(self, context, [])

        JointDiffusion(pipe)("rain", 2.9, method=ProbeSync(steps=1.0), generator=gen(), **dict(AUDIO, guidance_scale=2.5))
        assert len(lowered) == 6 and all(lowered), (scheduler.__name__, lowered)


def test_syncdiffusion_gradient_equals_finite_differences():
    pipe = tp.tiny_sd_pipeline(sample_size=32).to(dtype=torch.float64)
    g_scale, steps, weight = 2.5, 2, 0.5
    layout = ViewLayout(48, 32, 16)  # two views; the anchor is view 1
    noise = torch.randn(1, 4, 16, 48, generator=gen(9), dtype=torch.float64)
    RECORDS.clear()
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        out = JointDiffusion(pipe)("a valley", width=384, height=128, window=32, overlap=0.5, latents=noise,
                                   method=_RecordingSync(weight=weight, decay=0.5, steps=1.0, loss=mse),
                                   num_inference_steps=steps, guidance_scale=g_scale, output_type="latent")
    finally:
        hook.remove()
    assert out.layout == layout and [(r["i"], r["v"]) for r in RECORDS] == [(0, 0), (1, 0)]

    # The oracle: the model with guidance, DDIM's own x0 and the VAE, called by hand.
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    pos, neg = pipe.encode_prompt("a valley", "cpu", 1, True)
    cond = torch.cat([neg, pos])

    def decoded(x, i):
        t = sched.timesteps[i]
        u, c = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=cond).sample.chunk(2)
        x0 = sched.step(u + g_scale * (c - u), t, x).pred_original_sample
        return (pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)

    views = gather(noise, layout, -1)
    first = RECORDS[0]
    with torch.no_grad():
        torch.testing.assert_close(first["x_t"], views[0])
        # (the adapter's image output stage is float32, as the pipelines' postprocessing)
        torch.testing.assert_close(first["target"].double(), decoded(views[1], 0), rtol=1e-6, atol=1e-6)
        for r in RECORDS:
            for k in range(2):
                d = torch.randn(r["x_t"].shape, generator=gen(100 + k), dtype=torch.float64)
                h = 1e-6  # small: the [0, 1] clamp of the decoded image has kinks
                fd = (mse(decoded(r["x_t"] + h * d, r["i"]), r["target"])
                      - mse(decoded(r["x_t"] - h * d, r["i"]), r["target"])) / (2 * h)
                torch.testing.assert_close((r["grad"] * d).sum(), fd, rtol=1e-5, atol=1e-7)
    # The step the sampler took: x_t - weight * decay**i * grad on view 0, the anchor untouched.
    main_calls = [x for x in seen if x.shape[0] == 2 * layout.num_views]
    stepped = main_calls[0][: layout.num_views]
    torch.testing.assert_close(stepped[0:1], views[0] - weight * first["grad"], rtol=1e-12, atol=1e-12)
    assert torch.equal(stepped[1:2], views[1])


@pytest.mark.parametrize("scheduler,config,theirs", [
    (DDIMScheduler, {"clip_sample": False}, "pred_original_sample"),
    (DDIMScheduler, {}, "pred_original_sample"),  # clip_sample=True by default: clipped like DDIM's own
    (EulerDiscreteScheduler, {}, "pred_original_sample"),  # x0 + sigma eps samples, scaled model input
    (EulerAncestralDiscreteScheduler, {}, "pred_original_sample"),
    (DPMSolverMultistepScheduler, {}, "convert_model_output")],  # multistep: its own data prediction
    ids=["DDIM", "DDIM-clip", "Euler", "EulerAncestral", "DPMSolver++"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_predict_x0_equals_the_schedulers_own(scheduler, config, theirs, prediction):
    sched = scheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type=prediction, **config)
    sched.set_timesteps(5)
    i, t = 2, sched.timesteps[2]
    sample = torch.randn(2, 4, 8, 8, generator=gen(1), dtype=torch.float64) * float(sched.init_noise_sigma)
    out = torch.randn(2, 4, 8, 8, generator=gen(2), dtype=torch.float64)
    own = copy.deepcopy(sched)
    model_in = own.scale_model_input(sample, t)
    ours = predict_x0(sched, i, sample, model_in, out)
    if theirs == "pred_original_sample":
        expected = own.step(out, t, sample).pred_original_sample
    else:
        own._init_step_index(t)
        expected = own.convert_model_output(out, sample=sample)
    torch.testing.assert_close(ours, expected.to(ours.dtype), rtol=1e-5, atol=1e-5)


def test_predict_x0_flow_matching():
    # Flow matching's last step lands on sigma = 0, so its prev_sample is the x0 of that step.
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(5)
    sample = torch.randn(2, 4, 8, 8, generator=gen(1), dtype=torch.float64)
    out = torch.randn(2, 4, 8, 8, generator=gen(2), dtype=torch.float64)
    i = len(sched.timesteps) - 1
    expected = copy.deepcopy(sched).step(out, sched.timesteps[i], sample).prev_sample
    torch.testing.assert_close(predict_x0(sched, i, sample, sample, out), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["sd3", pytest.param("stable_audio", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("torchsde") is None, reason="needs torchsde"))])
def test_syncdiffusion_on_dit_pipelines(name):
    pipe = tp.tiny_sd3_pipeline() if name == "sd3" else tp.tiny_stable_audio_pipeline()
    jd = JointDiffusion(pipe)
    size = dict(width=512, height=128) if name == "sd3" else dict(seconds=5.85)
    kw = dict(size, overlap=0.25, num_inference_steps=3, guidance_scale=3.0, output_type="latent")
    loss = mse if name == "sd3" else None  # images: LPIPS is not available offline; audio: the default
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="torchsde")
        md = jd("x", method="multidiffusion", generator=gen(), **kw)
        zero = jd("x", method=SyncDiffusion(weight=0.0, steps=1.0, loss=loss), generator=gen(), **kw)
        sync = jd("x", method=SyncDiffusion(weight=1.0, steps=1.0, loss=loss), generator=gen(), **kw)
    torch.testing.assert_close(zero.latent, md.latent, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(sync.latent).all() and not torch.allclose(sync.latent, md.latent)


def test_syncdiffusion_one_view_and_anchor(audioldm):
    jd = JointDiffusion(audioldm)
    one = jd("rain", WINDOW_S, method="syncdiffusion", generator=gen(), **AUDIO)
    md = jd("rain", WINDOW_S, method="multidiffusion", generator=gen(), **AUDIO)
    assert one.layout.num_views == 1 and torch.equal(one.latent, md.latent)  # nothing to synchronise
    RECORDS.clear()
    jd("rain", 2.9, method=_RecordingSync(anchor=0, steps=0.4), generator=gen(), **AUDIO)
    assert [(r["i"], r["v"]) for r in RECORDS] == [(0, 1), (0, 2)]
    with pytest.raises(ValueError, match=r"anchor must be in \[0, 2\] for this layout of 3 views, got 3"):
        jd("rain", 2.9, method=SyncDiffusion(anchor=3), generator=gen(), **AUDIO)


def test_syncdiffusion_sync_freq(audioldm):
    # The authors' sync_freq: gradient steps at the synced steps i with (i + 1) % sync_freq == 0.
    jd = JointDiffusion(audioldm)
    kw = dict(AUDIO, num_inference_steps=5)
    for freq, synced in ((1, [0, 1, 2, 3]), (2, [1, 3]), (3, [2]), (5, [])):
        RECORDS.clear()
        jd("rain", 2.9, method=_RecordingSync(steps=0.8, sync_freq=freq), generator=gen(), **kw)  # 4 of 5 steps
        assert [(r["i"], r["v"]) for r in RECORDS] == [(i, v) for i in synced for v in (0, 2)], freq
    assert safa.get_method("syncdiffusion:sync_freq=2:steps=0.5") == SyncDiffusion(sync_freq=2, steps=0.5)
    # sync_freq larger than the synced steps: none is synced, which is MultiDiffusion
    md = jd("rain", 2.9, method="multidiffusion", generator=gen(), **kw)
    none = jd("rain", 2.9, method="syncdiffusion:sync_freq=5:steps=0.8", generator=gen(), **kw)
    assert torch.equal(none.latent, md.latent)


def test_syncdiffusion_parameter_errors():
    for kw, pattern in [(dict(weight=-1.0), "weight must be a finite number >= 0"),
                        (dict(weight=math.inf), "weight must be a finite number >= 0"),
                        (dict(decay=1.5), r"decay must be in \[0.0, 1.0\]"),
                        (dict(steps=float("nan")), r"steps must be in \[0.0, 1.0\]"),
                        (dict(loss="lpips"), "loss must be None or a callable"),
                        (dict(anchor=-1), "anchor must be None or an int >= 0"),
                        (dict(anchor=1.0), "anchor must be None or an int >= 0"),
                        (dict(sync_freq=0), "sync_freq must be an int >= 1"),
                        (dict(sync_freq=2.0), "sync_freq must be an int >= 1"),
                        (dict(sync_freq=True), "sync_freq must be an int >= 1")]:
        with pytest.raises(ValueError, match=pattern):
            SyncDiffusion(**kw)


def _lpips_ready() -> bool:
    try:
        import lpips  # noqa: F401
        from safa.methods.syncdiffusion import _vgg16_weights_file
        return os.path.isfile(_vgg16_weights_file())
    except ImportError:
        return False


@pytest.mark.skipif(_lpips_ready(), reason="LPIPS and its VGG weights are available here")
def test_syncdiffusion_image_default_loss_without_lpips_weights_is_a_clear_error(sd):
    calls = []
    hook = sd.unet.register_forward_pre_hook(lambda m, args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"LPIPS \(VGG\).*pass SyncDiffusion\(loss=f\)"):
            JointDiffusion(sd)("a valley", method="syncdiffusion", **IMAGE)
    finally:
        hook.remove()
    assert not calls  # refused before any model call
    out = JointDiffusion(sd)("a valley", method=SyncDiffusion(loss=mse), generator=gen(), **IMAGE)
    assert torch.isfinite(out.latent).all()


def test_spectral_distance():
    a = torch.randn(2, 1, 64, 16, generator=gen(1))
    assert spectral_distance(a, a).item() == 0.0
    # time-shift invariant (statistics over time), but not blind to the spectrum
    assert spectral_distance(a, a.roll(8, dims=2)).item() == pytest.approx(0.0, abs=1e-5)
    assert spectral_distance(a, a + 1.0).item() == pytest.approx(2 * 4 * 1.0, rel=1e-5)  # 2 items x 4 scales
    wave = torch.randn(1, 2, 8192, generator=gen(2))
    assert spectral_distance(wave, 0.5 * wave).item() > 0
    with pytest.raises(ValueError, match="equal shapes"):
        spectral_distance(a, a[:1])


# == the one list of methods ===========================================================================
def test_shorthands_everywhere(audioldm, tmp_path, capsys):
    from safa.cli import main
    from safa.evaluate import ALL_METHODS
    from safa.commands.profile import method_choices
    assert {"mad", "syncdiffusion"} <= set(safa.METHODS) == set(ALL_METHODS) == set(method_choices())
    assert safa.get_method("mad") == MAD() and safa.get_method("syncdiffusion") == SyncDiffusion()
    d = tmp_path / "tiny"
    audioldm.save_pretrained(str(d))
    fast = ["--prompt", "rain", "--window", "1.28", "--overlap", "0.25", "--steps", "2", "--quiet", "--seconds", "2.9"]
    for method in ("mad", "syncdiffusion"):
        out = tmp_path / f"{method}.wav"
        assert main(["generate", "--model", str(d), *fast, "--method", method, "--out", str(out)]) == 0
        assert out.stat().st_size > 1000 and method in capsys.readouterr().out
    code = main(["generate", *fast, "--method", "mad", "--out", str(tmp_path / "t.wav")])  # built-in texture model
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "MAD merges a UNet's self-attention" in err
    assert not (tmp_path / "t.wav").exists()


def test_python_method_takes_the_cli_spec_strings(audioldm):
    # One spelling for both doors: method="safa:guide=0.5" is SaFa(guide=0.5), in get_method and in the call.
    assert safa.get_method("safa:guide=0.5") == safa.SaFa(guide=0.5)
    assert safa.get_method("mad:steps=0.3") == MAD(steps=0.3)
    assert safa.get_method("multidiffusion_triangular") == safa.MultiDiffusion(triangular=True)
    assert safa.get_method("safa:guide=0.5", swap_interval=2) == safa.SaFa(guide=0.5, swap_interval=2)
    jd = JointDiffusion(audioldm)
    by_spec = jd("rain", 2.9, method="safa:guide=0.5:swap_interval=2", generator=gen(), **AUDIO)
    by_object = jd("rain", 2.9, method=safa.SaFa(guide=0.5, swap_interval=2), generator=gen(), **AUDIO)
    assert by_spec.method == safa.SaFa(guide=0.5, swap_interval=2)
    assert torch.equal(by_spec.latent, by_object.latent)
    for spec, params, pattern in [("safa:guide=0.5", dict(guide=0.4), "guide given both in the method spec"),
                                  ("nope:guide=0.5", {}, r"method must be one of .* got 'nope:guide=0.5'"),
                                  ("multidiffusion:guide=0.5", {}, "guide does not apply to method 'multidiffusion'"),
                                  ("safa:guide", {}, "is not name=value"),
                                  ("safa:guide=2.0", {}, r"guide must be in \[0.0, 1.0\]")]:
        with pytest.raises(ValueError, match=pattern):
            safa.get_method(spec, **params)
    with pytest.raises(ValueError, match="guide given both"):
        jd("rain", 2.9, method="safa:guide=0.5", guide=0.4, **AUDIO)
