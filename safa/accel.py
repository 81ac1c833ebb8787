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

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from safa_kernels import ViewLayout, sync_

from .adapters import Adapter, Conditions

__all__ = ["merge_step", "StaticModelStep", "StepRunner", "intern_layout"]


def merge_step(state: torch.Tensor, num_views: int, layout: ViewLayout, dim: int, mode: str,
               swap_interval: int, reference_axis: Optional[int], with_reference: bool) -> None:
    """The whole merge of one step, in place on ``state`` (``(num_views + 1 or num_views, ...)``).

    Rows ``0 .. num_views - 1`` are the views; with ``with_reference`` row ``num_views`` is the
    reference window whose middles are swapped in. One ``safa::merge_*`` op call.
    """
    reference = state[num_views] if with_reference else None
    sync_(state[:num_views], layout, dim, mode, swap_interval, reference=reference,
          reference_axis=reference_axis if with_reference else None)


# torch.compile backend of the denoiser under compile=True; "inductor" generates fused
# kernels, the only one that makes the model faster ("eager"/"aot_eager" only trace).
COMPILE_BACKEND = "inductor"


# Equal layouts share one object: torch.compile guards on the layout's identity (its plan
# is baked into the graph as a constant), so a fresh-but-equal ViewLayout per call would
# recompile every call and hit the recompile limit after 8. Interning also shares the plans.
_LAYOUTS: Dict[ViewLayout, ViewLayout] = {}


def intern_layout(layout: ViewLayout) -> ViewLayout:
    """The first-seen layout equal to ``layout`` (``ViewLayout`` equality ignores the plan memo)."""
    return _LAYOUTS.setdefault(layout, layout)


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


Chunk = Tuple[int, int, Conditions]


class StaticModelStep:
    """The model part of a step over preallocated buffers: what a CUDA graph captures.

    ``x`` (the scheduler batch after ``scale_model_input``) and ``t`` (0-d timestep) are
    static tensors; :meth:`load` copies a step's inputs into them in place and
    :meth:`forward` evaluates the denoiser on them. Shapes, dtypes and buffer addresses are
    the same every step, which is what capture needs; on CPU it runs eagerly (tests compare
    it with the eager step).
    """

    def __init__(self, predict: Callable[..., torch.Tensor], chunks: List[Chunk], guidance_scale: float,
                 example: torch.Tensor, t0: torch.Tensor) -> None:
        self.predict, self.chunks, self.guidance_scale = predict, chunks, guidance_scale
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
        return torch.cat([self.predict(self.x[a:b], self.t, cond, self.guidance_scale)
                          for a, b, cond in self.chunks])


class _GraphedModelStep:
    """A :class:`StaticModelStep` captured once into a ``torch.cuda.CUDAGraph`` and replayed per step."""

    def __init__(self, static: StaticModelStep, first_in: torch.Tensor, first_t: torch.Tensor) -> None:
        self.static = static
        static.load(first_in, first_t)
        # Warm-up on a side stream before capture (lazy inits, cuBLAS handles, autotuning
        # must not happen inside the capture); its output is discarded: one extra model
        # call per generation.
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


class StepRunner:
    """The model and merge calls of one ``JointDiffusion.__call__``, set up once before the loop."""

    def __init__(self, adapter: Adapter, cond: Conditions, rows_prompt: torch.Tensor, chunk_rows: int,
                 guidance_scale: float, timesteps: torch.Tensor, layout: ViewLayout, dim: int, mode: str,
                 swap_interval: int, reference_axis: Optional[int], num_views: int, *,
                 compile: bool = False, cuda_graphs: bool = False,
                 merge: Optional[Callable[..., None]] = None) -> None:
        self.adapter, self.guidance_scale = adapter, guidance_scale
        rows = int(rows_prompt.shape[0])
        self.chunks: List[Chunk] = [(r, min(r + chunk_rows, rows), cond.take(rows_prompt[r:r + chunk_rows]))
                                    for r in range(0, rows, chunk_rows)]
        self.timesteps = timesteps
        # The scheduler's copy of the schedule on the host: see the module docstring.
        self.scheduler_timesteps = timesteps.cpu() if isinstance(timesteps, torch.Tensor) else timesteps
        self.merge_args = (num_views, intern_layout(layout), dim, mode, swap_interval, reference_axis)
        self.cuda_graphs = cuda_graphs
        self._predict: Callable[..., torch.Tensor] = adapter.predict
        self._merge: Callable[..., None] = merge if merge is not None else merge_step
        if compile:
            # dynamic=False: every step has the same shapes; a static graph is what both
            # inductor and a later CUDA-graph capture want.
            self._predict = torch.compile(adapter.predict, dynamic=False, backend=COMPILE_BACKEND)
            if merge is None:
                self._merge = compiled_merge_step()
        self._graphed: Optional[_GraphedModelStep] = None

    def scheduler_timestep(self, i: int) -> Any:
        return self.scheduler_timesteps[i]

    def predict(self, model_in: torch.Tensor, i: int) -> torch.Tensor:
        t = self.timesteps[i]
        if self.cuda_graphs:
            if self._graphed is None:
                static = StaticModelStep(self._predict, self.chunks, self.guidance_scale, model_in, t)
                self._graphed = _GraphedModelStep(static, model_in, t)
            return self._graphed(model_in, t)
        return torch.cat([self._predict(model_in[a:b], t, c, self.guidance_scale) for a, b, c in self.chunks])

    def merge(self, state: torch.Tensor, with_reference: bool) -> None:
        self._merge(state, *self.merge_args, with_reference)


def check_cuda_graphs(device: torch.device) -> None:
    """Raise a clear error unless CUDA graphs can run on ``device``."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"cuda_graphs=True needs the pipeline on a CUDA device (it is on {device}); "
                           "CUDA graphs do not exist on CPU: use cuda_graphs=False (compile=True works on CPU)")
