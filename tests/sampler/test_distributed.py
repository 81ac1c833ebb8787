"""One generation over several processes (torch.distributed, gloo on CPU) against one process.

The claim under test (docs/distributed.md): with ``view_batch_size=1`` the output of a
distributed call is bitwise the one-process output, for every method, open and loop layouts,
audio and image pipelines, deterministic and stochastic schedulers, any number of ranks up
to the number of views; failures stop every rank with a clear error and never hang.

The processes are spawned by :func:`safa.testing.distributed.run_processes` (file rendezvous,
one thread each); tiny windows and two steps keep each process's work to a few seconds.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch
from diffusers import DDPMScheduler, EulerAncestralDiscreteScheduler, PNDMScheduler

import safa.testing.pipelines as tp
from safa import METHODS, JointDiffusion
from safa.distributed import agree, cells_read, view_blocks
from safa.testing.distributed import RankError, run_processes
from safa_kernels import ViewLayout, sync_

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 2


# -- the cases: (pipeline, method, loop, options) ------------------------------------------
def _pipeline(kind: str):
    if kind == "texture":
        from safa.texture import make_texture_pipeline  # DPM-Solver++(2M): a multistep history
        pipe = make_texture_pipeline(window_frames=32)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return {"audioldm": tp.tiny_audioldm_pipeline, "sd": tp.tiny_sd_pipeline, "sd3": tp.tiny_sd3_pipeline,
            "stable_audio": tp.tiny_stable_audio_pipeline, "flux": tp.tiny_flux_pipeline,
            "stable_audio_3": tp.tiny_stable_audio_3_pipeline, "longcat": tp.tiny_longcat_audio_pipeline}[kind]()


SCHEDULERS = {"DDPM": DDPMScheduler, "EulerAncestral": EulerAncestralDiscreteScheduler, "PNDM": PNDMScheduler}


def _generate(jd: JointDiffusion, kind: str, method: str, loop: bool, options: dict):
    options = dict(options)
    decoded = options.pop("decoded", False)
    scheduler = options.pop("scheduler", None)
    default_scheduler = jd.pipe.scheduler
    if scheduler is not None:
        jd.pipe.scheduler = SCHEDULERS[scheduler].from_config(default_scheduler.config)
    kw = dict(method=method, loop=loop, overlap=0.25, num_inference_steps=STEPS, view_batch_size=1,
              generator=torch.Generator().manual_seed(7), output_type=None if decoded else "latent")
    kw.update(options)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notices of the tiny pipelines
            if kind in ("sd", "sd3", "flux"):  # windows of 16 latent columns (128 px), 128 px high: 7 views, 6 in a loop
                return jd("a lake", width=(72 if loop else 80) * 8, height=128, window=16, **kw)
            if kind in ("stable_audio", "longcat"):  # 2 s windows: 4 views
                return jd("rain", 6.0, window=2.0, **kw)
            if kind == "stable_audio_3":  # 1 s windows: 4 views
                return jd("rain", 3.0, window=1.0, **kw)
            window = 1.28 if kind == "audioldm" else None  # 32 latent frames (the texture model's own)
            return jd("rain", 2.88 if loop else 3.2, window=window, **kw)
    finally:
        jd.pipe.scheduler = default_scheduler


# The methods that run distributed: those without per-step hooks that see every view at once
# (MAD merges self-attention over the long latent; SyncDiffusion's gradient step reads all views).
DISTRIBUTED_METHODS = ("safa", "safa_selfloop", "multidiffusion", "multidiffusion_triangular")


def _cases():
    cases = [(kind, method, loop, {}) for kind in ("texture", "audioldm", "sd") for method in DISTRIBUTED_METHODS
             for loop in (False, True)]
    cases += [
        # decoded outputs, not only the latent: whole on rank 0, or tiled with the tiles shared
        ("texture", "safa", True, {"decoded": True, "decode": "full"}),
        ("audioldm", "safa", False, {"decoded": True, "decode": "full"}),
        ("sd", "safa", True, {"decoded": True, "decode": "full"}),
        ("audioldm", "multidiffusion", True, {"decoded": True, "decode": "tiled", "decode_tile": 16}),
        ("sd", "safa_selfloop", False, {"decoded": True, "decode": "tiled", "decode_tile": 16}),
        # stochastic schedulers: per-step noise drawn for the whole batch on every rank
        ("audioldm", "safa", False, {"scheduler": "DDPM"}),
        ("audioldm", "multidiffusion", True, {"scheduler": "EulerAncestral"}),
        ("audioldm", "safa_selfloop", True, {"scheduler": "PNDM", "num_inference_steps": 4}),  # PNDM: 4+ steps
        # overlap 0.75 of a 32-frame window: stride 8, four views over every column, so a rank
        # reads cells of ranks two away; summation order of the 4-view means across the seam
        ("texture", "multidiffusion", True, {"overlap": 0.75}),
        ("texture", "multidiffusion_triangular", False, {"overlap": 0.75}),
        # two outputs per prompt: two scheduler rows per view
        ("audioldm", "safa", True, {"num_waveforms_per_prompt": 2}),
        # flow matching (SD3), and Stable Audio's SDE solver (Brownian-tree noise from the generator)
        ("sd3", "safa", False, {}),
        ("stable_audio", "safa_selfloop", False, {}),
        # the newer families: FLUX.1 (views packed with their own ids), Stable Audio 3 (its
        # ping-pong sampler re-noises from the generator), LongCat-AudioDiT (time on dim -2)
        ("flux", "safa", False, {}),
        ("stable_audio_3", "multidiffusion", False, {}),
        ("longcat", "safa", True, {}),
        # Mixture of Diffusers' Gaussian weights on a strip (on grids: test_distributed_grid.py)
        ("sd", "multidiffusion_gaussian", True, {}),
    ]
    return cases


def _summary(out) -> dict:
    images = None if out.images is None else np.stack([np.asarray(im) for im in out.images])
    return {"latent": out.latent, "audio": out.audio, "images": images, "views": out.layout.num_views,
            "length": out.layout.length}


def _counting(kind: str, group) -> JointDiffusion:
    """A JointDiffusion whose ``decoder_calls`` counts this process's decoder calls."""
    jd = JointDiffusion(_pipeline(kind), process_group=group)
    decode_latents = jd.adapter.decode_latents

    def counted(z):
        jd.decoder_calls += 1
        return decode_latents(z)
    jd.adapter.decode_latents = counted  # an instance attribute
    return jd


