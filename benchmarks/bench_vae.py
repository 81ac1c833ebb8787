"""Tiled VAE decoding: safa's exact tiled decode (safa.tiled_vae) against the whole decode and
diffusers' ``vae.enable_tiling()``, in fidelity, peak memory and time.

    python benchmarks/bench_vae.py [--mode smoke|quick|full] [--device cpu|cuda] [--threads N] [--plot PNG]
    python benchmarks/bench_vae.py --plot PNG --from-results benchmarks/results/<machine>.json

Two random-weight ``AutoencoderKL`` decoders, the same latents for every method:

- **tiny**: the tiny SD VAE of safa.testing (8 channels, 4 levels: the x8 of every SD VAE);
- **SD 2**: the full-size SD 1.x / 2.x VAE (benchmarks/fullsize.py ``SD2_VAE``: 128-512 channels, 83.7 M
  parameters), random weights: cost and float behaviour are the real model's, colours are not.

**fidelity** (one latent, per tile size): the largest per-pixel difference from the whole decode
and its PSNR, on the pipeline's pixel scale (``x / 2 + 0.5``, times 255, *not* clamped, so
saturated pixels do not hide differences; the largest difference also clamped to 0-255, as
the image is saved), and the **colour shift**: the image cut into
blocks of the tile size, the largest difference of a block's per-channel mean from the whole
decode's (what shows as tiles of different colour). diffusers' tiling runs with its tile set to
the same size (``tile_sample_min_size``; its overlap factor 0.25, blended).

**cost** (square images of the mode's sizes, SD 2 VAE): peak memory as the most tensor bytes
alive at once (safa.profiling.LiveTensorPeak: what ``torch.cuda.max_memory_allocated``
reports on CUDA) and wall time of one call, for the whole decode, safa tiled (64 latent pixels
= 512 px tiles) and diffusers' tiling (512 px tiles, its default for this VAE).
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

import harness
import report
from fullsize import SD2_VAE
from safa.profiling.memory import LiveTensorPeak

METHODS = ("whole", "safa tiled", "safa tiled+disk", "diffusers tiling")
# cost cases: (VAE, latent side, methods, "measured" or "meta": the allocation trace on the meta device)
TRACED = [("SD 2", side, METHODS, "meta") for side in (64, 128, 256, 512, 1024)]  # 512² ... 8192²
SETTINGS = {"smoke": dict(fidelity=[("tiny", (24, 40), (8, 16))],
                          cost=[("tiny", 32, METHODS, "measured"), ("tiny", 32, METHODS, "meta")]),
            "quick": dict(fidelity=[("tiny", (64, 96), (16, 32, 64)), ("SD 2", (32, 48), (16, 32))],
                          cost=[("SD 2", 64, METHODS, "measured"), ("SD 2", 128, METHODS, "measured")] + TRACED),
            "full": dict(fidelity=[("tiny", (64, 96), (16, 32, 64)), ("SD 2", (32, 48), (16, 32))],
                         cost=[("SD 2", side, METHODS, "measured") for side in (64, 128)] +
                         [("SD 2", 256, ("safa tiled+disk", "whole", "safa tiled", "diffusers tiling"), "measured")] +
                         TRACED)}
COST_TILE = 64  # latent pixels: 512 px, diffusers' own tile for the SD VAE


def build_vae(kind: str, device: torch.device) -> Any:
    from diffusers import AutoencoderKL

    from safa.testing.pipelines import _tiny_image_vae
    torch.manual_seed(0)
    vae = _tiny_image_vae() if kind == "tiny" else AutoencoderKL(**SD2_VAE)
    return vae.eval().to(device)


def _diffusers_tiled(vae: Any, z: torch.Tensor, tile: int) -> torch.Tensor:
    """``vae.enable_tiling()`` with ``tile`` latent pixels per tile (its default overlap, 0.25)."""
    vae.enable_tiling()
    saved = vae.tile_sample_min_size, vae.tile_latent_min_size
    vae.tile_latent_min_size, vae.tile_sample_min_size = tile, tile * 8
    try:
        with torch.no_grad():
            return vae.decode(z).sample
    finally:
        vae.tile_sample_min_size, vae.tile_latent_min_size = saved
        vae.disable_tiling()


def _whole(vae: Any, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(z).sample


def fidelity_row(kind: str, method: str, tile: int, out: torch.Tensor, full: torch.Tensor) -> Dict[str, Any]:
    """Differences from the whole decode on the 0-255 pixel scale (unclamped)."""
    a, b = (out.double() / 2 + 0.5) * 255, (full.double() / 2 + 0.5) * 255
    diff = (a - b).abs()
    mse = float(((a - b) / 255).pow(2).mean())
    block = tile * 8
    pooled = torch.nn.functional.avg_pool2d(a - b, block, ceil_mode=True)  # per-block per-channel mean difference
    return dict(vae=kind, method=method, tile_px=block, height=out.shape[-2], width=out.shape[-1],
                max_abs=float(diff.max()), mean_abs=float(diff.mean()),
                max_abs_clamped=float((a.clamp(0, 255) - b.clamp(0, 255)).abs().max()),
                psnr_db=float("inf") if mse == 0 else 10 * math.log10(1.0 / mse),
                colour_shift=float(pooled.abs().max()))


def fidelity(device: torch.device, cases: Sequence[Any]) -> List[Dict[str, Any]]:
    from safa import tiled_vae
    rows = []
    for kind, (h, w), tiles in cases:
        vae = build_vae(kind, device)
        z = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(1)).to(device)
        full = _whole(vae, z)
        for tile in tiles:
            rows.append(fidelity_row(kind, "safa tiled", tile, tiled_vae.decode(vae, z, tile=tile), full))
            rows.append(fidelity_row(kind, "diffusers tiling", tile, _diffusers_tiled(vae, z, tile), full))
            print(rows[-2], rows[-1], flush=True)
    return rows


class AllocationTrace(LiveTensorPeak):
    """:class:`~safa.profiling.memory.LiveTensorPeak`'s accounting on the meta device too: the
    same storages counted from creation to the death of their last tensor, keyed by the storage
    itself (a meta storage has no address). Run on the meta device, it gives the peak of a
    computation too slow to run, from its allocations alone."""

    def storage_key(self, t: torch.Tensor) -> Optional[int]:
        return t.untyped_storage()._cdata


class _CpuAttention:
    """On the meta device, ``F.scaled_dot_product_attention`` as the CPU runs it (its fused
    kernel, which has a meta function), not the math path the meta device falls back to, whose
    score matrices the CPU never allocates: so the meta trace counts what the CPU allocates."""

    def __enter__(self) -> None:
        import torch.nn.functional as F
        self.saved = F.scaled_dot_product_attention

        def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any = None, dropout_p: float = 0.0,
                  is_causal: bool = False, scale: Optional[float] = None, **kwargs: Any) -> torch.Tensor:
            assert attn_mask is None and dropout_p == 0.0 and not kwargs
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=is_causal,
                                                                              scale=scale)[0]
        F.scaled_dot_product_attention = fused

    def __exit__(self, *exc: Any) -> None:
        import torch.nn.functional as F
        F.scaled_dot_product_attention = self.saved


def _rss() -> int:
    """This process's resident set now (bytes)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _stream_png(vae: Any, z: torch.Tensor, tile: int, store: Any, path: str) -> None:
    """The tiled decode written to a PNG one tile row at a time, as ``output_path=`` does."""
    from safa import tiled_vae
    from safa.output import PngRows
    scale = 8
    writer, band, row = None, [], 0
    for r, c, piece in tiled_vae.decode_tiles(vae, z, tile, offload=store):
        if piece.is_meta:
            continue
        if writer is None:
            writer = PngRows(path, z.shape[-1] * scale, z.shape[-2] * scale)
        if r != row and band:
            _write_band(writer, band)
            band, row = [], r
        band.append(piece)
    if writer is not None:
        _write_band(writer, band)
        writer.close()


