"""SyncDiffusion (Lee et al., NeurIPS 2023): per-view gradient steps towards an anchor view.

At step ``i`` of the first ``round(steps * T)`` steps, every ``sync_freq``-th of them (when
``(i + 1) % sync_freq == 0``, as the authors' code), before the model call
(:meth:`SyncDiffusionHooks.before_model`, the loop's 7.1):

1. the anchor view (the middle one by default; on a 2-D grid of tiles the middle tile,
   :func:`middle_view`) goes through the model with classifier-free
   guidance, without gradients; its clean prediction ``x0`` is decoded once;
2. for every other view, one at a time: its noisy latent ``x_t`` becomes a leaf with a
   gradient, goes through the model with guidance, ``x0`` is computed by hand from the
   scheduler's noise levels (:func:`predict_x0`: never ``scheduler.step``, which multistep
   and stochastic schedulers would advance), decoded, compared with the anchor's decoding by
   the loss, and ``x_t <- x_t - weight * decay**i * d loss / d x_t``. The graph is freed
   before the next view.

Then the sampler's usual step runs on the updated views, and the overlaps are averaged.
As in the authors' code the anchor is not updated (their code also back-propagates through
the anchor and discards the result; we skip that work).

Losses take the decoded outputs of a view and of the anchor and return a scalar (per-item
values are summed, so each batch item gets its own loss's gradient): LPIPS (VGG) for images
when the ``lpips`` package and torchvision's VGG16 weights are available locally
(:func:`lpips_loss`), and :func:`spectral_distance`, weight-free, for audio;
:func:`style_distance` is a weight-free one for images (not perceptual).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, ClassVar, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .._checks import check_positive_int, check_range
from ..adapters import Adapter, Conditions
from ..schedulers import predict_x0, scale_model_input, x0_family
from .base import Method, MethodContext, MethodHooks, NotApplicable, leading_steps

__all__ = ["SyncDiffusion", "middle_view", "spectral_distance", "style_distance", "lpips_loss", "default_loss", "SyncDiffusionHooks"]

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class SyncDiffusion(Method):
    """SyncDiffusion (Lee et al., NeurIPS 2023): gradient steps that pull every view towards an anchor view.

    During the first ``steps`` fraction of the steps, before the model call, every view's
    noisy latent ``x_t`` (the anchor's excepted) moves down the gradient of a perceptual loss
    between its decoded clean prediction and the anchor's: ``x_t <- x_t - w_i * grad`` with
    ``w_i = weight * decay ** i`` at step ``i``. Then the usual step; the overlaps are
    averaged as in MultiDiffusion (see the module docstring).

    Args:
        weight: ``w``, the gradient step size at step 0 (default 20.0, the authors' for SD 2.0).
        decay: per-step decay of the step size (default 0.95).
        steps: fraction of the steps with gradient steps, the first ``round(steps * T)``
            (default 0.2: the authors' 10 of 50).
        sync_freq: a gradient step on every ``sync_freq``-th of those steps, step ``i`` when
            ``(i + 1) % sync_freq == 0`` (default 1: every one; the authors' ``sync_freq``).
        loss: differentiable ``f(a, b) -> scalar`` between a view's decoded output and the
            anchor's (images ``(B, 3, H, W)`` in ``[0, 1]``; audio: what the adapter's first
            decoding stage gives, a mel spectrogram for the AudioLDM family). Default: LPIPS
            (VGG) for images, :func:`spectral_distance` for audio.
        anchor: index of the anchor view (default: the middle one, ``num_views // 2``; on a grid of
            tiles the middle tile, row ``rows // 2`` and column ``cols // 2``: :func:`middle_view`).
    """

    weight: float = 20.0
    decay: float = 0.95
    steps: float = 0.2
    sync_freq: int = 1
    loss: Optional[Callable[[Any, Any], Any]] = None
    anchor: Optional[int] = None
    merge_mode: ClassVar[str] = "mean"
    max_overlap_rate: ClassVar[float] = 1.0
    couples_views: ClassVar[bool] = True  # every view is pulled towards the anchor view

    def __post_init__(self) -> None:
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) \
                or not 0.0 <= self.weight < math.inf:
            raise ValueError(f"weight must be a finite number >= 0, got {self.weight!r}")
        check_range("decay", self.decay, 0.0, 1.0)
        check_range("steps", self.steps, 0.0, 1.0)
        check_positive_int("sync_freq", self.sync_freq)
        if self.loss is not None and not callable(self.loss):
            raise ValueError(f"loss must be None or a callable f(a, b) -> scalar, got {self.loss!r}")
        if self.anchor is not None and (isinstance(self.anchor, bool) or not isinstance(self.anchor, int)
                                        or self.anchor < 0):
            raise ValueError(f"anchor must be None or an int >= 0 (a view index), got {self.anchor!r}")

    @property
    def name(self) -> str:
        return "syncdiffusion"

    def check_pipeline(self, adapter: Adapter) -> None:
        if adapter.kind == "video" and self.loss is None:  # neither LPIPS on one image nor a spectral distance
            raise NotApplicable("SyncDiffusion has no default loss for video: pass SyncDiffusion(loss=f) with a "
                                "differentiable f(a, b) -> scalar on decoded clips (B, 3, frames, H, W) in [-1, 1]")

    def hooks(self, context: MethodContext) -> MethodHooks:
        return SyncDiffusionHooks(self, context)


def middle_view(layout: Any) -> int:
    """The default anchor: the middle view of a strip (``num_views // 2``, the authors' ``len(views) // 2``),
    the middle tile of a grid (row ``rows // 2``, column ``cols // 2``; tiles are numbered row-major).

    On a grid the authors' ``len(views) // 2`` of their row-major views is that tile for an odd
    number of rows, and the first tile of the row below the middle for an even number: an edge
    tile, not the middle view their choice means. A grid of one row is the strip's choice.
    """
    rows = getattr(layout, "rows", None)
    if rows is None:
        return layout.num_views // 2
    return (rows.num_views // 2) * layout.cols.num_views + layout.cols.num_views // 2


# -- losses -------------------------------------------------------------------------------------
def _log_spectrograms(x: torch.Tensor, scales: Sequence[int]) -> List[torch.Tensor]:
    """``(B, time, bins)`` log-magnitude spectrograms of ``x`` at several time resolutions.

    ``x`` is a mel spectrogram ``(B, 1, frames, mels)`` (natural-log magnitudes, the AudioLDM
    family's and the texture model's first decoding stage), pooled over 1, 2, 4, ... frames;
    or a waveform ``(B, channels, samples)``, whose channel mean is analysed by STFTs of
    256, 512, 1024, ... points (Stable Audio).
    """
    if x.ndim == 4:
        mel = x[:, 0].float()
        return [F.avg_pool1d(mel.transpose(1, 2), s, s).transpose(1, 2) if s > 1 else mel
                for s in scales if s <= mel.shape[1]]
    if x.ndim == 3:
        wave = x.float().mean(1)
        out = []
        for s in scales:
            n_fft = 256 * s
            if n_fft > wave.shape[-1]:
                continue
            window = torch.hann_window(n_fft, device=wave.device)
            spec = torch.stft(wave, n_fft, n_fft // 4, window=window, return_complex=True)
            out.append(torch.log(spec.abs() + 1e-5).transpose(1, 2))
        return out
    raise ValueError(f"spectral_distance takes mel spectrograms (B, 1, frames, mels) or waveforms "
                     f"(B, channels, samples), got shape {tuple(x.shape)}")


def spectral_distance(a: torch.Tensor, b: torch.Tensor, scales: Sequence[int] = (1, 2, 4, 8)) -> torch.Tensor:
    """Multi-resolution log-mel distance between two batches of decoded audio; a scalar, weight-free.

    At every resolution (:func:`_log_spectrograms`): the mean over time of every frequency
    bin's log magnitude (the spectral envelope: timbre, level) and its standard deviation over
    time (how much the band moves at that time scale), compared by mean absolute difference
    over bins; summed over resolutions and batch items. Statistics over time rather than a
    frame-by-frame difference: the views sit at other times than the anchor, and the aim is the
    same sound, not the same events.
    """
    if a.shape != b.shape:
        raise ValueError(f"spectral_distance needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    total = a.new_zeros((), dtype=torch.float32)
    for sa, sb in zip(_log_spectrograms(a, scales), _log_spectrograms(b, scales)):
        mean_gap = (sa.mean(1) - sb.mean(1)).abs().mean(-1)
        spread_gap = (sa.std(1) - sb.std(1)).abs().mean(-1) if sa.shape[1] > 1 else 0.0
        total = total + (mean_gap + spread_gap).sum()
    return total


def style_distance(a: torch.Tensor, b: torch.Tensor, scales: Sequence[int] = (1, 2, 4, 8)) -> torch.Tensor:
    """Multi-resolution colour statistics distance between two batches of images; a scalar, weight-free.

    ``a``, ``b``: ``(B, channels, H, W)``. At every scale ``s`` (the images average-pooled over
    ``s x s`` cells, as far as they are that large): every channel's mean over the image (colour,
    level) and its standard deviation over the image (contrast at that scale), compared by mean
    absolute difference over channels; summed over scales and batch items. The image analogue of
    :func:`spectral_distance`: statistics over the image rather than a cell-by-cell difference,
    since the views show other places than the anchor. Not a perceptual metric (LPIPS is the
    authors'); ``safa evaluate --task seams2d`` uses it on the texture model, whose decoded
    pictures are its latent through a fixed linear map, not natural images.
    """
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"style_distance needs two equal shapes (B, channels, H, W), got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    total = a.new_zeros((), dtype=torch.float32)
    for s in scales:
        if s > min(a.shape[-2:]):
            continue
        pa, pb = (F.avg_pool2d(x.float(), s, s) if s > 1 else x.float() for x in (a, b))
        mean_gap = (pa.mean((-2, -1)) - pb.mean((-2, -1))).abs().mean(-1)
        spread_gap = (pa.std((-2, -1)) - pb.std((-2, -1))).abs().mean(-1) if pa[0, 0].numel() > 1 else 0.0
        total = total + (mean_gap + spread_gap).sum()
    return total


def _vgg16_weights_file() -> str:
    """Where torchvision keeps the ImageNet VGG16 weights that LPIPS(net='vgg') loads."""
    from torchvision.models import VGG16_Weights
    url = VGG16_Weights.IMAGENET1K_V1.url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


_HOW = ("or pass SyncDiffusion(loss=f) with any differentiable f(a, b) -> scalar on images in [0, 1] "
        "(e.g. lambda a, b: ((a - b) ** 2).mean(), which is not perceptual)")


@functools.lru_cache(maxsize=4)
def _lpips_model(device: torch.device) -> Any:
    import lpips
    model = lpips.LPIPS(net="vgg", verbose=False).eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def lpips_loss(device: torch.device) -> Loss:
    """LPIPS (VGG) as the authors use it, on images in ``[0, 1]``; a clear error when it cannot load offline.

    The ``lpips`` wheel ships its linear heads; the VGG16 backbone is torchvision's ImageNet
    checkpoint, which torchvision downloads on first use into the torch hub cache. Without it
    (a machine with no model hub) this raises a ``ValueError`` saying what to provide.
    """
    try:
        import lpips  # noqa: F401
        path = _vgg16_weights_file()
    except ImportError:
        raise ValueError("SyncDiffusion's default image loss is LPIPS (VGG) from the `lpips` package, which "
                         "needs `lpips` and `torchvision` installed (pip install lpips) and torchvision's "
                         f"VGG16 ImageNet weights in the torch hub cache; {_HOW}") from None
    if not os.path.isfile(path):
        raise ValueError(f"SyncDiffusion's default image loss is LPIPS (VGG), and torchvision's VGG16 ImageNet "
                         f"weights are not in the torch hub cache ({path}; this machine cannot download them): "
                         f"copy that file there from a machine where torchvision has downloaded it, {_HOW}")
    model = _lpips_model(torch.device(device))
    return lambda a, b: model(a * 2 - 1, b * 2 - 1).sum()  # LPIPS takes [-1, 1]


def default_loss(adapter: Adapter) -> Loss:
    """LPIPS (VGG) for image pipelines, :func:`spectral_distance` for audio."""
    return lpips_loss(adapter.device) if adapter.kind == "image" else spectral_distance


# -- the hooks ------------------------------------------------------------------------------------
class SyncDiffusionHooks(MethodHooks):
    """SyncDiffusion for one call: the gradient steps of the first steps, before each model call."""

    def __init__(self, method: SyncDiffusion, context: MethodContext) -> None:
        step = context.step
        n = step.layout.num_views
        anchor = middle_view(step.layout) if method.anchor is None else method.anchor
        if not 0 <= anchor < n:
            raise ValueError(f"anchor must be in [0, {n - 1}] for this layout of {n} views, got {anchor}")
        self.context, self.anchor = context, anchor
        self.weight, self.decay = float(method.weight), float(method.decay)
        self.sync_steps = leading_steps(method.steps, len(context.scheduler_timesteps)) if n > 1 else 0
        self.sync_freq = method.sync_freq
        self.loss: Loss = method.loss if method.loss is not None else (
            default_loss(context.adapter) if self.sync_steps else spectral_distance)
        batch = int(context.window_shape[0])
        self.conditions: List[Conditions] = [step.conditions.take(step.view_rows[v * batch:(v + 1) * batch])
                                             for v in range(n)]
        if self.sync_steps:  # an unknown scheduler fails here, before any step
            x0_family(context.scheduler)

    def decoded_x0(self, v: int, x_t: torch.Tensor, i: int) -> torch.Tensor:
        """View ``v``'s guided clean prediction at step ``i``, decoded (images in ``[0, 1]``; audio: mel / waveform)."""
        ctx = self.context
        model_input = scale_model_input(ctx.scheduler, x_t, ctx.scheduler_timesteps[i])
        out = ctx.adapter.predict(model_input, ctx.step.timesteps[i], self.conditions[v], ctx.step.guidance_scale)
        x0 = predict_x0(ctx.scheduler, i, x_t, model_input, out)
        decoded = ctx.adapter.decode_latents(x0)
        return ctx.adapter.finalize(decoded) if ctx.adapter.kind == "image" else decoded

    def gradient(self, v: int, x_t: torch.Tensor, i: int, target: torch.Tensor) -> torch.Tensor:
        """``d loss(decoded_x0(v, x_t, i), target) / d x_t``; the graph is freed on return."""
        leaf = x_t.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            loss = self.loss(self.decoded_x0(v, leaf, i), target)
            if loss.numel() != 1:
                loss = loss.sum()
            (grad,) = torch.autograd.grad(loss, leaf)
        return grad

    def synced(self, i: int) -> bool:
        """Whether step ``i`` takes gradient steps (the authors' ``(i + 1) % sync_freq == 0 and i < sync_thres``)."""
        return i < self.sync_steps and (i + 1) % self.sync_freq == 0

    def before_model(self, i: int, views: torch.Tensor) -> None:
        if not self.synced(i):
            return
        with torch.no_grad():
            target = self.decoded_x0(self.anchor, views[self.anchor], i)
        step_size = self.weight * self.decay ** i
        for v in range(views.shape[0]):
            if v != self.anchor:
                views[v].sub_(self.gradient(v, views[v], i, target), alpha=step_size)

