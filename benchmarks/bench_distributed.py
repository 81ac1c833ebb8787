"""Distributed generation: 2 CPU processes against 1, and a modelled scaling table for GPUs.

    python benchmarks/bench_distributed.py [--mode smoke|quick|full] [--seconds S] [--steps N] [--rounds N]
    python benchmarks/run.py --only distributed          # the same, as a part of make bench

The mode sets the measured run (smoke: 25 s, 3 steps, 1 round, numbers that mean nothing;
quick: 60 s, 20 steps, 3 rounds, the run docs/distributed.md records, about 40 s on the
2-core development VM; full: the same with 5 rounds); each option overrides one. The
results go to the ``distributed`` section of benchmarks/results/<machine>.json
(harness.record); benchmarks/report.py renders them (printed at the end, and in
benchmarks/README.md). What it measures, every number labelled measured / counted / modelled:

1. **Measured, this machine.** Two spawned processes (gloo, one thread each) on the tiny
   AudioLDM (``safa.testing.tiny_audioldm_pipeline``, native 10.24 s window, DDIM, CFG 2.5,
   ``view_batch_size=1``, SaFa). The rounds are interleaved in the same two processes:
   rank 0 alone makes the one-process call (rank 1 waits in a barrier), then both make the
   distributed call. **s / step** = (last step's callback - first step's) / (steps - 1) on
   rank 0, i.e. the loop's mean step time with guided and unguided steps in their proportion.
   The machine is shared (other jobs, one scheduling group per login session), so the
   parallelism it gave is measured alongside (a fixed matmul load alone and on both ranks at
   once), and so is the CPU critical path: per step the busier rank's CPU time, which is
   the step time when each process has a core of its own.
   Then, in the same processes: the one-process parts of a step (model time per window, the
   whole-batch scheduler step, the merge) and the exchange of one step on its own
   (:class:`safa.distributed.ViewShard`, ``bytes_sent`` on the wire), from which a
   prediction of the 2-process step time is checked against the measured one.
2. **Counted.** Bytes each rank sends per step for the GPU workloads, from the same
   exchange sets the shard sends (:func:`safa.distributed.exchange_cells`).
3. **FLOPs, counted.** ``torch.utils.flop_counter`` over full-size random-weight
   architectures built on the meta device: an AudioLDM-S-sized UNet, the SD 1.x UNet and the
   two VAE decoders plus AudioLDM's HiFi-GAN.
4. **Modelled.** Speed-up on 2 / 4 / 8 GPUs for 10 min and 1 h of AudioLDM audio and a
   512 x 16384 SD panorama: per step, the slowest rank's windows x the per-window model time,
   plus the replicated scheduler and merge, plus communication; ``ASSUMED`` below holds the
   hardware figures, which are not measured here (this task had no GPU).
5. **Counted, grids.** For SD 1.x at 2048 x 2048 px and SDXL at 4096 x 4096 px (5 x 5
   tiles each), the bytes a rank receives per step and its largest block, under the split
   the shard uses (row-major tile blocks) and two others it does not (whole tile rows per
   rank, a 2-D block split): docs/distributed.md, "Grids".

The step timing is the one function ``_step_times`` (a callback's wall and CPU timestamps of
every step, both needed: the wall time is the speed-up, the CPU time the critical path);
harness.py sets the mode and records the results.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

import harness
import report

# The measured run per mode: seconds of tiny AudioLDM audio, steps, timed rounds.
SETTINGS = {"smoke": dict(seconds=25.0, steps=3, rounds=1),
            "quick": dict(seconds=60.0, steps=20, rounds=3),
            "full": dict(seconds=60.0, steps=20, rounds=5)}

# Hardware figures of the model (NOT measured: no GPU on the machine that wrote this).
ASSUMED = {
    "gpu": "A100-SXM (the GPU of DistriFusion's figures)",
    "tflops": 150.0,          # sustained fp16 model throughput, about half of the 312 TFLOP/s dense peak
    "hbm_gbs": 1000.0,        # effective memory bandwidth of element-wise work (peak ~1.5-2 TB/s)
    "link_gbs": 100.0,        # effective NVLink bandwidth of one P2P transfer (peak 300 GB/s per direction)
    "latency_us": 20.0,       # per NCCL operation (the status all_reduce, each P2P, the broadcast)
    "dtype_bytes": 2,         # fp16 latents
}
DISTRIFUSION = {2: 1.8, 4: 3.4, 8: 6.1}  # SDXL on 2/4/8 A100, as published (arXiv 2402.19481)


# -- timing (the only timing code) ------------------------------------------------------------
def _step_times(call) -> Tuple[float, List[float]]:
    """One call's mean wall time per step (from the first step's callback to the last's) and
    the CPU time of each later step (``time.process_time``: every thread of the process)."""
    wall: List[float] = []
    cpu: List[float] = []

    def on_step(jd, i, t, state):
        wall.append(time.perf_counter())
        cpu.append(time.process_time())

    call(on_step)
    return (wall[-1] - wall[0]) / (len(wall) - 1), [b - a for a, b in zip(cpu, cpu[1:])]


# -- 1. measured: 2 processes against 1 ------------------------------------------------------
def _parallel_capacity(group) -> Dict[str, float]:
    """Seconds of a fixed matmul load on rank 0 alone and on every rank at once (a barrier apart)."""
    import torch.distributed as dist
    a = torch.randn(384, 384, generator=torch.Generator().manual_seed(0))

    def load() -> float:
        started = time.perf_counter()
        for _ in range(150):
            a @ a
        return time.perf_counter() - started

    alone = load() if group.rank() == 0 else 0.0
    dist.barrier(group)
    together = load()
    dist.barrier(group)
    return {"alone": alone, "together": together}


def _measure_ranks(group, seconds: float, steps: int, rounds: int) -> Dict[str, Any]:
    import torch.distributed as dist

    import safa.testing.pipelines as tp
    from safa import JointDiffusion
    from safa.distributed import ViewShard
    from safa_kernels import sync_
    rank = group.rank()
    pipe = tp.tiny_audioldm_pipeline()
    one, two = JointDiffusion(pipe), JointDiffusion(pipe, process_group=group)

    def run(jd):
        return lambda cb: jd("rain", seconds, num_inference_steps=steps, view_batch_size=1, output_type="latent",
                             generator=torch.Generator().manual_seed(0), callback_on_step_end=cb)

    # What two processes can get from this machine right now (it is shared): a fixed matmul
    # load on rank 0 alone, then on both at once, before and after the rounds.
    capacity = [_parallel_capacity(group)]
    one_s, two_s = [], []
    for r in range(rounds + 1):  # round 0 warms up both
        if rank == 0:
            one_s.append(_step_times(run(one)))
        dist.barrier(group)
        two_s.append(_step_times(run(two)))
    one_s, two_s = one_s[1:], two_s[1:]
    capacity.append(_parallel_capacity(group))

    # The parts of a step, in this process (rank 0 alone: rank 1 waits in the barrier).
    layout = one.layout_for(seconds)
    parts: Dict[str, Any] = {}
    if rank == 0:
        multidiffusion, _ = _step_times(
            lambda cb: one("rain", seconds, method="multidiffusion", num_inference_steps=steps, view_batch_size=1,
                           output_type="latent", generator=torch.Generator().manual_seed(0), callback_on_step_end=cb))
        views = torch.randn(layout.num_views, 1, 8, layout.window, 16)
        sched = pipe.scheduler
        sched.set_timesteps(steps)
        started = time.perf_counter()
        for _ in range(20):
            sched.step(torch.randn_like(views).flatten(0, 1), sched.timesteps[1], views.flatten(0, 1))
        parts["scheduler_s"] = (time.perf_counter() - started) / 20
        reference = torch.randn(1, 8, layout.window, 16)
        started = time.perf_counter()
        for _ in range(50):
            sync_(views, layout, -2, "swap", 1, reference=reference, reference_axis=-2)
        parts["merge_s"] = (time.perf_counter() - started) / 50
        # MultiDiffusion with view_batch_size=1: n windows + scheduler + merge (mean) per step
        parts["window_s"] = (multidiffusion - parts["scheduler_s"] - parts["merge_s"]) / layout.num_views
    dist.barrier(group)

    # One step's exchange on its own, unguided and guided (the reference's model output too).
    shard = ViewShard(group, layout, -2, "swap", 1, rows_per_view=1)
    views = torch.randn(layout.num_views, 1, 8, layout.window, 16)
    reference = torch.randn(1, 8, layout.window, 16)
    timings = {}
    for guiding in (False, True):
        shard.exchange(views, reference if shard.has_reference else None, guiding)  # warm-up
        shard.bytes_sent = 0
        dist.barrier(group)
        started = time.perf_counter()
        for _ in range(30):
            shard.exchange(views, reference if shard.has_reference else None, guiding)
        timings["guided" if guiding else "unguided"] = ((time.perf_counter() - started) / 30, shard.bytes_sent / 30)
    return {"rank": rank, "one_s": one_s, "two_s": two_s, "parts": parts, "exchange": timings, "capacity": capacity,
            "views": layout.num_views, "window": layout.window, "overlap": layout.overlap,
            "blocks": [len(b) for b in shard.blocks]}


def measured(seconds: float, steps: int, rounds: int) -> Dict[str, Any]:
    from safa.testing.distributed import RankError, run_processes
    results = run_processes(_measure_ranks, 2, seconds, steps, rounds, timeout_s=3600)
    for res in results:
        if isinstance(res, RankError):
            raise RuntimeError(res.traceback)
    r0, r1 = results
    one, two = statistics.median(w for w, _ in r0["one_s"]), statistics.median(w for w, _ in r0["two_s"])
    # CPU critical path: per step, the busier rank's CPU time (what the step would take with
    # a core per process and free communication), against one process's CPU time per step
    one_cpu = statistics.median(statistics.mean(c) for _, c in r0["one_s"])
    two_cpu = statistics.median(statistics.mean(max(a, b) for a, b in zip(c0, c1))
                                for (_, c0), (_, c1) in zip(r0["two_s"], r1["two_s"]))
    parts = r0["parts"]
    guide_steps = math.floor(0.3 * steps + 0.5)
    # The prediction of section 4, with this machine's measured parts (rank 1 holds X^0).
    n, blocks = r0["views"], r0["blocks"]
    per_step = []
    for i in range(1, steps):  # the loop's mean over steps 1..T-1, as measured
        guided = i < guide_steps
        windows = max(b + (1 if guided and r == len(blocks) - 1 else 0) for r, b in enumerate(blocks))
        exchange = max(res["exchange"]["guided" if guided else "unguided"][0] for res in results)
        per_step.append(windows * parts["window_s"] + parts["scheduler_s"] + parts["merge_s"] + exchange)
    # the bytes on the wire are the counted exchange sets (float32 AudioLDM cells: 8 x 16 per column)
    from safa.distributed import exchange_cells, view_blocks
    from safa_kernels import ViewLayout
    layout = ViewLayout(r0["window"] + (n - 1) * (r0["window"] - r0["overlap"]), r0["window"], r0["overlap"])
    for res in results:
        sends, _ = exchange_cells(layout, "swap", 1, view_blocks(n, 2), res["rank"])
        counted = sum(c.numel() for c in sends.values()) * 8 * 16 * 4
        if res["exchange"]["unguided"][1] != counted:
            raise AssertionError(f"rank {res['rank']} sent {res['exchange']['unguided'][1]} B, counted {counted} B")
    # parallelism the machine gave: 2 x (one process's time alone / the slower of two at once)
    capacity = [2 * r0["capacity"][k]["alone"] / max(r0["capacity"][k]["together"], r1["capacity"][k]["together"])
                for k in range(2)]
    return {"seconds": seconds, "steps": steps, "rounds": rounds, "views": n, "blocks": blocks,
            "parallel_capacity": capacity, "load_average": os.getloadavg(),
            "one_step_s": one, "two_step_s": two, "speedup": one / two,
            "one_cpu_step_s": one_cpu, "two_cpu_critical_step_s": two_cpu, "cpu_speedup": one_cpu / two_cpu,
            "one_rounds": [w for w, _ in r0["one_s"]], "two_rounds": [w for w, _ in r0["two_s"]], "parts": parts,
            "exchange": {f"rank {res['rank']}": res["exchange"] for res in results},
            "predicted_two_step_s": statistics.mean(per_step)}


# -- 3. FLOPs of the full-size architectures ---------------------------------------------------
def full_size_flops() -> Dict[str, float]:
    """TFLOP per window (UNet with CFG: batch 2) and per decoded window, on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    def count(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e12

    meta = torch.device("meta")
    with meta:
        sd_unet = UNet2DConditionModel(  # SD 1.x
            sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
            attention_head_dim=8)
        audio_unet = UNet2DConditionModel(  # AudioLDM-S sized: text as a projected class embedding
            sample_size=128, in_channels=8, out_channels=8, block_out_channels=(128, 256, 384, 640),
            layers_per_block=2, down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
            up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",), cross_attention_dim=(128, 256, 384, 640),
            attention_head_dim=8, class_embed_type="simple_projection", projection_class_embeddings_input_dim=512,
            class_embeddings_concat=True)
        sd_vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                               block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                               up_block_types=("UpDecoderBlock2D",) * 4)
        audio_vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=8, layers_per_block=2,
                                  block_out_channels=(128, 256, 512), down_block_types=("DownEncoderBlock2D",) * 3,
                                  up_block_types=("UpDecoderBlock2D",) * 3)
        vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
            model_in_dim=64, sampling_rate=16000, upsample_initial_channel=1024, upsample_rates=[5, 4, 2, 2, 2],
            upsample_kernel_sizes=[16, 16, 8, 4, 4], resblock_kernel_sizes=[3, 7, 11],
            resblock_dilation_sizes=[[1, 3, 5]] * 3, normalize_before=False))
    t = torch.tensor(500, device=meta)
    return {
        "sd_unet": count(lambda: sd_unet(torch.randn(2, 4, 64, 64, device=meta), t,
                                         encoder_hidden_states=torch.randn(2, 77, 768, device=meta))),
        "audio_unet": count(lambda: audio_unet(torch.randn(2, 8, 256, 16, device=meta), t,
                                               encoder_hidden_states=None,
                                               class_labels=torch.randn(2, 512, device=meta))),
        "sd_decode": count(lambda: sd_vae.decode(torch.randn(1, 4, 64, 64, device=meta))),
        "audio_decode": count(lambda: audio_vae.decode(torch.randn(1, 8, 256, 16, device=meta)))
        + count(lambda: vocoder(torch.randn(1, 1024, 64, device=meta))),
    }


