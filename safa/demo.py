"""``python -m safa.demo --out out/``: a 60-second looped soundscape with the built-in texture model.

Offline (no weights, no downloads). It generates the same loop (same prompt, same initial
noise) with SaFa and with MultiDiffusion, writes into ``--out``:

* ``safa.wav``, ``multidiffusion.wav`` (16 kHz mono, loopable),
* ``spectrograms.png``: the two spectrograms one above the other on one time axis and one
  dB colour scale, the views and their overlaps in a track above each and the window
  boundaries as thin lines, so the seams can be inspected,
* ``evaluate.png``: the seam-fidelity plot of :mod:`safa.evaluate` (overlap vs interior
  log-amplitude per temporal frequency, paper Fig. 2b; HF energy ratios with intervals),

and prints a short seam-fidelity table for these two methods at the demo's settings (a few
extra samples, so the numbers have confidence intervals; the first sample is the loop in
the WAVs, the others use the next seeds). ``safa evaluate`` prints every column.

Default sizes (chosen for a 2-core machine): the texture model with AudioLDM's latent
shape ``(8, T, 16)`` at 25 frames/s and a 312-frame window (12.48 s), so a 60 s loop is
exactly 6 views at stride 250 with an overlap of 62 frames (rate 0.2, the paper's);
25 DPM-Solver++ steps, no classifier-free guidance (the exact conditional denoiser needs
none), Griffin-Lim with 32 iterations.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import List, Optional

__all__ = ["main", "DEMO_WINDOW"]

# 12.48 s = 312 frames: overlap 62 (rate 0.2), and stride 250 divides 1500 frames (60 s) exactly.
DEMO_WINDOW = 12.48


def _parser() -> argparse.ArgumentParser:
    from .cli import OneLineParser
    from .commands.common import POSITIVE_INT, POSITIVE_NUMBER, SEED
    from .commands.evaluate import SAMPLES
    p = OneLineParser(prog="python -m safa.demo", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out", help="output directory (default out/)")
    p.add_argument("--prompt", default="rain", help="texture class (default rain)")
    p.add_argument("--seconds", type=POSITIVE_NUMBER, default=60.0, help="loop length (default 60)")
    p.add_argument("--steps", type=POSITIVE_INT, default=25, help="denoising steps (default 25)")
    p.add_argument("--window", type=POSITIVE_NUMBER, default=DEMO_WINDOW,
                   help=f"window in seconds: the built-in model is built for it (default {DEMO_WINDOW})")
    p.add_argument("--samples", type=SAMPLES, default=6,
                   help="samples per row of the seam-fidelity table, >= 2 (default 6)")
    p.add_argument("--seed", type=SEED, default=0, help="random seed (default 0)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from .cli import UsageError
    from .errors import one_line
    try:
        args = _parser().parse_args(argv)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    created = not os.path.exists(args.out)
    try:
        return _run(args)
    except (ValueError, OSError) as exc:  # bad --seconds / --window / --prompt, an unwritable --out
        print(f"python -m safa.demo: error: {one_line(exc)}", file=sys.stderr)
        # Nothing was made: do not leave the empty directory this run created behind.
        if created and os.path.isdir(args.out) and not os.listdir(args.out):
            shutil.rmtree(args.out, ignore_errors=True)
        return 2


def _run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from . import JointDiffusion
    from .audio_io import write_audio
    from .evaluate import evaluate, format_summary, write_plot
    from .plots import layout_title, view_spans, write_spectrogram
    from .spectrogram import compute_spectrogram
    from .texture import make_texture_pipeline, window_frames

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file, not a directory")
    t_all = time.perf_counter()
    pipe = make_texture_pipeline(window_frames=window_frames(args.window))
    pipe.model.encode_prompt(args.prompt)  # unknown names fail before any work
    pipe.set_progress_bar_config(disable=True)
    jd = JointDiffusion(pipe)
    jd.layout_for(args.seconds, loop=True)  # a length that does not loop fails before any work
    os.makedirs(args.out, exist_ok=True)
    spectrograms, methods = [], ("safa", "multidiffusion")
    for method in methods:
        t0 = time.perf_counter()
        out = jd(args.prompt, seconds=args.seconds, method=method, loop=True, num_inference_steps=args.steps,
                 guidance_scale=1.0, generator=torch.Generator().manual_seed(args.seed))
        audio = np.asarray(out.audio)[0]
        wav = os.path.join(args.out, f"{method}.wav")
        write_audio(wav, audio, out.sample_rate)
        spectrograms.append(compute_spectrogram(audio, out.sample_rate))
        print(f"{method}: wrote {wav} ({audio.size / out.sample_rate:g} s of audio, seed {args.seed}; "
              f"generated in {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    fps = jd.adapter.frames_per_second
    combined = os.path.join(args.out, "spectrograms.png")
    # Both methods start from the same noise on the same layout: one figure, one colour scale.
    write_spectrogram(combined, spectrograms, view_spans(out.layout, fps), loop=True,
                      title=layout_title(" vs ".join(methods), args.prompt, out.layout, fps), panel_titles=methods)
    print(f"spectrograms: {combined}", file=sys.stderr)

    res = evaluate(list(methods), samples=args.samples, seconds=args.seconds, steps=args.steps,
                   prompts=[args.prompt], loop=True, guidance_scale=1.0, seed=args.seed, pipe=pipe)
    print(format_summary(res))
    plot = os.path.join(args.out, "evaluate.png")
    write_plot(res, plot)
    print(f"seam-fidelity plot: {plot}", file=sys.stderr)
    print(f"demo finished in {time.perf_counter() - t_all:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
