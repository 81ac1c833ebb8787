"""MAD, Merge-Attend-Diffuse (Quattrini et al., ECCV 2024), as a diffusers attention processor.

While MAD is on, every self-attention layer of the UNet attends over the whole long latent
instead of over each view alone: the views' queries, keys and values (right after
``to_q`` / ``to_k`` / ``to_v``) are placed on the long latent at that layer's resolution,
overlapping tokens averaged; one attention runs over all of its tokens; the result is cut
back into the views (overlapping tokens duplicated) before ``to_out``. Cross-attention (text
tokens) stays per view. The placing and cutting are ``safa_kernels``' own ``stitch`` in
mean mode and ``gather``, on the call's layout scaled down by the layer's downsampling
factor, so the layout's window and overlap must be multiples of every such factor.

:class:`MergedAttentionHooks` installs one :class:`MergedSelfAttention` per attention module
of the UNet for the duration of a call (``__exit__`` restores the original processors, also
after an error) and switches the merge on around the model call of the first MAD steps;
outside those, and for cross-attention, each processor calls the original one.

Only UNets: the authors' method is defined on a UNet's spatial self-attention. SD3's MMDiT
attends jointly over image and per-view text tokens and Stable Audio's DiT places rotary
positions per window; neither has a faithful merged form, so MAD refuses them
(:class:`~safa.methods.base.NotApplicable`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, ClassVar, Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

from safa_kernels import ViewLayout, gather, stitch

from .._checks import check_range
from ..adapters import Adapter
from .base import Method, MethodContext, MethodHooks, NotApplicable, leading_steps

__all__ = ["MAD", "attention_factors", "AttentionCanvas", "MergedSelfAttention", "MergedAttentionHooks"]


@dataclasses.dataclass(frozen=True)
class MAD(Method):
    """MAD, Merge-Attend-Diffuse (Quattrini et al., ECCV 2024): one self-attention over the long latent.

    During the first ``steps`` fraction of the steps every UNet self-attention layer attends
    over the whole long latent at its resolution: the views' queries, keys and values are
    averaged onto it where views overlap, attention runs over all its tokens, and the result
    is cut back into the views (see the module docstring). After every step the overlaps are averaged
    as in MultiDiffusion. UNet pipelines only; every view must be in one model call, and the
    layout's window and overlap must be multiples of the UNet's deepest attention
    downsampling factor (the default layout rounds the overlap to one).

    Args:
        steps: fraction of the steps with merged attention, the first ``round(steps * T)``
            (default 0.5: the authors' 25 of 50 for Stable Diffusion).
    """

    steps: float = 0.5
    merge_mode: ClassVar[str] = "mean"
    max_overlap_rate: ClassVar[float] = 1.0
    all_views_in_one_call: ClassVar[bool] = True
    couples_views: ClassVar[bool] = True  # the views attend to each other

    def __post_init__(self) -> None:
        check_range("steps", self.steps, 0.0, 1.0)

    @property
    def name(self) -> str:
        return "mad"

    def check_pipeline(self, adapter: "Adapter") -> None:
        attention_factors(adapter)

    def layout_multiple(self, adapter: "Adapter") -> int:
        return math.lcm(*attention_factors(adapter).values())

    def hooks(self, context: MethodContext) -> MethodHooks:
        return MergedAttentionHooks(context, leading_steps(self.steps, len(context.scheduler_timesteps)))

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


class AttentionCanvas:
    """The long latent at every attention resolution: scatters views onto it and cuts them back.

    Rows of the model batch are ``(g, n, B)``: the classifier-free-guidance half (``g`` = 1
    or 2, ``[uncond; cond]``), the view, the batch item; tokens of a view are its latent
    positions ``(rows, cols)`` at the layer's resolution, row-major (diffusers' order).
    """

    def __init__(self, layout: ViewLayout, window_shape: Tuple[int, ...], long_dim: int) -> None:
        self.layout, self.batch = layout, int(window_shape[0])
        self.height, self.width = int(window_shape[-2]), int(window_shape[-1])
        # long axis among (..., rows, cols, channels) of the token grid
        self.dim = long_dim - 1
        self.on = False
        self._scaled: Dict[int, ViewLayout] = {}

    def scaled_layout(self, factor: int) -> ViewLayout:
        """The layout at ``factor`` times lower resolution (exact: the caller checked divisibility)."""
        if factor not in self._scaled:
            lay = self.layout
            self._scaled[factor] = ViewLayout(lay.length // factor, lay.window // factor, lay.overlap // factor,
                                              loop=lay.loop)
        return self._scaled[factor]

    def _grid(self, x: torch.Tensor, factor: int) -> Tuple[int, int, int]:
        n = self.layout.num_views
        rows, tokens = int(x.shape[0]), int(x.shape[1])
        h, w = self.height // factor, self.width // factor
        if tokens != h * w or rows % (n * self.batch):
            raise RuntimeError(f"MAD: an attention layer at downsampling {factor} got {rows} rows of {tokens} "
                               f"tokens; expected multiples of {n} views x {self.batch} items of {h} x {w} tokens")
        return rows // (n * self.batch), h, w

    def merge(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              factor: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(g n B, tokens, C)`` per view -> ``(g B, canvas tokens, C)``: overlapping tokens averaged."""
        g, h, w = self._grid(q, factor)
        n, b, c = self.layout.num_views, self.batch, q.shape[-1]
        views = torch.stack([q, k, v]).view(3, g, n, b, h, w, c).movedim(2, 0)  # (n, 3, g, B, h, w, C)
        canvas = stitch(views, self.scaled_layout(factor), self.dim, mode="mean")
        return canvas.reshape(3, g * b, -1, c).unbind(0)

    def split(self, canvas: torch.Tensor, factor: int) -> torch.Tensor:
        """``(g B, canvas tokens, C)`` -> ``(g n B, tokens, C)``: every view's window of the canvas."""
        lay = self.scaled_layout(factor)
        n, b = self.layout.num_views, self.batch
        h, w = self.height // factor, self.width // factor
        g = canvas.shape[0] // b
        shape = [g, b, h, w, canvas.shape[-1]]
        shape[self.dim] = lay.length
        views = gather(canvas.reshape(shape), lay, self.dim)  # (n, g, B, h, w, C)
        return views.movedim(0, 1).reshape(g * n * b, h * w, -1)