# -- 2 and 4. counted bytes and the modelled scaling table -------------------------------------
WORKLOADS = [
    # name, latent cells per column (channels x other axis), window, overlap rate, columns, steps, unet,
    # decode, output bytes per latent column (fp32: 640 samples; 8 columns of 512 RGB pixels)
    ("AudioLDM, 10 min", 8 * 16, 256, 0.2, 10 * 60 * 25, 200, "audio_unet", "audio_decode", 640 * 4),
    ("AudioLDM, 1 h", 8 * 16, 256, 0.2, 60 * 60 * 25, 200, "audio_unet", "audio_decode", 640 * 4),
    ("SD 1.x, 512 x 16384 px", 4 * 64, 64, 0.2, 16384 // 8, 50, "sd_unet", "sd_decode", 8 * 512 * 3 * 4),
]


def modelled(flops: Dict[str, float]) -> List[Dict[str, Any]]:
    from safa.distributed import exchange_cells, view_blocks
    from safa.layouts import open_layout
    a = ASSUMED
    rows = []
    for name, cells_per_column, window, rate, columns, steps, unet, decode, out_column_bytes in WORKLOADS:
        layout = open_layout(columns, window, int(round(rate * window)))
        n, guide_steps = layout.num_views, math.floor(0.3 * steps + 0.5)
        column_bytes = cells_per_column * a["dtype_bytes"]
        t_win = flops[unet] / a["tflops"]
        # replicated element-wise work per step: the scheduler (~6 passes over every view) and
        # the merge (~3 passes over the overlap columns), memory-bound
        replicated = (6 * n * window + 3 * n * layout.overlap) * column_bytes / (a["hbm_gbs"] * 1e9)
        t_decode = flops[decode] * layout.length / window / a["tflops"]
        link = a["link_gbs"] * 1e9
        one = steps * n * t_win + guide_steps * t_win + steps * replicated
        for world in (2, 4, 8):
            blocks = view_blocks(n, world)
            exchange = [exchange_cells(layout, "swap", 1, blocks, r) for r in range(world)]
            sent = [sum(c.numel() for c in sends.values()) * column_bytes for sends, _ in exchange]
            messages = [len(sends) + len(receives) for sends, receives in exchange]
            comm = a["latency_us"] * 1e-6 * (1 + max(messages)) + max(sent) / (a["link_gbs"] * 1e9)
            reference_bcast = a["latency_us"] * 1e-6 + window * column_bytes / (a["link_gbs"] * 1e9)
            total = 0.0
            comm_total = 0.0
            for i in range(steps):
                guided = i < guide_steps
                windows = max(len(b) + (1 if guided and r == world - 1 else 0) for r, b in enumerate(blocks))
                step_comm = comm + (reference_bcast if guided else 0.0)
                total += windows * t_win + replicated + step_comm
                comm_total += step_comm
            # the tiled decode shared: the views to every rank, the tiles round-robin (a gather to
            # rank 0 per round of `world` tiles), the output to rank 0
            tiles = math.ceil(layout.length / window)
            rounds = math.ceil(tiles / world)
            t_shared = (rounds / tiles * t_decode
                        + n * window * column_bytes / link + layout.length * out_column_bytes / link
                        + (2 + rounds) * a["latency_us"] * 1e-6)
            rows.append({"workload": name, "views": n, "gpus": world, "largest_block": max(len(b) for b in blocks),
                         "bytes_per_step_rank": max(sent), "window_ms": t_win * 1e3,
                         "step_ms": total / steps * 1e3, "comm_pct": 100 * comm_total / total,
                         "replicated_pct": 100 * steps * replicated / total,
                         "speedup": one / total,
                         "speedup_with_decode": (one + t_decode) / (total + t_decode),
                         "speedup_with_shared_decode": (one + t_decode) / (total + t_shared),
                         "decode_pct_of_one": 100 * t_decode / (one + t_decode),
                         "comm_pct_if_10x_slower": 100 * 10 * comm_total / (total + 9 * comm_total)})
    return rows


# -- 5. grids: bytes per step of a tile split (counted) ---------------------------------------
GRID_WORKLOADS = [
    # name, latent side (cells), tile window, as the sampler lays them out at overlap 0.2 (SD 1.x, SDXL)
    ("SD 1.x, 2048 x 2048 px", 256, 64),
    ("SDXL, 4096 x 4096 px", 512, 128),
]


def _grid_splits(layout, world: int) -> Dict[str, List[List[int]]]:
    """The tiles of each rank under three splits: the row-major blocks the shard uses
    (``view_blocks``), whole tile rows per rank, and the 2-D block split ``pr x pc = world``
    with the smallest largest block (whole tile rows when ``world`` is prime)."""
    from safa.distributed import view_blocks
    R, C = layout.rows.num_views, layout.cols.num_views

    def parts(n: int, k: int) -> List[range]:
        return view_blocks(n, k)
    splits = {"row-major tile blocks (used)": [list(b) for b in view_blocks(R * C, world)]}
    if world <= R:
        splits["whole tile rows"] = [[a * C + b for a in rows for b in range(C)] for rows in parts(R, world)]
    best = None
    for pr in range(1, world + 1):
        if world % pr or pr > R or world // pr > C:
            continue
        blocks = [[a * C + b for a in rows for b in cols] for rows in parts(R, pr) for cols in parts(C, world // pr)]
        if best is None or max(map(len, blocks)) < max(map(len, best)):
            best = blocks
    if best is not None:
        splits["2-D blocks"] = best
    return splits


def grid_exchange() -> List[Dict[str, Any]]:
    """Per workload, split, mode and world size: the largest block (tiles) and the bytes a rank
    receives per step (fp16, 4 channels, one image), counted from the exchange sets."""
    from safa.distributed import cells_read
    from safa_kernels import GridLayout
    cell_bytes = 4 * ASSUMED["dtype_bytes"]
    rows = []
    for name, side, window in GRID_WORKLOADS:
        layout = GridLayout.covering(side, side, window, int(round(0.2 * window)))
        for mode in ("swap", "mean"):
            for world in (2, 3, 4, 8):
                for split, blocks in _grid_splits(layout, world).items():
                    received = [cells_read(layout, mode, 1, block).numel() * cell_bytes for block in blocks]
                    rows.append({"workload": name, "tiles": f"{layout.rows.num_views} x {layout.cols.num_views}",
                                 "mode": mode, "gpus": world, "split": split,
                                 "largest_block": max(map(len, blocks)), "max_bytes_per_step_rank": max(received),
                                 "total_bytes_per_step": sum(received)})
    return rows


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = harness.argument_parser(__doc__, device=False)
    ap.add_argument("--seconds", type=float, default=None, help="seconds of audio of the measured run")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps per call")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds after the warm-up")
    args = ap.parse_args(argv)
    if args.threads not in (None, 1):
        ap.error(f"--threads must be 1 (each process runs one thread), got {args.threads}")
    args.threads = 1  # every rank sets one thread (safa.testing.distributed), whatever SAFA_BENCH_THREADS says
    args.mode, _, _ = harness.configure(args, ap)
    for key, value in SETTINGS[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 2:
        ap.error(f"--steps must be >= 2 (a step time is an interval between steps), got {args.steps}")
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.seconds <= 0:
        ap.error(f"--seconds must be > 0, got {args.seconds:g}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    meas = measured(args.seconds, args.steps, args.rounds)
    flops = full_size_flops()
    grid_exchange_rows = grid_exchange()
    path = harness.record("distributed", torch.device("cpu"), [], args.threads,
                          clock="wall time per step (rank 0) and process CPU time per rank",
                          measured=meas, flops=flops, modelled=modelled(flops), grid_exchange=grid_exchange_rows,
                          assumed=ASSUMED,
                          distrifusion={str(k): v for k, v in DISTRIFUSION.items()})
    print(report.render_file_section("distributed", path))
    print("\nGrids: bytes a rank receives per step (counted; fp16, 4 channels, one image)")
    for row in grid_exchange_rows:
        print(f"  {row['workload']:24} {row['tiles']} {row['mode']:5} {row['gpus']} GPUs  {row['split']:29} "
              f"largest block {row['largest_block']:2} tiles  max {row['max_bytes_per_step_rank'] / 1e3:6.1f} KB  "
              f"total {row['total_bytes_per_step'] / 1e3:7.1f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
