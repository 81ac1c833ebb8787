"""``safa evaluate``: exact seam-fidelity evaluation of the joint-diffusion methods with the built-in texture model.

The evaluation itself (what is sampled, what every column measures) is :mod:`safa.evaluate`;
this module is its command line: it checks the flags and the output paths before the (long)
evaluation, prints the table and writes it with the plot, atomically.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .._checks import check_int_range
from ..errors import CLIError
from ..files import write_text
from ..methods import METHODS
from .common import (NONNEGATIVE_NUMBER, POSITIVE_INT, POSITIVE_NUMBER, SEED, add_device_arguments,
                     add_guidance_argument, add_layout_arguments, arg_type)

__all__ = ["add_parser", "run", "ALL_METHODS"]

ALL_METHODS = tuple(METHODS)
# At least two samples per row: the table's intervals need them.
SAMPLES = arg_type(int, lambda name, value: check_int_range(name, value, 2), "an int >= 2")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``safa evaluate``."""
    p = subparsers.add_parser("evaluate", help="exact seam-fidelity evaluation with the built-in texture model",
                              description=_description(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help=f"comma-separated methods, each optionally with parameters of its method object, "
                        f"e.g. safa:guide=0.6 (default: all: {','.join(ALL_METHODS)})")
    p.add_argument("--scheduler", default=None,
                   help="diffusers scheduler class, e.g. DDIM, DPMSolverMultistep (default: the built-in "
                        "model's DPM-Solver++)")
    p.add_argument("--samples", type=SAMPLES, default=8, help="long samples per row, >= 2 (default 8)")
    p.add_argument("--seconds", type=POSITIVE_NUMBER, default=40.0, help="length of each sample (default 40)")
    p.add_argument("--steps", type=POSITIVE_INT, default=25, help="denoising steps (default 25)")
    p.add_argument("--prompts", default="", help="comma-separated texture classes (default: all, round-robin)")
    add_layout_arguments(p, view_batch_size=False)
    add_guidance_argument(p, 1.0, "the exact conditional denoiser needs none")
    p.add_argument("--window", type=POSITIVE_NUMBER, default=None,
                   help="window in seconds: the built-in model is built for it (default its native 10.24 s)")
    p.add_argument("--min-eigenvalue", type=NONNEGATIVE_NUMBER, default=1.0,
                   help="whitened directions counted in the KL columns (default 1.0)")
    p.add_argument("--seed", type=SEED, default=0,
                   help="seed of the first sample; sample i of every method starts from seed + i, so the rows "
                        "are paired on the same noise (default 0)")
    p.add_argument("--task", choices=("seams", "continue", "timeline", "seams2d"), default="seams",
                   help="seams: the methods' seams (default); continue: continue a clip drawn from the model "
                        "against the exact conditional (table only; --samples per prompt); timeline: a timeline of "
                        "--prompts (default rain,wind,surf) in equal spans over --seconds against per-view prompts, "
                        "crossfaded spans and MultiDiffusion (docs/timelines.md); seams2d: 2-D seams of "
                        "the grid methods on images of tiles x tiles tiles of the 2-D texture model, open and torus, "
                        "DDIM 200 and DPM-Solver++ 25 steps, or --scheduler with --steps (seams2d.txt, seams2d.png)")
    p.add_argument("--tiles", type=POSITIVE_INT, default=3,
                   help="--task seams2d: tiles per side of each canvas, 2 to 16 (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="--task seams2d: 2 canvases per row, DDIM 20 and DPM-Solver++ 10 steps (a smoke run)")
    p.add_argument("--transition", type=NONNEGATIVE_NUMBER, default=4.0,
                   help="--task timeline: seconds of each transition (default 4)")
    p.add_argument("--clip-seconds", type=POSITIVE_NUMBER, default=10.0,
                   help="--task continue: the clip's length in seconds (default 10)")
    p.add_argument("--rows", default=None,
                   help="--task continue: comma-separated rows (default all: true, one window, crossfade, "
                        "multidiffusion, safa, 'safa, own X^0' as own-x0, multidiffusion + resample as "
                        "multidiffusion+resample, safa + resample as safa+resample)")
    p.add_argument("--resample", type=POSITIVE_INT, default=3, metavar="N",
                   help="--task continue: the resample rows' runs of each resampled step (default 3)")
    p.add_argument("--resample-until", type=POSITIVE_NUMBER, default=0.5,
                   help="--task continue: the fraction of the steps, from the first, that are resampled (default 0.5)")
    p.add_argument("--guide", type=POSITIVE_NUMBER, default=None,
                   help="--task continue: SaFa's guidance window, a fraction of the steps (default the method's)")
    p.add_argument("--out", default="out", help="output directory for evaluate.txt and evaluate.png (default out/)")
    p.add_argument("--plot", default=None, help="the plot's path, a .png (default: evaluate.png in --out)")
    add_device_arguments(p)
    p.set_defaults(func=run)
    return p


def _description() -> str:
    # The library's docstring explains the columns; read from its file so that --help imports no torch.
    import ast
    import importlib.util
    spec = importlib.util.find_spec("safa.evaluate")
    if spec is None or spec.origin is None:
        return __doc__ or ""
    with open(spec.origin, encoding="utf-8") as f:
        return ast.get_docstring(ast.parse(f.read())) or ""


def run(args: argparse.Namespace) -> int:
    """``safa evaluate``: print the table and write it with the plot (atomically)."""
    from ..evaluate import evaluate, format_table, write_plot
    from ..files import check_output_path, check_writable
    from .common import check_backend, overlap_notice, resolve_device, setup_logging, use_backend

    setup_logging(args.quiet)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    prompts = [p.strip() for p in args.prompts.split(",") if p.strip()] or None
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CLIError(f"--out {args.out} is a file: give a directory for evaluate.txt and evaluate.png")
    stem = "seams2d" if args.task == "seams2d" else "evaluate"
    table_path = os.path.join(args.out, f"{stem}.txt")
    plot = args.plot or os.path.join(args.out, f"{stem}.png")
    if args.plot is not None:
        check_output_path(plot, kinds=("image",), name="--plot")
    if args.task == "seams2d":
        _check_seams2d(args)
    device = resolve_device(args.device)
    check_backend(args.backend, device)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"cannot create --out {args.out}: {exc.strerror or exc}") from None
    for path in (table_path, plot):  # fail before the (long) evaluation, not after it
        try:
            check_writable(path)
        except OSError as exc:
            raise CLIError(f"cannot write {path}: {exc}") from None
    overlap_notice(args.overlap, args.quiet)
    if args.task == "continue":
        with use_backend(args.backend):
            return _run_continue(args, prompts, table_path)
    if args.task == "seams2d":
        with use_backend(args.backend):
            return _run_seams2d(args, methods, prompts, device)
    if args.task == "timeline":
        with use_backend(args.backend):
            return _run_timeline(args, prompts, table_path, plot)
    with use_backend(args.backend):
        res = evaluate(methods, samples=args.samples, seconds=args.seconds, steps=args.steps, prompts=prompts,
                       loop=args.loop, overlap=args.overlap, guidance_scale=args.guidance_scale, seed=args.seed,
                       window=args.window, min_eigenvalue=args.min_eigenvalue, scheduler=args.scheduler,
                       device=device, log=_log(args))
    table = format_table(res)
    print(table)
    write_text(table_path, table)
    write_plot(res, plot)
    print(f"wrote {table_path}, {plot}")
    return 0


def _log(args: argparse.Namespace) -> Any:
    """Progress lines to stderr, or None with --quiet."""
    return None if args.quiet else (lambda m: print(m, file=sys.stderr))


def _run_continue(args: argparse.Namespace, prompts: Any, table_path: str) -> int:
    """``safa evaluate --task continue``: the continuation table (safa.evaluate.evaluate_continuation), printed and
    written."""
    from ..evaluate import evaluate_continuation, format_continuation_table
    from ..evaluate import CONTINUE_ROWS
    names = {r: r for r in CONTINUE_ROWS if "," not in r}
    names.update({"own-x0": "safa, own X^0", "multidiffusion+resample": "multidiffusion + resample",
                  "safa+resample": "safa + resample"})
    rows = CONTINUE_ROWS
    if args.rows is not None:
        rows = [r.strip() for r in args.rows.split(",") if r.strip()]
        unknown = [r for r in rows if r not in names]
        if unknown:
            raise CLIError(f"--rows: unknown {', '.join(unknown)}; choose from {', '.join(sorted(names))}")
        rows = [names[r] for r in rows]
    try:
        res = evaluate_continuation(prompts or ("rain", "wind", "surf"), samples=args.samples,
                                    clip_seconds=args.clip_seconds, seconds=args.seconds, steps=args.steps,
                                    scheduler=args.scheduler, seed=args.seed, min_eigenvalue=args.min_eigenvalue,
                                    rows=rows, resample_steps=args.resample, resample_until=args.resample_until,
                                    guide=args.guide, log=_log(args))
    except ValueError as exc:
        raise CLIError(str(exc).splitlines()[0]) from None
    table = format_continuation_table(res)
    print(table)
    write_text(table_path, table)
    print(f"wrote {table_path}")
    return 0


def _check_seams2d(args: argparse.Namespace) -> None:
    """The flags ``--task seams2d`` takes, checked before any work (one line each)."""
    if args.loop:
        raise CLIError("--loop: --task seams2d measures both the open canvas and the torus; drop --loop")
    if not 2 <= args.tiles <= 16:
        raise CLIError(f"--tiles must be an int in [2, 16], got {args.tiles}")
    if args.seconds != 40.0 or args.window is not None:
        raise CLIError("--seconds / --window are for the audio tasks; --task seams2d takes --tiles (32 x 32 tiles)")


def _run_seams2d(args: argparse.Namespace, methods: Any, prompts: Any, device: Any) -> int:
    """``safa evaluate --task seams2d`` (safa.evaluate2d): per scheduler setting, the open canvas and the
    torus; the tables printed and written, the figure written."""
    from ..evaluate2d import (GRID_METHODS, QUICK_SETTINGS, SEAMS2D_SETTINGS, evaluate_seams2d, format_seams2d_table,
                              write_seams2d_plot)
    if args.methods == ",".join(ALL_METHODS):  # the default: the methods that have a grid form
        methods = list(GRID_METHODS)
    settings = QUICK_SETTINGS if args.quick else SEAMS2D_SETTINGS
    if args.scheduler is not None:
        settings = ((args.scheduler, args.steps),)
    samples = 2 if args.quick else args.samples
    log = _log(args)
    results, tables = [], []
    for scheduler, steps in settings:
        for loop in (False, True):
            res = evaluate_seams2d(methods, samples=samples, tiles=args.tiles, steps=steps, scheduler=scheduler,
                                   prompts=prompts, loop=loop, overlap=args.overlap, seed=args.seed,
                                   min_eigenvalue=args.min_eigenvalue, guidance_scale=args.guidance_scale,
                                   device=device, log=log)
            results.append(res)
            tables.append(format_seams2d_table(res))
            print(tables[-1] + "\n")
    table_path = os.path.join(args.out, "seams2d.txt")
    plot = args.plot or os.path.join(args.out, "seams2d.png")
    write_text(table_path, "\n\n".join(tables))
    write_seams2d_plot(results, plot)
    print(f"wrote {table_path}, {plot}")
    return 0


def _run_timeline(args: argparse.Namespace, prompts: Any, table_path: str, plot: str) -> int:
    """``safa evaluate --task timeline``: the table and plot of safa.timeline_eval, printed and written."""
    from ..timeline_eval import evaluate_timeline, format_timeline_table, write_timeline_plot
    res = evaluate_timeline(prompts or ("rain", "wind", "surf"), seconds=args.seconds, transition=args.transition,
                            samples=args.samples, steps=args.steps, scheduler=args.scheduler, seed=args.seed,
                            log=_log(args))
    table = format_timeline_table(res)
    print(table)
    write_text(table_path, table)
    write_timeline_plot(res, plot)
    print(f"wrote {table_path}, {plot}")
    return 0
