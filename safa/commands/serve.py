"""``safa serve``: a web page for generating and evaluating, on this machine by default.

    safa serve                                  # the built-in model, http://127.0.0.1:7860
    safa serve --model path/to/audioldm --port 8000
    safa serve --host 0.0.0.0                   # reachable from other machines: see --host

The page (Gradio) takes a prompt, a length, a loop, the method and its parameters, the steps
and the seed (the advanced options folded away with their defaults), shows the progress of the
steps and of the decoding, and gives the audio (or the image), its annotated spectrogram, the
layout, the timings and the file; the session's earlier results are listed below. A second tab
runs ``safa evaluate``. Requests run one at a time through a visible queue; one that cannot fit
in memory is refused with the estimate, before any work; Cancel stops a request at its next
step and leaves no file. Files go to --results (default: a new temporary folder).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

from ..errors import CLIError
from .._checks import check_int_range
from .common import BUILTIN_MODEL, POSITIVE_INT, add_device_arguments, add_model_arguments, arg_type

__all__ = ["add_parser", "run", "DEFAULT_HOST", "DEFAULT_PORT"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
PORT = arg_type(int, lambda name, value: check_int_range(name, value, 0, 65535), "an int in [0, 65535]")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``serve`` on ``subparsers``."""
    p = subparsers.add_parser("serve", help="a web page (Gradio) to generate and evaluate",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}: this machine only). 0.0.0.0 listens on "
                        "every network interface: anyone who can reach this machine can then use the page and "
                        "its compute; there is no login")
    p.add_argument("--port", type=PORT, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--results", default=None,
                   help="folder for the generated files (default: a new temporary folder)")
    p.add_argument("--max-queue", type=POSITIVE_INT, default=16,
                   help="requests waiting at most; more are turned away until the queue shortens (default 16)")
    add_device_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """``safa serve``: serve until interrupted; returns the exit code."""
    try:
        from ..serve.app import launch
    except ImportError as exc:
        raise CLIError(f"safa serve needs gradio ({exc}): pip install -e '.[serve]' (or make serve)") from None
    import tempfile

    from ..sampler import JointDiffusion
    from ..serve.jobs import Studio
    from .common import check_backend, load_pipeline, resolve_device, setup_logging, use_backend

    setup_logging(args.quiet)
    # The web stack's own deprecation notices and unclosed-loop warnings say nothing to a user.
    warnings.filterwarnings("ignore", module="gradio")
    warnings.filterwarnings("ignore", category=ResourceWarning)
    device = resolve_device(args.device)
    check_backend(args.backend, device)  # before anything is loaded
    pipe = load_pipeline(args.model, args.window if args.model == BUILTIN_MODEL else None)
    jd = JointDiffusion(pipe)  # ValueError (unsupported pipeline) -> one line, exit 2
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)  # the page shows the progress
    results = args.results or tempfile.mkdtemp(prefix="safa-serve-")
    studio = Studio(jd, args.model, results, device=device)
    print(f"safa serve: {args.model} on {device}, files in {results}; http://{args.host}:{args.port} "
          f"(Ctrl-C stops it)", file=sys.stderr)
    with use_backend(args.backend):  # every request's merge
        launch(studio, host=args.host, port=args.port, max_queue=args.max_queue, quiet=args.quiet)
    return 0
