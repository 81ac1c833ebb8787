"""``safa generate``: long-form audio (or a panorama) from a diffusers pipeline by joint diffusion.

    safa generate --model DIR_OR_ID --prompt "rain" [--prompt ... one per view] --seconds 60 \\
        --method safa --loop --steps 200 --guidance 2.5 --seed 0 --out rain.wav

Writes WAV/FLAC (audio) plus ``<out>.png``, a spectrogram with the views' windows and
overlaps marked, or a PNG (images). Files are written atomically.

Under ``torchrun --nproc-per-node N -m safa generate ...`` (the same flags) the views are
spread over N processes: NCCL on ``cuda:LOCAL_RANK`` when CUDA is available, else gloo on
the CPU (docs/distributed.md). Rank 0 shows the progress and writes the files; the other
ranks print nothing unless they fail, and nothing is written unless every rank succeeded.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Optional

from ..audio_io import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, check_writable, write_audio, write_image, write_spectrogram
from ..cli import CLIError
from ..methods import METHODS

__all__ = ["add_parser", "run", "load_pipeline", "set_scheduler", "BUILTIN_MODEL"]

# The default --model: the built-in analytic texture model (no weights, no downloads).
BUILTIN_MODEL = "builtin:texture"
# Pipeline classes that are not in diffusers: module that exports them.
_CUSTOM_PIPELINE_MODULES = ("safa.texture",)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``generate`` on ``subparsers``."""
    p = subparsers.add_parser("generate", help="generate long audio / a panorama",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=BUILTIN_MODEL,
                   help=f"local diffusers pipeline directory or cached hub id (default {BUILTIN_MODEL}: "
                        "the built-in analytic texture model)")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt; repeat once per view for per-view prompts (default: empty prompt)")
    p.add_argument("--negative-prompt", default=None, help="negative prompt shared by all views")
    p.add_argument("--reference-prompt", default=None,
                   help="prompt of SaFa's reference window (default: the first prompt)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--seconds", type=float, default=None, help="audio length in seconds")
    length.add_argument("--width", type=int, default=None, help="panorama width in pixels")
    p.add_argument("--height", type=int, default=None,
                   help="panorama height in pixels (default: the model's native window height)")
    p.add_argument("--method", choices=tuple(METHODS), default="safa", help="joint diffusion method (default safa)")
    p.add_argument("--loop", action="store_true", help="seamless loop / 360-degree panorama")
    p.add_argument("--steps", type=int, default=200, help="denoising steps (default 200)")
    p.add_argument("--guidance", type=float, default=2.5, help="classifier-free guidance scale (default 2.5)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--scheduler", default=None,
                   help="diffusers scheduler class, e.g. DDIM, DPMSolverMultistep, EulerDiscrete (default: the model's)")
    p.add_argument("--window", type=float, default=None,
                   help="window: seconds for audio, latent columns for images (default: the model's native one)")
    p.add_argument("--overlap", type=float, default=0.2, help="overlap rate (default 0.2)")
    p.add_argument("--swap-interval", type=int, default=None,
                   help="swap interval w_swap of the swap methods (default: the method's, 1)")
    p.add_argument("--guide", type=float, default=None,
                   help="SaFa's reference guidance step rate r_guide (default: the method's, 0.3)")
    p.add_argument("--view-batch-size", type=int, default=None, help="windows per model call (default all)")
    p.add_argument("--decode", choices=("full", "views", "tiled"), default="full", help="decoding (default full)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--out", default=None, help="output file: .wav/.flac for audio, .png for images "
                                               "(default out.wav / out.png)")
    p.add_argument("--no-spectrogram", action="store_true", help="do not write the spectrogram PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bars or library warnings")
    p.add_argument("--dist-timeout", type=float, default=600.0,
                   help="under torchrun: seconds a rank waits for the others before it gives up (default 600)")
    p.set_defaults(func=run)
    return p


