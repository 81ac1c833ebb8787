"""Per-step profile of joint diffusion: where a step's time and launches go.

:mod:`~safa.profiling.measure` runs steps under ``torch.profiler`` and splits each into
model / scheduler / merge / other (:func:`profile_steps`, :func:`analyse`);
:mod:`~safa.profiling.report` prints the result. ``safa profile`` (safa/commands/profile.py)
is the command line over both.
"""
from .measure import (CATEGORIES, NAIVE_METHODS, RANGES, ProfileResult, StepBreakdown, analyse, naive_merge_step,
                      profile_steps)
from .report import format_breakdown, format_comparison

__all__ = ["CATEGORIES", "RANGES", "NAIVE_METHODS", "StepBreakdown", "ProfileResult", "analyse", "profile_steps",
           "naive_merge_step", "format_breakdown", "format_comparison"]
