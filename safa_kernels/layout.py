"""Geometry of overlapping views over a long axis (docs/kernels.md, section 1).

A :class:`ViewLayout` knows nothing of tensors: it is the integer geometry that the
reference implementation, the plan builder and the sampler all share.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

__all__ = ["ViewLayout"]


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class ViewLayout:
    """``num_views`` windows of ``window`` columns over a long axis of ``length`` columns.

    Open layout (``loop=False``): ``length = window + (num_views - 1) * stride`` and view
    ``i`` covers columns ``[i * stride, i * stride + window)``.

    Loop layout (``loop=True``, seamless loops and 360 degree panoramas):
    ``length = num_views * stride`` and view ``i`` covers ``(i * stride + k) % length``
    for ``k in [0, window)``; the last view overlaps the first.

    The constructor validates; use :meth:`covering` to get the smallest layout whose
    length is at least a requested length.
    """

    length: int
    window: int
    overlap: int
    loop: bool = False
    # Per-layout memo of kernel plans (see ``plan.py``); not part of equality or hashing.
    _plans: Dict[tuple, object] = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        _check_int("window", self.window, 1)
        _check_int("overlap", self.overlap, 0)
        _check_int("length", self.length, 1)
        if not isinstance(self.loop, bool):
            raise TypeError(f"loop must be a bool, got {type(self.loop).__name__}")
        if self.overlap >= self.window:
            raise ValueError(f"overlap must be in [0, window) = [0, {self.window}), got {self.overlap}")
        if self.window > self.length:
            raise ValueError(f"window ({self.window}) must be <= length ({self.length})")
        stride = self.window - self.overlap
        if self.loop:
            if self.length % stride:
                raise ValueError(
                    f"a loop layout needs length to be a multiple of stride = window - overlap = {stride}; "
                    f"got length {self.length} (use ViewLayout.covering)")
            if self.length // stride < 2:
                raise ValueError(f"a loop layout needs at least 2 views; length {self.length} with "
                                 f"stride {stride} gives {self.length // stride}")
        elif (self.length - self.window) % stride:
            raise ValueError(
                f"views of window {self.window} at stride {stride} do not cover length {self.length} exactly: "
                f"length must be window + k * stride (use ViewLayout.covering)")

    @classmethod
    def covering(cls, min_length: int, window: int, overlap: int, loop: bool = False) -> "ViewLayout":
        """The layout with the fewest views whose length is ``>= min_length``.

        The caller generates that length and crops. An open layout has at least one view
        (so ``min_length < window`` gives one window); a loop layout at least two.
        """
        _check_int("min_length", min_length, 1)
        _check_int("window", window, 1)
        _check_int("overlap", overlap, 0)
        if overlap >= window:
            raise ValueError(f"overlap must be in [0, window) = [0, {window}), got {overlap}")
        stride = window - overlap
        if loop:
            num_views = max(2, math.ceil(min_length / stride))
            # window <= length must hold: with a large overlap two views may be too few.
            num_views = max(num_views, math.ceil(window / stride))
            return cls(num_views * stride, window, overlap, loop=True)
        num_views = 1 + max(0, math.ceil((min_length - window) / stride))
        return cls(window + (num_views - 1) * stride, window, overlap, loop=False)

    # -- derived geometry -------------------------------------------------------------
    @property
    def stride(self) -> int:
        return self.window - self.overlap

    @property
    def num_views(self) -> int:
        if self.loop:
            return self.length // self.stride
        return (self.length - self.window) // self.stride + 1

    @property
    def starts(self) -> Tuple[int, ...]:
        """First column of each view (in a loop layout, view i may wrap past the end)."""
        return tuple(i * self.stride for i in range(self.num_views))

    def columns(self, view: int) -> List[int]:
        """Columns of the long axis covered by ``view``, in the view's local order."""
        start = view * self.stride
        if self.loop:
            return [(start + k) % self.length for k in range(self.window)]
        return list(range(start, start + self.window))

    def neighbour_pairs(self) -> List[Tuple[int, int]]:
        """Pairs ``(i, j)`` whose overlap is view ``i``'s right part and view ``j``'s left part."""
        n = self.num_views
        pairs = [(i, i + 1) for i in range(n - 1)]
        if self.loop:
            pairs.append((n - 1, 0))
        return pairs

    def middle(self, view: int) -> Tuple[int, int]:
        """Local columns ``[lo, hi)`` of ``view`` that no other view covers (may be empty).

        For the two end views of an open layout the middle runs to the edge.
        """
        n = self.num_views
        has_left = self.loop or view > 0
        has_right = self.loop or view < n - 1
        lo = self.overlap if has_left else 0
        hi = self.stride if has_right else self.window
        return lo, max(lo, hi)

    def coverage(self, column: int) -> List[Tuple[int, int]]:
        """Every ``(view, local column)`` that covers ``column``, in increasing view order."""
        s, w, n = self.stride, self.window, self.num_views
        # Only views starting within `window` columns before `column` can cover it.
        last = column // s
        first = last - (w - 1) // s
        out = []
        for i in range(first, last + 1):
            if self.loop:
                view = i % n
                local = (column - view * s) % self.length
            elif 0 <= i < n:
                view, local = i, column - i * s
            else:
                continue
            if local < w:
                out.append((view, local))
        return sorted(out)