def _generate_all(group, cases):
    pipes = {}
    results = []
    for kind, method, loop, options in cases:
        if kind not in pipes:
            pipes[kind] = _counting(kind, group)
        pipes[kind].decoder_calls = 0
        results.append(_summary(_generate(pipes[kind], kind, method, loop, options)))
        results[-1]["decoder_calls"] = pipes[kind].decoder_calls
    return results


# -- 2-D grids of tiles (docs/distributed.md, "Grids"; the exchange alone: test_distributed_grid.py)
# (method, call options) on the tiny SD pipeline with 16 x 16 latent tiles: 3 x 3 tiles (232 x
# 232 px: 29 x 29 latent cells) on 2 ranks is an uneven split inside a tile row (5 + 4), on 3
# ranks whole rows (3 + 3 + 3); 2 x 3 tiles (200 px high) on 2 ranks whole rows, on 3 ranks
# every block inside a tile row (2 + 2 + 2).
GRID_WINDOW = 16
SQUARE, WIDE = dict(width=232, height=232), dict(width=232, height=200)
# Every method appears (the swap, the swap without a reference, mean, triangular and Gaussian
# weights), each on an awkward case of its own.
GRID_CASES = [
    ("safa", dict(WIDE, loop="both", width=272)),                    # a torus: 25 x 34 cells, 2 x 3 tiles
    ("multidiffusion", dict(WIDE, loop=(True, False))),              # the rows loop
    ("multidiffusion_gaussian", dict(SQUARE, loop=(False, True), width=272)),  # the cols loop
    ("safa_selfloop", dict(WIDE, loop="both", width=272, overlap=0.5)),  # the swap's largest overlap
    ("multidiffusion_triangular", dict(SQUARE, overlap=0.75)),       # ranks two tile rows away
    ("safa", dict(WIDE, scheduler="DDPM")),                          # stochastic: noise over the whole batch
    ("safa", dict(WIDE, num_images_per_prompt=2)),                   # two scheduler rows per tile
    ("safa", dict(SQUARE, output_type="np")),                        # decoded (on rank 0)
]


