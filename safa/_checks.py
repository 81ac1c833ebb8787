"""Argument checks shared by the sampler, the method objects and the command line: errors name
the parameter and its range (the CLI's flag types are built on these, so a flag and the Python
argument it feeds are checked by the same code)."""
from __future__ import annotations

import math
from typing import Any, Optional

__all__ = ["check_positive_int", "check_range", "check_int_range", "check_positive_number"]


def check_range(name: str, value: Any, lo: float, hi: float, hi_open: bool = False) -> float:
    """``value`` as a float in ``[lo, hi]`` (``[lo, hi)`` with ``hi_open``), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or not (lo <= value and (value < hi if hi_open else value <= hi)):
        raise ValueError(f"{name} must be in [{lo}, {hi}{')' if hi_open else ']'}, got {value!r}")
    return float(value)


def check_positive_int(name: str, value: Any, allow_none: bool = False) -> Optional[int]:
    """``value`` as an int >= 1 (or None with ``allow_none``), else ``ValueError``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1{' or None' if allow_none else ''}, got {value!r}")
    return value


def check_int_range(name: str, value: Any, lo: int, hi: Optional[int] = None) -> int:
    """``value`` as an int in ``[lo, hi]`` (``>= lo`` when ``hi`` is None), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name} must be an int {f'>= {lo}' if hi is None else f'in [{lo}, {hi}]'}, got {value!r}")
    return value


def check_positive_number(name: str, value: Any) -> float:
    """``value`` as a finite float > 0, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)
