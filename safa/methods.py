"""Joint-diffusion methods: SaFa and the baselines it is compared with (docs/method.md).

All methods share the sampler's loop (every view through the model and the scheduler as one
batch, then one merge of the overlaps); they differ in the merge rule, in whether an
independent reference window guides the first steps, and, for the two baselines that act
inside a step, in small per-call hooks (:class:`MethodHooks`):

=================================  ============================================  ==========================
shorthand                          object                                        merge; hooks
=================================  ============================================  ==========================
``"safa"``                         :class:`SaFa` ``(guide, swap_interval)``      self-loop swap (Eq. 9) +
                                                                                 reference swap (Eq. 10)
``"safa_stats"``                   :class:`SaFaStats` ``(snr, strength,          self-loop swap; the views'
                                   swap_interval)``                              clean predictions take the
                                                                                 reference's row statistics
``"safa_selfloop"``                :class:`SaFaSelfLoop` (SaFa*)                 self-loop swap only
``"multidiffusion"``               :class:`MultiDiffusion` (MD)                  mean of the overlaps
``"multidiffusion_triangular"``    ``MultiDiffusion(triangular=True)`` (MD*)     triangular-weighted mean
``"mad"``                          :class:`MAD` ``(steps)``                      mean; self-attention merged
                                                                                 over the long latent
``"syncdiffusion"``                :class:`SyncDiffusion` ``(weight, decay,      mean; a gradient step on
                                   steps, loss, anchor)``                        every view before the model
=================================  ============================================  ==========================

Equations refer to the paper (arXiv 2502.05130, section 3). A method is a small frozen
object: ``JointDiffusion(pipe)(prompt, method=SaFa(guide=0.5))``; the shorthands build the
default object and accept the old keyword arguments (``guide=``, ``swap_interval=``) through
:func:`get_method`. :data:`METHODS` is the one list of methods: the CLI's choices,
``safa evaluate`` and ``safa profile`` derive from it.

Writing a method: subclass :class:`Method` as a frozen dataclass; set ``merge_mode`` (and
``max_overlap_rate``); override :meth:`Method.reference_steps` for a reference window, and
:meth:`Method.hooks` to act inside the step (return a :class:`MethodHooks`); raise
:class:`NotApplicable` from :meth:`Method.check_pipeline` for pipelines it cannot run on.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Any, Callable, ClassVar, ContextManager, Dict, Optional, Tuple, Union

from ._checks import check_positive_int, check_range

if TYPE_CHECKING:  # type hints only: importing torch / the sampler here would slow ``import safa``
    import torch

    from .accel import StepConfig
    from .adapters import Adapter

__all__ = ["Method", "MethodContext", "MethodHooks", "NotApplicable", "SaFa", "SaFaStats", "SaFaSelfLoop",
           "MultiDiffusion", "MAD", "SyncDiffusion", "METHODS", "get_method", "parse_method_spec", "parse_spec_value",
           "split_method_spec"]


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
    of every step (``safa/loop.py``): :meth:`before_model` (7.1), :meth:`model_context`
    around the model call (7.3) and :meth:`after_model` (7.4). ``__exit__`` runs also when the
    loop raises, so anything installed by ``__enter__`` (MAD's attention processors) is always
    removed.
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
            (:class:`SaFaStats`, through its hooks) sets it False.
    """

    merge_mode: ClassVar[str] = "swap"
    max_overlap_rate: ClassVar[float] = 0.5
    all_views_in_one_call: ClassVar[bool] = False
    swaps_reference: ClassVar[bool] = True
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
        """The per-call hooks of this method (default: none)."""
        return MethodHooks()


@dataclasses.dataclass(frozen=True)
class SaFa(Method):
    """Latent Swap Joint Diffusion: self-loop latent swap + reference-guided latent swap.

    Args:
        guide: ``r_guide``, the fraction of the steps during which the reference window
            ``X^0`` is swapped into every view's middle (Eq. 10): the first
            ``round(guide * T)`` steps (default 0.3, the paper's 60 of 200). Algorithm 1 of
            the paper writes ``t >= r_guide T``; its text and experiments guide the *initial*
            steps, which is what this does (docs/method.md).
        swap_interval: ``w_swap``, frames per alternation of both swaps (default 1).
    """

    guide: float = 0.3
    swap_interval: int = 1

    def __post_init__(self) -> None:
        check_range("guide", self.guide, 0.0, 1.0)
        check_positive_int("swap_interval", self.swap_interval)

    @property
    def name(self) -> str:
        return "safa"

    def reference_steps(self, num_steps: int, scheduler: Any = None) -> int:
        return leading_steps(self.guide, num_steps)

    @property
    def has_reference(self) -> bool:
        return self.guide > 0


