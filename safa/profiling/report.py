"""Printing what :mod:`safa.profiling.measure` measured: per-step tables and side-by-side medians."""
from __future__ import annotations

import math

from .measure import CATEGORIES, ProfileResult

__all__ = ["format_breakdown", "format_comparison"]


def format_breakdown(result: ProfileResult) -> str:
    """One line per profiled step: total ms, then ms and ops (CPU) or launches (CUDA) per category."""
    cuda = result.device.startswith("cuda")
    unit = "launches" if cuda else "ops"
    head = f"{'step':>4} {'total ms':>9} | " + " | ".join(f"{c + ' ms':>12} {unit:>8}" for c in CATEGORIES) \
        + f" | {'merge ops':>9}"
    lines = [f"{result.label} on {result.device}" + (f" (trace: {result.trace})" if result.trace else ""), head]
    for s in result.steps:
        counts = s.launches if cuda else s.ops
        lines.append(f"{s.step:>4} {s.total_ms:>9.2f} | "
                     + " | ".join(f"{s.ms[c]:>12.3f} {counts[c]:>8}" for c in CATEGORIES)
                     + f" | {s.merge_ops:>9}")
    unprofiled = ("" if math.isnan(result.median_unprofiled_ms)  # --warmup 0: no step ran outside it
                  else f", {result.median_unprofiled_ms:.2f} ms without it")
    lines.append(f"median step {result.median_total_ms:.2f} ms under the profiler{unprofiled}")
    return "\n".join(lines)


def format_comparison(a: ProfileResult, b: ProfileResult) -> str:
    """Medians of two breakdowns side by side, with ``b / a``."""
    cuda = a.device.startswith("cuda")
    lines = [f"medians over {len(a.steps)} steps, same process ({a.device})",
             f"{'':<22} {a.label:>18} {b.label:>18} {'ratio':>8}"]

    def row(name: str, x: float, y: float, fmt: str) -> None:
        ratio = y / x if x else float("inf") if y else 1.0
        lines.append(f"{name:<22} {format(x, fmt):>18} {format(y, fmt):>18} {ratio:>8.2f}")

    row("step ms (no profiler)", a.median_unprofiled_ms, b.median_unprofiled_ms, ".3f")
    row("step ms (profiled)", a.median_total_ms, b.median_total_ms, ".3f")
    for c in CATEGORIES:
        row(f"{c} ms", a.median("ms", c), b.median("ms", c), ".3f")
        row(f"{c} ops", a.median("ops", c), b.median("ops", c), ".0f")
        if cuda:
            row(f"{c} launches", a.median("launches", c), b.median("launches", c), ".0f")
            row(f"{c} device ms", a.median("device_ms", c), b.median("device_ms", c), ".3f")
    return "\n".join(lines)
