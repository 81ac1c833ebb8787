"""Reference-statistics guidance: the views take the reference window's statistics, not its content.

SaFa's reference-guided swap (Eq. 10) copies alternate columns of the reference ``X^0`` into
every view's middle. That makes the views share the reference's content (every middle holds
half of the same columns) and, while it runs, interleaves two trajectories column by column.
:class:`ReferenceStatisticsHooks` (the method :class:`SaFaStats`) lets the reference
decide the same global property (timbre, level, sub-style; colour and style for images) through
statistics instead. At step ``i`` of the guided window, after the model call and before the
scheduler steps (:meth:`MethodHooks.after_model`, the loop's 7.4):

1. the clean predictions ``x0`` of the views and of the reference are read off the model output
   (:func:`safa.schedulers.predict_x0`);
2. per view, every *row* of its ``x0`` (every position of the axes other than the batch and the
   long axis: a (channel, frequency bin) of an audio latent, a (channel, latent row) of an image)
   is scaled so that its root mean square along the long axis equals the reference's row:
   ``delta = x0 * ((rms_ref / rms_view) ** strength - 1)``; the view keeps its own phases and
   detail, only the level of each row changes;
3. the views' ``delta`` are made to agree where views overlap (triangular-weighted mean,
   ``safa_kernels.sync_``), so the views stay windows of one long latent;
4. each view's clean prediction moves by its ``delta`` with its noise prediction kept
   (:func:`safa.schedulers.shift_clean_prediction`): the scheduler then steps as if the model
   had predicted ``x0 + delta``.

The window is a range of noise levels, not a fraction of the steps: the steps whose
signal-to-noise ratio is at most ``snr`` (:func:`safa.schedulers.step_snr`), so 25 and 200
steps guide over the same part of the trajectory. docs/guidance-research.md has the
measurements that led here, the variants that did not, and what it means for real models.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Optional

import torch

from safa_kernels import sync_

from .._checks import check_positive_int, check_range
from ..schedulers import predict_x0, shift_clean_prediction, step_snr, x0_family
from .base import Method, MethodContext, MethodHooks

__all__ = ["SaFaStats", "row_gains", "ReferenceStatisticsHooks"]


@dataclasses.dataclass(frozen=True)
class SaFaStats(Method):
    """SaFa with reference-statistics guidance: the views take the reference's statistics, not its content.

    The self-loop swap of Eq. 9 merges the overlaps, as in SaFa. The reference window ``X^0`` is
    denoised alongside the views while it guides, but nothing of it is copied into them: at
    every guided step each view's clean prediction is scaled, row by row (every position of
    the axes other than the long one: a (channel, frequency bin) of an audio latent), to the
    reference's root mean square along the long axis, with the noise prediction kept
    (see the module docstring). The views settle on the reference's timbre / level /
    sub-style and keep their own content. The guided steps are those whose signal-to-noise
    ratio is at most ``snr``, the same part of the trajectory for any number of steps.
    Measured against SaFa in docs/guidance-research.md.

    Args:
        snr: the guidance window: steps whose noisy latent's signal-to-noise ratio
            (:func:`safa.schedulers.step_snr`; ``alpha_bar / (1 - alpha_bar)``) is at most
            this (default 0.02: on AudioLDM's noise schedule the first 63 of 200 DDIM steps or 8 of
            25 DPM-Solver++ steps, where the texture model's sub-style is decided). 0: no guidance.
        strength: exponent of the row gains, 0 (none) to 1 (the reference's level exactly;
            default 1).
        swap_interval: ``w_swap`` of the self-loop swap (default 1).
    """

    snr: float = 0.02
    strength: float = 1.0
    swap_interval: int = 1
    swaps_reference: ClassVar[bool] = False
    couples_views: ClassVar[bool] = True  # the views' corrections agree over the overlaps
    grid_refusal: ClassVar[Optional[str]] = "its corrections are gains per column of one long axis"

    def __post_init__(self) -> None:
        if isinstance(self.snr, bool) or not isinstance(self.snr, (int, float)) or not 0.0 <= self.snr < math.inf:
            raise ValueError(f"snr must be a finite number >= 0 (a signal-to-noise ratio), got {self.snr!r}")
        check_range("strength", self.strength, 0.0, 1.0)
        check_positive_int("swap_interval", self.swap_interval)

    @property
    def name(self) -> str:
        return "safa_stats"

    @property
    def has_reference(self) -> bool:
        return self.snr > 0 and self.strength > 0

    def reference_steps(self, num_steps: int, scheduler: Any = None) -> int:
        if not self.has_reference:
            return 0  # no guidance: no reference window at all (exactly SaFa*)
        if scheduler is None:
            raise ValueError("SaFaStats.reference_steps needs the scheduler (after set_timesteps): its window "
                             "is a range of noise levels")
        steps = 0
        while steps < num_steps and step_snr(scheduler, steps) <= self.snr:
            steps += 1
        return steps

    def hooks(self, context: MethodContext) -> MethodHooks:
        return ReferenceStatisticsHooks(self, context)


def row_gains(x0_views: torch.Tensor, x0_reference: torch.Tensor, dim: int, strength: float) -> torch.Tensor:
    """``(rms_ref / rms_view) ** strength`` per view and row: the root mean square along ``dim``.

    ``x0_views`` is ``(n, B, ...)`` and ``x0_reference`` ``(B, ...)``; the result has the views'
    shape with ``dim`` reduced to 1 (float32 or wider). A row that is zero in a view keeps gain 1.
    """
    work = torch.promote_types(x0_views.dtype, torch.float32)
    rms_view = x0_views.to(work).pow(2).mean(dim, keepdim=True).sqrt()
    rms_ref = x0_reference.to(work).pow(2).mean(dim, keepdim=True).sqrt()
    ratio = rms_ref / torch.where(rms_view > 0, rms_view, torch.ones_like(rms_view))
    return torch.where(rms_view > 0, ratio.pow(strength), torch.ones_like(ratio))


class ReferenceStatisticsHooks(MethodHooks):
    """The per-call hooks of :class:`SaFaStats` (see the module docstring)."""

    def __init__(self, method: SaFaStats, context: MethodContext) -> None:
        self.strength = float(method.strength)
        self.context = context
        x0_family(context.scheduler)  # an unknown scheduler family fails before the first step

    def after_model(self, i: int, views: torch.Tensor, reference: Optional[torch.Tensor],
                    model_input: torch.Tensor, model_output: torch.Tensor) -> None:
        if reference is None:  # outside the guided window (the sampler gives the reference only inside)
            return
        ctx = self.context
        scheduler, dim, layout = ctx.scheduler, ctx.step.dim, ctx.step.layout
        rows = views.shape[0] * views.shape[1]
        flat = views.view(rows, *views.shape[2:])
        x0_views = predict_x0(scheduler, i, flat, model_input[:rows], model_output[:rows]).view_as(views)
        x0_reference = predict_x0(scheduler, i, reference, model_input[rows:], model_output[rows:])
        gains = row_gains(x0_views, x0_reference, dim, self.strength)
        delta = (x0_views * (gains - 1)).to(views.dtype)
        sync_(delta, layout, dim, "triangular")  # one correction per column of the long latent
        shift_clean_prediction(scheduler, i, flat, model_input[:rows], model_output[:rows],
                               delta.view_as(flat))
