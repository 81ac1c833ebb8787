"""Prompts over the canvas: audio timelines and image regions (docs/timelines.md).

A *timeline* (audio: ``[(0, "rain"), (30, "thunderstorm"), (45, "calm night")]``) and *regions*
(images: ``[(mask, prompt), ...]`` over a background ``prompt``) both come down to the same
thing: ``K`` prompts, each with a weight per latent cell, ``w_k >= 0`` and ``sum_k w_k = 1``
everywhere (a partition of unity). The weights do not depend on the views: the layout is the
sampler's business, the content's placement the user's.

How a step uses them (:class:`PromptMix`, applied by :func:`combine_branches` inside
``safa.accel.StepRunner.predict``): each view runs one model *branch* per prompt whose weight is
non-zero somewhere in that view, and the branches' predictions are summed per cell with the
weights, ``eps(cell) = sum_k w_k(cell) eps_k(cell)``, before the one ``scheduler.step``. For a
scheduler whose step is affine in the model output, ``x' = a x + b eps`` (DDIM, Euler, flow
matching), ``sum_k w_k (a x + b eps_k) = a x + b sum_k w_k eps_k`` because ``sum_k w_k = 1``:
combining before the step *is* MultiDiffusion's combine of the per-branch steps. A view inside one
span (one prompt, weight 1) runs one branch, exactly the plain prompt's call.

Timeline weights: span ``k`` covers ``[s_k, s_{k+1})`` seconds (the last one to the end, or, in a
loop, round the seam into the first). ``w_k(x)`` is the fraction of the interval
``[x - tau/2, x + tau/2]`` that lies in span ``k`` (``tau`` = ``transition``), i.e. the spans'
indicators smoothed by a box of width ``tau``: a linear ramp of width ``tau`` centred on each
boundary, and a partition of unity since the indicators are one. An open timeline extends its first
span to the left and its last to the right; a loop wraps, so the last span ramps into the first
across the seam.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["CanvasPrompts", "PromptMix", "parse_timeline", "timeline_weights", "timeline_prompts", "region_prompts",
           "region_masks", "build_mix", "mix_conditions", "dominant_prompt", "combine_branches", "Bootstrap",
           "constant_colour_latents", "DEFAULT_BOOTSTRAP"]

# MultiDiffusion's region-based default: bootstrapping during the first 20% of the steps (their
# 20 of 50 DDIM steps; we keep the fraction, so that it scales with num_inference_steps).
DEFAULT_BOOTSTRAP = 0.2

# Weights within this of 0 or 1 are snapped to it: a view inside one span must see exactly 1.0
# (one branch, bitwise the plain prompt), not 1 - 1e-16 from the interval arithmetic.
_SNAP = 1e-9


@dataclass(frozen=True)
class CanvasPrompts:
    """``K`` prompts with a weight per latent cell of the canvas (the layout's whole length).

    Attributes:
        prompts: the prompt of each of the ``K`` weight maps (the background first for regions).
        negatives: per prompt, its own negative prompt, or None for the call's.
        guidance_scales: per prompt, its own guidance scale, or None for the call's.
        weights: ``(K, length)`` for audio (latent columns), ``(K, rows, cols)`` for images,
            float64, a partition of unity.
        bootstrap: per prompt, whether it is a foreground region bootstrapped in the first steps.
        bootstrap_fraction: MultiDiffusion's bootstrapping, as a fraction of the steps.
    """

    prompts: Tuple[str, ...]
    negatives: Tuple[Optional[str], ...]
    guidance_scales: Tuple[Optional[float], ...]
    weights: torch.Tensor
    bootstrap: Tuple[bool, ...] = ()
    bootstrap_fraction: float = 0.0

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)


# -- timelines ----------------------------------------------------------------------------------------------------------
def parse_timeline(timeline: Any, seconds: float) -> List[Tuple[float, str]]:
    """``[(start seconds, prompt), ...]`` checked: starts from 0, increasing, before ``seconds``."""
    if not isinstance(timeline, (list, tuple)) or not timeline:
        raise ValueError(f"timeline must be a non-empty list of (start seconds, prompt), got {timeline!r}")
    spans: List[Tuple[float, str]] = []
    for item in timeline:
        if (not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[1], str)
                or isinstance(item[0], bool) or not isinstance(item[0], (int, float)) or not math.isfinite(item[0])):
            raise ValueError(f"timeline entries must be (start seconds, prompt), got {item!r}")
        spans.append((float(item[0]), item[1]))
    if spans[0][0] != 0:
        raise ValueError(f"timeline must start at 0 s (its first span's start), got {spans[0][0]:g}")
    for (a, _), (b, _) in zip(spans, spans[1:]):
        if b <= a:
            raise ValueError(f"timeline starts must increase (spans sorted, not overlapping): {a:g} s then {b:g} s")
    if spans[-1][0] >= seconds:
        raise ValueError(f"timeline span starting at {spans[-1][0]:g} s is past the end of the {seconds:g} s output")
    return spans


def timeline_weights(starts: Sequence[float], seconds: float, transition: float, loop: bool, length: int,
                     columns_per_second: float) -> torch.Tensor:
    """``(K, length)`` weights of the spans starting at ``starts`` at the latent columns' centres.

    Raises ``ValueError`` when ``transition`` is negative or longer than a span.
    """
    if isinstance(transition, bool) or not isinstance(transition, (int, float)) or not math.isfinite(transition) \
            or transition < 0:
        raise ValueError(f"transition must be a number of seconds >= 0, got {transition!r}")
    ends = list(starts[1:]) + [seconds]
    shortest = min(b - a for a, b in zip(starts, ends))
    if len(starts) > 1 and transition > shortest:
        raise ValueError(f"transition must be at most the shortest timeline span ({shortest:g} s), got {transition:g}")
    # Column centres in seconds; a loop's layout is exactly `seconds` long, an open one may be longer
    # (the covering layout is cropped): those columns belong to the last span.
    x = (np.arange(length) + 0.5) / columns_per_second
    if loop:
        x = x * (seconds * columns_per_second / length)  # the loop's columns cover exactly `seconds`
    half = transition / 2
    lo, hi = x - half, x + half
    weights = np.zeros((len(starts), length))
    for k, (a, b) in enumerate(zip(starts, ends)):
        if not loop:
            a = -math.inf if k == 0 else a
            b = math.inf if k == len(starts) - 1 else b
        shifts = (-seconds, 0.0, seconds) if loop else (0.0,)
        if transition == 0:
            weights[k] = sum(((x >= a + s) & (x < b + s)).astype(float) for s in shifts)
        else:
            weights[k] = sum(np.clip(np.minimum(hi, b + s) - np.maximum(lo, a + s), 0, None) for s in shifts) / transition
    weights[np.abs(weights) < _SNAP] = 0.0
    weights[np.abs(weights - 1) < _SNAP] = 1.0
    return torch.from_numpy(weights)


def timeline_prompts(adapter: Any, timeline: Any, seconds: float, transition: float, loop: bool,
                     length: int) -> CanvasPrompts:
    """The :class:`CanvasPrompts` of an audio timeline over a layout of ``length`` latent columns."""
    if adapter.kind != "audio":
        raise ValueError("timeline is for audio pipelines (a prompt per time span); images take regions=")
    spans = parse_timeline(timeline, seconds)
    weights = timeline_weights([s for s, _ in spans], seconds, transition, loop, length,
                               adapter.length_in_columns(seconds=1.0))
    k = len(spans)
    return CanvasPrompts(tuple(p for _, p in spans), (None,) * k, (None,) * k, weights, (False,) * k, 0.0)


# -- regions ------------------------------------------------------------------------------------------------------------
def _mask_array(mask: Any, index: int, height: int, width: int) -> np.ndarray:
    """A region's mask as ``(height, width)`` floats in [0, 1]: a box, a PIL image, an array or a tensor."""
    name = f"regions[{index}]"
    if isinstance(mask, (list, tuple)) and len(mask) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in mask):
        top, left, bottom, right = (int(round(v)) for v in mask)
        if not (0 <= top < bottom <= height and 0 <= left < right <= width):
            raise ValueError(f"{name}: a box is (top, left, bottom, right) pixels with 0 <= top < bottom <= {height} "
                             f"and 0 <= left < right <= {width}, got {tuple(mask)}")
        out = np.zeros((height, width))
        out[top:bottom, left:right] = 1.0
        return out
    if hasattr(mask, "convert") and hasattr(mask, "size"):  # a PIL image: its luminance, white = inside
        arr = np.asarray(mask.convert("L"), dtype=np.float64) / 255.0
    elif isinstance(mask, torch.Tensor):
        arr = mask.detach().cpu().double().numpy()
    elif isinstance(mask, np.ndarray):
        arr = mask.astype(np.float64)
    else:
        raise ValueError(f"{name}: a mask is a PIL image, a (height, width) array / tensor or a box "
                         f"(top, left, bottom, right) in pixels, got {type(mask).__name__}")
    arr = np.squeeze(arr)
    if arr.shape != (height, width):
        raise ValueError(f"{name}: the mask must be the canvas's size in pixels, (height, width) = ({height}, {width}), "
                         f"got {tuple(arr.shape)}")
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
        raise ValueError(f"{name}: mask values must be in [0, 1] (booleans or fractions)")
    return arr