def _looks_like_path(model: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else that is not a directory is a path.
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model


def load_pipeline(model: str) -> Any:
    """Load ``model``: the built-in texture model, a local pipeline directory, or a cached hub id.

    Raises :class:`CLIError` for a missing directory, a directory that is not a pipeline,
    an unsupported pipeline class (checked before loading any weights) or an unknown id.
    """
    from ..adapters import load_all, registered_adapters
    load_all()
    supported = ", ".join(sorted(registered_adapters()))
    if model == BUILTIN_MODEL:
        from safa.texture import make_texture_pipeline
        return make_texture_pipeline()
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        index_file = os.path.join(path, "model_index.json")
        if not os.path.isfile(index_file):
            raise CLIError(f"{model} is not a diffusers pipeline directory (no model_index.json)")
        with open(index_file) as f:
            class_name = json.load(f).get("_class_name")
        if class_name not in registered_adapters():
            raise CLIError(f"unsupported pipeline {class_name} in {model}; supported: {supported}")
        import diffusers
        cls = getattr(diffusers, class_name, None)
        for module_name in _CUSTOM_PIPELINE_MODULES:
            if cls is None:
                import importlib
                cls = getattr(importlib.import_module(module_name), class_name, None)
        if cls is None:
            raise CLIError(f"pipeline class {class_name} in {model} cannot be imported")
        return cls.from_pretrained(path)
    if os.path.exists(path):
        raise CLIError(f"model {model} is a file, not a pipeline directory")
    if _looks_like_path(model):
        raise CLIError(f"model directory {model} does not exist")
    from diffusers import DiffusionPipeline
    try:  # offline first: a cached hub id must work without a network
        return DiffusionPipeline.from_pretrained(model, local_files_only=True)
    except Exception as exc:  # noqa: BLE001  (diffusers raises many types here)
        raise CLIError(f"model {model} is neither a local directory nor a cached hub id "
                       f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def set_scheduler(pipe: Any, name: str) -> None:
    """Replace ``pipe.scheduler`` by the diffusers scheduler ``name`` (``DDIM`` or ``DDIMScheduler``), same config."""
    import diffusers
    wanted = name.lower().removesuffix("scheduler")
    choices = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and n != "SchedulerMixin"
                     and isinstance(getattr(diffusers, n, None), type))
    for cls_name in choices:
        if cls_name.lower().removesuffix("scheduler") == wanted:
            pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config)
            return
    raise CLIError(f"unknown scheduler {name!r}; choose one of: "
                   + ", ".join(c.removesuffix("Scheduler") for c in choices))


def _quiet() -> None:
    """No loading bars, deprecation notices or warnings: stderr is for errors only."""
    import warnings

    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog
    for log in (dlog, tlog):
        log.disable_progress_bar()
        log.set_verbosity_error()
    warnings.filterwarnings("ignore")


def run(args: argparse.Namespace) -> int:
    """``safa generate``: returns the exit code."""
    from .. import distributed

    if not args.dist_timeout > 0:
        raise CLIError(f"--dist-timeout must be > 0 seconds, got {args.dist_timeout}")
    # torchrun's environment -> the default process group (None in a plain run).
    launched = distributed.init_from_environment(args.dist_timeout, args.device)
    if launched is None:
        return _generate(args, None, args.device)
    group, device = launched
    try:
        return _generate(args, group, str(device))
    finally:
        import torch.distributed as dist
        dist.destroy_process_group()


def _generate(args: argparse.Namespace, group: Any, device: Optional[str]) -> int:
    from .. import distributed

    rank = 0 if group is None else group.rank()
    if rank != 0:  # rank 0 speaks for every rank
        _quiet()
    error: Optional[BaseException] = None
    try:
        jd, out, device = _prepare(args, group, rank, device)
    except Exception as exc:  # noqa: BLE001  (every rank learns of it in agree(), then it is raised)
        error = exc
    # A rank that cannot start (a missing model on its node, rank 0's unwritable --out) stops
    # every rank here, before the generation, instead of leaving them waiting.
    distributed.agree(group, error)
    return _generate_and_write(args, jd, out, device, rank)


