"""What every joint-diffusion method is: :class:`Method`, its per-call :class:`MethodHooks`, their context.

A method is a small frozen object the sampler reads (merge mode, reference window, layout
constraints) and, for the methods that act inside a step, a factory of :class:`MethodHooks`
for one call. Nothing here imports torch: ``import safa.methods`` (the CLI's ``--help``)
stays light.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import TYPE_CHECKING, Any, ClassVar, ContextManager, Optional, Tuple

if TYPE_CHECKING:  # type hints only: importing torch / the sampler here would slow ``import safa``
    import torch

    from ..accel import StepConfig
    from ..adapters import Adapter

__all__ = ["Method", "MethodContext", "MethodHooks", "NotApplicable", "leading_steps"]


def leading_steps(fraction: float, num_steps: int) -> int:
    """The number of steps in "the first ``fraction`` of ``num_steps`` steps", rounded half up.

    0.3 * 25 = 7.5 gives 8 steps (Python's round would give 8 here but 2 for 0.5 * 5 = 2.5;
    half-up is what "the first 30%" means for every T).
    """
    return int(math.floor(fraction * num_steps + 0.5))


class NotApplicable(ValueError):
    """The method cannot run on this pipeline (e.g. MAD on a model without UNet self-attention)."""


@dataclasses.dataclass(frozen=True)
class MethodContext:
    """What one ``JointDiffusion.__call__`` tells its method's hooks, fixed before the loop.

    Attributes:
        adapter: the pipeline family's adapter (``adapter.pipe`` is the pipeline).
        scheduler: the views' scheduler, after ``set_timesteps``.
        step: the model and merge configuration of the call (conditions, prompt rows of the
            views, guidance scale, the model's timesteps, rows per model call, layout, long axis).
        scheduler_timesteps: the schedule as the scheduler is given it (a host copy on CUDA).
        window_shape: one view's latent shape ``(B, ...)``.
        cuda_graphs: whether the model call is replayed from a captured CUDA graph.
    """

    adapter: "Adapter"
    scheduler: Any
    step: "StepConfig"
    scheduler_timesteps: Any
    window_shape: Tuple[int, ...]
    cuda_graphs: bool = False


class MethodHooks:
    """A method's behaviour inside the sampler's step, for one call (the base class does nothing).

    The sampler enters it around the whole denoising loop and calls it at three numbered points
    of every step (``safa/loop.py``): :meth:`before_model` (7.1), :meth:`model_context` around
    the model call (7.3) and :meth:`after_model` (7.4), before the scheduler steps. ``__exit__`` runs also when
    the loop raises, so anything installed by ``__enter__`` (MAD's attention processors) is
    always removed.
    """

    def __enter__(self) -> "MethodHooks":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        return None

    def before_model(self, i: int, views: "torch.Tensor") -> None:
        """Step ``i``, before the model: may update the views' noisy latents ``(n, B, ...)`` in place."""

    def model_context(self, i: int) -> ContextManager[None]:
        """Step ``i``: a context around the model call (no-op by default)."""
        return contextlib.nullcontext()

    def after_model(self, i: int, views: "torch.Tensor", reference: "Optional[torch.Tensor]",
                    model_input: "torch.Tensor", model_output: "torch.Tensor") -> None:
        """Step ``i``, after the model and before the scheduler steps: may update in place the views'
        noisy latents ``(n, B, ...)`` and the model output (the views' rows, view-major, then the
        reference's). ``reference`` is the reference window's ``x_t`` while it guides, else None;
        ``model_input`` is the model batch the output came from."""


class Method:
    """What distinguishes one joint-diffusion method from another.

    Attributes (read by the sampler):
        name: the shorthand string of this configuration (e.g. ``"safa"``).
        merge_mode: ``safa_kernels`` merge mode of the overlaps: ``"swap"``, ``"mean"`` or
            ``"triangular"``.
        swap_interval: ``w_swap`` of Eq. 9-10 (frames per alternation); 1 for the averaging modes.
        max_overlap_rate: the largest overlap rate the merge accepts (swap is defined between
            two views only, so at most half a window; averaging takes any overlap below 1).
        all_views_in_one_call: every view must be in the same model call (``view_batch_size``
            None then means all views, not the sampler's bounded default).
        swaps_reference: whether the merge swaps the reference window into the views' middles
            while it guides (Eq. 10; SaFa). A method with a reference that guides otherwise
            (:class:`~safa.methods.SaFaStats`, through its hooks) sets it False.
        couples_views: whether the method's hooks see every view at once inside a step (MAD's
            merged attention, SyncDiffusion's anchor, SaFaStats' agreed corrections), so the
            views cannot be sharded over processes (``process_group``).
        grid_refusal: None when the method runs on a 2-D grid of tiles (an image beyond one
            window in height); else why it does not (the sampler's one-line error).
    """

    merge_mode: ClassVar[str] = "swap"
    max_overlap_rate: ClassVar[float] = 0.5
    all_views_in_one_call: ClassVar[bool] = False
    swaps_reference: ClassVar[bool] = True
    couples_views: ClassVar[bool] = False
    grid_refusal: ClassVar[Optional[str]] = None
    swap_interval: int = 1

    @property
    def name(self) -> str:
        raise NotImplementedError

    def reference_steps(self, num_steps: int, scheduler: Any = None) -> int:
        """How many of the first ``num_steps`` steps the reference window guides (0: no reference).

        ``scheduler`` is the views' scheduler after ``set_timesteps`` (the sampler always gives
        it), for a window defined by noise level rather than by a fraction of the steps.
        """
        return 0

    @property
    def has_reference(self) -> bool:
        """Whether the method may denoise a reference window (what the memory estimate counts,
        before the scheduler's timesteps, and so :meth:`reference_steps`, are known)."""
        return False

    def check_pipeline(self, adapter: "Adapter") -> None:
        """Raise :class:`NotApplicable` when the method cannot run on ``adapter``'s pipeline."""

    def layout_multiple(self, adapter: "Adapter") -> int:
        """Window and overlap (so also stride) must be multiples of this many latent columns (default 1)."""
        return 1

    def hooks(self, context: MethodContext) -> MethodHooks:
        """The per-call hooks of this method (default: none). A method whose hooks see every view
        at once sets :attr:`couples_views`."""
        return MethodHooks()
