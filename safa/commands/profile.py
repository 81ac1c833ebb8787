"""``safa profile``: where a joint-diffusion step's time and launches go (model / scheduler / merge / other).

    safa profile                                  # tiny random AudioLDM, 30 s, SaFa, 4 steps
    safa profile --model DIR --seconds 60 --method multidiffusion --backend triton --compare

Runs a few steps under ``torch.profiler``, prints per step the time and the ops (CPU) or
launches (CUDA) of each part, and writes a Chrome trace (open it in chrome://tracing or
https://ui.perfetto.dev). ``--compare`` runs the naive eager merge beside ours. The code is
:mod:`safa.profiling`; ``benchmarks/profile_step.py`` runs the same.
"""
from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``profile`` on ``subparsers``."""
    from ..profiling import add_arguments, run
    p = subparsers.add_parser("profile", help="per-step profile: model / scheduler / merge / other",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p
