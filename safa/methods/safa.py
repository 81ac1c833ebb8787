"""SaFa, Latent Swap Joint Diffusion (arXiv 2502.05130): the self-loop swap (Eq. 9) and the reference swap (Eq. 10).

Both swaps are merge rules of ``safa_kernels`` (mode ``"swap"``); the methods here only say
which rule runs and for how many steps the reference window guides, so they have no hooks.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from .._checks import check_positive_int, check_range
from .base import Method, leading_steps

__all__ = ["SaFa", "SaFaSelfLoop"]


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
