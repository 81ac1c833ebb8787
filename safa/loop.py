"""The denoising loop of :class:`safa.JointDiffusion`: step 7 of Algorithm 1 as the sampler numbers it.

Every step ``i`` of the ``T`` timesteps, in the numbered blocks of :func:`denoise` (the methods'
hooks and docs/method.md cite these numbers):

- 7.1 the method's hook before the model (SyncDiffusion's gradient step on the views' ``x_t``);
- 7.2 the model input: this process's views, plus the reference window ``X^0`` (on its own
  scheduler) while it guides;
- 7.3 one model batch (chunked by ``view_batch_size`` only to bound memory; classifier-free
  guidance inside ``adapter.predict``), inside the method's model context (MAD's merged
  attention);
- 7.4 the method's hook after the model (SaFaStats moves the views' clean predictions);
- 7.5 ``scheduler.step`` ONCE on the views' rows (multistep history and stochastic noise are
  per row), the distributed exchange, and ``X^0`` on its own scheduler while it guides;
- 7.6 ONE ``sync_``: the overlaps merged in place (self-loop swap, Eq. 9, or averaging) plus
  the reference swap of the middles (Eq. 10) during the first ``round(guide * T)`` steps; with
  the user's audio (:mod:`safa.known`) one ``index_put_`` then writes its latent columns, at
  the step's noise level, into every view;
- 7.7 the user's ``callback_on_step_end``.

With RePaint's resampling (``resample_steps`` r > 1, :class:`safa.known.Resampling`) a step
runs r times: between runs its merged output jumps back to the step's input noise level by the
scheduler's forward transition and the step (7.1-7.6) is redone; 7.7 follows its last run.

``X^0`` is read only while it guides, so it is denoised only then and freed after: a SaFa call
costs ``n T + round(guide T)`` window evaluations, not ``(n + 1) T``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch.profiler import record_function
from tqdm.auto import tqdm

from safa_kernels import GridLayout, ViewLayout

from . import accel as _accel
from .adapters.base import Conditions
from .distributed import ViewShard
from . import known as _known
from .known import KnownColumns, Resampling
from .regions import Bootstrap, PromptMix
from .methods import MethodContext
from .request import GenerationRequest, merge_dims, model_windows
from .schedulers import scale_model_input

__all__ = ["LoopPlan", "denoise"]

StepCallback = Callable[..., Optional[Dict[str, Any]]]


@dataclass(frozen=True)
class LoopPlan:
    """What steps 3-6 prepared for the loop (everything but the latents, which it replaces every step).

    Attributes:
        layout: the views over the long latent ``J``; ``window_shape`` one view's latent shape.
        timesteps: the schedule; ``guide_steps``: how many of them ``X^0`` guides.
        conditions, view_rows, reference_rows: the encoded prompts and the prompt of every
            scheduler row of the views (all of them) and of ``X^0`` (None without one).
        shard: this process's views (all of them in one process).
        known: the user's audio or image (:mod:`safa.known`): its latent columns, imposed every step.
        mix: a timeline's / regions' model branches (:mod:`safa.regions`), or None.
        seed: seeds the generator of the mix's bootstrapping (its own: the call's stream is untouched).
        resample: RePaint's resampling (:class:`safa.known.Resampling`), or None: one run per step.
    """

    layout: Union[ViewLayout, GridLayout]
    window_shape: Tuple[int, ...]
    timesteps: torch.Tensor
    guide_steps: int
    conditions: Conditions
    view_rows: torch.Tensor
    reference_rows: Optional[torch.Tensor]
    shard: ViewShard
    known: Optional[KnownColumns] = None
    mix: Optional[PromptMix] = None
    seed: int = 0
    resample: Optional[Resampling] = None


def _step_runner(jd: Any, request: GenerationRequest, plan: LoopPlan) -> _accel.StepRunner:
    """The model and merge calls of every step, set up once (:mod:`safa.accel`)."""
    shard, method = plan.shard, request.method
    reference_here = plan.guide_steps > 0 and shard.has_reference
    windows = len(shard.views) + (1 if reference_here else 0)
    config = _accel.StepConfig(
        adapter=jd.adapter, conditions=plan.conditions, view_rows=plan.view_rows[shard.rows],
        reference_rows=plan.reference_rows if reference_here else None,
        guidance_scale=request.guidance_scale, timesteps=plan.timesteps,
        chunk_rows=model_windows(request.view_batch_size, windows, method) * request.batch_size,
        layout=plan.layout, dim=merge_dims(jd.adapter, plan.layout), merge_mode=method.merge_mode,
        swap_interval=method.swap_interval,
        # A grid's reference swap alternates along its rows axis (the ops' default for grids).
        reference_axis=None if isinstance(plan.layout, GridLayout) else jd.adapter.reference_axis, mix=plan.mix,
        bootstrap=Bootstrap(jd.adapter, jd.pipe.scheduler, plan.timesteps, plan.mix, plan.window_shape, plan.seed)
        if plan.mix is not None and plan.mix.bootstrap_steps else None)
    return _accel.StepRunner(config, compile=jd.compile, cuda_graphs=jd.cuda_graphs, merge=jd.merge_step)


def denoise(jd: Any, request: GenerationRequest, plan: LoopPlan, views: torch.Tensor,
            reference_and_scheduler: Optional[Tuple[torch.Tensor, Any]], generator: Any,
            callback_on_step_end: Optional[StepCallback]) -> Tuple[torch.Tensor, float]:
    """Run the loop from the views of ``J_T`` (and ``X^0`` with its own scheduler, when it guides);
    return the final views and the loop's start time (``time.perf_counter``).

    Called with the initial latents as plain arguments (not held by the caller, no ``*args``),
    so this frame holds them alone: every step replaces ``views``, nothing views-sized outlives
    the step that reads it, and ``X^0`` is freed when it stops guiding.
    """
    reference, ref_scheduler = reference_and_scheduler or (None, None)
    reference_and_scheduler = None
    adapter, pipe, scheduler, method = jd.adapter, jd.pipe, jd.pipe.scheduler, request.method
    layout, shard, guide_steps, window_shape = plan.layout, plan.shard, plan.guide_steps, plan.window_shape
    if jd.cuda_graphs:
        _accel.check_cuda_graphs(views.device)
    runner = _step_runner(jd, request, plan)
    n, num_steps = layout.num_views, len(plan.timesteps)
    # Stochastic schedulers draw noise for every row: a generator list (one per output) covers
    # the views' rows (view-major) once per view.
    view_step_kwargs = adapter.step_kwargs(generator * n if isinstance(generator, list) else generator, request.eta)
    ref_step_kwargs = adapter.step_kwargs(generator, request.eta)
    # The method's hooks inside the step (7.1, 7.3, 7.4: MAD, SyncDiffusion, SaFaStats).
    hooks = method.hooks(MethodContext(adapter=adapter, scheduler=scheduler, step=runner.config,
                                       scheduler_timesteps=runner.scheduler_timesteps,
                                       window_shape=window_shape, cuda_graphs=jd.cuda_graphs))
    own, own_rows = shard.views, shard.rows
    view_rows_count, own_rows_count = n * request.batch_size, len(own) * request.batch_size
    progress_bar = pipe.progress_bar(total=num_steps) if shard.rank == 0 else tqdm(total=num_steps, disable=True)
    # record_function ranges: `safa profile` splits each step into model / scheduler / merge.
    started = time.perf_counter()
    with hooks, progress_bar as progress:
        if shard.rank == 0 and "desc" not in (getattr(pipe, "_progress_bar_config", None) or {}):
            progress.set_description("denoising", refresh=False)
        # RePaint's resampling (safa.known.Resampling) runs a step more than once: between runs the
        # merged views (and X^0) jump back to the step's input noise level, with the schedulers'
        # state (step index, multistep history) as the first run found it. Off: one run per step.
        for i, t, run, last in _known.step_runs(plan.timesteps, plan.resample):
            guiding = i < guide_steps
            with_reference = guiding and shard.has_reference
            if run == 0:
                shard.begin_step(i, num_steps)
                states = plan.resample.save(scheduler, ref_scheduler if guiding else None) if not last else None
            else:
                views, reference = plan.resample.jump(views, reference if guiding else None, scheduler,
                                                      ref_scheduler if guiding else None, plan.timesteps, i, states)
            with record_function("safa.step"):
                t_sched = runner.scheduler_timestep(i)  # a host copy on CUDA: see safa/accel.py
                # 7.1 The method's pre-model hook: SyncDiffusion's gradient step on the views' x_t.
                hooks.before_model(i, views)
                flat = views.view(view_rows_count, *window_shape[1:])  # the scheduler's batch
                # 7.2 Model input: this process's views, plus X^0 (on its own scheduler) while it
                # guides, on the rank that holds it.
                with record_function("safa.scheduler"):
                    model_in = scale_model_input(scheduler, flat[own_rows], t_sched)
                    if with_reference:
                        model_in = torch.cat([model_in, scale_model_input(ref_scheduler, reference, t_sched)])
                # 7.3 One model batch (classifier-free guidance inside adapter.predict), in the
                # method's model context (MAD: self-attention merged over the long latent).
                with record_function("safa.model"), hooks.model_context(i):
                    model_out = runner.predict(model_in, i, with_reference)
                # 7.4 The method's post-model hook: SaFaStats moves the views' clean predictions.
                hooks.after_model(i, views, reference if guiding else None, model_in, model_out)
                # Memory: the scheduler's step is the peak of the loop; nothing views-sized that it
                # does not read may live through it (the concatenated model input here, its
                # pred_original_sample below): docs/long-audio.md.
                model_in = None
                # 7.5 Scheduler step of all views as one batch (in a distributed call every rank
                # steps every row: the model output of other ranks' rows is zeros, their results
                # unused), ...
                with record_function("safa.scheduler"):
                    views = scheduler.step(shard.whole_batch(model_out[:own_rows_count]), t_sched, flat,
                                           **view_step_kwargs).prev_sample.contiguous().view(n, *window_shape)
                # ... the step's one exchange (distributed): X^0's model output from its rank, and
                # the overlap cells the merge of this rank's views reads, ...
                with record_function("safa.exchange"):
                    reference_out = shard.exchange(views, model_out[own_rows_count:] if with_reference
                                                   else None, guiding)
                # ... and X^0 on its own scheduler (on every rank).
                with record_function("safa.scheduler"):
                    if guiding:
                        reference = ref_scheduler.step(reference_out, t_sched, reference,
                                                       **ref_step_kwargs).prev_sample
                        if plan.known is not None:  # X^0 holds the user's clip (safa.known)
                            plan.known.impose_reference(reference, ref_scheduler, plan.timesteps, i)
                flat = model_out = reference_out = None
                # 7.6 The merge, one op: self-loop swap (Eq. 9) or averaging over the overlaps,
                # plus the reference-guided swap of the middles (Eq. 10) while guiding.
                with record_function("safa.merge"):
                    runner.merge(views, reference if guiding and method.swaps_reference else None)
                # ... then the user's audio: its latent columns in every view, brought to the noise
                # level of this step's output by the scheduler's forward process (safa.known).
                if plan.known is not None:
                    with record_function("safa.known"):
                        plan.known.impose(views, scheduler, plan.timesteps, i)
                # 7.7 Callback (after a step's last run): may replace this process's views / the reference.
                if callback_on_step_end is not None and last:
                    got = callback_on_step_end(jd, i, t, {"views": views[own.start:own.stop], "view_range": own,
                                                          "reference": reference if guiding else None,
                                                          "layout": layout})
                    if got:
                        if got.get("views") is not None:
                            views[own.start:own.stop].copy_(got["views"])
                        if guiding and got.get("reference") is not None:
                            reference = got["reference"]
            if not last:
                continue
            if i + 1 == guide_steps:  # X^0 has guided its last step: free it and its scheduler
                reference = ref_scheduler = None
            progress.update()
    return views, started
