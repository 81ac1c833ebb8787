"""Choosing the views' layout for a requested length (docs/method.md, section 2).

- **Open** layouts (:func:`open_layout`): the fewest windows of the requested size that cover
  the length; the output is cropped.
- **Loop** layouts (:func:`loop_layout`): a loop must be exactly the requested length (a
  cropped loop has a seam at its loop point). Its ``n`` views are spread evenly over the
  length (:meth:`ViewLayout.spaced`: strides, and so overlaps, differ by at most one column),
  with the window within :data:`WINDOW_TOLERANCE` of the requested one (a multiple of what
  the denoiser accepts, or exactly it for a fixed-window model) and the overlap rate as near
  the requested one as possible, at most :data:`OVERLAP_RATE_TOLERANCE` away. Only when
  nothing fits (a loop shorter than about two windows, or a length that is not a whole
  number of latent columns) :class:`LoopLengthError` names the nearest lengths that fit.

Pure integer geometry over latent columns: the sampler converts seconds / pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

from safa_kernels import ViewLayout

__all__ = ["open_layout", "loop_layout", "LoopLengthError", "WINDOW_TOLERANCE", "OVERLAP_RATE_TOLERANCE"]

# A loop's window may differ from the requested (native) one by this fraction: a model trained
# on 10.24 s clips makes the same sound in 10.0 s or 10.5 s windows.
WINDOW_TOLERANCE = 0.05
# ... and its overlap rate (mean overlap / window) from the requested one by this much (absolute).
OVERLAP_RATE_TOLERANCE = 0.05


class LoopLengthError(ValueError):
    """No seamless loop layout of the requested length within the tolerances.

    ``nearest`` holds the nearest loopable lengths in latent columns (below and above).
    """

    def __init__(self, message: str, nearest: Sequence[int]) -> None:
        super().__init__(message)
        self.nearest = tuple(nearest)


def open_layout(columns: int, window: int, overlap: int) -> ViewLayout:
    """The fewest views of ``window`` with ``overlap`` that cover ``columns`` (the caller crops)."""
    if columns < window:
        raise ValueError(f"the requested length ({columns} latent columns) is shorter than one window "
                         f"({window} columns)")
    return ViewLayout.covering(columns, window, overlap, loop=False)


def _max_overlap(window: int, mode: str) -> int:
    # A swap is defined between two views: no column may be covered by three (docs/kernels.md).
    return window // 2 if mode == "swap" else window - 1


def _windows(window: int, multiple: int, fixed: bool) -> List[int]:
    """Candidate windows: ``window`` itself, or multiples of ``multiple`` within the tolerance of it."""
    if fixed:
        return [window]
    lo = max(multiple, math.ceil(window * (1 - WINDOW_TOLERANCE) / multiple) * multiple)
    hi = math.floor(window * (1 + WINDOW_TOLERANCE) / multiple) * multiple
    return sorted(set(range(lo, hi + 1, multiple)) | ({window} if window % multiple == 0 else set()))


@dataclass(frozen=True)
class _Fit:
    """``num_views`` views of ``window`` spread over ``length`` columns."""

    length: int
    window: int
    num_views: int

    @property
    def rate(self) -> float:  # mean overlap / window
        return 1.0 - self.length / (self.num_views * self.window)

    @property
    def uniform(self) -> bool:
        return self.length % self.num_views == 0


def _fits(length: int, window: int, overlap_rate: float, mode: str, multiple: int, fixed: bool,
          stride_multiple: int = 1) -> List[_Fit]:
    """Every (window, views) that loops ``length`` columns within the tolerances, best first.

    ``stride_multiple > 1``: only uniform layouts whose stride is a multiple of it (MAD's grid).
    """
    found = []
    for w in _windows(window, multiple, fixed):
        if w > length:
            continue
        # rate = 1 - L / (n w) within the tolerance: n in a narrow band around L / (w (1 - r)).
        lo_rate = max(0.0, overlap_rate - OVERLAP_RATE_TOLERANCE)
        hi_rate = min(0.999, overlap_rate + OVERLAP_RATE_TOLERANCE)
        for n in range(max(2, math.floor(length / (w * (1 - lo_rate)))), math.ceil(length / (w * (1 - hi_rate))) + 1):
            fit = _Fit(length, w, n)
            if stride_multiple > 1 and (not fit.uniform or (length // n) % stride_multiple):
                continue
            widest = w - length // n          # overlap of the shortest stride
            narrowest = w - -(-length // n)   # ... of the longest one
            if widest > _max_overlap(w, mode) or narrowest < (1 if overlap_rate > 0 else 0):
                continue
            if abs(fit.rate - overlap_rate) <= OVERLAP_RATE_TOLERANCE + 1e-12:
                found.append(fit)
    # Nearest rate first; then the window nearest the requested one; equal strides; fewer views.
    return sorted(found, key=lambda f: (round(abs(f.rate - overlap_rate), 9), abs(f.window - window),
                                        not f.uniform, f.num_views))


def loop_layout(columns: float, window: int, overlap_rate: float, mode: str, multiple: int = 1,
                fixed: bool = False, describe: Optional[Callable[[float], str]] = None,
                stride_multiple: int = 1) -> ViewLayout:
    """The seamless loop layout of exactly ``columns`` columns nearest what was asked.

    Args:
        columns: the loop's length in latent columns; a fractional length (a request that is
            not a whole number of latent columns) cannot loop seamlessly and raises.
        window: the requested window (latent columns); the loop's is within
            :data:`WINDOW_TOLERANCE` of it and a multiple of ``multiple``, or exactly it when
            ``fixed`` (a model defined on one window size).
        overlap_rate: the requested overlap rate; the loop's (mean overlap / window) is the
            nearest possible, within :data:`OVERLAP_RATE_TOLERANCE`.
        mode: the merge mode (``"swap"`` allows overlaps up to half a window).
        describe: formats a length in columns for the error message (e.g. in seconds).
        stride_multiple: with > 1, only uniform layouts whose stride (and window) are multiples
            of it (a method that works on a coarser grid, e.g. MAD's attention resolutions).

    Raises:
        LoopLengthError: no layout fits; the message names the nearest loopable lengths.
    """
    fmt = describe or _columns
    whole = round(columns)
    if abs(columns - whole) <= 1e-6 * max(1.0, columns):
        multiple = multiple * stride_multiple // math.gcd(multiple, stride_multiple)
        fits = _fits(whole, window, overlap_rate, mode, multiple, fixed, stride_multiple)
        if fits:
            best = fits[0]
            return ViewLayout.spaced(best.length, best.window, best.num_views, loop=True)
        windows = _windows(window, multiple, fixed)
        span = fmt(windows[0]) if len(windows) == 1 else f"{fmt(windows[0])} to {fmt(windows[-1])}"
        why = (f"it needs at least two views of {span} overlapping at a rate within {OVERLAP_RATE_TOLERANCE} "
               f"of {overlap_rate:g}" + (" (or a shorter window=)" if whole < 3 * window and not fixed else ""))
    else:
        why = "it is not a whole number of latent columns, so the loop point would fall inside one"

    def loopable(n: int) -> bool:
        return bool(_fits(n, window, overlap_rate, mode, multiple, fixed, stride_multiple))

    below = next((n for n in range(math.ceil(columns) - 1, 0, -1) if loopable(n)), None)
    above = next(n for n in range(math.floor(columns) + 1, math.floor(columns) + 4 * window + 10) if loopable(n))
    nearest = tuple(n for n in (below, above) if n is not None)
    raise LoopLengthError(f"no seamless loop of exactly {fmt(columns)}: {why}; nearest loopable lengths: "
                          f"{' or '.join(fmt(n) for n in nearest)}", nearest)


def _columns(n: float) -> str:
    return f"{n:.6g} latent columns"