@dataclasses.dataclass(frozen=True)
class SaFaStats(Method):
    """SaFa with reference-statistics guidance: the views take the reference's statistics, not its content.

    The self-loop swap of Eq. 9 merges the overlaps, as in SaFa. The reference window ``X^0`` is
    denoised alongside the views while it guides, but nothing of it is copied into them: at
    every guided step each view's clean prediction is scaled, row by row (every position of
    the axes other than the long one: a (channel, frequency bin) of an audio latent), to the
    reference's root mean square along the long axis, with the noise prediction kept
    (:mod:`safa.reference_stats`). The views settle on the reference's timbre / level /
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
        from .schedulers import step_snr
        steps = 0
        while steps < num_steps and step_snr(scheduler, steps) <= self.snr:
            steps += 1
        return steps

    def hooks(self, context: MethodContext) -> MethodHooks:
        from .reference_stats import ReferenceStatisticsHooks
        return ReferenceStatisticsHooks(self, context)


@dataclasses.dataclass(frozen=True)
class SaFaSelfLoop(Method):
    """SaFa*: the self-loop latent swap of Eq. 9 alone (the paper's ablation without reference).

    Args:
        swap_interval: ``w_swap``, frames per alternation (default 1).
    """

    swap_interval: int = 1

    def __post_init__(self) -> None:
        check_positive_int("swap_interval", self.swap_interval)

    @property
    def name(self) -> str:
        return "safa_selfloop"


@dataclasses.dataclass(frozen=True)
class MultiDiffusion(Method):
    """MultiDiffusion (Bar-Tal et al., 2023): every overlapping column is the mean of its views.

    Args:
        triangular: weight view ``i``'s local column ``k`` by ``min(k + 1, w - k)`` (MD*, the
            paper's triangular-window baseline) instead of a plain mean (MD).
    """

    triangular: bool = False
    max_overlap_rate: ClassVar[float] = 1.0  # any overlap below one window

    def __post_init__(self) -> None:
        if not isinstance(self.triangular, bool):
            raise ValueError(f"triangular must be a bool, got {self.triangular!r}")

    @property
    def merge_mode(self) -> str:  # type: ignore[override]
        return "triangular" if self.triangular else "mean"

    @property
    def name(self) -> str:
        return "multidiffusion_triangular" if self.triangular else "multidiffusion"


@dataclasses.dataclass(frozen=True)
class MAD(Method):
    """MAD, Merge-Attend-Diffuse (Quattrini et al., ECCV 2024): one self-attention over the long latent.

    During the first ``steps`` fraction of the steps every UNet self-attention layer attends
    over the whole long latent at its resolution: the views' queries, keys and values are
    averaged onto it where views overlap, attention runs over all its tokens, and the result
    is cut back into the views (:mod:`safa.mad`). After every step the overlaps are averaged
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

    def __post_init__(self) -> None:
        check_range("steps", self.steps, 0.0, 1.0)

    @property
    def name(self) -> str:
        return "mad"

    def check_pipeline(self, adapter: "Adapter") -> None:
        from .mad import attention_factors
        attention_factors(adapter)

    def layout_multiple(self, adapter: "Adapter") -> int:
        from .mad import attention_factors
        return math.lcm(*attention_factors(adapter).values())

    def hooks(self, context: MethodContext) -> MethodHooks:
        from .mad import MergedAttentionHooks
        return MergedAttentionHooks(context, leading_steps(self.steps, len(context.scheduler_timesteps)))


@dataclasses.dataclass(frozen=True)
class SyncDiffusion(Method):
    """SyncDiffusion (Lee et al., NeurIPS 2023): gradient steps that pull every view towards an anchor view.

    During the first ``steps`` fraction of the steps, before the model call, every view's
    noisy latent ``x_t`` (the anchor's excepted) moves down the gradient of a perceptual loss
    between its decoded clean prediction and the anchor's: ``x_t <- x_t - w_i * grad`` with
    ``w_i = weight * decay ** i`` at step ``i``. Then the usual step; the overlaps are
    averaged as in MultiDiffusion (:mod:`safa.syncdiffusion`).

    Args:
        weight: ``w``, the gradient step size at step 0 (default 20.0, the authors' for SD 2.0).
        decay: per-step decay of the step size (default 0.95).
        steps: fraction of the steps with gradient steps, the first ``round(steps * T)``
            (default 0.2: the authors' 10 of 50).
        loss: differentiable ``f(a, b) -> scalar`` between a view's decoded output and the
            anchor's (images ``(B, 3, H, W)`` in ``[0, 1]``; audio: what the adapter's first
            decoding stage gives, a mel spectrogram for the AudioLDM family). Default: LPIPS
            (VGG) for images, :func:`safa.syncdiffusion.spectral_distance` for audio.
        anchor: index of the anchor view (default: the middle one, ``num_views // 2``).
    """

    weight: float = 20.0
    decay: float = 0.95
    steps: float = 0.2
    loss: Optional[Callable[[Any, Any], Any]] = None
    anchor: Optional[int] = None
    merge_mode: ClassVar[str] = "mean"
    max_overlap_rate: ClassVar[float] = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) \
                or not 0.0 <= self.weight < math.inf:
            raise ValueError(f"weight must be a finite number >= 0, got {self.weight!r}")
        check_range("decay", self.decay, 0.0, 1.0)
        check_range("steps", self.steps, 0.0, 1.0)
        if self.loss is not None and not callable(self.loss):
            raise ValueError(f"loss must be None or a callable f(a, b) -> scalar, got {self.loss!r}")
        if self.anchor is not None and (isinstance(self.anchor, bool) or not isinstance(self.anchor, int)
                                        or self.anchor < 0):
            raise ValueError(f"anchor must be None or an int >= 0 (a view index), got {self.anchor!r}")

    @property
    def name(self) -> str:
        return "syncdiffusion"

    def hooks(self, context: MethodContext) -> MethodHooks:
        from .syncdiffusion import SyncDiffusionHooks
        return SyncDiffusionHooks(self, context)


