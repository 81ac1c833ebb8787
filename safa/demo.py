"""``python -m safa.demo --out out/``: a 60-second looped soundscape with the built-in texture model.

Offline (no weights, no downloads). It generates the same loop (same prompt, same initial
noise) with SaFa and with MultiDiffusion, writes into ``--out``:

* ``safa.wav``, ``multidiffusion.wav`` (16 kHz mono, loopable),
* ``spectrograms.png``: the two spectrograms one above the other, window boundaries as
  cyan lines and overlaps tinted, so the seams can be inspected,

and prints the seam-fidelity table of :mod:`safa.evaluate` for these two methods at the
demo's settings (a few extra samples, so the numbers have confidence intervals).

Default sizes (chosen for a 2-core machine): the texture model with AudioLDM's latent
shape ``(8, T, 16)`` at 25 frames/s and a 312-frame window (12.48 s), so a 60 s loop is
exactly 6 views at stride 250 with an overlap of 62 frames (rate 0.2, the paper's);
25 DPM-Solver++ steps, no classifier-free guidance (the exact conditional denoiser needs
none), Griffin-Lim with 32 iterations.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

import numpy as np
import torch

__all__ = ["main", "DEMO_WINDOW"]

# 312 frames: round(0.2 * 312) = 62 overlap, stride 250 divides 1500 frames (60 s) exactly.
DEMO_WINDOW = 312


def _compose(paths: List[str], labels: List[str], out_path: str) -> None:
    """Stack spectrogram PNGs vertically with a label strip above each."""
    from PIL import Image, ImageDraw
    from .audio_io import atomic_path
    imgs = [Image.open(p).convert("RGB") for p in paths]
    width = max(i.size[0] for i in imgs)
    strip = 22
    canvas = Image.new("RGB", (width, sum(i.size[1] + strip for i in imgs)), "white")
    y = 0
    draw = ImageDraw.Draw(canvas)
    for img, label in zip(imgs, labels):
        draw.text((6, y + 5), label, fill="black")
        canvas.paste(img, (0, y + strip))
        y += img.size[1] + strip
    with atomic_path(out_path) as tmp:
        canvas.save(tmp, format="PNG")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m safa.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out", help="output directory (default out/)")
    p.add_argument("--prompt", default="rain", help="texture class (default rain)")
    p.add_argument("--seconds", type=float, default=60.0, help="loop length (default 60)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    p.add_argument("--window", type=int, default=DEMO_WINDOW, help=f"model window in frames (default {DEMO_WINDOW})")
    p.add_argument("--samples", type=int, default=6, help="samples per row of the seam-fidelity table (default 6)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from . import JointDiffusion
    from .audio_io import write_audio, write_spectrogram
    from .evaluate import evaluate, format_table
    from .texture import make_texture_pipeline

    os.makedirs(args.out, exist_ok=True)
    t_all = time.perf_counter()
    pipe = make_texture_pipeline(window=args.window)
    pipe.model.encode_prompt(args.prompt)  # unknown names fail before any work
    pipe.set_progress_bar_config(disable=True)
    jd = JointDiffusion(pipe)
    spectros, labels = [], []
    for method in ("safa", "multidiffusion"):
        t0 = time.perf_counter()
        out = jd(args.prompt, seconds=args.seconds, method=method, loop=True, num_inference_steps=args.steps,
                 guidance_scale=1.0, generator=torch.Generator().manual_seed(args.seed))
        audio = np.asarray(out.audio)[0]
        wav = os.path.join(args.out, f"{method}.wav")
        write_audio(wav, audio, out.sample_rate)
        fps = jd.adapter.frames_per_second
        spans = [(v * out.layout.stride / fps, (v * out.layout.stride + out.layout.window) / fps)
                 for v in range(out.layout.num_views)]
        png = os.path.join(args.out, f"{method}_spectrogram.png")
        write_spectrogram(png, audio, out.sample_rate, view_spans=spans, duration=audio.size / out.sample_rate,
                          loop=True)
        spectros.append(png)
        labels.append(f"{method}: '{args.prompt}', {audio.size / out.sample_rate:.1f} s loop, {out.layout}")
        print(f"{method}: {wav} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    combined = os.path.join(args.out, "spectrograms.png")
    _compose(spectros, labels, combined)
    print(f"spectrograms: {combined}", file=sys.stderr)

    res = evaluate(["safa", "multidiffusion"], samples=args.samples, seconds=args.seconds, steps=args.steps,
                   prompts=[args.prompt], loop=True, guidance_scale=1.0, seed=args.seed + 1, pipe=pipe)
    print(format_table(res))
    print(f"demo finished in {time.perf_counter() - t_all:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
