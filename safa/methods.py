"""Joint-diffusion methods: SaFa and the baselines it is compared with (docs/method.md).

All methods share the sampler's loop (every view through the model and the scheduler as one
batch, then one merge of the overlaps); they differ in the merge rule and in whether an
independent reference window guides the first steps:

=====================  ======================================  ==========================
shorthand              object                                  merge
=====================  ======================================  ==========================
``"safa"``             :class:`SaFa` ``(guide, swap_interval)``  self-loop swap (Eq. 9) +
                                                                 reference swap (Eq. 10)
``"safa_selfloop"``    :class:`SaFaSelfLoop` (SaFa*)             self-loop swap only
``"multidiffusion"``   :class:`MultiDiffusion` (MD)              mean of the overlaps
``"multidiffusion_triangular"``  ``MultiDiffusion(triangular=True)`` (MD*)  triangular-weighted mean
=====================  ======================================  ==========================

Equations refer to the paper (arXiv 2502.05130, section 3). A method is a small frozen
object: ``JointDiffusion(pipe)(prompt, method=SaFa(guide=0.5))``; the shorthands build the
default object and accept the old keyword arguments (``guide=``, ``swap_interval=``) through
:func:`get_method`. :data:`METHODS` is the one list of methods: the CLI's choices,
``safa evaluate`` and ``safa profile`` derive from it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, ClassVar, Dict, Optional, Union

__all__ = ["Method", "SaFa", "SaFaSelfLoop", "MultiDiffusion", "METHODS", "get_method"]


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0.0, 1.0], got {value!r}")
    return float(value)


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


class Method:
    """What distinguishes one joint-diffusion method from another.

    Attributes (read by the sampler):
        name: the shorthand string of this configuration (e.g. ``"safa"``).
        merge_mode: ``safa_kernels`` merge mode of the overlaps: ``"swap"``, ``"mean"`` or
            ``"triangular"``.
        swap_interval: ``w_swap`` of Eq. 9-10 (frames per alternation); 1 for the averaging modes.
        max_overlap_rate: the largest overlap rate the merge accepts (swap is defined between
            two views only, so at most half a window; averaging takes any overlap below 1).
    """

    merge_mode: ClassVar[str] = "swap"
    max_overlap_rate: ClassVar[float] = 0.5
    swap_interval: int = 1

    @property
    def name(self) -> str:
        raise NotImplementedError

    def reference_steps(self, num_steps: int) -> int:
        """How many of the first ``num_steps`` steps the reference window guides (0: no reference)."""
        return 0


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
        _check_fraction("guide", self.guide)
        _check_positive_int("swap_interval", self.swap_interval)

    @property
    def name(self) -> str:
        return "safa"

    def reference_steps(self, num_steps: int) -> int:
        # round half up: 0.3 * 25 = 7.5 guides 8 steps (Python's round would give 8 here but
        # 2 for 0.5 * 5 = 2.5; half-up is what "the first 30%" means for every T).
        return int(math.floor(self.guide * num_steps + 0.5))


@dataclasses.dataclass(frozen=True)
class SaFaSelfLoop(Method):
    """SaFa*: the self-loop latent swap of Eq. 9 alone (the paper's ablation without reference).

    Args:
        swap_interval: ``w_swap``, frames per alternation (default 1).
    """

    swap_interval: int = 1

    def __post_init__(self) -> None:
        _check_positive_int("swap_interval", self.swap_interval)

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


# The one list of methods: shorthand -> factory of the default configuration.
METHODS: Dict[str, Callable[..., Method]] = {
    "safa": SaFa,
    "safa_selfloop": SaFaSelfLoop,
    "multidiffusion": MultiDiffusion,
    "multidiffusion_triangular": functools.partial(MultiDiffusion, triangular=True),
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
