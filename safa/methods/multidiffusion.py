"""MultiDiffusion (Bar-Tal et al., 2023) and its weighted variants: the overlaps averaged after every step."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from .base import Method

__all__ = ["MultiDiffusion"]


@dataclasses.dataclass(frozen=True)
class MultiDiffusion(Method):
    """MultiDiffusion (Bar-Tal et al., 2023): every overlapping column is the mean of its views.

    Args:
        triangular: weight view ``i``'s local column ``k`` by ``min(k + 1, w - k)`` (MD*, the
            paper's triangular-window baseline) instead of a plain mean (MD).
        gaussian: weight each view by Mixture of Diffusers' Gaussian tile weights (Jiménez,
            2023; on a grid the outer product of the two axes' Gaussians, docs/kernels.md
            section 8) instead of a plain mean. At most one of ``triangular`` / ``gaussian``.
    """

    triangular: bool = False
    gaussian: bool = False
    max_overlap_rate: ClassVar[float] = 1.0  # any overlap below one window

    def __post_init__(self) -> None:
        if not isinstance(self.triangular, bool):
            raise ValueError(f"triangular must be a bool, got {self.triangular!r}")
        if not isinstance(self.gaussian, bool):
            raise ValueError(f"gaussian must be a bool, got {self.gaussian!r}")
        if self.triangular and self.gaussian:
            raise ValueError("triangular and gaussian are two weightings: give at most one of them")

    @property
    def merge_mode(self) -> str:  # type: ignore[override]
        return "triangular" if self.triangular else "gaussian" if self.gaussian else "mean"

    @property
    def name(self) -> str:
        return "multidiffusion_triangular" if self.triangular else \
            "multidiffusion_gaussian" if self.gaussian else "multidiffusion"
