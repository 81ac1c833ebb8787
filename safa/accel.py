"""Per-step work of :class:`safa.sampler.JointDiffusion`: eager, ``torch.compile`` and CUDA graphs.

The sampler's loop is ``scale_model_input -> model -> scheduler.step -> merge``. This module
owns the two parts that can be accelerated, behind one :class:`StepRunner` built per call:

- **model**: ``adapter.predict`` over the chunks of the scheduler batch. The conditions of
  every chunk are taken once per call, not once per step (``Conditions.take`` indexes with
  a host tensor: on CUDA that is a host-to-device copy, i.e. a host sync, every step).
  ``compile=True`` runs it through ``torch.compile``; ``cuda_graphs=True`` captures it once
  per call into a CUDA graph over static input buffers (:class:`StaticModelStep`).
- **merge**: :func:`merge_step`, ONE ``safa::merge_<backend>_`` op per step (self-loop
  swap / mean plus the reference swap together). ``compile=True`` compiles it with
  ``fullgraph=True``, so a graph break on the merge path is an error, not a silent
  slowdown.

The scheduler stays eager on purpose: diffusers schedulers keep Python state (step index,
multistep history) and read per-step coefficients on the host, which a graph would freeze.
On CUDA the scheduler is given the timestep as a *host* tensor (a copy of the schedule made
once per call): DDIM indexes ``alphas_cumprod`` (a CPU tensor) with it and compares it with
0, which with a device timestep is a host sync each step. The model gets the device one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import torch

from safa_kernels import ViewLayout, intern_layout, sync_

from .adapters import Adapter, Conditions
from .regions import Bootstrap, PromptMix, combine_branches

__all__ = ["merge_step", "StaticModelStep", "StepConfig", "StepRunner", "intern_layout"]


def merge_step(views: torch.Tensor, reference: Optional[torch.Tensor], layout: ViewLayout, dim: int, mode: str,
               swap_interval: int, reference_axis: Optional[int]) -> None:
    """The whole merge of one step, in place on ``views`` (``(num_views, B, ...)``): ONE op call.

    Self-loop swap (Eq. 9) or averaging over the overlaps, plus, when ``reference`` (one
    window, ``(B, ...)``) is given, the reference-guided swap of every view's middle (Eq. 10).
    """
    sync_(views, layout, dim, mode, swap_interval, reference=reference,
          reference_axis=reference_axis if reference is not None else None)


# torch.compile backend of the denoiser under compile=True; "inductor" generates fused
# kernels, the only one that makes the model faster ("eager"/"aot_eager" only trace).
COMPILE_BACKEND = "inductor"


# Equal layouts share one object: torch.compile guards on the layout's identity (its plan
# is baked into the graph as a constant), so a fresh-but-equal ViewLayout per call would
# recompile every call and hit the recompile limit after 8. safa_kernels.intern_layout is the
# op layer's one bounded cache of layouts and their plans.


_compiled_merge: Optional[Callable[..., None]] = None


def compiled_merge_step() -> Callable[..., None]:
    """:func:`merge_step` under ``torch.compile(fullgraph=True)``, created once per process.

    The ``eager`` dynamo backend: the graph is the op call itself (there is nothing for
    inductor to fuse), and functionalising a mutating custom op could add a copy of the views.
    """
    global _compiled_merge
    if _compiled_merge is None:
        _compiled_merge = torch.compile(merge_step, fullgraph=True, dynamic=False, backend="eager")
    return _compiled_merge


# (first row, end row, their conditions, their guidance scale): one model call.
Chunk = Tuple[int, int, Conditions, float]


class StaticModelStep:
    """The model part of a step over preallocated buffers: what a CUDA graph captures.

    ``x`` (the model batch after ``scale_model_input``) and ``t`` (0-d timestep) are
    static tensors; :meth:`load` copies a step's inputs into them in place and
    :meth:`forward` evaluates the denoiser on them. Shapes, dtypes and buffer addresses are
    the same every step, which is what capture needs; on CPU it runs eagerly (tests compare
    it with the eager step).
    """

    def __init__(self, predict: Callable[..., torch.Tensor], chunks: List[Chunk],
                 example: torch.Tensor, t0: torch.Tensor) -> None:
        self.predict, self.chunks = predict, chunks
        self.x = torch.empty_like(example, memory_format=torch.contiguous_format)
        self.t = torch.empty((), dtype=t0.dtype, device=example.device)

    def load(self, model_in: torch.Tensor, t: torch.Tensor) -> None:
        if model_in.shape != self.x.shape:
            raise ValueError(f"static step built for {tuple(self.x.shape)}, got {tuple(model_in.shape)}")
        self.x.copy_(model_in)
        # non_blocking: a host timestep is a scalar from pageable memory; a blocking copy
        # would synchronise the stream (cudaMemcpy + sync) every step.
        self.t.copy_(t.reshape(()), non_blocking=True)

    def forward(self) -> torch.Tensor:
        return torch.cat([self.predict(self.x[a:b], self.t, cond, scale) for a, b, cond, scale in self.chunks])


class _GraphedModelStep:
    """A :class:`StaticModelStep` captured once into a ``torch.cuda.CUDAGraph`` and replayed per step."""

    def __init__(self, static: StaticModelStep, first_in: torch.Tensor, first_t: torch.Tensor) -> None:
        self.static = static
        static.load(first_in, first_t)
        # Warm-up on a side stream before capture (lazy inits, cuBLAS handles, autotuning
        # must not happen inside the capture); its output is discarded: one extra model
        # call per captured batch shape.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            static.forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = static.forward()  # lives in the graph's pool: same address every replay

    def __call__(self, model_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.static.load(model_in, t)
        self.graph.replay()
        # A copy: schedulers may keep the model output they were given (multistep history)
        # and the next replay overwrites self.out in place.
        return self.out.clone()


@dataclass(frozen=True)
class StepConfig:
    """What the per-step model and merge calls of one generation need, fixed before the loop.

    Attributes:
        adapter: the pipeline family's adapter (its ``predict`` is the model call).
        conditions: the encoded prompts, one row per distinct prompt.
        view_rows: prompt index of every scheduler row of the views (``num_views * B``,
            window-major).
        reference_rows: prompt index of the reference window's rows (``B``), or None
            when no reference is used.
        guidance_scale: classifier-free guidance scale (off when <= 1).
        timesteps: the schedule (on the model's device).
        chunk_rows: windows' rows per model call (``view_batch_size * B``).
        layout, dim: the views' geometry and the latent's long axis.
        merge_mode, swap_interval, reference_axis: the merge of :func:`merge_step`.
        mix: prompts over the canvas (a timeline, regions: :mod:`safa.regions`): the views' rows
            run as these model branches, combined per cell before the scheduler step; None: one
            branch per row (``view_rows``).
        bootstrap: MultiDiffusion's bootstrapping of the mix's foreground branches, or None.
    """

    adapter: Adapter
    conditions: Conditions
    view_rows: torch.Tensor
    reference_rows: Optional[torch.Tensor]
    guidance_scale: float
    timesteps: torch.Tensor
    chunk_rows: int
    layout: ViewLayout
    dim: int
    merge_mode: str
    swap_interval: int
    reference_axis: Optional[int]
    mix: Optional[PromptMix] = None
    bootstrap: Optional[Bootstrap] = None


class _Batch:
    """The model calls of one batch composition (views only, or views + reference).

    Conditions of every chunk are taken once here, not per step (``Conditions.take`` indexes
    with a host tensor: on CUDA a host-to-device copy, i.e. a host sync, every step).
    """

    def __init__(self, config: StepConfig, rows: torch.Tensor, scales: Optional[Tuple[float, ...]] = None) -> None:
        total, size = int(rows.shape[0]), config.chunk_rows
        scales = scales or (config.guidance_scale,) * total
        self.chunks: List[Chunk] = []
        start = 0
        while start < total:  # chunks of at most `size` rows, one guidance scale each
            end = min(start + size, total)
            end = next((r for r in range(start + 1, end) if scales[r] != scales[start]), end)
            self.chunks.append((start, end, config.conditions.take(rows[start:end]), scales[start]))
            start = end
        self.graphed: Optional[_GraphedModelStep] = None


class StepRunner:
    """The model and merge calls of one ``JointDiffusion.__call__``, set up once before the loop.

    Two batch compositions exist: the views plus the reference window (while it guides)
    and the views alone; each has its chunks (and, under ``cuda_graphs``, its own graph).
    With a prompt mix (:mod:`safa.regions`) the views' part of the batch is the mix's branches,
    combined back into one prediction per row before :meth:`predict` returns.
    """

    def __init__(self, config: StepConfig, *, compile: bool = False, cuda_graphs: bool = False,
                 merge: Optional[Callable[..., None]] = None) -> None:
        self.config = config
        mix = config.mix
        view_rows = mix.rows if mix is not None else config.view_rows
        view_scales = mix.scales if mix is not None else (config.guidance_scale,) * int(view_rows.shape[0])
        self._views = _Batch(config, view_rows, view_scales)
        self._with_reference = (_Batch(config, torch.cat([view_rows, config.reference_rows]),
                                       view_scales + (config.guidance_scale,) * int(config.reference_rows.shape[0]))
                                if config.reference_rows is not None else None)
        # The scheduler's copy of the schedule on the host: see the module docstring.
        timesteps = config.timesteps
        self.scheduler_timesteps = timesteps.cpu() if isinstance(timesteps, torch.Tensor) else timesteps
        self.merge_args = (intern_layout(config.layout), config.dim, config.merge_mode, config.swap_interval,
                           config.reference_axis)
        self.cuda_graphs = cuda_graphs
        self._predict: Callable[..., torch.Tensor] = config.adapter.predict
        self._merge: Callable[..., None] = merge if merge is not None else merge_step
        if compile:
            # dynamic=False: every step has the same shapes; a static graph is what both
            # inductor and a later CUDA-graph capture want.
            self._predict = torch.compile(config.adapter.predict, dynamic=False, backend=COMPILE_BACKEND)
            if merge is None:
                self._merge = compiled_merge_step()

    def scheduler_timestep(self, i: int) -> Any:
        return self.scheduler_timesteps[i]

    def predict(self, model_in: torch.Tensor, i: int, with_reference: bool) -> torch.Tensor:
        """Model outputs for ``model_in``: the views' rows, then (``with_reference``) the reference's."""
        mix = self.config.mix
        if mix is None:
            return self._predict_rows(model_in, i, with_reference)
        # Prompts over the canvas: every view row's branches (its prompts), then the reference's rows.
        views = int(self.config.view_rows.shape[0])
        branch_in = model_in[:views].index_select(0, mix.source)
        if self.config.bootstrap is not None:
            branch_in = self.config.bootstrap.apply(branch_in, i)
        out = self._predict_rows(torch.cat([branch_in, model_in[views:]]), i, with_reference)
        combined = combine_branches(out[:mix.num_branches], mix, views)
        return torch.cat([combined, out[mix.num_branches:]]) if with_reference else combined

    def _predict_rows(self, model_in: torch.Tensor, i: int, with_reference: bool) -> torch.Tensor:
        batch = self._with_reference if with_reference else self._views
        if batch is None:
            raise ValueError("this generation has no reference window")
        t = self.config.timesteps[i]
        if self.cuda_graphs:
            if batch.graphed is None:
                static = StaticModelStep(self._predict, batch.chunks, model_in, t)
                batch.graphed = _GraphedModelStep(static, model_in, t)
            return batch.graphed(model_in, t)
        # Each chunk's output goes straight into one buffer: a torch.cat of the chunk outputs
        # would hold the whole model output twice (hours of audio: ~0.5 GB more at the peak).
        out: Optional[torch.Tensor] = None
        for a, b, c, scale in batch.chunks:
            piece = self._predict(model_in[a:b], t, c, scale)
            if len(batch.chunks) == 1:
                return piece
            if out is None:
                out = piece.new_empty((model_in.shape[0], *piece.shape[1:]))
            out[a:b] = piece
        assert out is not None
        return out

    def merge(self, views: torch.Tensor, reference: Optional[torch.Tensor]) -> None:
        self._merge(views, reference, *self.merge_args)


def check_cuda_graphs(device: torch.device) -> None:
    """Raise a clear error unless CUDA graphs can run on ``device``."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"cuda_graphs=True needs the pipeline on a CUDA device (it is on {device}); "
                           "CUDA graphs do not exist on CPU: use cuda_graphs=False (compile=True works on CPU)")
