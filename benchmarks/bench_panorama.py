"""SaFa vs diffusers' StableDiffusionPanoramaPipeline (MultiDiffusion) on the same tiny UNet.

    python benchmarks/bench_panorama.py [--mode smoke|quick|full] [--device cpu|cuda] [--threads N]

Both sides wrap ONE tiny random-weight SD 1.x pipeline (safa.testing.tiny_sd_pipeline: native
window 64 latent columns = 512 px, DDIM), so the UNet, text encoder and scheduler are shared
and only the joint-diffusion scheme differs:

- MultiDiffusion: diffusers' panorama pipeline with its defaults, window 64, stride 8 (overlap
  rate 0.875), ``view_batch_size`` 1 (its default) and also all views in one batch; and the
  same MultiDiffusion through ``JointDiffusion(pipe)`` (``method="multidiffusion"``, window
  64, overlap 56: the drop-in that gives diffusers' latents), all views in one batch;
- SaFa: ``JointDiffusion(pipe)`` with method "safa", overlap rate 0.2 plus its reference
  window, all windows in one batch (its default) and also one window per call.

Per denoising step, with classifier-free guidance 7.5 on both sides: UNet calls and window
evaluations (UNet batch rows / 2), counted by a forward hook; **step** = the median interval
between ``callback_on_step_end`` calls (harness.StepClock: model + scheduler + merge; text
encoding, set-up and decoding excluded; ``output_type="latent"``), and **model** = the UNet's
own forward time inside those steps (harness.ModelClock), so **step / model** is what each
scheme costs beyond the work of its model evaluations. A warm-up call per configuration,
then the configurations take turns for the mode's rounds.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

import harness
import report

PROMPT = "a photo of the dolomites"
GUIDANCE = 7.5
SETTINGS = {"smoke": dict(height=512, width=1024, steps=2, rounds=1),
            "quick": dict(height=512, width=2048, steps=4, rounds=1),
            "full": dict(height=512, width=2048, steps=6, rounds=3)}


def measure(device: torch.device, mode: str) -> List[Dict[str, Any]]:
    from diffusers import StableDiffusionPanoramaPipeline

    from safa import JointDiffusion
    from safa.testing import tiny_sd_pipeline

    st = SETTINGS[mode]
    height, width, steps = st["height"], st["width"], st["steps"]
    sd = tiny_sd_pipeline(seed=0).to(device)
    # Same modules (no copies): the panorama pipeline wraps the very UNet / VAE / encoder / scheduler.
    pano = StableDiffusionPanoramaPipeline(**sd.components, requires_safety_checker=False)
    pano.set_progress_bar_config(disable=True)
    jd = JointDiffusion(sd)
    md_views = len(pano.get_views(height, width))  # window 64, stride 8: its defaults
    layout = jd.layout_for(width=width, overlap=0.2, method="safa")

    def run_md(vbs: int) -> Callable[[harness.StepClock], None]:
        def run(clock: harness.StepClock) -> None:
            clock.returns_kwargs = True
            pano(PROMPT, height=height, width=width, num_inference_steps=steps, guidance_scale=GUIDANCE,
                 view_batch_size=vbs, output_type="latent", callback_on_step_end=clock,
                 generator=torch.Generator(device).manual_seed(0))
        return run

    def run_jd_md(clock: harness.StepClock) -> None:
        jd(PROMPT, width=width, height=height, method="multidiffusion", window=64, overlap=56 / 64,
           num_inference_steps=steps, guidance_scale=GUIDANCE, output_type="latent", callback_on_step_end=clock,
           generator=torch.Generator(device).manual_seed(0))

    def run_safa(vbs: Optional[int]) -> Callable[[harness.StepClock], None]:
        def run(clock: harness.StepClock) -> None:
            jd(PROMPT, width=width, height=height, method="safa", overlap=0.2, num_inference_steps=steps,
               guidance_scale=GUIDANCE, view_batch_size=vbs, output_type="latent", callback_on_step_end=clock,
               generator=torch.Generator(device).manual_seed(0))
        return run

    configs = [
        ("MultiDiffusion (diffusers panorama, window 64, stride 8, view_batch_size 1)", md_views, run_md(1)),
        (f"MultiDiffusion (diffusers panorama, window 64, stride 8, view_batch_size {md_views})", md_views,
         run_md(md_views)),
        ("MultiDiffusion (safa JointDiffusion, window 64, stride 8, one batch)", md_views, run_jd_md),
        (f"SaFa (overlap 0.2, stride {layout.stride}, + reference, view_batch_size all)", layout.num_views + 1,
         run_safa(None)),
        (f"SaFa (overlap 0.2, stride {layout.stride}, + reference, view_batch_size 1)", layout.num_views + 1,
         run_safa(1)),
    ]
    for _, _, run in configs:  # warm-up: allocator, plans, lazy inits
        run(harness.StepClock(device))
    samples: Dict[str, Dict[str, List[float]]] = {name: dict(step=[], model=[]) for name, _, _ in configs}
    counts: Dict[str, Any] = {}
    for _ in range(st["rounds"]):
        for name, _, run in configs:
            with harness.ModelClock(sd.unet, device) as model_clock:
                clock = harness.StepClock(device, model_clock)
                run(clock)
            samples[name]["step"] += clock.intervals
            samples[name]["model"] += clock.model
            counts[name] = (model_clock.calls / steps, model_clock.rows / steps)
    records = []
    for name, windows, _ in configs:
        step, model = harness.Stats.of(samples[name]["step"]), harness.Stats.of(samples[name]["model"])
        calls, rows = counts[name]
        records.append(dict(config=name, height=height, width=width, steps=steps, rounds=st["rounds"],
                            windows=windows, unet_calls_per_step=calls, window_evals_per_step=rows / 2,
                            step=step.to_dict(), model=model.to_dict(), step_over_model=step.median / model.median))
    return records


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = harness.argument_parser(__doc__)
    args = p.parse_args(argv)
    mode, threads, device = harness.configure(args, p)
    path = harness.record("panorama", device, measure(device, mode), threads)
    print(report.render_file_section("panorama", path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