def region_masks(regions: Any, height: int, width: int, scale: int) -> List[np.ndarray]:
    """Each region's mask at the latent's resolution: the fraction of its pixels in every latent cell."""
    rows, cols = -(-height // scale), -(-width // scale)
    out = []
    for i, region in enumerate(regions):
        arr = _mask_array(region[0], i, height, width)
        padded = np.zeros((rows * scale, cols * scale))
        padded[:height, :width] = arr
        out.append(padded.reshape(rows, scale, cols, scale).mean((1, 3)))
    return out


def _region_entry(region: Any, index: int) -> Tuple[Any, str, Optional[str], Optional[float]]:
    """``(mask, prompt)`` or ``(mask, prompt, {"negative_prompt": ..., "guidance_scale": ...})``."""
    if not isinstance(region, (list, tuple)) or len(region) not in (2, 3) or not isinstance(region[1], str):
        raise ValueError(f"regions[{index}] must be (mask, prompt) or (mask, prompt, options), got {region!r}")
    options = dict(region[2]) if len(region) == 3 else {}
    unknown = set(options) - {"negative_prompt", "guidance_scale"}
    if unknown:
        raise ValueError(f"regions[{index}]: options are negative_prompt and guidance_scale, got {sorted(unknown)}")
    scale = options.get("guidance_scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise ValueError(f"regions[{index}]: guidance_scale must be a finite number, got {scale!r}")
    negative = options.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise ValueError(f"regions[{index}]: negative_prompt must be a str, got {negative!r}")
    return region[0], region[1], negative, None if scale is None else float(scale)


def region_prompts(adapter: Any, regions: Any, background: Any, height: int, width: int, canvas_rows: int,
                   canvas_cols: int, bootstrap: float) -> CanvasPrompts:
    """The :class:`CanvasPrompts` of image regions over a background prompt, on the canvas's latent cells.

    The foreground weights are the masks (normalised where they overlap to more than 1); the
    background takes the rest, ``1 - sum(foreground)``. Cells of the covering canvas beyond the
    requested size (cropped at the output) repeat the last row / column.
    """
    if adapter.kind != "image":
        raise ValueError("regions is for image pipelines (a prompt per area); audio takes timeline=")
    if not isinstance(regions, (list, tuple)) or not regions:
        raise ValueError(f"regions must be a non-empty list of (mask, prompt), got {regions!r}")
    if not isinstance(background, str):
        raise ValueError("regions: give prompt (one str: the background's prompt) with regions")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, (int, float)) or not 0 <= bootstrap <= 1:
        raise ValueError(f"bootstrap must be a fraction of the steps in [0, 1], got {bootstrap!r}")
    entries = [_region_entry(r, i) for i, r in enumerate(regions)]
    scale = adapter.decoded_scale * adapter.finalize_scale
    masks = np.stack(region_masks(regions, height, width, scale))
    total = masks.sum(0)
    masks = masks / np.maximum(total, 1.0)  # overlapping regions share a cell
    weights = np.concatenate([np.clip(1.0 - masks.sum(0), 0, 1)[None], masks])
    weights[np.abs(weights) < _SNAP] = 0.0
    weights[np.abs(weights - 1) < _SNAP] = 1.0
    rows, cols = weights.shape[1:]
    padded = np.pad(weights, ((0, 0), (0, max(0, canvas_rows - rows)), (0, max(0, canvas_cols - cols))), mode="edge")
    return CanvasPrompts((background,) + tuple(e[1] for e in entries), (None,) + tuple(e[2] for e in entries),
                         (None,) + tuple(e[3] for e in entries),
                         torch.from_numpy(padded[:, :canvas_rows, :canvas_cols].copy()),
                         (False,) + (True,) * len(entries), float(bootstrap))


# -- the model branches of a step -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptMix:
    """The views' model branches of a call with prompts over the canvas, fixed before the loop.

    Branch ``m`` reads scheduler row ``source[m]`` with condition ``rows[m]`` and guidance
    ``scales[m]``; its prediction is added, times ``weights[m]`` (broadcast over one window), into
    row ``source[m]``. Branches are ordered by row, then prompt.

    Attributes:
        masks: the bootstrapped branches' weights over the window (foreground regions: in the
            first ``bootstrap_steps`` the rest of their input is replaced by a noised
            constant-colour latent, MultiDiffusion's bootstrapping), else None.
        bootstrap_rows: indices of the bootstrapped branches (None without bootstrapping).
    """

    source: torch.Tensor
    rows: torch.Tensor
    weights: torch.Tensor
    scales: Tuple[float, ...]
    masks: Optional[torch.Tensor] = None
    bootstrap_rows: Optional[torch.Tensor] = None
    bootstrap_steps: int = 0

    @property
    def num_branches(self) -> int:
        return int(self.source.shape[0])


def _view_weights(weights: torch.Tensor, layout: Any, view: int) -> torch.Tensor:
    """``(K, *cells)`` weights of one view: its columns (strip) or its tile (grid)."""
    if hasattr(layout, "rows") and hasattr(layout, "cols"):  # a GridLayout
        a, b = divmod(view, layout.cols.num_views)
        return weights[:, layout.rows.columns(a)][:, :, layout.cols.columns(b)]
    return weights[..., layout.columns(view)]


def build_mix(canvas: CanvasPrompts, layout: Any, batch_size: int, window_shape: Tuple[int, ...], long_dim: int,
              key_of: Callable[[int, int], Any], guidance_scale: float, num_steps: int, device: torch.device,
              dtype: torch.dtype) -> Tuple[Optional[PromptMix], List[Any]]:
    """The branches of every view's rows, and the key of every row when each view has one prompt.

    ``key_of(k, b)`` is the condition key of prompt ``k`` for output ``b``. Returns ``(mix,
    keys)``: ``mix`` is None when every view lies inside one prompt's area (weight 1: no combine,
    the plain call's model batch) and ``keys`` gives each row its prompt's key; otherwise
    ``keys`` are the branches' keys (:attr:`PromptMix.rows` is filled in by the caller).
    """
    n = layout.num_views
    per_view = []
    for v in range(n):
        w = _view_weights(canvas.weights, layout, v)
        per_view.append((w, [k for k in range(canvas.num_prompts) if bool((w[k] > 0).any())]))
    if all(len(active) == 1 and bool((w[active[0]] == 1).all()) for w, active in per_view):
        return None, [key_of(per_view[v][1][0], b) for v in range(n) for b in range(batch_size)]
    ndim = len(window_shape) - 1  # the weights broadcast over one window (without its batch axis)
    source: List[int] = []
    keys: List[Any] = []
    scales: List[float] = []
    weights: List[torch.Tensor] = []
    boot: List[int] = []
    for v, (w, active) in enumerate(per_view):
        for b in range(batch_size):
            for k in active:
                cell = w[k]
                if cell.dim() == 1:  # audio: on the window's long axis
                    shape = [1] * ndim
                    shape[long_dim] = cell.shape[0]
                    cell = cell.reshape(shape)
                else:  # images: (rows, cols), the last two axes
                    cell = cell.reshape((1,) * (ndim - 2) + tuple(cell.shape))
                if canvas.bootstrap and canvas.bootstrap[k]:
                    boot.append(len(source))
                source.append(v * batch_size + b)
                keys.append(key_of(k, b))
                own = canvas.guidance_scales[k]
                scales.append(guidance_scale if own is None else own)
                weights.append(cell)
    stacked = torch.stack(weights).to(device=device, dtype=dtype)
    steps = round(canvas.bootstrap_fraction * num_steps) if boot else 0
    picked = torch.tensor(boot, dtype=torch.long)
    # source on the denoiser's device: the per-step gather and index_add_ copy nothing from the host
    mix = PromptMix(torch.tensor(source, device=device), torch.zeros(len(source), dtype=torch.long), stacked,
                    tuple(scales), stacked[picked] if steps else None, picked if steps else None, steps)
    return mix, keys


def mix_conditions(adapter: Any, canvas: CanvasPrompts, prompts: Any, layout: Any, window_shape: Tuple[int, ...],
                   with_reference: bool, guidance_scale: float, num_steps: int
                   ) -> Tuple[Any, torch.Tensor, Optional[torch.Tensor], Optional[PromptMix]]:
    """Encode the prompts the views use once: ``(conditions, view_rows, reference_rows, mix)``.

    As :meth:`safa.JointDiffusion.prepare_conditions` for the plain call (the same keys in the same
    order, so a timeline of one span encodes exactly what the plain prompt does), plus the mix. A
    region's own negative prompt replaces the call's for its branches (``""`` stands for the
    pipeline's own unconditional branch when only some prompts have one).
    """
    batch = prompts.batch_size
    negative = prompts.negative

    def key_of(k: int, b: int) -> Tuple[str, Optional[str]]:
        own = canvas.negatives[k]
        return canvas.prompts[k], own if own is not None else (negative[prompts.item(b)] if negative else None)

    mix, keys = build_mix(canvas, layout, batch, window_shape, adapter.long_dim, key_of, guidance_scale, num_steps,
                          adapter.device, adapter.dtype)
    reference_keys = [(prompts.reference[prompts.item(b)], negative[prompts.item(b)] if negative else None)
                      for b in range(batch)] if with_reference else []
    distinct = list(dict.fromkeys(keys + reference_keys))
    negatives = [neg if neg is not None else "" for _, neg in distinct] \
        if any(neg is not None for _, neg in distinct) else None
    encode_scale = max([guidance_scale] + [s for s in canvas.guidance_scales if s is not None])
    cond = adapter.encode_prompts([text for text, _ in distinct], negatives, encode_scale)
    index = {key: i for i, key in enumerate(distinct)}
    rows = torch.tensor([index[key] for key in keys])
    reference_rows = torch.tensor([index[key] for key in reference_keys]) if with_reference else None
    if mix is None:
        return cond, rows, reference_rows, None
    plain = torch.zeros(layout.num_views * batch, dtype=torch.long)  # unused: the mix gives every branch its row
    return cond, plain, reference_rows, replace(mix, rows=rows)


def dominant_prompt(canvas: CanvasPrompts, layout: Any) -> str:
    """The prompt with the most weight in the first view (the reference window's default prompt)."""
    w = _view_weights(canvas.weights, layout, 0)
    return canvas.prompts[int(w.reshape(w.shape[0], -1).sum(1).argmax())]


def combine_branches(branch_out: torch.Tensor, mix: PromptMix, rows: int) -> torch.Tensor:
    """``eps[r] = sum_k w_k eps_k`` over the branches of every row ``r`` (``rows`` rows out).

    The timeline/region analogue of classifier-free guidance's combine: one weighted sum of the
    branches' predictions, per cell, before the scheduler's step (module docstring: for an
    affine step this is MultiDiffusion's combine of the per-branch steps).
    """
    out = branch_out.new_zeros((rows, *branch_out.shape[1:]))
    out.index_add_(0, mix.source, branch_out * mix.weights)
    return out


# -- MultiDiffusion's bootstrapping -----------------------------------------------------------------------------------
def constant_colour_latents(adapter: Any, colours: torch.Tensor) -> torch.Tensor:
    """``(N, C)``: the latent of a constant-colour image per RGB row of ``colours`` (in [0, 1]).

    Encoded with the pipeline's own VAE (a 64-pixel square, averaged over its cells) and brought
    to the denoiser's latent space as the adapter decodes it back (scaling, shift or mean/std).
    """
    vae = adapter.pipe.vae
    side = 8 * adapter.decoded_scale
    image = (colours.to(device=vae.device, dtype=vae.dtype) * 2 - 1)[:, :, None, None].expand(-1, 3, side, side)
    z = vae.encode(image).latent_dist.mean.float()
    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        view = (1, -1, 1, 1)
        z = (z - torch.tensor(mean).view(view)) * cfg.scaling_factor / torch.tensor(std).view(view)
    else:
        z = (z - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor
    return z.mean((-1, -2))


class Bootstrap:
    """The noised constant-colour backgrounds of MultiDiffusion's bootstrapping, one per bootstrapped branch.

    At step ``i`` (``i < mix.bootstrap_steps``) a bootstrapped branch's model input becomes
    ``m x + (1 - m) bg_i`` with ``m`` its region's weights and ``bg_i`` a new random colour's latent
    brought to the step's noise level with fixed noise (as their code: a random colour each step,
    the same noise), then through ``scale_model_input``. Its own generator (seeded from the call's),
    so the call's random stream is the same with and without regions.
    """

    def __init__(self, adapter: Any, scheduler: Any, timesteps: torch.Tensor, mix: PromptMix,
                 window_shape: Tuple[int, ...], seed: int) -> None:
        self.adapter, self.scheduler, self.timesteps, self.mix = adapter, scheduler, timesteps, mix
        self.generator = torch.Generator().manual_seed(seed)
        count = int(mix.bootstrap_rows.shape[0]) if mix.bootstrap_rows is not None else 0
        self.noise = torch.randn((count, *window_shape[1:]), generator=self.generator).to(
            device=adapter.device, dtype=adapter.dtype)

    def apply(self, branch_in: torch.Tensor, i: int) -> torch.Tensor:
        """``branch_in`` with the bootstrapped branches' inputs replaced outside their regions (step ``i``)."""
        from .schedulers import scale_model_input
        mix = self.mix
        if mix.bootstrap_rows is None or i >= mix.bootstrap_steps:
            return branch_in
        colours = torch.rand((self.noise.shape[0], 3), generator=self.generator)
        bg = constant_colour_latents(self.adapter, colours).to(self.noise)
        bg = bg.reshape(*bg.shape, *([1] * (self.noise.dim() - 2))).expand_as(self.noise)
        t = self.timesteps[i]
        if hasattr(self.scheduler, "scale_noise"):  # flow matching: (1 - s) x0 + s noise
            noised = self.scheduler.scale_noise(bg, t.reshape(1), self.noise)
        else:
            noised = self.scheduler.add_noise(bg, self.noise, t.reshape(1))
        noised = scale_model_input(self.scheduler, noised, t)
        rows = mix.bootstrap_rows.to(branch_in.device)
        m = mix.masks
        out = branch_in.clone()
        out[rows] = m * branch_in[rows] + (1 - m) * noised
        return out


def canvas_prompts(adapter: Any, request: Any, layout: Any, *, timeline: Any, transition: Any, regions: Any,
                   bootstrap: Any, prompt: Any, view_prompts: Any) -> Optional[CanvasPrompts]:
    """The call's prompts over the canvas (None without ``timeline`` / ``regions``), every argument checked."""
    if timeline is None and regions is None:
        if transition is not None:
            raise ValueError("transition is the ramp between timeline spans: give timeline= with it")
        return None
    if timeline is not None and regions is not None:
        raise ValueError("give timeline (audio) or regions (images), not both")
    name = "timeline" if timeline is not None else "regions"
    if view_prompts is not None:
        raise ValueError(f"give either view_prompts (one prompt per view) or {name}, not both")
    if request.embeds:
        raise ValueError(f"{name} takes text prompts; prompt_embeds cannot be combined with it")
    if request.method.couples_views:
        raise ValueError(f"{name}: method {request.method.name!r} couples the views inside each step and reads one "
                         f"prompt per view; use safa, safa_selfloop or a multidiffusion method")
    if timeline is not None:
        if prompt is not None:
            raise ValueError("give either prompt (one for the whole output) or timeline (a prompt per span), not both")
        if adapter.kind != "audio":
            raise ValueError("timeline is for audio pipelines (a prompt per time span); images take regions=")
        spans = parse_timeline(timeline, request.seconds)
        if transition is None:  # default: 2 s ramps, or the shortest span when one is shorter
            ends = [s for s, _ in spans[1:]] + [request.seconds]
            transition = min([2.0] + [b - a for (a, _), b in zip(spans, ends)])
        return timeline_prompts(adapter, timeline, request.seconds, transition, request.loop, layout.length)
    if adapter.kind != "image":
        raise ValueError("regions is for image pipelines (a prompt per area); audio takes timeline=")
    scale = adapter.decoded_scale * adapter.finalize_scale
    rows = adapter.latent_rows(request.height)
    grid = hasattr(layout, "rows") and hasattr(layout, "cols")
    return region_prompts(adapter, regions, prompt, rows * scale if request.height is None else request.height,
                          request.width, layout.rows.length if grid else rows,
                          layout.cols.length if grid else layout.length,
                          DEFAULT_BOOTSTRAP if bootstrap is None else bootstrap)


def seed_of(generator: Any) -> int:
    """A seed for the bootstrapping's own generator, from the call's (0 without one)."""
    first = generator[0] if isinstance(generator, (list, tuple)) and generator else generator
    return int(first.initial_seed()) if isinstance(first, torch.Generator) else 0


def window_evaluations(mix: Optional[PromptMix], num_views: int, num_steps: int, guide_steps: int,
                       batch_size: int) -> Tuple[int, int]:
    """``(all, added by the mix)``: window evaluations per output over a call."""
    views = mix.num_branches // batch_size if mix is not None else num_views
    return views * num_steps + guide_steps, (views - num_views) * num_steps
