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
``"multidiffusion_gaussian"``      ``MultiDiffusion(gaussian=True)``             Gaussian-weighted mean
                                   (Mixture of Diffusers)
``"mad"``                          :class:`MAD` ``(steps, cross_attention)``     mean; cross- (every step) and
                                                                                 self-attention (first steps)
                                                                                 merged over the long latent
``"syncdiffusion"``                :class:`SyncDiffusion` ``(weight, decay,      mean; a gradient step on
                                   steps, sync_freq, loss, anchor)``             every view before the model
=================================  ============================================  ==========================

Equations refer to the paper (arXiv 2502.05130, section 3). A method is a small frozen
object: ``JointDiffusion(pipe)(prompt, method=SaFa(guide=0.5))``; the shorthands build the
default object, a spec string sets parameters as at the CLI (``method="safa:guide=0.5"``), and
the old keyword arguments (``guide=``, ``swap_interval=``) are accepted; all through
:func:`get_method`. :data:`METHODS` is the one list of methods: the CLI's choices,
``safa evaluate`` and ``safa profile`` derive from it.

The package has one module per method, holding its parameters and its hooks: ``base.py``
(:class:`Method`, :class:`MethodHooks`, :class:`MethodContext`), ``safa.py``,
``multidiffusion.py``, ``mad.py``, ``syncdiffusion.py`` (with its losses) and
``reference_stats.py`` (:class:`SaFaStats`). The three whose hooks need torch are imported on
first use, so that ``import safa.methods`` (the CLI's ``--help``) does not load torch.

Writing a method: subclass :class:`Method` as a frozen dataclass in a module of its own; set
``merge_mode`` (and ``max_overlap_rate``); override :meth:`Method.reference_steps` for a
reference window, and :meth:`Method.hooks` to act inside the step (return a
:class:`MethodHooks`, and set ``couples_views`` when the hooks see every view at once); raise
:class:`NotApplicable` from :meth:`Method.check_pipeline` for pipelines it cannot run on; add
its shorthand to :data:`METHODS`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, FrozenSet, Mapping, Optional, Tuple, Type, Union

from .base import Method, MethodContext, MethodHooks, NotApplicable, leading_steps
from .multidiffusion import MultiDiffusion
from .safa import SaFa, SaFaSelfLoop

__all__ = ["Method", "MethodContext", "MethodHooks", "NotApplicable", "SaFa", "SaFaStats", "SaFaSelfLoop",
           "MultiDiffusion", "MAD", "SyncDiffusion", "METHODS", "MethodEntry", "get_method", "leading_steps",
           "parse_method_spec", "parse_spec_value", "split_method_spec"]


# The methods whose modules import torch (their hooks compute with it): loaded on first use.
def _mad() -> Type[Method]:
    from .mad import MAD
    return MAD


def _syncdiffusion() -> Type[Method]:
    from .syncdiffusion import SyncDiffusion
    return SyncDiffusion


def _safa_stats() -> Type[Method]:
    from .reference_stats import SaFaStats
    return SaFaStats


_LAZY_CLASSES: Dict[str, Callable[[], Type[Method]]] = {
    "MAD": _mad, "SyncDiffusion": _syncdiffusion, "SaFaStats": _safa_stats}


def __getattr__(name: str) -> Any:
    if name in _LAZY_CLASSES:
        return _LAZY_CLASSES[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclasses.dataclass(frozen=True)
class MethodEntry:
    """One shorthand of :data:`METHODS`: its method class (loaded on first use) and the parameters it fixes.

    Calling it builds the method: ``METHODS["multidiffusion_triangular"]()`` is
    ``MultiDiffusion(triangular=True)``.
    """

    load: Callable[[], Type[Method]]
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def cls(self) -> Type[Method]:
        return self.load()

    @property
    def parameters(self) -> FrozenSet[str]:
        """The parameters a spec may set (the class's fields less the fixed ones)."""
        return frozenset(f.name for f in dataclasses.fields(self.cls)) - set(self.fixed)

    def __call__(self, **params: Any) -> Method:
        return self.cls(**self.fixed, **params)


# The one list of methods: shorthand -> its entry (the class and what the shorthand fixes).
METHODS: Dict[str, MethodEntry] = {
    "safa": MethodEntry(lambda: SaFa),
    "safa_stats": MethodEntry(_safa_stats),
    "safa_selfloop": MethodEntry(lambda: SaFaSelfLoop),
    "multidiffusion": MethodEntry(lambda: MultiDiffusion),
    "multidiffusion_triangular": MethodEntry(lambda: MultiDiffusion, {"triangular": True}),
    "multidiffusion_gaussian": MethodEntry(lambda: MultiDiffusion, {"gaussian": True}),
    "mad": MethodEntry(_mad),
    "syncdiffusion": MethodEntry(_syncdiffusion),
}


def get_method(method: Union[str, Method], **params: Optional[Any]) -> Method:
    """The :class:`Method` for ``method``: a ``Method``, a shorthand of :data:`METHODS`, or a spec.

    A spec is the CLI's ``"name:param=value:..."`` (``"safa:guide=0.5"``, ``"mad:steps=0.3"``).
    ``params`` are the sampler's method keyword arguments (``guide=``, ``swap_interval=``);
    ``None`` means "the method's default". A parameter the method does not have, or one given
    both in the spec and on its own, is an error, not silently ignored (``guide=0.5`` with
    MultiDiffusion would change nothing).
    """
    given = {k: v for k, v in params.items() if v is not None}
    if isinstance(method, Method):
        if given:
            raise ValueError(f"{', '.join(given)} given beside the method object {method!r}: set "
                             f"{'it' if len(given) == 1 else 'them'} on the object instead")
        return method
    if not isinstance(method, str) or method.split(":")[0].strip() not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)} (optionally with parameters, e.g. "
                         f"'safa:guide=0.5') or a safa.Method object, got {method!r}")
    return _build(method, given)


def _build(spec: str, given: Dict[str, Any]) -> Method:
    """The method of ``spec`` with the further parameters ``given`` (not None)."""
    name, kwargs = split_method_spec(spec)
    twice = sorted(set(given) & set(kwargs))
    if twice:
        raise ValueError(f"{', '.join(twice)} given both in the method spec {spec!r} and on its own: give it once")
    kwargs.update(given)
    entry = METHODS[name]
    unknown = sorted(set(kwargs) - entry.parameters)
    if unknown:
        raise ValueError(f"{', '.join(unknown)} does not apply to method {name!r} "
                         f"(its parameters: {', '.join(sorted(entry.parameters)) or 'none'})")
    return entry(**kwargs)


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
    given), as :func:`get_method` takes them; an unknown name, or a parameter given twice,
    unknown or out of range, is a ``ValueError`` that names it.
    """
    return _build(spec, {k: v for k, v in params.items() if v is not None})
