"""The exchange of a 2-D grid of tiles over several processes, in one process.

A grid's tiles are sharded like a strip's views: contiguous blocks in row-major order
(``view_blocks``), so a block is whole rows of tiles plus, where the ranks do not divide the
rows, a run of the next row's tiles. The exchange is read off the grid's ``sync_`` plan (its
runs expanded), exactly as for strips (docs/distributed.md, "Grids"). The generations over 2
and 3 gloo processes, bitwise against one process, are in test_distributed.py (they share its
processes: spawning them is most of the cost).
"""
from __future__ import annotations

import pytest
import torch

from safa.distributed import cells_read, exchange_cells, view_blocks, view_cells
from safa_kernels import GridLayout, ViewLayout, sync_


# -- the exchange set, in one process ----------------------------------------------------------
def _grid(loop_rows: bool, loop_cols: bool, overlap_rows: int = 3, overlap_cols: int = 2) -> GridLayout:
    rows = ViewLayout(4 * (8 - overlap_rows), 8, overlap_rows, loop=True) if loop_rows else \
        ViewLayout(8 + 2 * (8 - overlap_rows), 8, overlap_rows)
    cols = ViewLayout(4 * (6 - overlap_cols), 6, overlap_cols, loop=True) if loop_cols else \
        ViewLayout(6 + 3 * (6 - overlap_cols), 6, overlap_cols)
    return GridLayout(rows, cols)


@pytest.mark.parametrize("loop", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["open", "rows", "cols", "torus"])
@pytest.mark.parametrize("mode,overlaps", [("swap", (3, 2)), ("swap", (4, 3)), ("mean", (3, 2)), ("mean", (6, 4)),
                                           ("triangular", (3, 2)), ("gaussian", (5, 4))])
@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_a_rank_merge_of_a_grid_needs_only_the_exchanged_cells(loop, mode, overlaps, world_size):
    # Every cell a rank neither owns nor receives is NaN: the rank's own tiles must still come
    # out bitwise equal to the merge of the true tiles (the reference swap of the middles too).
    layout = _grid(*loop, *overlaps)
    views = torch.randn(layout.num_views, 2, 3, layout.rows.window, layout.cols.window)
    reference = torch.randn(2, 3, layout.rows.window, layout.cols.window) if mode == "swap" else None
    expected = sync_(views.clone(), layout, (-2, -1), mode, 1, reference)
    w, cols = view_cells(layout), layout.cols.window
    for rank, block in enumerate(view_blocks(layout.num_views, world_size)):
        local = torch.full_like(views, float("nan"))
        local[block.start:block.stop] = views[block.start:block.stop]
        for cell in cells_read(layout, mode, 1, block).tolist():
            v, k = divmod(cell, w)
            assert not block.start <= v < block.stop
            local[v, ..., k // cols, k % cols] = views[v, ..., k // cols, k % cols]
        sync_(local, layout, (-2, -1), mode, 1, reference)
        assert torch.equal(local[block.start:block.stop], expected[block.start:block.stop]), (rank, block)


def test_a_grid_exchange_is_what_the_2d_swap_reads():
    # Independent of the plan: 2 x 2 tiles of 8 x 6 overlapping by 4 rows and 2 columns, one
    # tile per rank. The swap's owner of an overlap cell is (row owner, column owner), each the
    # 1-D swap on its axis (odd offset: the later tile). Tile (0, 0) reads from tile (0, 1) the
    # column overlap's odd columns where tile row 0 owns the row (row offsets 0, 2 of the row
    # overlap, and every row above it), from (1, 0) the row overlap's odd rows where tile
    # column 0 owns the column (its columns 0-4), and from (1, 1) the corner's odd rows x odd columns.
    layout = GridLayout(ViewLayout(12, 8, 4), ViewLayout(10, 6, 2))
    blocks = view_blocks(4, 4)
    w, cols = view_cells(layout), layout.cols.window

    def cell(view: int, r: int, c: int) -> int:
        return view * w + r * cols + c
    right = [cell(1, r, 1) for r in (0, 1, 2, 3, 4, 6)]      # tile (0, 1): local column 1 = offset 1
    below = [cell(2, r, c) for r in (1, 3) for c in range(5)]  # tile (1, 0): local rows 1, 3 (column 4: q = 0)
    corner = [cell(3, r, 1) for r in (1, 3)]                  # tile (1, 1): odd row and odd column offsets
    assert sorted(cells_read(layout, "swap", 1, blocks[0]).tolist()) == sorted(right + below + corner)
    # Averaging reads every covering cell of the other tiles over tile (0, 0).
    mean = cells_read(layout, "mean", 1, blocks[0]).tolist()
    assert len(mean) == 8 * 2 + 4 * 6 + 4 * 2  # (0, 1): 8 x 2, (1, 0): 4 x 6, (1, 1): 4 x 2
    # Both sides of every transfer agree on it.
    for rank in range(4):
        sends, receives = exchange_cells(layout, "swap", 1, blocks, rank)
        for peer, cells in receives.items():
            assert torch.equal(cells, exchange_cells(layout, "swap", 1, blocks, peer)[0][rank])
