"""MAD and SyncDiffusion on 2-D grids of tiles (images beyond the window in height and width).

- Both authors' codes lay their views out on a 2-D grid already (``get_views``: row-major tiles
  over height and width); a grid here is the same geometry (tiles numbered row-major).
- MAD: a whole 2 x 2 grid call equals the authors' loop written out independently in 2-D (views
  as (h_start, h_end, w_start, w_end) spans, q/k/v and cross-attention queries averaged onto the
  2-D canvas by sum / count, one attention, cropped back; DDIM, CFG, value / count averaging);
  the merged self-attention layer equals a naive 2-D canvas attention (open and torus).
- SyncDiffusion: the anchor is the middle tile (oracle: the tile whose centre is nearest the
  canvas's, ties to the later tile as ``n // 2`` on a strip), every other tile gets its gradient
  step; the authors' ``len(views) // 2`` differs from it on an even number of rows.
- Both: a grid of one row equals the strip bitwise; a 2 x 2 grid and a torus run on tiny SD with
  the right shapes.
"""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

import safa.testing.pipelines as tp
from safa import MAD, JointDiffusion, SyncDiffusion
from safa.methods.mad import AttentionCanvas, MergedAttention
from safa.methods.syncdiffusion import SyncDiffusionHooks, middle_view
from safa_kernels import GridLayout, ViewLayout

STEPS = 2


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).sum()


@pytest.fixture(scope="module")
def sd():
    return tp.tiny_sd_pipeline(sample_size=32)  # 32 x 32 latent tiles, 256 px


def _tiles(layout: GridLayout):
    """The authors' view list: (h_start, h_end, w_start, w_end) per tile, row-major."""
    return [(r, r + layout.rows.window, c, c + layout.cols.window)
            for r in layout.rows.starts for c in layout.cols.starts]


