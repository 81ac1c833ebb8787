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

import math
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

import harness
import report
from fullsize import SD2_VAE

SETTINGS = {"smoke": dict(fidelity=[("tiny", (24, 40), (8, 16))], cost=[("tiny", 32), ("tiny", 64)]),
            "quick": dict(fidelity=[("tiny", (64, 96), (16, 32, 64)), ("SD 2", (32, 48), (16, 32))],
                          cost=[("SD 2", 64), ("SD 2", 128)]),
            "full": dict(fidelity=[("tiny", (64, 96), (16, 32, 64)), ("SD 2", (64, 96), (16, 32, 64))],
                         cost=[("SD 2", 64), ("SD 2", 128), ("SD 2", 256)])}
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


def _measure(fn: Any, device: torch.device) -> Dict[str, float]:
    from safa.profiling.memory import LiveTensorPeak
    clock = harness.timer(device)
    start = clock()
    with LiveTensorPeak() as peak:
        out = fn()
    seconds = clock() - start
    del out
    return dict(peak_bytes=peak.peak, seconds=seconds)


def cost(device: torch.device, cases: Sequence[Any]) -> List[Dict[str, Any]]:
    from safa import tiled_vae
    from safa.memory import tiled_decode_bytes
    from safa.adapters.working_memory import vae_decode_bytes
    rows = []
    for kind, side in cases:
        vae = build_vae(kind, device)
        z = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(2)).to(device)
        tile = min(COST_TILE, side // 2)  # at least 2 x 2 tiles, so both tiled decodes tile
        methods = {"whole": lambda: _whole(vae, z),
                   "safa tiled": lambda: tiled_vae.decode(vae, z, tile=tile),
                   "diffusers tiling": lambda: _diffusers_tiled(vae, z, tile)}
        estimates = {"whole": vae_decode_bytes(vae.config, z.shape, 4),
                     "safa tiled": tiled_decode_bytes(vae.config, z.shape, 4, tile)}
        for method, fn in methods.items():
            row = dict(vae=kind, method=method, side_px=side * 8, pixels=(side * 8) ** 2, tile_px=tile * 8,
                       estimate_bytes=estimates.get(method), **_measure(fn, device))
            rows.append(row)
            print(row, flush=True)
    return rows


def plot(records: Sequence[Dict[str, Any]], path: str) -> None:
    """Peak tensor memory against the image's pixels, one line per decode (log-log)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in records if r["part"] == "cost"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["pixels"])
        ax.plot([r["pixels"] / 1e6 for r in mine], [r["peak_bytes"] / 2 ** 30 for r in mine], "o-", label=method)
        for r in mine:
            ax.annotate(f"{r['side_px']}²", (r["pixels"] / 1e6, r["peak_bytes"] / 2 ** 30), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("image (megapixels)")
    ax.set_ylabel("peak tensor memory (GiB)")
    ax.set_title(f"VAE decode, {rows[0]['vae']} architecture (random weights)" if rows else "VAE decode")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import json
    p = harness.argument_parser(__doc__)
    p.add_argument("--plot", default=None, help="also write the peak-memory plot to this PNG")
    p.add_argument("--from-results", default=None, help="plot the vae section of this results file, measure nothing")
    args = p.parse_args(argv)
    if args.from_results:
        if not args.plot:
            p.error("--from-results needs --plot")
        plot(json.loads(open(args.from_results).read())["benchmarks"]["vae"]["records"], args.plot)
        return 0
    mode, threads, device = harness.configure(args, p)
    st = SETTINGS[mode]
    started = time.perf_counter()
    records = [dict(part="fidelity", **r) for r in fidelity(device, st["fidelity"])] + \
        [dict(part="cost", **r) for r in cost(device, st["cost"])]
    path = harness.record("vae", device, records, threads, wall_seconds=time.perf_counter() - started)
    print(report.render_file_section("vae", path))
    if args.plot:
        plot(records, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