def _prepare(args: argparse.Namespace, group: Any, rank: int, device: Optional[str]) -> Any:
    """Everything before the generation: checks, the pipeline, the scheduler, the device.

    Returns ``(JointDiffusion, output path, device)``."""
    import torch

    from ..sampler import JointDiffusion

    out: Optional[str] = args.out
    if out is not None:
        ext = os.path.splitext(out)[1].lower()
        if ext not in AUDIO_EXTENSIONS + IMAGE_EXTENSIONS:
            raise CLIError(f"--out must end in one of {AUDIO_EXTENSIONS + IMAGE_EXTENSIONS}, got {out!r}")
        try:  # fail before the (long) generation, not after it (rank 0 writes)
            if rank == 0:
                check_writable(out)
        except OSError as exc:
            raise CLIError(f"cannot write --out {out}: {exc}") from None
    if args.quiet:
        _quiet()
    pipe = load_pipeline(args.model)
    jd = JointDiffusion(pipe, process_group=group)  # ValueError (unsupported pipeline) -> exit 2
    kind = jd.adapter.kind
    out = out or ("out.wav" if kind == "audio" else "out.png")
    ext = os.path.splitext(out)[1].lower()
    if kind == "audio" and ext not in AUDIO_EXTENSIONS:
        raise CLIError(f"audio output must end in one of {AUDIO_EXTENSIONS}, got {out!r}")
    if kind == "image" and ext not in IMAGE_EXTENSIONS:
        raise CLIError(f"image output must end in .png, got {out!r}")
    if args.out is None and rank == 0:
        try:
            check_writable(out)
        except OSError as exc:
            raise CLIError(f"cannot write --out {out}: {exc}") from None
    if kind == "audio" and args.seconds is None:
        raise CLIError("this is an audio pipeline: give --seconds")
    if kind == "image" and args.width is None:
        raise CLIError("this is an image pipeline: give --width")
    if args.scheduler:
        set_scheduler(pipe, args.scheduler)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=args.quiet or rank != 0)
    return jd, out, device


def _generate_and_write(args: argparse.Namespace, jd: Any, out: str, device: str, rank: int) -> int:
    import torch

    kind = jd.adapter.kind
    prompts = args.prompt or [""]
    started = time.perf_counter()
    result = jd(prompts if len(prompts) > 1 else prompts[0], seconds=args.seconds, width=args.width,
                height=args.height,
                method=args.method, loop=args.loop, num_inference_steps=args.steps,
                guidance_scale=args.guidance, negative_prompt=args.negative_prompt,
                reference_prompt=args.reference_prompt,
                generator=torch.Generator(device=device).manual_seed(args.seed), window=args.window,
                overlap=args.overlap, swap_interval=args.swap_interval, guide=args.guide,
                view_batch_size=args.view_batch_size, decode=args.decode)
    elapsed = time.perf_counter() - started
    if rank != 0:  # the result is on rank 0, which writes it
        return 0
    layout = result.layout
    if kind == "audio":
        audio = result.audio[0]
        write_audio(out, audio, result.sample_rate)
        written = [out]
        if not args.no_spectrogram:
            spec_path = os.path.splitext(out)[0] + ".png"
            fps = jd.adapter.frames_per_second
            spans = [(s / fps, (s + layout.window) / fps) for s in layout.starts]
            write_spectrogram(spec_path, audio, result.sample_rate, spans, duration=args.seconds, loop=layout.loop)
            written.append(spec_path)
        what = f"{audio.shape[-1] / result.sample_rate:.2f} s at {result.sample_rate} Hz"
    else:
        write_image(out, result.images[0])
        written = [out]
        what = f"{result.images[0].size[0]}x{result.images[0].size[1]} px"
    print(f"wrote {', '.join(written)}: {what}, {layout.num_views} views of {layout.window} latent columns "
          f"(overlap {layout.overlap}, {'loop' if layout.loop else 'open'}), {args.method}, "
          f"{args.steps} steps in {elapsed:.1f} s")
    return 0
