"""Geometry of overlapping views over a long axis (docs/kernels.md, section 1).

A :class:`ViewLayout` knows nothing of tensors: it is the integer geometry that the
reference implementation, the plan builder and the sampler all share.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple, Union

__all__ = ["ViewLayout", "GridLayout", "AnyLayout", "layout_from_geometry", "MAX_CELLS", "GRID_TAG"]

# The kernels address a view cell (view v, local column k) by its flat position v * window + k
# in an int32 plan table (plan.py), so no layout may have more than this many cells. Checked
# before the starts are built: a request for 10**12 columns is an error, not a tuple that grows
# until the process runs out of memory.
MAX_CELLS = 2**31 - 1


def _check_cells(name: str, num_views: int, window: int, bound: str = "") -> None:
    """Refuse a layout of more than :data:`MAX_CELLS` view cells, naming the parameter and the bound."""
    if num_views * window > MAX_CELLS:
        bound = bound or f"num_views must be <= {MAX_CELLS // window} for window {window}"
        raise ValueError(f"{name}: {num_views} views of window {window} are {num_views * window} view cells, more "
                         f"than the kernels address (2**31 - 1, int32 plan positions): {bound}")


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class ViewLayout:
    """``num_views`` windows of ``window`` columns over a long axis of ``length`` columns.

    Open layout (``loop=False``): view ``i`` covers columns ``[starts[i], starts[i] + window)``,
    from ``starts[0] = 0`` to ``starts[-1] = length - window``.

    Loop layout (``loop=True``, seamless loops and 360 degree panoramas): view ``i`` covers
    ``(starts[i] + k) % length`` for ``k in [0, window)``; the last view overlaps the first.

    ``ViewLayout(length, window, overlap, loop)`` is the *uniform* layout: one stride
    ``window - overlap`` throughout (``length = window + (n - 1) * stride`` open,
    ``n * stride`` loop). :meth:`spaced` spreads ``n`` views evenly over any length instead:
    ``starts[i] = floor(i * span / d)``, so neighbouring strides differ by at most one column
    and ``overlap`` is the largest overlap of two neighbours (a loop of any length can be
    seamless). The constructor validates; :meth:`covering` gives the smallest uniform layout
    whose length is at least a requested length.
    """

    length: int
    window: int
    overlap: int
    loop: bool = False
    # First column of every view; derived for a uniform layout, given for a spaced one.
    starts: Tuple[int, ...] = field(default=(), compare=True)
    # hash() of the fields, computed once: layouts key the plan cache (cache.py) on every
    # merge, and hashing a long starts tuple per call would cost more than the lookup.
    _hash: int = field(default=0, init=False, repr=False, compare=False)

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
        if self.starts:
            self._check_starts()
        else:
            object.__setattr__(self, "starts", self._uniform_starts())
        object.__setattr__(self, "_hash", hash((self.length, self.window, self.overlap, self.loop, self.starts)))

    def __hash__(self) -> int:
        return self._hash

    def _uniform_starts(self) -> Tuple[int, ...]:
        stride = self.window - self.overlap
        if self.loop:
            if self.length % stride:
                raise ValueError(
                    f"a loop layout needs length to be a multiple of stride = window - overlap = {stride}; "
                    f"got length {self.length} (use ViewLayout.covering or ViewLayout.spaced)")
            if self.length // stride < 2:
                raise ValueError(f"a loop layout needs at least 2 views; length {self.length} with "
                                 f"stride {stride} gives {self.length // stride}")
            n = self.length // stride
        else:
            if (self.length - self.window) % stride:
                raise ValueError(
                    f"views of window {self.window} at stride {stride} do not cover length {self.length} exactly: "
                    f"length must be window + k * stride (use ViewLayout.covering or ViewLayout.spaced)")
            n = (self.length - self.window) // stride + 1
        _check_cells("length", n, self.window, self._length_bound("length", self.window, self.overlap, self.loop))
        return tuple(i * stride for i in range(n))

    @staticmethod
    def _length_bound(name: str, window: int, overlap: int, loop: bool) -> str:
        """``name`` must be at most the length of the longest uniform layout within :data:`MAX_CELLS`."""
        views = MAX_CELLS // window
        longest = views * (window - overlap) if loop else window + (views - 1) * (window - overlap)
        return f"{name} must be <= {longest} for window {window}, overlap {overlap}{', loop' if loop else ''}"

    def _check_starts(self) -> None:
        starts, w, L = self.starts, self.window, self.length
        _check_cells("starts", len(starts), w, f"len(starts) must be <= {MAX_CELLS // w} for window {w}")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in starts):
            raise TypeError("starts must be ints")
        gaps = self._strides(starts, w, L, self.loop)
        if starts[0] != 0 or any(g < 1 for g in gaps):
            raise ValueError(f"starts must increase from 0, got {starts[:8]}...")
        if self.loop and len(starts) < 2:
            raise ValueError("a loop layout needs at least 2 views")
        if not self.loop and starts[-1] != L - w:
            raise ValueError(f"the last view of an open layout must end at length {L}: starts[-1] = {starts[-1]}, "
                             f"window {w}")
        if max(gaps, default=1) > w:
            raise ValueError(f"views of window {w} leave columns uncovered (a stride of {max(gaps)})")
        widest = w - min(gaps, default=w)
        if widest != self.overlap:
            raise ValueError(f"overlap must be the largest overlap of two neighbouring views ({widest}), "
                             f"got {self.overlap}")

    @staticmethod
    def _strides(starts: Tuple[int, ...], window: int, length: int, loop: bool) -> List[int]:
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        if loop:
            gaps.append(starts[0] + length - starts[-1])
        return gaps

    @classmethod
    def spaced(cls, length: int, window: int, num_views: int, loop: bool = False) -> "ViewLayout":
        """``num_views`` views of ``window`` spread evenly over exactly ``length`` columns.

        ``starts[i] = floor(i * length / num_views)`` for a loop, ``floor(i * (length - window) /
        (num_views - 1))`` open: the strides differ by at most one column, so the overlaps do too.
        Uniform when the division is exact (then equal to ``ViewLayout(length, window, overlap, loop)``).
        """
        _check_int("length", length, 1)
        _check_int("window", window, 1)
        _check_int("num_views", num_views, 2 if loop else 1)
        _check_cells("num_views", num_views, window)
        if not loop and num_views == 1:
            if length != window:
                raise ValueError(f"one view of window {window} cannot cover length {length} exactly")
            return cls(length, window, 0)
        span, parts = (length, num_views) if loop else (length - window, num_views - 1)
        if span < 0 or window > length:
            raise ValueError(f"window ({window}) must be <= length ({length})")
        starts = tuple((i * span) // parts for i in range(num_views))
        if span % parts == 0:
            return cls(length, window, window - span // parts, loop)
        widest = window - min(cls._strides(starts, window, length, loop))
        if widest < 0:
            raise ValueError(f"{num_views} views of window {window} leave columns of {length} uncovered")
        return cls(length, window, widest, loop, starts)

    def __repr__(self) -> str:
        if self.uniform:
            return f"ViewLayout(length={self.length}, window={self.window}, overlap={self.overlap}, loop={self.loop})"
        return (f"ViewLayout.spaced(length={self.length}, window={self.window}, num_views={self.num_views}, "
                f"loop={self.loop})")

    @classmethod
    def covering(cls, min_length: int, window: int, overlap: int, loop: bool = False) -> "ViewLayout":
        """The uniform layout with the fewest views whose length is ``>= min_length``.

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
            # window <= length must hold: with a large overlap two views may be too few.
            num_views = max(2, -(-min_length // stride), -(-window // stride))
        else:
            num_views = 1 + max(0, -(-(min_length - window) // stride))
        _check_cells("min_length", num_views, window, cls._length_bound("min_length", window, overlap, loop))
        length = num_views * stride if loop else window + (num_views - 1) * stride
        return cls(length, window, overlap, loop=loop)

    @property
    def geometry(self) -> Tuple[int, ...]:
        """The layout as ints, for a torch.library op's ``int[] layout`` argument:
        ``(length, window, overlap, loop)``, then the starts when the layout is not uniform."""
        head = (self.length, self.window, self.overlap, int(self.loop))
        return head if self.uniform else head + self.starts

    @classmethod
    def from_geometry(cls, geometry: Sequence[int]) -> "ViewLayout":
        """The layout whose :attr:`geometry` is ``geometry`` (validated as the constructor does)."""
        if len(geometry) < 4:
            raise ValueError(f"layout must be [length, window, overlap, loop, *starts], got {list(geometry)}")
        length, window, overlap, loop = geometry[:4]
        return cls(length, window, overlap, bool(loop), tuple(geometry[4:]))

    # -- derived geometry -------------------------------------------------------------
    @property
    def stride(self) -> int:
        """The stride of a uniform layout (``window - overlap``); a spaced layout's smallest one."""
        return self.window - self.overlap

    @property
    def min_overlap(self) -> int:
        """The narrowest overlap of two neighbouring views (``overlap`` for a uniform layout)."""
        strides = self._strides(self.starts, self.window, self.length, self.loop)
        return max(0, self.window - max(strides)) if strides else 0

    @property
    def uniform(self) -> bool:
        """Whether every neighbouring pair is one stride apart."""
        return len(set(self._strides(self.starts, self.window, self.length, self.loop))) <= 1

    @property
    def num_views(self) -> int:
        return len(self.starts)

    def view_stride(self, view: int) -> int:
        """Columns from ``view``'s start to the next view's (around the loop for the last view)."""
        n = self.num_views
        if view < n - 1:
            return self.starts[view + 1] - self.starts[view]
        return self.starts[0] + self.length - self.starts[view] if self.loop else self.window

    def pair_overlap(self, view: int) -> int:
        """Columns shared by ``view`` and the next view (its right part, the next one's left part)."""
        return max(0, self.window - self.view_stride(view))

    def columns(self, view: int) -> List[int]:
        """Columns of the long axis covered by ``view``, in the view's local order."""
        start = self.starts[view]
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
        lo = self.pair_overlap((view - 1) % n) if has_left else 0
        hi = self.view_stride(view) if has_right else self.window
        return lo, max(lo, hi)

    def coverage(self, column: int) -> List[Tuple[int, int]]:
        """Every ``(view, local column)`` that covers ``column``, in increasing view order."""
        w, L = self.window, self.length
        out = []
        # Views starting in (column - window, column], and (loop) the same a length later.
        for c in ((column, column + L) if self.loop else (column,)):
            first = bisect.bisect_right(self.starts, c - w)
            last = bisect.bisect_right(self.starts, c)
            out.extend((v, c - self.starts[v]) for v in range(first, last))
        return sorted(set(out))

    # -- the flat view the plans and kernels see (shared with GridLayout) -----------------
    @property
    def view_cells(self) -> int:
        """Cells of one view along the merged axis the kernels address: ``window``."""
        return self.window

    @property
    def canvas_cells(self) -> int:
        """Cells of the long latent along that axis: ``length``."""
        return self.length

    @property
    def swappable(self) -> bool:
        """Whether ``mode="swap"`` applies: no column covered by three views (``overlap <= window / 2``)."""
        return 2 * self.overlap <= self.window


# The first entry of a GridLayout's geometry: negative, so it is never a ViewLayout's length.
GRID_TAG = -2


def _axis_layout(name: str, value: object) -> ViewLayout:
    if not isinstance(value, ViewLayout):
        raise TypeError(f"{name} must be a ViewLayout, got {type(value).__name__}")
    return value


def _pair(name: str, value: object) -> Tuple[object, object]:
    """``value`` for both axes, or its two entries ``(rows, cols)``."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be one value or a pair (rows, cols), got {value!r}")
        return value[0], value[1]
    return value, value


@dataclass(frozen=True)
class GridLayout:
    """A grid of tiles over two long axes: ``rows`` along the first, ``cols`` along the second.

    Each axis is its own :class:`ViewLayout` (window, overlap, loop, uniform or spaced). Tile
    ``(a, b)`` covers rows ``rows.columns(a)`` x columns ``cols.columns(b)``; tiles are numbered
    row-major, ``view = a * cols.num_views + b``. The kernels see a grid as one merged axis of
    ``rows.length * cols.length`` cells, a tile as ``rows.window * cols.window`` of them, row-major
    (docs/kernels.md, section 8), so the same plan executors run strips and grids.
    """

    rows: ViewLayout
    cols: ViewLayout
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _axis_layout("rows", self.rows)
        _axis_layout("cols", self.cols)
        n, cells = self.num_views, self.rows.window * self.cols.window
        if n * cells > MAX_CELLS:
            raise ValueError(
                f"cols: {self.rows.num_views} x {self.cols.num_views} tiles of {self.rows.window} x "
                f"{self.cols.window} are {n * cells} view cells, more than the kernels address (2**31 - 1, int32 plan "
                f"positions): cols.num_views must be <= {MAX_CELLS // (cells * self.rows.num_views)} for these rows")
        object.__setattr__(self, "_hash", hash((GRID_TAG, self.rows, self.cols)))

    def __hash__(self) -> int:
        return self._hash

    @classmethod
    def covering(cls, min_height: int, min_width: int, window, overlap, loop=False) -> "GridLayout":
        """The uniform grid with the fewest tiles covering at least ``min_height`` x ``min_width``.

        ``window``, ``overlap`` and ``loop`` are one value for both axes or a pair ``(rows, cols)``;
        each axis is :meth:`ViewLayout.covering` (the caller generates that size and crops).
        """
        (wr, wc), (orr, oc), (lr, lc) = _pair("window", window), _pair("overlap", overlap), _pair("loop", loop)
        return cls(ViewLayout.covering(min_height, wr, orr, lr), ViewLayout.covering(min_width, wc, oc, lc))

    @classmethod
    def spaced(cls, height: int, width: int, window, num_views, loop=False) -> "GridLayout":
        """Tiles spread evenly over exactly ``height`` x ``width`` (:meth:`ViewLayout.spaced` per axis);
        ``window``, ``num_views`` and ``loop`` are one value or a pair ``(rows, cols)``."""
        (wr, wc), (nr, nc), (lr, lc) = _pair("window", window), _pair("num_views", num_views), _pair("loop", loop)
        return cls(ViewLayout.spaced(height, wr, nr, lr), ViewLayout.spaced(width, wc, nc, lc))

    def __repr__(self) -> str:
        return f"GridLayout(rows={self.rows!r}, cols={self.cols!r})"

    @property
    def geometry(self) -> Tuple[int, ...]:
        """The grid as ints for a torch.library op's ``int[] layout``:
        ``(GRID_TAG, len(rows.geometry), *rows.geometry, *cols.geometry)``."""
        return (GRID_TAG, len(self.rows.geometry)) + self.rows.geometry + self.cols.geometry

    @classmethod
    def from_geometry(cls, geometry: Sequence[int]) -> "GridLayout":
        """The grid whose :attr:`geometry` is ``geometry`` (validated as the constructor does)."""
        if len(geometry) < 10 or geometry[0] != GRID_TAG or not 4 <= geometry[1] <= len(geometry) - 6:
            raise ValueError(f"layout must be [{GRID_TAG}, len(rows), *rows, *cols], got {list(geometry)[:12]}")
        split = 2 + geometry[1]
        return cls(ViewLayout.from_geometry(geometry[2:split]), ViewLayout.from_geometry(geometry[split:]))

    @property
    def num_views(self) -> int:
        """Tiles in the grid: ``rows.num_views * cols.num_views``."""
        return self.rows.num_views * self.cols.num_views

    @property
    def view_cells(self) -> int:
        """Cells of one tile on the merged axis: ``rows.window * cols.window``."""
        return self.rows.window * self.cols.window

    @property
    def canvas_cells(self) -> int:
        """Cells of the canvas on the merged axis: ``rows.length * cols.length``."""
        return self.rows.length * self.cols.length

    @property
    def swappable(self) -> bool:
        """Whether ``mode="swap"`` applies: each axis has ``overlap <= window / 2``."""
        return self.rows.swappable and self.cols.swappable

    def tile(self, view: int) -> Tuple[int, int]:
        """``(a, b)``: the row and column of tile ``view`` (row-major)."""
        return divmod(view, self.cols.num_views)

    def middle(self, view: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        """Local ``([row_lo, row_hi), [col_lo, col_hi))`` of tile ``view`` that no other tile covers."""
        a, b = self.tile(view)
        return self.rows.middle(a), self.cols.middle(b)


AnyLayout = Union[ViewLayout, GridLayout]


def layout_from_geometry(geometry: Sequence[int]) -> AnyLayout:
    """The :class:`ViewLayout` or :class:`GridLayout` whose ``geometry`` is ``geometry``."""
    if len(geometry) and geometry[0] == GRID_TAG:
        return GridLayout.from_geometry(geometry)
    return ViewLayout.from_geometry(geometry)
