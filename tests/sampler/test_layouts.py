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
    root = Path(__file__).resolve().parents[2]
    table = runpy.run_path(str(root / "tools" / "loop_table.py"))["table"]()
    docs = (root / "docs" / "method.md").read_text()
    for line in table.splitlines():
        assert line in docs, f"docs/method.md is out of date (python tools/loop_table.py): {line}"


# -- ViewLayout: bounded size, one cache of layouts and plans ---------------------------------
import time  # noqa: E402

import torch  # noqa: E402

from safa_kernels import ViewLayout, cache  # noqa: E402
from safa_kernels.layout import MAX_CELLS  # noqa: E402
from safa_kernels.plan import REF_NONE, get_plan  # noqa: E402


@pytest.mark.parametrize("make,name,bound", [
    (lambda: ViewLayout.covering(10**12, 256, 51), "min_length", "min_length must be <= 1719664486 "),
    (lambda: ViewLayout.covering(10**12, 256, 51, loop=True), "min_length", "min_length must be <= 1719664435 "),
    (lambda: ViewLayout.spaced(10**12, 256, 10**10), "num_views", f"num_views must be <= {MAX_CELLS // 256} "),
    (lambda: ViewLayout(256 + 205 * 10**10, 256, 51), "length", "length must be <= 1719664486 "),
    (lambda: ViewLayout(2**40, 2**20, 0, loop=True), "length",
     "length must be <= 2146435072 for window 1048576, overlap 0, loop"),
], ids=["covering", "covering-loop", "spaced", "uniform", "uniform-loop"])
def test_a_layout_too_large_to_merge_is_refused_at_once(make, name, bound):
    # Not a starts tuple that grows until the out-of-memory killer ends the process: an error
    # naming the parameter and its bound, before anything is built.
    began = time.perf_counter()
    with pytest.raises(ValueError, match=f"^{name}: .*2\\*\\*31 - 1.*{bound}"):
        make()
    assert time.perf_counter() - began < 0.1


@pytest.mark.parametrize("loop", [False, True])
def test_the_layout_bound_is_the_plan_addressing_limit(loop):
    # A window of 2**20 keeps the largest layout small (2047 views): the bound is tight.
    window, overlap = 2**20, 2**18
    views = MAX_CELLS // window
    longest = views * (window - overlap) if loop else window + (views - 1) * (window - overlap)
    layout = ViewLayout.covering(longest, window, overlap, loop=loop)
    assert layout.length == longest and layout.num_views * window <= MAX_CELLS
    with pytest.raises(ValueError, match=f"min_length must be <= {longest} for window {window}"):
        ViewLayout.covering(longest + 1, window, overlap, loop=loop)


def test_equal_layouts_are_one_object_with_one_set_of_plans(monkeypatch):
    monkeypatch.setattr(cache, "_entries", type(cache._entries)())  # this test's own table
    monkeypatch.setattr(cache, "_recent", (None, (None, {})))
    a, b = ViewLayout.covering(90, 16, 5), ViewLayout.covering(90, 16, 5)
    assert a is not b and a == b and hash(a) == hash(b)
    assert cache.intern_layout(a) is a and cache.intern_layout(b) is a
    plan = get_plan(a, "sync", "swap", 1, REF_NONE, torch.device("cpu"))
    assert get_plan(b, "sync", "swap", 1, REF_NONE, torch.device("cpu")) is plan
    # A gather plan does not depend on the merge arguments: one plan for all of them.
    gather = get_plan(b, "gather", "swap", 1, REF_NONE, torch.device("cpu"))
    assert get_plan(a, "gather", "mean", 3, REF_NONE, torch.device("cpu")) is gather


def test_the_cache_keeps_the_most_recently_used_layouts_and_their_plans(monkeypatch):
    monkeypatch.setattr(cache, "_entries", type(cache._entries)())
    monkeypatch.setattr(cache, "_recent", (None, (None, {})))
    layouts = [ViewLayout(16 + 11 * k, 16, 5) for k in range(cache.MAX_LAYOUTS + 1)]  # all distinct
    first_plan = get_plan(layouts[0], "stitch", "mean", 1, REF_NONE, torch.device("cpu"))
    for layout in layouts[1:-1]:
        assert cache.intern_layout(layout) is layout
    assert cache.intern_layout(ViewLayout(16, 16, 5)) is layouts[0]  # used again: now the most recent
    assert cache.intern_layout(layouts[-1]) is layouts[-1]  # one too many: the least recent goes
    assert len(cache._entries) == cache.MAX_LAYOUTS
    assert layouts[1] not in cache._entries and layouts[0] in cache._entries
    assert get_plan(layouts[0], "stitch", "mean", 1, REF_NONE, torch.device("cpu")) is first_plan
    assert cache.intern_layout(ViewLayout(16 + 11, 16, 5)) is not layouts[1]  # evicted: a new entry


@pytest.mark.parametrize("layout", [ViewLayout(56, 16, 6), ViewLayout.spaced(100, 16, 9),
                                    ViewLayout.spaced(101, 16, 8, loop=True)], ids=["uniform", "spaced", "loop"])
def test_geometry_round_trips(layout):
    # What the functional ops pass as their `int[] layout`: a spaced layout keeps its starts.
    assert ViewLayout.from_geometry(list(layout.geometry)) == layout
    assert len(layout.geometry) == (4 if layout.uniform else 4 + layout.num_views)
