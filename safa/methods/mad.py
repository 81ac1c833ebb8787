"""MAD, Merge-Attend-Diffuse (Quattrini et al., ECCV 2024), as a diffusers attention processor.

MAD lets the views meet inside the UNet, in two ways, as in its authors' code
(aimagelab/MAD, ``CrossViewsAttnProcessor2_0``):

- **self-attention**, during the first ``steps`` of the call: the views' queries, keys and
  values (right after ``to_q`` / ``to_k`` / ``to_v``) are placed on the long latent at the
  layer's resolution, overlapping tokens averaged; one attention runs over all of its tokens;
  the result is cut back into the views (overlapping tokens duplicated) before ``to_out``;
- **cross-attention**, at every step: the views' queries are averaged onto the long latent
  the same way, attend to the text keys and values of their classifier-free-guidance branch,
  and are cut back into the views.

The placing and cutting are ``safa_kernels``' own ``stitch`` in mean mode and ``gather``, on
the call's layout scaled down by the layer's downsampling factor, so the layout's window and
overlap must be multiples of every such factor. On a 2-D grid of tiles (an image beyond the
window in height too) the canvas is the 2-D latent at the layer's resolution, each token the
mean over the tiles covering it, both axes scaled: the authors' own geometry, whose
``get_views`` lays views out over height and width, row-major as a ``GridLayout``; a grid of
one row is the strip, bitwise. Two limits of the authors' code are
generalised, reducing to it where it applies: their factor is read as ``64 / sqrt(tokens)``,
so views must be square, and their views are a fixed stride that may leave the last columns
uncovered; here each layer's token grid is the view's own ``(H / f, W / f)`` and the layout
covers the long latent exactly (a uniform layout whose views tile the width is theirs). Their
cross-attention takes one text per guidance branch (rows 0 and -1 of the batch); here every
batch item keeps its own text, and with per-view prompts the views that share a text share
one canvas query (:class:`TextGroups`: a departure, documented in docs/method.md).
``MAD(cross_attention="views")`` keeps cross-attention per view instead.

:class:`MergedAttentionHooks` installs one :class:`MergedAttention` per attention module of
the UNet for the duration of a call (``__exit__`` restores the original processors, also
after an error) and switches the self-attention merge on around the model call of the first
MAD steps; an attention the merge is off for calls the original processor.

Only UNets: the authors' method is defined on a UNet's spatial attention. SD3's MMDiT
attends jointly over image and per-view text tokens and Stable Audio's DiT places rotary
positions per window; neither has a faithful merged form, so MAD refuses them
(:class:`~safa.methods.base.NotApplicable`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, ClassVar, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from safa_kernels import GridLayout, ViewLayout, gather, stitch

from .._checks import check_range
from ..adapters import Adapter, Conditions
from .base import Method, MethodContext, MethodHooks, NotApplicable, leading_steps

__all__ = ["MAD", "CROSS_ATTENTION", "attention_factors", "AttentionCanvas", "TextGroups", "MergedAttention",
           "MergedAttentionHooks"]

CROSS_ATTENTION = ("canvas", "views")


@dataclasses.dataclass(frozen=True)
class MAD(Method):
    """MAD, Merge-Attend-Diffuse (Quattrini et al., ECCV 2024): the views attend over the long latent.

    As the authors' code: every UNet cross-attention layer averages the views' queries onto
    the long latent at its resolution, attends to the text there and cuts the result back
    into the views, at every step; during the first ``steps`` fraction of the steps every
    self-attention layer also averages the views' queries, keys and values onto the long
    latent and attends over all of its tokens (see the module docstring). After every step
    the overlaps are averaged as in MultiDiffusion. UNet pipelines only; every view must be in
    one model call, and the layout's window and overlap (each axis of a grid) must be multiples
    of the UNet's deepest attention downsampling factor (the default layout rounds the overlap
    to one). Strips and 2-D grids of tiles, open or looping on either axis.

    Args:
        steps: fraction of the steps with merged self-attention, the first ``round(steps * T)``
            (default 0.5: the authors' 25 of 50 for Stable Diffusion). 0 is the authors'
            threshold 0: cross-attention merged, self-attention per view.
        cross_attention: ``"canvas"`` (default, the authors'): merged at every step as above;
            ``"views"``: per view, as in the pipeline (a variant: then ``steps=0`` is
            MultiDiffusion exactly).
    """

    steps: float = 0.5
    cross_attention: str = "canvas"
    merge_mode: ClassVar[str] = "mean"
    max_overlap_rate: ClassVar[float] = 1.0
    all_views_in_one_call: ClassVar[bool] = True
    couples_views: ClassVar[bool] = True  # the views attend to each other

    def __post_init__(self) -> None:
        check_range("steps", self.steps, 0.0, 1.0)
        if self.cross_attention not in CROSS_ATTENTION:
            raise ValueError(f"cross_attention must be one of {CROSS_ATTENTION}, got {self.cross_attention!r}")

    @property
    def name(self) -> str:
        return "mad"

    def check_pipeline(self, adapter: "Adapter") -> None:
        attention_factors(adapter)

    def layout_multiple(self, adapter: "Adapter") -> int:
        return math.lcm(*attention_factors(adapter).values())

    def hooks(self, context: MethodContext) -> MethodHooks:
        return MergedAttentionHooks(context, leading_steps(self.steps, len(context.scheduler_timesteps)),
                                    merge_cross_attention=self.cross_attention == "canvas")


# The processors MAD reproduces when merging (both compute the same attention; 2_0 is the
# default on torch >= 2). Anything else (xFormers, IP-Adapter, LoRA processors) would be
# silently dropped by the merged path, so it is refused.
_DEFAULT_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")


def _unet(adapter: Adapter) -> Any:
    unet = getattr(adapter.pipe, "unet", None)
    if unet is None or not hasattr(unet, "down_blocks"):
        denoiser = getattr(adapter.pipe, "transformer", None)
        what = (f"its denoiser is a {type(denoiser).__name__} (a DiT: joint or rotary-position attention "
                f"per window, no faithful merged form)" if denoiser is not None else "it has no UNet")
        raise NotApplicable(f"MAD merges a UNet's self-attention layers; {type(adapter.pipe).__name__} cannot "
                            f"run it: {what}. MAD supports the UNet pipelines (SD 1.x/2.x, SDXL, AudioLDM, "
                            f"AudioLDM2, MusicLDM)")
    return unet


def attention_factors(adapter: Adapter) -> Dict[str, int]:
    """Every attention module of the adapter's UNet -> its downsampling factor of the latent.

    Walks the UNet as its forward runs: the down blocks at factors 1, 2, 4, ... (each block
    with a downsampler halves the resolution after its own layers), the mid block at the
    deepest factor, the up blocks back up. Raises :class:`NotApplicable` for a pipeline
    without a UNet, a UNet without attention, or non-default attention processors.
    """
    from diffusers.models.attention_processor import Attention
    unet = _unet(adapter)
    factors: Dict[str, int] = {}

    def visit(prefix: str, block: Any, factor: int) -> None:
        for name, module in block.named_modules():
            if isinstance(module, Attention):
                factors[f"{prefix}.{name}"] = factor

    factor = 1
    for k, block in enumerate(unet.down_blocks):
        visit(f"down_blocks.{k}", block, factor)
        if getattr(block, "downsamplers", None) is not None:
            factor *= 2
    if unet.mid_block is not None:
        visit("mid_block", unet.mid_block, factor)
    for k, block in enumerate(unet.up_blocks):
        visit(f"up_blocks.{k}", block, factor)
        if getattr(block, "upsamplers", None) is not None:
            factor //= 2
    if not factors:
        raise NotApplicable(f"MAD merges self-attention, and the UNet of {type(adapter.pipe).__name__} has "
                            f"no attention layers")
    processors = unet.attn_processors
    if set(processors) != {f"{name}.processor" for name in factors}:  # an attention layer we did not place
        raise NotApplicable(f"MAD cannot place the attention layers of {type(unet).__name__} at their resolutions")
    for name, proc in processors.items():
        if type(proc).__name__ not in _DEFAULT_PROCESSORS:
            raise NotApplicable(f"MAD replaces the UNet's self-attention and reproduces diffusers' default "
                                f"processors only; {name} has {type(proc).__name__}: call "
                                f"pipe.unet.set_default_attn_processor() first")
    return factors


@dataclasses.dataclass(frozen=True)
class TextGroups:
    """Which views attend to the same text, per guidance branch and batch item.

    The authors' cross-attention merge averages the queries of views that attend to one text
    (their code has one prompt per guidance branch). With per-view prompts, views attending to
    different texts cannot share a query: the views that share a text (equal conditions in
    that branch) share one canvas query, the others get their own (a view alone in its group
    has per-view cross-attention).

    Attributes:
        labels: ``(g, n, B)`` long: the group of every row of the model batch (guidance branch
            ``[uncond; cond]``, view, batch item), numbered ``0, 1, ...`` per branch and item
            in view order.
        count: the most groups of any branch and item (1: the authors' case).
    """

    labels: torch.Tensor
    count: int

    @classmethod
    def of(cls, conditions: Conditions, view_rows: torch.Tensor, num_views: int, batch: int) -> "TextGroups":
        """The groups of a call: ``view_rows`` is the prompt index of every row of the views (view-major)."""
        branches = [conditions.positive] if conditions.negative is None else [conditions.negative,
                                                                               conditions.positive]
        prompts = view_rows.tolist()
        labels = torch.zeros(len(branches), num_views, batch, dtype=torch.long)
        for g, texts in enumerate(branches):
            for b in range(batch):
                seen: List[int] = []  # one prompt index per group
                for v in range(num_views):
                    p = prompts[v * batch + b]
                    same = [j for j, q in enumerate(seen) if _same_text(texts, p, q)]
                    if not same:
                        seen.append(p)
                    labels[g, v, b] = same[0] if same else len(seen) - 1
        return cls(labels, int(labels.max()) + 1)

    def representatives(self, group: int) -> torch.Tensor:
        """``(g, B)``: the first view of ``group`` per branch and item (view 0 where it has no such group)."""
        member = self.labels == group
        return torch.where(member.any(1), member.long().argmax(1), torch.zeros_like(member[:, 0], dtype=torch.long))


def _same_text(texts: Dict[str, Any], p: int, q: int) -> bool:
    return p == q or all(torch.equal(t[p], t[q]) for t in texts.values() if isinstance(t, torch.Tensor))


class AttentionCanvas:
    """The long latent at every attention resolution: scatters views onto it and cuts them back.

    Rows of the model batch are ``(g, n, B)``: the classifier-free-guidance branch (``g`` = 1
    or 2, ``[uncond; cond]``), the view, the batch item; tokens of a view are its latent
    positions ``(rows, cols)`` at the layer's resolution, row-major (diffusers' order).

    Attributes:
        merge_self: whether self-attention is merged now (switched per step by the hooks).
        merge_cross: whether cross-attention is merged (the whole call).
        groups: which views share a text (None: in every branch and item, all views do).
    """

    def __init__(self, layout: Union[ViewLayout, GridLayout], window_shape: Tuple[int, ...],
                 long_dim: Union[int, Tuple[int, int]], groups: Optional[TextGroups] = None) -> None:
        self.layout, self.batch = layout, int(window_shape[0])
        self.height, self.width = int(window_shape[-2]), int(window_shape[-1])
        # The latent's long axis (a strip) or (rows, cols) axes (a grid), as axes of the token
        # grid (..., rows, cols, channels): one place further left.
        self.dim: Union[int, Tuple[int, int]] = (long_dim - 1 if isinstance(long_dim, int)
                                                 else (long_dim[0] - 1, long_dim[1] - 1))
        self.merge_self = False
        self.merge_cross = False
        self.groups = groups
        self._scaled: Dict[int, Union[ViewLayout, GridLayout]] = {}

    def scaled_layout(self, factor: int) -> Union[ViewLayout, GridLayout]:
        """The layout at ``factor`` times lower resolution (exact: the caller checked divisibility);
        a grid's two axes each scaled."""
        if factor not in self._scaled:
            lay = self.layout
            self._scaled[factor] = (GridLayout(_scaled_axis(lay.rows, factor), _scaled_axis(lay.cols, factor))
                                    if isinstance(lay, GridLayout) else _scaled_axis(lay, factor))
        return self._scaled[factor]

    def branches(self, x: torch.Tensor, factor: int) -> int:
        """``g``, the guidance branches of ``x`` ``(g n B, tokens, C)``; an error for any other shape."""
        n = self.layout.num_views
        rows, tokens = int(x.shape[0]), int(x.shape[1])
        h, w = self.height // factor, self.width // factor
        if tokens != h * w or rows % (n * self.batch):
            raise RuntimeError(f"MAD: an attention layer at downsampling {factor} got {rows} rows of {tokens} "
                               f"tokens; expected multiples of {n} views x {self.batch} items of {h} x {w} tokens")
        return rows // (n * self.batch)

    def merge(self, tensors: Sequence[torch.Tensor], factor: int) -> List[torch.Tensor]:
        """Each ``(g n B, tokens, C)`` per view -> ``(g B, canvas tokens, C)``: overlapping tokens averaged."""
        g = self.branches(tensors[0], factor)
        n, b, c = self.layout.num_views, self.batch, tensors[0].shape[-1]
        h, w = self.height // factor, self.width // factor
        views = torch.stack(list(tensors)).view(len(tensors), g, n, b, h, w, c).movedim(2, 0)  # (n, k, g, B, h, w, C)
        canvas = stitch(views, self.scaled_layout(factor), self.dim, mode="mean")
        return list(canvas.reshape(len(tensors), g * b, -1, c).unbind(0))

    def merge_group(self, x: torch.Tensor, factor: int, group: int) -> torch.Tensor:
        """``(g n B, tokens, C)`` -> ``(g B, canvas tokens, C)``: the mean over the views of text ``group`` only
        (zero where none of them reaches)."""
        if self.groups is None or self.groups.count == 1:
            return self.merge([x], factor)[0]
        member = self.member(group, x)
        total, count = self.merge([x * member, member.expand_as(x)], factor)  # mean(x m) / mean(m)
        return torch.where(count > 0, total / torch.where(count > 0, count, torch.ones_like(count)),
                           torch.zeros_like(total))

    def member(self, group: int, x: torch.Tensor) -> torch.Tensor:
        """``(g n B, 1, 1)`` in ``x``'s dtype: 1 for the rows of text ``group``."""
        assert self.groups is not None
        labels = self.groups.labels.to(x.device)
        if labels.numel() != x.shape[0]:
            raise RuntimeError(f"MAD: a cross-attention layer got {x.shape[0]} rows; the call's text groups are "
                               f"for {labels.numel()}")
        return (labels == group).to(x.dtype).reshape(-1, 1, 1)

    def pick(self, x: torch.Tensor, group: int) -> torch.Tensor:
        """``(g n B, ...)`` -> ``(g B, ...)``: per branch and item, the row of the first view of text ``group``
        (text keys and values are equal over a group's views)."""
        n, b = self.layout.num_views, self.batch
        g = x.shape[0] // (n * b)
        grid = x.reshape(g, n, b, *x.shape[1:])
        views = (self.groups.representatives(group).to(x.device) if self.groups is not None
                 else torch.zeros(g, b, dtype=torch.long, device=x.device))
        return grid[torch.arange(g, device=x.device)[:, None], views, torch.arange(b, device=x.device)[None, :]] \
            .reshape(g * b, *x.shape[1:])

    def split(self, canvas: torch.Tensor, factor: int) -> torch.Tensor:
        """``(g B, canvas tokens, C)`` -> ``(g n B, tokens, C)``: every view's window of the canvas."""
        lay = self.scaled_layout(factor)
        n, b = self.layout.num_views, self.batch
        h, w = self.height // factor, self.width // factor
        g = canvas.shape[0] // b
        shape = [g, b, h, w, canvas.shape[-1]]
        if isinstance(lay, GridLayout):
            shape[self.dim[0]], shape[self.dim[1]] = lay.rows.length, lay.cols.length
        else:
            shape[self.dim] = lay.length
        views = gather(canvas.reshape(shape), lay, self.dim)  # (n, g, B, h, w, C)
        return views.movedim(0, 1).reshape(g * n * b, h * w, -1)


def _scaled_axis(axis: ViewLayout, factor: int) -> ViewLayout:
    return ViewLayout(axis.length // factor, axis.window // factor, axis.overlap // factor, loop=axis.loop)


def _attend(attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """diffusers' ``AttnProcessor2_0`` between the projections and ``to_out``: ``(N, tokens, C)`` rows."""
    rows, head_dim = query.shape[0], key.shape[-1] // attn.heads
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[1], rows)
        attention_mask = attention_mask.view(rows, attn.heads, -1, attention_mask.shape[-1])
    query = query.reshape(rows, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.reshape(rows, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.reshape(rows, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    # no scale=: as AttnProcessor2_0 (the default 1 / sqrt(head_dim) is the authors' attn.scale)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                         is_causal=False)
    return out.transpose(1, 2).reshape(rows, -1, attn.heads * head_dim).to(query.dtype)


class MergedAttention:
    """Attention processor of one UNet attention module: MAD's merged attention where it is on.

    Where the canvas has the merge off (self-attention outside MAD's steps; cross-attention
    with ``cross_attention="views"``) it is the module's original processor. On, it is
    diffusers' ``AttnProcessor2_0`` with the merge between the projections and the attention.
    """

    def __init__(self, original: Any, canvas: AttentionCanvas, factor: int) -> None:
        self.original, self.canvas, self.factor = original, canvas, factor

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 **kwargs: Any) -> torch.Tensor:
        cross = encoder_hidden_states is not None
        if not (self.canvas.merge_cross if cross else self.canvas.merge_self):
            if temb is not None:
                kwargs["temb"] = temb
            return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=attention_mask, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if cross:
            hidden_states = self._cross_attention(attn, hidden_states, encoder_hidden_states, attention_mask)
        else:
            hidden_states = self._self_attention(attn, hidden_states, attention_mask)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _self_attention(self, attn: Any, hidden_states: torch.Tensor,
                        attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("MAD merges self-attention over all views and cannot merge a self-attention mask")
        # Merge: every view's q, k, v onto the long latent, overlapping tokens averaged.
        query, key, value = self.canvas.merge([attn.to_q(hidden_states), attn.to_k(hidden_states),
                                               attn.to_v(hidden_states)], self.factor)
        # Attend: one attention over all tokens of the long latent; then back into the views.
        return self.canvas.split(_attend(attn, query, key, value), self.factor)

    def _cross_attention(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                         attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        canvas = self.canvas
        query = attn.to_q(hidden_states)
        self.canvas.branches(query, self.factor)  # the shape check
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        per_row_mask = attention_mask is not None and attention_mask.shape[0] == query.shape[0]
        out: Optional[torch.Tensor] = None
        for group in range(canvas.groups.count if canvas.groups is not None else 1):
            # Merge the queries of the views that share this text; attend to the text of each
            # guidance branch and item (the authors' rows 0 and -1); cut back into the views.
            mask = canvas.pick(attention_mask, group) if per_row_mask else attention_mask
            attended = _attend(attn, canvas.merge_group(query, self.factor, group), canvas.pick(key, group),
                               canvas.pick(value, group), mask)
            views = canvas.split(attended, self.factor)
            out = views if out is None else torch.where(canvas.member(group, views) > 0, views, out)
        assert out is not None
        return out


class MergedAttentionHooks(MethodHooks):
    """MAD for one call: processors installed on ``__enter__``, restored on ``__exit__``; self-attention
    merged during the first ``self_steps``, cross-attention (``merge_cross_attention``) at every step.

    With one view, or nothing to merge (``self_steps=0`` with per-view cross-attention), nothing
    is installed: the call is the pipeline's own attention.
    """

    def __init__(self, context: MethodContext, self_steps: int, merge_cross_attention: bool = True) -> None:
        step = context.step
        self.layout, self.self_steps = step.layout, self_steps
        self.unet: Any = None
        self.saved: Optional[Dict[str, Any]] = None
        n, batch = self.layout.num_views, int(context.window_shape[0])
        if n < 2 or (self_steps == 0 and not merge_cross_attention):
            return
        if step.chunk_rows < n * batch:
            raise ValueError(f"MAD attends over all views at once: view_batch_size must be None or >= the "
                             f"{n} views of this layout, got {step.chunk_rows // batch}")
        if context.cuda_graphs:
            raise ValueError("MAD runs the UNet's attention through its own processors (self-attention merged "
                             "in some steps only), which safa does not capture in CUDA graphs: use cuda_graphs=False")
        if len(context.window_shape) != 4:
            raise ValueError(f"MAD needs (B, C, H, W) latents, got windows of {tuple(context.window_shape)}")
        self.factors = attention_factors(context.adapter)
        axes = (self.layout.rows, self.layout.cols) if isinstance(self.layout, GridLayout) else (self.layout,)
        for factor in sorted(set(self.factors.values())):
            if any(lay.window % factor or lay.overlap % factor or lay.length % factor for lay in axes):
                raise ValueError(f"MAD needs the layout's window, overlap and length (on each axis of a grid) to be "
                                 f"multiples of every attention downsampling factor ({factor}); got {self.layout}")
        self.unet = _unet(context.adapter)
        groups = TextGroups.of(step.conditions, step.view_rows, n, batch) if merge_cross_attention else None
        self.canvas = AttentionCanvas(self.layout, tuple(context.window_shape), step.dim, groups)
        self.canvas.merge_cross = merge_cross_attention

    def __enter__(self) -> "MergedAttentionHooks":
        if self.unet is not None:
            self.saved = dict(self.unet.attn_processors)
            merged = {name: MergedAttention(proc, self.canvas, self.factors[name.rsplit(".", 1)[0]])
                      for name, proc in self.saved.items()}
            self.unet.set_attn_processor(merged)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.saved is not None:
            # set_attn_processor pops from the dict it is given: hand it a copy.
            self.unet.set_attn_processor(dict(self.saved))
            self.saved = None

    @contextlib.contextmanager
    def _self_merged(self) -> Iterator[None]:
        self.canvas.merge_self = True
        try:
            yield
        finally:
            self.canvas.merge_self = False

    def model_context(self, i: int) -> Any:
        if self.unet is not None and i < self.self_steps:
            return self._self_merged()
        return contextlib.nullcontext()