# == MAD =========================================================================================
class _AuthorsMAD2D:
    """MAD's attention processor as the authors' code computes it on their 2-D view list, written
    out independently: rows ``[uncond tiles; cond tiles]`` (one batch item); the layer's factor from
    its token count; canvas = sum / count over the tiles' spans; cross-attention always (text rows
    0 and -1), self-attention merged while ``merge_self``."""

    def __init__(self, tiles, height: int, width: int, window: int) -> None:
        self.tiles, self.height, self.width, self.window = tiles, height, width, window
        self.merge_self = False

    def _canvas(self, x, g, t, f):
        c = x.shape[-1]
        total = torch.zeros(g, self.height // f, self.width // f, c, dtype=x.dtype)
        count = torch.zeros(1, self.height // f, self.width // f, 1, dtype=x.dtype)
        views = x.view(g, len(self.tiles), t, t, c)
        for i, (h0, h1, w0, w1) in enumerate(self.tiles):
            total[:, h0 // f:h1 // f, w0 // f:w1 // f] += views[:, i]
            count[:, h0 // f:h1 // f, w0 // f:w1 // f] += 1
        return (total / count).reshape(g, -1, c)

    def _crop(self, canvas, g, f):
        canvas = canvas.view(g, self.height // f, self.width // f, -1)
        crops = [canvas[:, h0 // f:h1 // f, w0 // f:w1 // f] for h0, h1, w0, w1 in self.tiles]
        return torch.stack(crops, 1).reshape(g * len(self.tiles), -1, canvas.shape[-1])

    @staticmethod
    def _attention(attn, q, k, v):
        split = lambda x: x.reshape(x.shape[0], x.shape[1], attn.heads, -1).transpose(1, 2)  # noqa: E731
        out = (split(q) @ split(k).transpose(-1, -2) * attn.scale).softmax(-1) @ split(v)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        rows, tokens, _ = hidden_states.shape
        g = rows // len(self.tiles)
        f = round(self.window / math.sqrt(tokens))  # square tiles, as their code assumes
        t = self.window // f
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if encoder_hidden_states is not None:
            text_k, text_v = torch.stack([k[0], k[-1]]), torch.stack([v[0], v[-1]])
            out = self._crop(self._attention(attn, self._canvas(q, g, t, f), text_k, text_v), g, f)
        elif self.merge_self:
            out = self._crop(self._attention(attn, *(self._canvas(x, g, t, f) for x in (q, k, v))), g, f)
        else:
            out = self._attention(attn, q, k, v)
        return attn.to_out[1](attn.to_out[0](out))


@pytest.mark.parametrize("steps", [0.0, 0.5], ids=["threshold_0", "half"])
def test_mad_on_a_grid_equals_the_authors_2d_loop(steps):
    pipe = tp.tiny_sd_pipeline(sample_size=32).to(dtype=torch.float64)
    g_scale, side = 2.5, 384  # 48 x 48 latent: 2 x 2 tiles of 32, stride 16 (their get_views)
    noise = torch.randn(1, 4, side // 8, side // 8, generator=gen(4), dtype=torch.float64)
    ours = JointDiffusion(pipe)("a valley", width=side, height=side, overlap=0.5, latents=noise,
                                method=MAD(steps=steps), num_inference_steps=STEPS, guidance_scale=g_scale,
                                output_type="latent")
    assert ours.layout == GridLayout(ViewLayout(48, 32, 16), ViewLayout(48, 32, 16))
    tiles = _tiles(ours.layout)

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(STEPS)
    pos, neg = pipe.encode_prompt("a valley", "cpu", 1, True)
    n = len(tiles)
    text = torch.cat([neg.repeat(n, 1, 1), pos.repeat(n, 1, 1)])
    processor = _AuthorsMAD2D(tiles, side // 8, side // 8, 32)
    pipe.unet.set_attn_processor(processor)
    latent = noise.clone()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            processor.merge_self = i < round(steps * STEPS)
            views = [latent[..., h0:h1, w0:w1] for h0, h1, w0, w1 in tiles]
            uncond, cond = pipe.unet(torch.cat(views * 2), t, encoder_hidden_states=text).sample.chunk(2)
            stepped = sched.step(uncond + g_scale * (cond - uncond), t, torch.cat(views)).prev_sample
            value, count = torch.zeros_like(latent), torch.zeros_like(latent)
            for k, (h0, h1, w0, w1) in enumerate(tiles):
                value[..., h0:h1, w0:w1] += stepped[k:k + 1]
                count[..., h0:h1, w0:w1] += 1
            latent = value / count
    torch.testing.assert_close(ours.latent, latent, rtol=1e-10, atol=1e-10)


def _naive_grid_attention(attn, hidden, layout: GridLayout, g: int, b: int):
    """MAD's self-attention on a 2-D canvas, one tile and one token at a time (wrapping on loops)."""
    n, c, t = layout.num_views, hidden.shape[-1], layout.rows.window
    q, k, v = (proj(hidden).view(g, n, b, t, t, c) for proj in (attn.to_q, attn.to_k, attn.to_v))
    shape = (g, b, layout.rows.length, layout.cols.length, c)
    sums, count = [torch.zeros(shape, dtype=hidden.dtype) for _ in range(3)], torch.zeros(shape, dtype=hidden.dtype)
    for i in range(n):
        rows, cols = layout.rows.columns(i // layout.cols.num_views), layout.cols.columns(i % layout.cols.num_views)
        for a, row in enumerate(rows):
            for e, col in enumerate(cols):
                for total, x in zip(sums, (q, k, v)):
                    total[:, :, row, col] += x[:, i, :, a, e]
                count[:, :, row, col] += 1
    cq, ck, cv = (s / count for s in sums)
    heads, dh = attn.heads, c // attn.heads
    flat = lambda x: x.reshape(g * b, -1, heads, dh).transpose(1, 2)  # noqa: E731
    attended = ((flat(cq) @ flat(ck).transpose(-1, -2) / math.sqrt(dh)).softmax(-1) @ flat(cv))
    attended = attended.transpose(1, 2).reshape(shape)
    views = torch.empty(g, n, b, t, t, c, dtype=hidden.dtype)
    for i in range(n):
        rows, cols = layout.rows.columns(i // layout.cols.num_views), layout.cols.columns(i % layout.cols.num_views)
        for a, row in enumerate(rows):
            for e, col in enumerate(cols):
                views[:, i, :, a, e] = attended[:, :, row, col]
    return attn.to_out[1](attn.to_out[0](views.reshape(g * n * b, t * t, c)))


@pytest.mark.parametrize("loop", [False, True], ids=["open", "torus"])
def test_merged_attention_on_a_grid_equals_naive_2d_canvas_attention(loop):
    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4).double().eval()
    factor, g, b = 2, 2, 2
    rows = ViewLayout(16, 8, 4, loop=True) if loop else ViewLayout(20, 8, 4)  # latent cells
    cols = ViewLayout(24, 8, 4, loop=True) if loop else ViewLayout(16, 8, 4)
    layout = GridLayout(rows, cols)
    canvas = AttentionCanvas(layout, (b, 4, 8, 8), (-2, -1))
    attn.set_processor(MergedAttention(AttnProcessor2_0(), canvas, factor))
    t = 8 // factor
    hidden = torch.randn(g * layout.num_views * b, t * t, 8, dtype=torch.float64)
    scaled = GridLayout(*(ViewLayout(a.length // factor, a.window // factor, a.overlap // factor, loop=loop)
                          for a in (rows, cols)))
    with torch.no_grad():
        expected = _naive_grid_attention(attn, hidden, scaled, g, b)
        canvas.merge_self = True
        merged = attn(hidden)
    torch.testing.assert_close(merged, expected, rtol=1e-12, atol=1e-12)


# == one row of tiles is the strip ===============================================================
def _as_one_row_grid(jd: JointDiffusion) -> JointDiffusion:
    """``jd`` with every strip layout replaced by the grid of one row of the same tiles."""
    strip_layout = jd.prepare_layout

    def one_row(request):
        layout, columns, out_len = strip_layout(request)
        assert isinstance(layout, ViewLayout)
        return GridLayout(ViewLayout(32, 32, 0), layout), columns, out_len

    jd.prepare_layout = one_row
    return jd


@pytest.mark.parametrize("method", [MAD(steps=0.5), SyncDiffusion(steps=1.0, loss=mse)], ids=["mad", "syncdiffusion"])
def test_a_grid_of_one_row_is_the_strip_bitwise(sd, method):
    kw = dict(width=512, height=256, overlap=0.25, num_inference_steps=STEPS, guidance_scale=2.5,
              output_type="latent", method=method)  # one row of 3 tiles of 32 x 32
    strip = JointDiffusion(sd)("a valley", generator=gen(), **kw)
    grid = _as_one_row_grid(JointDiffusion(sd))("a valley", generator=gen(), **kw)
    assert isinstance(grid.layout, GridLayout) and grid.layout.cols == strip.layout
    assert strip.layout.num_views == 3
    assert torch.equal(grid.latent, strip.latent)


# == a 2 x 2 grid and a torus run =================================================================
@pytest.mark.parametrize("method", [MAD(), SyncDiffusion(steps=1.0, loss=mse)], ids=["mad", "syncdiffusion"])
@pytest.mark.parametrize("loop", [False, "both", (True, False)], ids=["open", "torus", "rows_loop"])
def test_grid_runs_on_tiny_sd(sd, method, loop):
    # 2 tiles of 32 (stride 24) per axis: a looping axis is 48 cells (384 px), an open one 56 (448 px)
    rows_loop, cols_loop = loop is not False, loop == "both"
    height, width = 384 if rows_loop else 448, 384 if cols_loop else 448
    kw = dict(width=width, height=height, overlap=0.25, loop=loop, num_inference_steps=STEPS, guidance_scale=2.5,
              output_type="latent")
    out = JointDiffusion(sd)("a valley", method=method, generator=gen(), **kw)
    assert isinstance(out.layout, GridLayout)
    assert (out.layout.rows.num_views, out.layout.cols.num_views) == (2, 2)
    assert (out.layout.rows.loop, out.layout.cols.loop) == (rows_loop, cols_loop)
    assert out.latent.shape == (1, 4, height // 8, width // 8) and torch.isfinite(out.latent).all()
    md = JointDiffusion(sd)("a valley", method="multidiffusion", generator=gen(), **kw)
    assert not torch.allclose(out.latent, md.latent)  # the views met (attention / gradient steps)


def test_mad_grid_off_the_attention_grid_is_refused(sd):
    # tiny SD's attention factors reach 2: an odd overlap on the rows cannot be placed
    jd = JointDiffusion(sd)
    method = MAD()
    request_layout = GridLayout(ViewLayout(61, 32, 3), ViewLayout(32, 32, 0))
    jd.prepare_layout = lambda request: (request_layout, 32, 256)
    with pytest.raises(ValueError, match=r"MAD needs the layout's window, overlap and length \(on each axis of a "
                                         r"grid\) to be multiples of every attention downsampling factor"):
        jd("a valley", width=256, height=256, method=method, num_inference_steps=1, output_type="latent")


# == SyncDiffusion's anchor =======================================================================
RECORDS: list = []


class _RecordingHooks(SyncDiffusionHooks):
    def gradient(self, v, x_t, i, target):
        RECORDS.append((i, v, self.anchor))
        return super().gradient(v, x_t, i, target)


class _RecordingSync(SyncDiffusion):
    def hooks(self, context):
        return _RecordingHooks(self, context)


def _nearest_the_centre(layout: GridLayout) -> int:
    """The tile whose centre is nearest the canvas's centre (ties: the later tile, as ``n // 2`` on a strip)."""
    def axis(a: ViewLayout) -> int:
        centre = a.length / 2
        return min(range(a.num_views), key=lambda k: (abs(a.starts[k] + a.window / 2 - centre), -k))
    return axis(layout.rows) * layout.cols.num_views + axis(layout.cols)


@pytest.mark.parametrize("height,width,shape", [(448, 448, (2, 2)), (640, 832, (3, 4)), (448, 640, (2, 3))])
def test_syncdiffusion_anchor_is_the_middle_tile(sd, height, width, shape):
    RECORDS.clear()
    out = JointDiffusion(sd)("a valley", width=width, height=height, overlap=0.25, num_inference_steps=STEPS,
                             method=_RecordingSync(steps=0.5, loss=mse), output_type="latent", generator=gen())
    layout = out.layout
    assert (layout.rows.num_views, layout.cols.num_views) == shape
    anchor = _nearest_the_centre(layout)
    assert middle_view(layout) == anchor
    # one synced step (round(0.5 * 2) = 1): every tile but the anchor, in order
    assert RECORDS == [(0, v, anchor) for v in range(layout.num_views) if v != anchor]
    if shape[0] % 2 == 0:  # the authors' len(views) // 2 is the first tile of the row below the middle
        assert layout.num_views // 2 == (shape[0] // 2) * shape[1] != anchor


def test_middle_view_of_a_strip_is_the_authors():
    assert middle_view(ViewLayout(80, 32, 8)) == 1 and middle_view(ViewLayout(104, 32, 8)) == 2
    assert middle_view(GridLayout(ViewLayout(32, 32, 0), ViewLayout(104, 32, 8))) == 2


def test_style_distance():
    from safa.methods.syncdiffusion import style_distance
    a = torch.rand(2, 3, 16, 16, generator=gen(1))
    assert style_distance(a, a) == 0
    # statistics over the image: a shuffle of its cells keeps the scale-1 terms, not the coarser ones
    shuffled = a.flatten(2)[..., torch.randperm(256, generator=gen(2))].view_as(a)
    coarse = style_distance(a, shuffled, scales=(4,))
    assert style_distance(a, shuffled, scales=(1,)) < 1e-6 < coarse
    brighter = (a + 0.1).requires_grad_(True)
    d = style_distance(brighter, a)
    torch.testing.assert_close(d, torch.tensor(4 * 2 * 0.1), rtol=1e-5, atol=1e-6)  # 4 scales x 2 items x 0.1
    (grad,) = torch.autograd.grad(d, brighter)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"style_distance needs two equal shapes \(B, channels, H, W\)"):
        style_distance(a, a[:, :, :8])
