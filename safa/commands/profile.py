"""``safa profile``: where a joint-diffusion step's time and launches go (model / scheduler / merge / other).

    safa profile                                  # the built-in model, 30 s, SaFa, 4 steps
    safa profile --model builtin:tiny-audioldm    # a tiny random AudioLDM (a UNet, offline)
    safa profile --model fullsize:audioldm --seconds 10 --steps 1 --warmup 0
                                                  # full-size AudioLDM-S / fullsize:sd2 (random weights)
    safa profile --model DIR --seconds 60 --method multidiffusion --backend triton --compare

Runs a few steps under ``torch.profiler``, prints per step the time and the ops (CPU) or
launches (CUDA) of each part, and writes a Chrome trace (open it in chrome://tracing or
https://ui.perfetto.dev). ``--compare`` runs the hand-written per-view merge loop
(``safa_kernels.naive``) beside the one-op merge, in the same process. The flags mean what
they mean in ``safa generate``; two defaults differ on purpose, and the first line printed
says so: ``--steps`` (the steps profiled, 4) and SaFa's ``--guide`` (1.0, so that every
profiled step does the reference swap, the step's most expensive merge; generate's is the
method's 0.3). Measuring is :mod:`safa.profiling.measure`, printing :mod:`safa.profiling.report`.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict, List

from .common import (BUILTIN_MODEL, NONNEGATIVE_INT, POSITIVE_INT, POSITIVE_NUMBER, TINY_AUDIOLDM,
                     add_device_arguments, add_layout_arguments, add_model_arguments, add_sampling_arguments)

__all__ = ["add_parser", "add_arguments", "method_choices", "run", "TINY_AUDIOLDM", "PROFILE_GUIDE"]

# SaFa's r_guide when profiling: the reference swap in every profiled step (see the module docstring).
PROFILE_GUIDE = 1.0
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
    """The methods `safa profile --method` takes: the one list, safa.methods.METHODS."""
    from ..methods import METHODS
    return list(METHODS)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)  # --model (builtin:tiny-audioldm too), --window
    p.add_argument("--seconds", type=POSITIVE_NUMBER, default=None, help="audio length (default 30 for audio pipelines)")
    p.add_argument("--width", type=POSITIVE_INT, default=None, help="panorama width in pixels (image pipelines)")
    p.add_argument("--height", type=POSITIVE_INT, default=None, help="panorama height in pixels (image pipelines)")
    p.add_argument("--prompt", default="rain", help="the prompt (default rain: a class of the built-in model)")
    p.add_argument("--method", default="safa",
                   help=f"one of {', '.join(method_choices())}, optionally with parameters of its method object "
                        f"(e.g. safa_stats:snr=0.05, as generate and evaluate take them; default safa)")
    add_sampling_arguments(p, steps=4, steps_help="profiled steps (default 4)")
    add_layout_arguments(p)
    p.add_argument("--warmup", type=NONNEGATIVE_INT, default=2, help="steps of the warm-up call (default 2)")
    p.add_argument("--guide", type=float, default=None,
                   help=f"SaFa's r_guide (default {PROFILE_GUIDE:g} for safa: the reference swap in every profiled "
                        "step; generate's default is the method's 0.3)")
    p.add_argument("--compile", action="store_true", help="JointDiffusion(compile=True)")
    p.add_argument("--cuda-graphs", action="store_true", help="JointDiffusion(cuda_graphs=True) (CUDA only)")
    p.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads, >= 1 (default: torch's)")
    p.add_argument("--compare", action="store_true",
                   help="also run the hand-written per-view merge loop (safa_kernels.naive) and print both "
                        "side by side")
    p.add_argument("--trace", default="out/profile_trace.json",
                   help="Chrome trace path (default out/profile_trace.json; --compare adds .naive before .json; "
                        "'' for none)")
    add_device_arguments(p)


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


def _method(args: argparse.Namespace) -> Any:
    """The method object, with SaFa's guide at :data:`PROFILE_GUIDE` unless the spec or --guide sets it."""
    from ..methods import parse_method_spec, split_method_spec
    from ..profiling import NAIVE_METHODS
    name, spec_params = split_method_spec(args.method)
    guide = PROFILE_GUIDE if name == "safa" and args.guide is None and "guide" not in spec_params else args.guide
    method = parse_method_spec(args.method, guide=guide)
    if args.compare and name not in NAIVE_METHODS:
        raise ValueError(f"--compare: the naive merge implements {NAIVE_METHODS}, not {args.method!r}")
    return method


