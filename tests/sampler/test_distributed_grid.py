"""2-D grids of tiles over several processes (torch.distributed, gloo on CPU) against one process.

A grid's tiles are sharded like a strip's views: contiguous blocks in row-major order
(``view_blocks``), so a block is whole rows of tiles plus, where the ranks do not divide the
rows, a run of the next row's tiles. The exchange is read off the grid's ``sync_`` plan (its
runs expanded), exactly as for strips. The claim (docs/distributed.md, "Grids"): bitwise the
one-process output, for SaFa, SaFa*, MD, MD*, Gaussian-weighted MD, loops on either or both
axes, 2 and 3 ranks, even and uneven blocks.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

import safa.testing.pipelines as tp
from safa import JointDiffusion
from safa.distributed import cells_read, exchange_cells, view_blocks, view_cells
from safa.testing.distributed import RankError, run_processes
from safa_kernels import GridLayout, ViewLayout, sync_

WINDOW = 16  # latent cells per tile side of the tiny SD pipeline (128 px)
GRID_METHODS = ("safa", "safa_selfloop", "multidiffusion", "multidiffusion_triangular", "multidiffusion_gaussian")


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


# -- the sampler over 2 and 3 processes --------------------------------------------------------
# (method, call options): 3 x 3 tiles (232 x 232 px: 29 x 29 latent cells) on 2 ranks is an
# uneven split inside a tile row (5 + 4), on 3 ranks whole rows (3 + 3 + 3); 2 x 3 tiles
# (200 px high) on 2 ranks whole rows, on 3 ranks every block inside a tile row (2 + 2 + 2).
SQUARE, WIDE = dict(width=232, height=232), dict(width=232, height=200)
CASES = [(method, SQUARE) for method in GRID_METHODS] + [
    ("safa", dict(WIDE, loop="both", width=272)),                    # a torus: 25 x 34 cells, 2 x 3 tiles
    ("multidiffusion", dict(WIDE, loop=(True, False))),              # the rows loop
    ("multidiffusion_gaussian", dict(SQUARE, loop=(False, True), width=272)),  # the cols loop
    ("safa_selfloop", dict(WIDE, loop="both", width=272, overlap=0.5)),  # the swap's largest overlap
    ("multidiffusion_triangular", dict(SQUARE, overlap=0.75)),       # ranks two tile rows away
    ("safa", dict(WIDE, scheduler="DDPM")),                          # stochastic: noise over the whole batch
    ("safa", dict(WIDE, num_images_per_prompt=2)),                   # two scheduler rows per tile
    ("safa", dict(SQUARE, output_type="np")),                        # decoded (on rank 0)
]


def _generate(jd: JointDiffusion, method: str, options: dict):
    options = dict(options)
    scheduler = options.pop("scheduler", None)
    default_scheduler = jd.pipe.scheduler
    if scheduler == "DDPM":
        jd.pipe.scheduler = DDPMScheduler.from_config(default_scheduler.config)
    kw = dict(method=method, overlap=0.25, num_inference_steps=3, view_batch_size=1, output_type="latent",
              generator=torch.Generator().manual_seed(7))
    kw.update(options)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notices of the tiny pipeline
            out = jd("a stone wall", **kw)
    finally:
        jd.pipe.scheduler = default_scheduler
    images = None if out.images is None else np.stack([np.asarray(im) for im in out.images])
    return {"latent": out.latent, "images": images, "tiles": out.layout.num_views}


def _pipeline():
    return tp.tiny_sd_pipeline(seed=0, sample_size=WINDOW)


def _ranks_generate(group):
    import torch.distributed as dist
    pair = dist.new_group([0, 1])  # every rank of the world takes part in creating it
    results = {}
    for world_size, sub in ((3, group), (2, pair)):
        if dist.get_rank() >= world_size:
            continue
        jd = JointDiffusion(_pipeline(), process_group=sub)
        decode_latents = jd.adapter.decode_latents
        calls = []
        jd.adapter.decode_latents = lambda z: (calls.append(1), decode_latents(z))[1]
        results[world_size] = []
        for method, options in CASES:
            calls.clear()
            results[world_size].append(dict(_generate(jd, method, options), decoder_calls=len(calls)))
    return results


@pytest.fixture(scope="module")
def one_process():
    jd = JointDiffusion(_pipeline())
    return [_generate(jd, method, options) for method, options in CASES]


def test_a_grid_over_2_and_3_ranks_is_bitwise_one_process(one_process):
    results = run_processes(_ranks_generate, 3, timeout_s=240)
    for rank, res in enumerate(results):
        assert not isinstance(res, RankError), f"rank {rank}: {res.traceback}"
    for world_size in (2, 3):
        for case, single, distributed in zip(CASES, one_process, results[0][world_size]):
            assert single["tiles"] >= 6 and isinstance(single["latent"], torch.Tensor)
            for key in ("latent", "images"):
                if single[key] is None:
                    assert distributed[key] is None, (world_size, case, key)
                    continue
                expected = single[key].numpy() if isinstance(single[key], torch.Tensor) else single[key]
                assert np.array_equal(distributed[key], expected), \
                    (world_size, case, key, float(np.abs(distributed[key].astype(np.float64) - expected).max()))
        for rank in range(1, world_size):  # the result, and the decode, are rank 0's alone
            for (method, options), res in zip(CASES, results[rank][world_size]):
                assert res["latent"] is None and res["images"] is None and res["decoder_calls"] == 0
        decoded = [res["decoder_calls"] for res in results[0][world_size]]
        assert decoded[-1] >= 1 and sum(decoded[:-1]) == 0
