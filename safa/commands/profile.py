"""``safa profile``: where a joint-diffusion step's time and launches go (model / scheduler / merge / other).

    safa profile                                  # the built-in model, 30 s, SaFa, 4 steps
    safa profile --model builtin:tiny-audioldm    # a tiny random AudioLDM (a UNet, offline)
    safa profile --model fullsize:audioldm --seconds 10 --steps 1 --warmup 0
                                                  # full-size AudioLDM-S / fullsize:sd2 (random weights)
    safa profile --model DIR --seconds 60 --method multidiffusion --backend triton --compare

Runs a few steps under ``torch.profiler``, prints per step the time and the ops (CPU) or
launches (CUDA) of each part, and writes a Chrome trace (open it in chrome://tracing or
https://ui.perfetto.dev). ``--compare`` runs the hand-written per-view merge loop
(``safa_kernels.naive``) beside the one-op merge, in the same process. Measuring is
:mod:`safa.profiling.measure`, printing :mod:`safa.profiling.report`.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict, List, Optional

import torch

__all__ = ["add_parser", "add_arguments", "method_choices", "run", "TINY_AUDIOLDM"]

TINY_AUDIOLDM = "builtin:tiny-audioldm"
# Full-size random-weight architectures from the published configs of benchmarks/fullsize.py
# (a source checkout's, not an installed package's): the real cost of a step, offline.
FULLSIZE = {"fullsize:sd2": "sd2_pipeline", "fullsize:audioldm": "audioldm_pipeline"}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``profile`` on ``subparsers``."""
    p = subparsers.add_parser("profile", help="per-step profile: model / scheduler / merge / other",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def method_choices() -> List[str]:
    """The methods `safa profile --method` takes: the one list, safa.sampler.METHODS."""
    from ..sampler import METHODS
    return list(METHODS)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .common import add_guidance_argument, add_model_arguments
    add_model_arguments(p)  # --model (also builtin:tiny-audioldm here), --window, --device, --quiet
    p.add_argument("--seconds", type=float, default=None, help="audio length (default 30 for audio pipelines)")
    p.add_argument("--width", type=int, default=None, help="panorama width in pixels (image pipelines)")
    p.add_argument("--height", type=int, default=None, help="panorama height in pixels (image pipelines)")
    p.add_argument("--prompt", default="rain", help="the prompt (default rain: a class of the built-in model)")
    p.add_argument("--method", default="safa",
                   help=f"one of {', '.join(method_choices())}, optionally with parameters of its method object "
                        f"(e.g. safa_stats:snr=0.05, as generate and evaluate take them; default safa)")
    p.add_argument("--backend", default="auto", help="merge backend: auto, cpp, cuda, triton, reference")
    p.add_argument("--steps", type=int, default=4, help="profiled steps (default 4)")
    p.add_argument("--warmup", type=int, default=2, help="steps of the warm-up call (default 2)")
    p.add_argument("--guide", type=float, default=None,
                   help="SaFa's r_guide (default 1.0 for safa: the reference swap in every profiled step)")
    add_guidance_argument(p)
    p.add_argument("--compile", action="store_true", help="JointDiffusion(compile=True)")
    p.add_argument("--cuda-graphs", action="store_true", help="JointDiffusion(cuda_graphs=True) (CUDA only)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--compare", action="store_true",
                   help="also run the hand-written per-view merge loop (safa_kernels.naive) and print both "
                        "side by side")
    p.add_argument("--trace", default="out/profile_trace.json",
                   help="Chrome trace path (default out/profile_trace.json; --compare adds .naive before .json)")


def load(model: str, window: Optional[float]) -> Any:
    """The pipeline ``model`` names: :data:`TINY_AUDIOLDM` or anything ``safa generate --model`` accepts."""
    if model == TINY_AUDIOLDM:
        from ..testing import tiny_audioldm_pipeline
        return tiny_audioldm_pipeline()
    if model in FULLSIZE:
        return _fullsize(model)
    from .common import BUILTIN_MODEL, load_pipeline
    return load_pipeline(model, window if model == BUILTIN_MODEL else None)


def _fullsize(model: str) -> Any:
    """``fullsize:sd2`` / ``fullsize:audioldm``: built by benchmarks/fullsize.py of this source tree."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "benchmarks", "fullsize.py")
    if not os.path.isfile(path):
        raise ValueError(f"--model {model} needs a source checkout (benchmarks/fullsize.py); not found at {path}")
    spec = importlib.util.spec_from_file_location("safa_benchmarks_fullsize", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return getattr(module, FULLSIZE[model])("full")


def run(args: argparse.Namespace) -> int:
    """``safa profile``: print the breakdown(s); returns the exit code."""
    from ..profiling import NAIVE_METHODS, format_breakdown, format_comparison, naive_merge_step, profile_steps
    from ..methods import parse_method_spec, split_method_spec
    from ..sampler import JointDiffusion

    if args.steps < 1 or args.warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps}, {args.warmup}")
    name, spec_params = split_method_spec(args.method)
    # SaFa's reference swap in every profiled step unless the spec or --guide says otherwise.
    guide = 1.0 if name == "safa" and args.guide is None and "guide" not in spec_params else args.guide
    method = parse_method_spec(args.method, guide=guide)
    if args.compare and name not in NAIVE_METHODS:
        raise ValueError(f"--compare: the naive merge implements {NAIVE_METHODS}, not {args.method!r}")
    from .common import BUILTIN_MODEL, check_backend_env, resolve_device, setup_logging
    setup_logging(args.quiet)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    check_backend_env(device)
    if args.cuda_graphs and device.type != "cuda":
        raise ValueError(f"--cuda-graphs needs a CUDA device; this run is on {device}")
    pipe = load(args.model, args.window)
    window = None if args.model == BUILTIN_MODEL else args.window  # the built-in model was built for it
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    jd = JointDiffusion(pipe, compile=args.compile, cuda_graphs=args.cuda_graphs)
    kwargs: Dict[str, Any] = dict(prompt=args.prompt, method=method, num_inference_steps=args.steps,
                                  guidance_scale=args.guidance_scale, window=window)
    if jd.adapter.kind == "audio":
        kwargs["seconds"] = args.seconds if args.seconds is not None else 30.0
    else:
        if args.width is None:
            raise ValueError("this is an image pipeline: give --width")
        kwargs.update(width=args.width, height=args.height)
    layout = jd.layout_for(kwargs.get("seconds"), kwargs.get("width"), window=window, method=method)
    if args.compare and layout.loop:
        raise ValueError("--compare: the naive merge handles open layouts only")
    print(f"{args.model}: {jd.describe_layout(layout)}, "
          f"{args.method}, backend {args.backend}, compile={args.compile}, cuda_graphs={args.cuda_graphs}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    ours = profile_steps(jd, kwargs, label="safa_kernels", backend=args.backend, warmup_steps=args.warmup,
                         trace=args.trace, quiet=args.quiet)
    print(format_breakdown(ours))
    if args.compare:
        trace = None if not args.trace else os.path.splitext(args.trace)[0] + ".naive.json"
        naive_jd = JointDiffusion(pipe, compile=args.compile, cuda_graphs=args.cuda_graphs,
                                  merge_step=naive_merge_step)
        naive = profile_steps(naive_jd, kwargs, label="naive eager", warmup_steps=args.warmup, trace=trace,
                              quiet=args.quiet)
        print()
        print(format_breakdown(naive))
        print()
        print(format_comparison(ours, naive))
    return 0