# The one list of methods: shorthand -> factory of the default configuration.
METHODS: Dict[str, Callable[..., Method]] = {
    "safa": SaFa,
    "safa_stats": SaFaStats,
    "safa_selfloop": SaFaSelfLoop,
    "multidiffusion": MultiDiffusion,
    "multidiffusion_triangular": functools.partial(MultiDiffusion, triangular=True),
    "mad": MAD,
    "syncdiffusion": SyncDiffusion,
}


def get_method(method: Union[str, Method], **params: Optional[Any]) -> Method:
    """The :class:`Method` for ``method`` (a shorthand of :data:`METHODS` or a ``Method``).

    ``params`` are the sampler's method keyword arguments (``guide=``, ``swap_interval=``);
    ``None`` means "the method's default". A parameter the method does not have is an error,
    not silently ignored (``guide=0.5`` with MultiDiffusion would change nothing).
    """
    given = {k: v for k, v in params.items() if v is not None}
    if isinstance(method, Method):
        if given:
            raise ValueError(f"{', '.join(given)} given beside the method object {method!r}: set "
                             f"{'it' if len(given) == 1 else 'them'} on the object instead")
        return method
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)} or a safa.Method object, got {method!r}")
    factory = METHODS[method]
    cls = factory.func if isinstance(factory, functools.partial) else factory
    accepted = {f.name for f in dataclasses.fields(cls)} - set(getattr(factory, "keywords", {}))
    unknown = sorted(set(given) - accepted)
    if unknown:
        raise ValueError(f"{', '.join(unknown)} does not apply to method {method!r} "
                         f"(its parameters: {', '.join(sorted(accepted)) or 'none'})")
    return factory(**given)


def parse_spec_value(text: str) -> Any:
    """A spec's value as bool, int, float or (else) str."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def split_method_spec(spec: str) -> Tuple[str, Dict[str, Any]]:
    """``"name:param=value:..."`` -> ``(name, {param: value})``, the name one of :data:`METHODS`."""
    name, *items = spec.strip().split(":")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} in {spec!r}; choose from {', '.join(METHODS)}")
    kwargs: Dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"method parameter {item!r} in {spec!r} is not name=value")
        if key.strip() in kwargs:
            raise ValueError(f"method parameter {key.strip()!r} given twice in {spec!r}")
        kwargs[key.strip()] = parse_spec_value(value)
    return name, kwargs


def parse_method_spec(spec: str, **params: Optional[Any]) -> Method:
    """``"name"`` or ``"name:param=value:param=value"`` (the CLI's method spec) -> the method object.

    ``params`` are further parameters (the CLI's ``--guide`` / ``--swap-interval``; None: not
    given), as :func:`get_method` takes them; a parameter given twice, unknown or out of range
    is a ``ValueError`` that names it.
    """
    name, kwargs = split_method_spec(spec)
    given = {k: v for k, v in params.items() if v is not None}
    twice = sorted(set(given) & set(kwargs))
    if twice:
        raise ValueError(f"{', '.join(twice)} given both in the method spec {spec!r} and on its own: give it once")
    return get_method(name, **kwargs, **given)
