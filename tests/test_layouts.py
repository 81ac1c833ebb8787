"""Loop layouts: exactly the requested length, seamless, near the requested window and overlap rate.

The families' geometry (native window in latent columns, what the denoiser accepts) is
written out here, not read from the adapters: AudioLDM / AudioLDM2 / MusicLDM 256 frames at
25 per second, the built-in texture model exactly 256, Stable Audio Open 1024 frames,
SD 1.x 64 columns, SD3 128 columns in multiples of its 2x2 patches.
"""
from __future__ import annotations

import pytest

from safa.layouts import OVERLAP_RATE_TOLERANCE, WINDOW_TOLERANCE, LoopLengthError, loop_layout

FAMILIES = {  # name: (native window, window multiple, fixed window)
    "audioldm": (256, 1, False),
    "texture": (256, 1, True),
    "stable_audio": (1024, 1, False),
    "sd": (64, 1, False),
    "sd3": (128, 2, False),
}


def check_loop(layout, length, window, rate, mode, multiple, fixed):
    assert layout.loop and layout.length == length  # exactly the length asked: nothing cropped
    w = layout.window
    assert w == window if fixed else (abs(w - window) <= WINDOW_TOLERANCE * window and w % multiple == 0)
    strides = [layout.view_stride(v) for v in range(layout.num_views)]
    assert sum(strides) == length and max(strides) - min(strides) <= 1  # evenly spread, wrapping
    # seamless: the last view overlaps the first, and every column is covered
    assert layout.neighbour_pairs()[-1] == (layout.num_views - 1, 0) and layout.min_overlap >= 1
    assert all(layout.coverage(c) for c in range(0, length, max(1, length // 97)))
    mean_rate = 1 - length / (layout.num_views * w)
    assert abs(mean_rate - rate) <= OVERLAP_RATE_TOLERANCE + 1e-9
    if mode == "swap":
        assert 2 * layout.overlap <= w


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode,rate", [("swap", 0.2), ("swap", 0.5), ("mean", 0.2), ("mean", 0.875)])
def test_every_loop_from_a_few_windows_to_ten_minutes(family, mode, rate):
    window, multiple, fixed = FAMILIES[family]
    # From five windows on every length loops (eight for a fixed window: between two view
    # counts no overlap near the rate fits); probe densely up to 10 min of AudioLDM latent.
    start = (8 if fixed else 5) * window
    lengths = list(range(start, start + 120)) + list(range(start + 120, 15001, 173))
    for n in lengths:
        check_loop(loop_layout(n, window, rate, mode, multiple, fixed), n, window, rate, mode, multiple, fixed)


@pytest.mark.parametrize("seconds", [24, 30, 40, 45, 60, 61, 90, 120, 300, 599.96, 600])
def test_audioldm_loops_in_seconds(seconds):
    n = round(seconds * 25)
    check_loop(loop_layout(n, 256, 0.2, "swap"), n, 256, 0.2, "swap", 1, False)


def test_uniform_when_the_length_allows_it():
    # 40 s = 1000 frames: 5 views of 250 at stride 200 hit the requested rate exactly.
    layout = loop_layout(1000, 256, 0.2, "swap")
    assert layout.uniform and (layout.window, layout.overlap, layout.num_views) == (250, 50, 5)


@pytest.mark.parametrize("columns,nearest", [(500, (455, 549)), (250, (366,))])
def test_too_short_or_between_view_counts_names_the_nearest_lengths(columns, nearest):
    with pytest.raises(LoopLengthError, match="nearest loopable lengths") as info:
        loop_layout(columns, 256, 0.2, "swap", describe=lambda n: f"{n / 25:g} s")
    assert info.value.nearest == nearest
    for n in nearest:  # and they do loop
        check_loop(loop_layout(n, 256, 0.2, "swap"), n, 256, 0.2, "swap", 1, False)


def test_fractional_length_cannot_loop():
    with pytest.raises(LoopLengthError, match="not a whole number of latent columns") as info:
        loop_layout(762.5, 256, 0.2, "swap")
    assert info.value.nearest == (762, 763)


def test_the_docs_table_is_what_the_code_does():
    import runpy
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    table = runpy.run_path(str(root / "tools" / "loop_table.py"))["table"]()
    docs = (root / "docs" / "method.md").read_text()
    for line in table.splitlines():
        assert line in docs, f"docs/method.md is out of date (python tools/loop_table.py): {line}"
