"""MultiDiffusion (Bar-Tal et al., 2023) and its triangular-window variant: the overlaps averaged after every step."""
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
