"""Every method side by side: window evaluations and time per generation, beside the paper's ratios.

    python benchmarks/bench_methods.py [--mode smoke|quick|full] [--device cpu|cuda] [--threads N]

Two pipelines of safa.testing (random weights, so only cost is measured, not quality):

- **image**: the tiny SD 1.x at 512x2048 px (native window 64 latent columns = 512 px), DDIM,
  CFG 7.5, the paper's panorama settings (Sec. 3.2): SaFa and SaFa* at overlap 0.2, the
  baselines (MD, MD*, MAD, SyncDiffusion) at overlap 0.8; MAD on its authors' first half of
  the steps, SyncDiffusion on its first 20% (weight 20, decay 0.95, anchor the middle view),
  with an LPIPS-free loss (mean squared error of the decoded images: this machine has no
  LPIPS weights; a perceptual network would cost more); and two rows labelled "authors'
  setting": MAD and SyncDiffusion with their authors' own layout, window 64 latent columns at
  stride 16 (``window=64, overlap=0.75``; docs/method.md, section 9), the rest as above;
- **audio**: the tiny AudioLDM at 60 s (native window 10.24 s), every method at overlap 0.2
  (the paper's audio setting, Sec. 3.1), CFG 3.5; SyncDiffusion with its default spectral loss.

Per generation (``output_type="latent"``: decoding is the same for every method), one call
per configuration per round after a warm-up call, configurations interleaved: **time** (the
harness clock over the whole call), **window evaluations** (the denoiser's batch rows / 2
under classifier-free guidance, counted by a forward hook, SyncDiffusion's gradient passes
included) and **denoiser calls**. The paper's ratios (512x3200 panoramas on an A100, its
Tab. 3: SD 2.0 SaFa 35.2 s, MD 40.1 s, MAD 41.8 s, SyncD 401.0 s; SD 3.5 SaFa 49.5 s, MD 63.8
s, MAD 65.9 s, SyncD 668.5 s) are printed beside ours as time / SaFa's time.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

import harness
import report

# The paper's Tab. 3 panorama times (s), 512x3200 on an NVIDIA A100.
PAPER_SECONDS = {"SD 2.0": {"safa": 35.2, "multidiffusion": 40.1, "mad": 41.8, "syncdiffusion": 401.0},
                 "SD 3.5": {"safa": 49.5, "multidiffusion": 63.8, "mad": 65.9, "syncdiffusion": 668.5}}
SETTINGS = {"smoke": dict(width=1024, seconds=24.0, steps=2, rounds=1),
            "quick": dict(width=2048, seconds=60.0, steps=10, rounds=1),
            "full": dict(width=2048, seconds=60.0, steps=20, rounds=3)}
METHOD_ORDER = ("safa", "safa_selfloop", "multidiffusion", "multidiffusion_triangular", "mad", "syncdiffusion")
# The MAD and SyncDiffusion authors' own layout (window 64 latent columns, stride 16); DDIM,
# CFG 7.5 and the methods' defaults (MAD on the first half of the steps; SyncDiffusion weight
# 20, decay 0.95 on the first 20%) are theirs already.
AUTHORS = " (authors' setting)"
AUTHORS_LAYOUT = dict(window=64, overlap=0.75)


def _configurations(kind: str) -> Tuple[str, ...]:
    return METHOD_ORDER + ((f"mad{AUTHORS}", f"syncdiffusion{AUTHORS}") if kind == "image" else ())


def _image_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).mean()


def _method(name: str, kind: str) -> Any:
    from safa import SyncDiffusion, get_method
    name = name.removesuffix(AUTHORS)
    if name == "syncdiffusion" and kind == "image":
        return SyncDiffusion(loss=_image_mse)
    return get_method(name)


def measure(device: torch.device, mode: str) -> List[Dict[str, Any]]:
    from safa import JointDiffusion
    from safa.testing import tiny_audioldm_pipeline, tiny_sd_pipeline

    st = SETTINGS[mode]
    cases = {
        "image": (tiny_sd_pipeline(seed=0).to(device), dict(prompt="a photo of the dolomites", height=512,
                                                             width=st["width"], guidance_scale=7.5)),
        "audio": (tiny_audioldm_pipeline().to(device), dict(prompt="rain on a tin roof", seconds=st["seconds"],
                                                             guidance_scale=3.5)),
    }
    records = []
    for kind, (pipe, call) in cases.items():
        from diffusers import DDIMScheduler
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        jd = JointDiffusion(pipe)
        denoiser = pipe.unet

        def overlap(name: str) -> float:
            if name.endswith(AUTHORS):
                return AUTHORS_LAYOUT["overlap"]
            return 0.8 if kind == "image" and not name.startswith("safa") else 0.2

        def window(name: str) -> Optional[int]:
            return AUTHORS_LAYOUT["window"] if name.endswith(AUTHORS) else None

        def run(name: str) -> None:
            jd(method=_method(name, kind), window=window(name), overlap=overlap(name), num_inference_steps=st["steps"],
               output_type="latent", generator=torch.Generator(device).manual_seed(0), **call)

        clock = harness.timer(device)
        configurations = _configurations(kind)
        for name in configurations:  # warm-up: plans, allocator, lazy inits
            run(name)
        times: Dict[str, List[float]] = {name: [] for name in configurations}
        counts: Dict[str, Any] = {}
        for _ in range(st["rounds"]):
            for name in configurations:
                with harness.ModelClock(denoiser, device) as model_clock:
                    t0 = clock()
                    run(name)
                    times[name].append(clock() - t0)
                counts[name] = (model_clock.calls, model_clock.rows)
        for name in configurations:
            calls, rows = counts[name]
            layout = jd.layout_for(seconds=call.get("seconds"), width=call.get("width"), window=window(name),
                                   overlap=overlap(name), method=_method(name, kind))
            records.append(dict(kind=kind, method=name, steps=st["steps"], rounds=st["rounds"],
                                size=f"{call['height']}x{call['width']} px" if kind == "image"
                                else f"{call['seconds']:g} s", overlap=overlap(name), views=layout.num_views,
                                denoiser_calls=calls, window_evals=rows / 2, time=harness.Stats.of(times[name]).to_dict()))
    return records


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = harness.argument_parser(__doc__)
    args = p.parse_args(argv)
    mode, threads, device = harness.configure(args, p)
    path = harness.record("methods", device, measure(device, mode), threads, paper_seconds=PAPER_SECONDS)
    print(report.render_file_section("methods", path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