def _call_kwargs(args: argparse.Namespace, jd: Any, method: Any) -> Dict[str, Any]:
    window = None if args.model == BUILTIN_MODEL else args.window  # the built-in model was built for it
    kwargs: Dict[str, Any] = dict(prompt=args.prompt, method=method, num_inference_steps=args.steps,
                                  guidance_scale=args.guidance_scale, window=window, overlap=args.overlap,
                                  loop=args.loop, view_batch_size=args.view_batch_size)
    if jd.adapter.kind == "audio":
        kwargs["seconds"] = args.seconds if args.seconds is not None else 30.0
    elif jd.adapter.kind == "video":  # the length in seconds (whole frames), the frame size in pixels
        if args.seconds is None:
            raise ValueError("this is a video pipeline: give --seconds (frames / fps)")
        kwargs.update(seconds=args.seconds, width=args.width, height=args.height)
    else:
        if args.width is None:
            raise ValueError("this is an image pipeline: give --width")
        kwargs.update(width=args.width, height=args.height)
    return kwargs


def run(args: argparse.Namespace) -> int:
    """``safa profile``: print the breakdown(s); returns the exit code."""
    import torch

    from ..profiling import format_breakdown, format_comparison, naive_merge_step, profile_steps
    from ..sampler import JointDiffusion
    from .common import (check_backend, load_pipeline, overlap_notice, resolve_device, set_scheduler,
                         setup_logging, use_backend)

    method = _method(args)
    setup_logging(args.quiet)
    device = resolve_device(args.device)
    backend = check_backend(args.backend, device)  # before anything is printed or loaded
    if args.cuda_graphs and device.type != "cuda":
        raise ValueError(f"--cuda-graphs needs a CUDA device; this run is on {device}")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = (_fullsize(args.model) if args.model in FULLSIZE
            else load_pipeline(args.model, args.window if args.model == BUILTIN_MODEL else None))
    if args.scheduler:
        set_scheduler(pipe, args.scheduler)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    jd = JointDiffusion(pipe, compile=args.compile, cuda_graphs=args.cuda_graphs)
    kwargs = _call_kwargs(args, jd, method)
    layout = jd.layout_for(kwargs.get("seconds"), kwargs.get("width"), window=kwargs["window"],
                           overlap=args.overlap, loop=args.loop, method=method)
    if args.compare and layout.loop:
        raise ValueError("--compare: the naive merge handles open layouts only")
    overlap_notice(args.overlap, args.quiet)
    guide = getattr(method, "guide", None)
    print(f"{args.model}: {jd.describe_layout(layout)}, {args.method}"
          + (f" (guide {guide:g}: the reference swap in every profiled step)" if guide == PROFILE_GUIDE else "")
          + f", backend {backend}, seed {args.seed}, compile={args.compile}, cuda_graphs={args.cuda_graphs}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with use_backend(args.backend):
        ours = profile_steps(jd, kwargs, label="safa_kernels", warmup_steps=args.warmup, trace=args.trace or None,
                             seed=args.seed, quiet=args.quiet)
    print(format_breakdown(ours))
    if args.compare:
        trace = None if not args.trace else os.path.splitext(args.trace)[0] + ".naive.json"
        naive_jd = JointDiffusion(pipe, compile=args.compile, cuda_graphs=args.cuda_graphs,
                                  merge_step=naive_merge_step)
        naive = profile_steps(naive_jd, kwargs, label="naive eager", warmup_steps=args.warmup, trace=trace,
                              seed=args.seed, quiet=args.quiet)
        print()
        print(format_breakdown(naive))
        print()
        print(format_comparison(ours, naive))
    return 0
