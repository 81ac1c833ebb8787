"""Print the table of loop layouts in docs/method.md: what `loop=True` gets per family and length.

    python tools/loop_table.py          # markdown, as pasted into docs/method.md

The families' geometry is the released checkpoints' (native window in latent frames and
frames per second); the layouts come from safa.layouts.loop_layout, as the sampler calls it.
"""
from __future__ import annotations

import sys
from typing import List

from safa.layouts import LoopLengthError, loop_layout

# name: (native window in latent frames, latent frames per second, window multiple, fixed window)
FAMILIES = {
    "AudioLDM / AudioLDM2 / MusicLDM": (256, 25.0, 1, False),
    "built-in texture model": (256, 25.0, 1, True),
    "Stable Audio Open": (1024, 44100 / 2048, 1, False),
}
SECONDS = (10, 20, 30, 40, 60, 90, 120, 300, 600)


def cell(seconds: float, window: int, fps: float, multiple: int, fixed: bool) -> str:
    def fmt(n: float) -> str:
        return f"{n / fps:.6g} s"

    try:
        layout = loop_layout(seconds * fps, window, 0.2, "swap", multiple, fixed, fmt)
    except LoopLengthError as exc:
        return "no: nearest " + " / ".join(fmt(n) for n in exc.nearest)
    rate = 1 - layout.length / (layout.num_views * layout.window)
    return f"{layout.num_views} x {fmt(layout.window)}, {rate:.3f}"


def table() -> str:
    lines: List[str] = ["| loop length | " + " | ".join(FAMILIES) + " |",
                        "|---" * (len(FAMILIES) + 1) + "|"]
    for seconds in SECONDS:
        cells = [cell(seconds, *spec) for spec in FAMILIES.values()]
        lines.append(f"| {seconds} s | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(table() + "\n")