class MergedSelfAttention:
    """Attention processor of one UNet attention module: MAD's merged self-attention while on.

    Off, or for cross-attention, it is the module's original processor. On, it is diffusers'
    ``AttnProcessor2_0`` with the merge between the projections and the attention.
    """

    def __init__(self, original: Any, canvas: AttentionCanvas, factor: int) -> None:
        self.original, self.canvas, self.factor = original, canvas, factor

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 **kwargs: Any) -> torch.Tensor:
        if not self.canvas.on or encoder_hidden_states is not None:
            if temb is not None:
                kwargs["temb"] = temb
            return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=attention_mask, **kwargs)
        if attention_mask is not None:
            raise ValueError("MAD merges self-attention over all views and cannot merge a self-attention mask")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        # Merge: every view's q, k, v onto the long latent, overlapping tokens averaged.
        query, key, value = self.canvas.merge(query, key, value, self.factor)
        rows = query.shape[0]
        head_dim = key.shape[-1] // attn.heads
        query = query.reshape(rows, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.reshape(rows, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.reshape(rows, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        # Attend: one attention over all tokens of the long latent (no scale=: as AttnProcessor2_0).
        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(rows, -1, attn.heads * head_dim).to(query.dtype)
        # ... and back into the views.
        hidden_states = self.canvas.split(hidden_states, self.factor)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class MergedAttentionHooks(MethodHooks):
    """MAD for one call: processors installed on ``__enter__``, restored on ``__exit__``, on for the first steps.

    With one view there is nothing to merge: nothing is installed (the call is the pipeline's own).
    """

    def __init__(self, context: MethodContext, mad_steps: int) -> None:
        step = context.step
        self.layout, self.mad_steps = step.layout, mad_steps
        self.unet: Any = None
        self.saved: Optional[Dict[str, Any]] = None
        n, batch = self.layout.num_views, int(context.window_shape[0])
        if n < 2:
            return
        if mad_steps > 0 and step.chunk_rows < n * batch:
            raise ValueError(f"MAD attends over all views at once: view_batch_size must be None or >= the "
                             f"{n} views of this layout, got {step.chunk_rows // batch}")
        if mad_steps > 0 and context.cuda_graphs:
            raise ValueError("MAD switches the UNet's attention between steps, which a captured CUDA graph "
                             "would not see: use cuda_graphs=False")
        if len(context.window_shape) != 4:
            raise ValueError(f"MAD needs (B, C, H, W) latents, got windows of {tuple(context.window_shape)}")
        self.factors = attention_factors(context.adapter)
        for factor in sorted(set(self.factors.values())):
            lay = self.layout
            if lay.window % factor or lay.overlap % factor or lay.length % factor:
                raise ValueError(f"MAD needs the layout's window, overlap and length to be multiples of every "
                                 f"attention downsampling factor ({factor}); got {lay}")
        self.unet = _unet(context.adapter)
        self.canvas = AttentionCanvas(self.layout, tuple(context.window_shape), step.dim)

    def __enter__(self) -> "MergedAttentionHooks":
        if self.unet is not None:
            self.saved = dict(self.unet.attn_processors)
            merged = {name: MergedSelfAttention(proc, self.canvas, self.factors[name.rsplit(".", 1)[0]])
                      for name, proc in self.saved.items()}
            self.unet.set_attn_processor(merged)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.saved is not None:
            # set_attn_processor pops from the dict it is given: hand it a copy.
            self.unet.set_attn_processor(dict(self.saved))
            self.saved = None

    @contextlib.contextmanager
    def _merged(self) -> Iterator[None]:
        self.canvas.on = True
        try:
            yield
        finally:
            self.canvas.on = False

    def model_context(self, i: int) -> Any:
        if self.unet is not None and i < self.mad_steps:
            return self._merged()
        return contextlib.nullcontext()