def _write_band(writer: Any, band: List[torch.Tensor]) -> None:
    pixels = (torch.cat(band, -1)[0] / 2 + 0.5).clamp(0, 1)
    writer.write((pixels * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy())


def measure_one(kind: str, method: str, side: int, device: torch.device) -> Dict[str, Any]:
    """One decode of a ``side`` x ``side`` latent by ``method`` with the ``kind`` VAE: peak tensor memory,
    peak RSS (of this process: run it in a fresh one), time; on the meta device the allocation
    trace only. ``safa tiled+disk`` streams the image to a PNG (as ``output_path=``), the others
    return it whole."""
    import resource
    import tempfile

    from safa import tiled_vae
    meta = device.type == "meta"
    vae = build_vae(kind, torch.device("cpu")).to(device)
    z = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(2)).to(device)
    tile = min(COST_TILE, side // 2)  # at least 2 x 2 tiles, so the tiled decodes tile
    store = tiled_vae.DiskStore()
    with tempfile.TemporaryDirectory() as tmp:
        methods = {"whole": lambda: _whole(vae, z),
                   "safa tiled": lambda: tiled_vae.decode(vae, z, tile=tile),
                   "safa tiled+disk": lambda: _stream_png(vae, z, tile, store, os.path.join(tmp, "out.png")),
                   "diffusers tiling": lambda: _diffusers_tiled(vae, z, tile)}
        fn = methods[method]
        base_rss = _rss()
        clock = harness.timer(device)
        start = clock()
        with (_CpuAttention() if meta else contextlib.nullcontext()), \
                (AllocationTrace() if meta else LiveTensorPeak()) as peak:
            out = fn()
        seconds = clock() - start
        del out
    row = dict(vae=kind, method=method, side_px=side * 8, pixels=(side * 8) ** 2, tile_px=tile * 8,
               peak_bytes=peak.peak, disk_bytes=store.peak_bytes if method == "safa tiled+disk" else None,
               trace="meta" if meta else "measured")
    if not meta:
        row.update(seconds=seconds, base_rss_bytes=base_rss,
                   peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return row


def cost(device: torch.device, cases: Sequence[Any], threads: int, cache: Optional[str] = None,
         cached_only: bool = False) -> List[Dict[str, Any]]:
    """``cases``: (side, methods, trace) with trace "measured" (run) or "meta" (allocation trace on
    the meta device). Each decode runs in a fresh process (its peak RSS is its own); ``cache``: a
    JSON-lines file of rows already measured, reused and appended to (a long run can resume);
    ``cached_only``: leave out the cases it does not have."""
    import json
    import subprocess
    import sys

    from safa.adapters.working_memory import vae_decode_bytes
    from safa.memory import tiled_decode_bytes, tiled_disk_decode_bytes
    done = {}
    if cache and os.path.exists(cache):
        for line in open(cache):
            r = json.loads(line)
            done[(r["vae"], r["method"], r["side_px"], r["trace"])] = r
    rows = []
    for kind, side, methods, trace in cases:
        config = build_vae(kind, torch.device("meta")).config
        tile = min(COST_TILE, side // 2)
        shape = (1, 4, side, side)
        estimates = {"whole": vae_decode_bytes(config, shape, 4), "safa tiled": tiled_decode_bytes(config, shape, 4, tile),
                     "safa tiled+disk": tiled_disk_decode_bytes(config, shape, 4, tile)}
        for method in methods:
            row = done.get((kind, method, side * 8, trace))
            if row is None and cached_only:
                continue
            if row is None:
                dev = "meta" if trace == "meta" else str(device)
                out = subprocess.run([sys.executable, __file__, "--one", kind, method, str(side), "--device", dev,
                                      "--threads", str(threads)], check=True, capture_output=True, text=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                if cache:
                    with open(cache, "a") as f:
                        f.write(json.dumps(row) + "\n")
            row = dict(row, estimate_bytes=estimates.get(method))
            rows.append(row)
            print(row, flush=True)
    return rows


def plot(records: Sequence[Dict[str, Any]], path: str) -> None:
    """Left: peak tensor memory against the image's pixels, one line per decode (log-log; hollow
    markers: meta-device allocation traces). Right: time over the whole decode's, where measured."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in records if r["part"] == "cost"]
    fig, (ax, at) = plt.subplots(1, 2, figsize=(11, 4.2))
    whole = {r["side_px"]: r["seconds"] for r in rows if r["method"] == "whole" and r.get("seconds")}
    for k, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        colour = f"C{k}"
        # one value per size: the measurement where there is one, else the trace
        by_side: Dict[int, Dict[str, Any]] = {}
        for r in sorted((r for r in rows if r["method"] == method), key=lambda r: r.get("trace") != "meta"):
            by_side[r["side_px"]] = r
        mine = sorted(by_side.values(), key=lambda r: r["pixels"])
        ax.plot([r["pixels"] / 1e6 for r in mine], [r["peak_bytes"] / 2 ** 30 for r in mine], "-", color=colour,
                label=method)
        for r in mine:
            traced = r.get("trace") == "meta"
            ax.plot(r["pixels"] / 1e6, r["peak_bytes"] / 2 ** 30, "o", color=colour, mfc="none" if traced else colour)
        timed = [r for r in mine if r.get("seconds") and r["side_px"] in whole]
        if timed:
            at.plot([r["pixels"] / 1e6 for r in timed], [r["seconds"] / whole[r["side_px"]] for r in timed], "o-",
                    color=colour, label=method)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("image (megapixels)")
    ax.set_ylabel("peak tensor memory (GiB)")
    ax.set_title("peak memory (hollow: meta-device allocation trace)", fontsize=9)
    ax.legend(fontsize=8)
    at.axhline(1.3, color="grey", ls=":", lw=1)
    at.set_xscale("log")
    at.set_xlabel("image (megapixels)")
    at.set_ylabel("CPU time / whole decode's")
    at.set_title("time, where measured (dotted: the 1.3x goal)", fontsize=9)
    fig.suptitle(f"VAE decode, {rows[0]['vae']} architecture (random weights, float32, CPU)" if rows else "VAE decode")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import json
    p = harness.argument_parser(__doc__)
    p.add_argument("--plot", default=None, help="also write the peak-memory plot to this PNG")
    p.add_argument("--from-results", default=None, help="plot the vae section of this results file, measure nothing")
    p.add_argument("--cache", default=None, help="JSON-lines file of cost rows: reused, and new rows appended")
    p.add_argument("--only-cost", action="store_true", help="measure the cost part only (nothing recorded)")
    p.add_argument("--cached-only", action="store_true", help="record only the cost rows --cache has")
    p.add_argument("--reuse-fidelity", action="store_true",
                   help="keep the fidelity rows of this machine's results file instead of measuring them again")
    p.add_argument("--one", nargs=3, metavar=("VAE", "METHOD", "SIDE"), default=None,
                   help="measure one decode in this process and print its row as JSON (used by the cost part)")
    args = p.parse_args(argv)
    if args.one:
        _, threads, device = harness.configure(args, p)
        print(json.dumps(measure_one(args.one[0], args.one[1], int(args.one[2]), device)))
        return 0
    if args.from_results:
        if not args.plot:
            p.error("--from-results needs --plot")
        plot(json.loads(open(args.from_results).read())["benchmarks"]["vae"]["records"], args.plot)
        return 0
    mode, threads, device = harness.configure(args, p)
    st = SETTINGS[mode]
    started = time.perf_counter()
    if args.only_cost:
        cost(device, st["cost"], threads, args.cache)
        return 0
    if args.reuse_fidelity:
        saved = json.loads(harness.results_path(device).read_text())["benchmarks"]["vae"]["records"]
        kept = [r for r in saved if r["part"] == "fidelity"]
    else:
        kept = [dict(part="fidelity", **r) for r in fidelity(device, st["fidelity"])]
    records = kept + \
        [dict(part="cost", **r) for r in cost(device, st["cost"], threads, args.cache, args.cached_only)]
    path = harness.record("vae", device, records, threads, wall_seconds=time.perf_counter() - started)
    print(report.render_file_section("vae", path))
    if args.plot:
        plot(records, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
