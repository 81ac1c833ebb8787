"""Reference-statistics guidance: the views take the reference window's statistics, not its content.

SaFa's reference-guided swap (Eq. 10) copies alternate columns of the reference ``X^0`` into
every view's middle. That makes the views share the reference's content (every middle holds
half of the same columns) and, while it runs, interleaves two trajectories column by column.
:class:`ReferenceStatisticsHooks` (the method :class:`~safa.methods.SaFaStats`) lets the reference
decide the same global property (timbre, level, sub-style; colour and style for images) through
statistics instead. At step ``i`` of the guided window, after the model call and before the
scheduler steps (the loop's 7.4):

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

from typing import Any, Optional

import torch

from safa_kernels import sync_

from .methods import MethodContext, MethodHooks
from .schedulers import predict_x0, shift_clean_prediction, x0_family

__all__ = ["row_gains", "ReferenceStatisticsHooks"]


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
    """The per-call hooks of :class:`~safa.methods.SaFaStats` (see the module docstring)."""

    def __init__(self, method: Any, context: MethodContext) -> None:
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