def _generate_grid(jd: JointDiffusion, method: str, options: dict) -> dict:
    options = dict(options)
    scheduler = options.pop("scheduler", None)
    default_scheduler = jd.pipe.scheduler
    if scheduler is not None:
        jd.pipe.scheduler = SCHEDULERS[scheduler].from_config(default_scheduler.config)
    kw = dict(method=method, overlap=0.25, num_inference_steps=STEPS, view_batch_size=1, output_type="latent",
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


def _generate_grids(group) -> list:
    jd = JointDiffusion(tp.tiny_sd_pipeline(seed=0, sample_size=GRID_WINDOW), process_group=group)
    decode_latents = jd.adapter.decode_latents
    calls = []
    jd.adapter.decode_latents = lambda z: (calls.append(1), decode_latents(z))[1]
    results = []
    for method, options in GRID_CASES:
        calls.clear()
        results.append(dict(_generate_grid(jd, method, options), decoder_calls=len(calls)))
    return results


def _rank_generates(group, cases):
    """This rank's strip cases on the 3 ranks, then the grid cases on 3 ranks and on 2 (a
    subgroup: every rank takes part in creating it, ranks 0 and 1 run it)."""
    import torch.distributed as dist
    pair = dist.new_group([0, 1])
    results = {"strips": _generate_all(group, cases), "grids": {3: _generate_grids(group)}}
    if group.rank() < 2:
        results["grids"][2] = _generate_grids(pair)
    return results


@pytest.fixture(scope="module")
def one_process():
    return _generate_all(None, _cases())


def _check_ranks(results):
    for rank, res in enumerate(results):
        assert not isinstance(res, RankError), f"rank {rank}: {res.traceback}"


@pytest.fixture(scope="module")
def three_ranks():
    """Every case of _cases and GRID_CASES over 3 processes (and the grids over 2 of them):
    one spawn for both tests (starting the processes is a large part of their time)."""
    results = run_processes(_rank_generates, 3, _cases(), timeout_s=480)
    _check_ranks(results)
    return results


# Three ranks: a first, a middle and a last rank, each exchanging with its neighbours (two ranks
# are covered by test_torchrun_writes_the_one_process_file, the Wan test and the grids).
def test_bitwise_equal_to_one_process(one_process, three_ranks):
    cases, world_size = _cases(), 3
    results = [res["strips"] for res in three_ranks]
    for case, single, distributed in zip(cases, one_process, results[0]):
        assert single["views"] >= world_size
        for key in ("latent", "audio", "images"):
            if single[key] is None:
                assert distributed[key] is None, (case, key)
                continue
            expected = single[key].numpy() if isinstance(single[key], torch.Tensor) else single[key]
            assert np.array_equal(distributed[key], expected), \
                (case, key, float(np.abs(distributed[key].astype(np.float64) - expected).max()))
    for rank in range(1, world_size):  # the result is on rank 0 only
        for res in results[rank]:
            assert res["latent"] is None and res["audio"] is None and res["images"] is None
    for i, (kind, method, loop, options) in enumerate(cases):  # who ran the decoder
        calls = [results[rank][i]["decoder_calls"] for rank in range(world_size)]
        if options.get("decode") == "tiled" and kind != "sd":  # the one process's tiles, split between the ranks
            assert sum(calls) == one_process[i]["decoder_calls"] and min(calls) >= 1, (cases[i], calls)
        elif options.get("decoded"):  # rank 0 (an image's exact tiled decode too: its tiles share GroupNorm statistics)
            assert calls[0] >= 1 and sum(calls[1:]) == 0, (cases[i], calls)


def test_a_grid_over_2_and_3_ranks_is_bitwise_one_process(three_ranks):
    # SaFa, SaFa*, MD, MD*, Gaussian MD; loops on the rows, the cols, both; blocks that are whole
    # tile rows and blocks that cut one; the decode on rank 0 alone.
    jd = JointDiffusion(tp.tiny_sd_pipeline(seed=0, sample_size=GRID_WINDOW))
    one_process = [_generate_grid(jd, method, options) for method, options in GRID_CASES]
    for world_size in (2, 3):
        ranks = [res["grids"][world_size] for res in three_ranks[:world_size]]
        for case, single, distributed in zip(GRID_CASES, one_process, ranks[0]):
            assert single["tiles"] >= 6 and single["latent"] is not None
            for key in ("latent", "images"):
                if single[key] is None:
                    assert distributed[key] is None, (world_size, case, key)
                    continue
                expected = single[key].numpy() if isinstance(single[key], torch.Tensor) else single[key]
                assert np.array_equal(distributed[key], expected), \
                    (world_size, case, key, float(np.abs(distributed[key].astype(np.float64) - expected).max()))
        for rank in range(1, world_size):  # the result, and the decode, are rank 0's alone
            for res in ranks[rank]:
                assert res["latent"] is None and res["images"] is None and res["decoder_calls"] == 0
        decoded = [res["decoder_calls"] for res in ranks[0]]
        assert decoded[-1] >= 1 and sum(decoded[:-1]) == 0


# -- the exchange set, in one process: a rank's merge reads only its cells and those it receives
@pytest.mark.parametrize("loop", [False, True])
@pytest.mark.parametrize("mode,overlap", [("swap", 5), ("swap", 8), ("mean", 5), ("mean", 12), ("triangular", 13),
                                          ("gaussian", 10)])
@pytest.mark.parametrize("world_size", [2, 3, 6])
def test_a_rank_merge_needs_only_the_exchanged_cells(mode, overlap, loop, world_size):
    # Every cell a rank neither owns nor receives is poisoned with NaN (what the merge of
    # other ranks' stale rows may hold): the rank's own cells must still come out bitwise
    # equal to the merge of the true views, in every mode, for every rank.
    layout = ViewLayout(6 * (16 - overlap), 16, overlap, loop=True) if loop else \
        ViewLayout(16 + 5 * (16 - overlap), 16, overlap)
    views = torch.randn(layout.num_views, 2, 3, layout.window, 4)
    expected = sync_(views.clone(), layout, -2, mode, 2)
    w = layout.window
    for rank, block in enumerate(view_blocks(layout.num_views, world_size)):
        local = torch.full_like(views, float("nan"))
        local[block.start:block.stop] = views[block.start:block.stop]
        received = cells_read(layout, mode, 2, block)
        assert not any(block.start <= c // w < block.stop for c in received.tolist())
        for cell in received.tolist():
            local[cell // w, :, :, cell % w] = views[cell // w, :, :, cell % w]
        sync_(local, layout, -2, mode, 2)
        assert torch.equal(local[block.start:block.stop], expected[block.start:block.stop]), (rank, block)


def test_exchange_is_what_the_merge_reads():
    # Independent of the plan: swap reads the winning half of each overlap only; averaging
    # reads every covering cell, ranks two away included when the overlap exceeds the stride.
    layout = ViewLayout(6 * 12, 16, 4, loop=True)  # 6 views, stride 12, overlap 4
    (r0,) = [view_blocks(6, 3)[0]]  # views 0, 1
    swap = cells_read(layout, "swap", 1, r0)
    # overlap offsets q = 0..3 of pairs (1, 2) and (5, 0); parity 1 (q odd) takes the right view
    expected_swap = [2 * 16 + 1, 2 * 16 + 3] + [5 * 16 + 12 + 0, 5 * 16 + 12 + 2]
    assert sorted(swap.tolist()) == sorted(expected_swap)
    mean = cells_read(layout, "mean", 1, r0)
    assert sorted(mean.tolist()) == sorted([2 * 16 + q for q in range(4)] + [5 * 16 + 12 + q for q in range(4)])
    deep = ViewLayout(6 * 4, 16, 12, loop=True)  # stride 4: each column under four views
    cells = cells_read(deep, "mean", 1, range(0, 1))
    assert sorted({c // 16 for c in cells.tolist()}) == [1, 2, 3, 4, 5]


def test_every_other_method_is_one_that_couples_the_views():
    # MAD and SyncDiffusion read every view inside a step; SaFaStats averages its corrections
    # over the overlaps inside a step (a second exchange the distributed step does not make).
    # (multidiffusion_gaussian does not couple them: it runs distributed in one case of _cases
    # and in the grid tests, test_distributed_grid.py.)
    assert set(METHODS) - set(DISTRIBUTED_METHODS) == {"mad", "syncdiffusion", "safa_stats", "multidiffusion_gaussian"}


def test_view_blocks():
    assert view_blocks(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert view_blocks(4, 4) == [range(i, i + 1) for i in range(4)]
    with pytest.raises(ValueError, match="at least one view per process: 3 processes for a layout of 2"):
        view_blocks(2, 3)


def test_process_group_must_be_a_group():
    with pytest.raises(ValueError, match="process_group must be None or a torch.distributed.ProcessGroup"):
        JointDiffusion(tp.tiny_audioldm_pipeline(), process_group="gloo")


# -- failures ----------------------------------------------------------------------------------
def _rank_failure_scenarios(group):
    jd = JointDiffusion(_pipeline("texture"), process_group=group)
    rank = group.rank()
    kw = dict(num_inference_steps=3, view_batch_size=1, output_type="latent")
    outcomes = {}

    def attempt(name, fn):
        started = time.monotonic()
        try:
            fn()
            outcomes[name] = ("ok", "", time.monotonic() - started)
        except Exception as exc:  # noqa: BLE001  (what each rank raised is the result)
            outcomes[name] = (type(exc).__name__, str(exc), time.monotonic() - started)

    # different arguments on different ranks
    attempt("arguments", lambda: jd("rain", 3.2 if rank == 0 else 3.3, generator=torch.Generator().manual_seed(0),
                                    **kw))
    # a different seed is a different argument too
    attempt("seed", lambda: jd("rain", 3.2, generator=torch.Generator().manual_seed(rank), **kw))
    # more ranks than views: 1.2 s is one 32-frame view
    attempt("too_many_ranks", lambda: jd("rain", 1.2, generator=torch.Generator().manual_seed(0), **kw))
    # a method whose hooks see every view at once
    attempt("syncdiffusion", lambda: jd("rain", 3.2, method="syncdiffusion", generator=torch.Generator().manual_seed(0),
                                        **kw))

    # rank 1 raises in its callback at step 2: every rank stops at its next exchange
    def fail_on_rank_1(jd_, step, t, state):
        if rank == 1 and step == 1:
            raise RuntimeError("boom on rank 1")

    attempt("rank_fails", lambda: jd("rain", 3.2, generator=torch.Generator().manual_seed(0),
                                     callback_on_step_end=fail_on_rank_1, **kw))
    # outside a call (the CLI's checks before it): rank 1 cannot start
    attempt("agree", lambda: agree(group, ValueError("model directory /x does not exist") if rank == 1 else None))
    # the group is still usable afterwards
    attempt("after", lambda: jd("rain", 3.2, generator=torch.Generator().manual_seed(0), **kw))
    return outcomes


def test_failures_stop_every_rank_with_a_clear_error():
    results = run_processes(_rank_failure_scenarios, 2, timeout_s=240)
    _check_ranks(results)
    for rank, outcomes in enumerate(results):
        kind, msg, _ = outcomes["arguments"]
        assert kind == "ValueError" and "must make the same call: seconds differs between rank 0 and rank 1" in msg
        kind, msg, _ = outcomes["seed"]
        assert kind == "ValueError" and "generator differs" in msg
        kind, msg, _ = outcomes["too_many_ranks"]
        assert kind == "ValueError" and "2 processes for a layout of 1 view" in msg
        kind, msg, _ = outcomes["syncdiffusion"]
        assert kind == "ValueError" and "method 'syncdiffusion' couples the views" in msg
        kind, msg, elapsed = outcomes["rank_fails"]
        if rank == 1:
            assert (kind, msg) == ("RuntimeError", "boom on rank 1")
        else:
            assert kind == "PeerFailure" and "rank 1 failed (at step 3 of 3): RuntimeError: boom on rank 1" in msg
        assert elapsed < 30
        kind, msg, _ = outcomes["agree"]
        if rank == 1:
            assert (kind, msg) == ("ValueError", "model directory /x does not exist")
        else:
            assert kind == "PeerFailure" and msg == ("rank 1 failed (while preparing): ValueError: model directory /x "
                                                     "does not exist")
        assert outcomes["after"][0] == "ok"


def _rank_dies(group):
    jd = JointDiffusion(_pipeline("texture"), process_group=group)

    def die(jd_, step, t, state):
        if group.rank() == 1 and step == 1:
            os._exit(3)  # no exception, no goodbye: the process is gone

    started = time.monotonic()
    try:
        jd("rain", 3.2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="latent",
           callback_on_step_end=die)
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__, str(exc), time.monotonic() - started
    return "ok", "", time.monotonic() - started


def test_a_rank_that_dies_stops_the_others_within_the_timeout():
    results = run_processes(_rank_dies, 2, timeout_s=120, group_timeout_s=30)
    assert isinstance(results[1], RankError) and "exited with code 3" in results[1].message
    kind, msg, elapsed = results[0]
    assert kind == "CommunicationError", msg
    assert elapsed < 35  # gloo notices the closed connection; at worst the 30 s group timeout


# -- the command line under torchrun ---------------------------------------------------------
def _torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), "-m", "safa", *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


def _rank_streams(group, path):
    jd = _counting("audioldm", group)
    jd.decoder_calls = 0
    out = _generate(jd, "audioldm", "safa", False, {"decoded": True, "decode": "tiled", "decode_tile": 16,
                                                    "output_path": path})
    return {"calls": jd.decoder_calls, "paths": out.output_paths, "audio": out.audio}


@pytest.mark.parametrize("world_size", [3])
def test_streamed_output_shares_the_decode_and_equals_one_process(tmp_path, world_size):
    # output_path with a tiled decode: the ranks decode the tiles round-robin, rank 0 writes
    # them in order; the file is the one-process output sample for sample.
    path = str(tmp_path / "rain.wav")
    results = run_processes(_rank_streams, world_size, path)
    _check_ranks(results)
    single = _counting("audioldm", None)
    single.decoder_calls = 0
    expected = _generate(single, "audioldm", "safa", False,
                         {"decoded": True, "decode": "tiled", "decode_tile": 16}).audio[0]
    written, _ = sf.read(path, dtype="float32")
    assert np.array_equal(written, expected)
    assert results[0]["paths"] == [path] and results[0]["audio"] is None
    assert all(r["paths"] is None for r in results[1:])
    calls = [r["calls"] for r in results]
    assert sum(calls) == single.decoder_calls and min(calls) >= 1, calls
    assert os.listdir(tmp_path) == ["rain.wav"]  # no temporary file left behind


def test_torchrun_writes_the_one_process_file(tmp_path):
    from safa.cli import main
    model = tmp_path / "model"
    tp.tiny_audioldm_pipeline().save_pretrained(str(model))
    flags = ["generate", "--model", str(model), "--prompt", "rain", "--window", "1.28", "--overlap", "0.25",
             "--steps", "2", "--view-batch-size", "1", "--no-spectrogram", "--quiet"]
    proc = _torchrun(*flags, "--seconds", "3.2", "--out", str(tmp_path / "two.wav"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("wrote ") == 1 and "3 views" in proc.stdout  # rank 0 only
    # one process, one thread (conftest; torchrun gives each rank one)
    assert main([*flags, "--seconds", "3.2", "--out", str(tmp_path / "one.wav")]) == 0
    two, sr2 = sf.read(str(tmp_path / "two.wav"), dtype="float32")
    one, sr1 = sf.read(str(tmp_path / "one.wav"), dtype="float32")
    assert sr1 == sr2 and np.array_equal(one, two)  # (the files' PEAK chunks hold a timestamp)
    # 1 s is one view for two processes: one line from rank 0, exit 2, no file
    bad = _torchrun(*flags, "--seconds", "1.0", "--out", str(tmp_path / "bad.wav"))
    assert bad.returncode != 0
    ours = [ln for ln in bad.stderr.splitlines() if ln.startswith("safa generate:")]
    assert len(ours) == 1 and "at least one view per process: 2 processes" in ours[0], bad.stderr
    assert not (tmp_path / "bad.wav").exists()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more CUDA devices (NCCL)")
def test_nccl_two_gpus_equal_one_gpu(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    flags = ["-m", "safa", "generate", "--seconds", "25", "--steps", "3", "--view-batch-size", "1",
             "--no-spectrogram", "--quiet"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *flags, "--device", "cuda", "--out", str(tmp_path / "two.wav")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert two.returncode == 0, two.stderr
    one = subprocess.run([sys.executable, *flags, "--device", "cuda", "--out", str(tmp_path / "one.wav")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert one.returncode == 0, one.stderr
    a, _ = sf.read(str(tmp_path / "one.wav"), dtype="float32")
    b, _ = sf.read(str(tmp_path / "two.wav"), dtype="float32")
    assert np.array_equal(a, b)
