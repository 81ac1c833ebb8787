"""``safa generate``: long-form audio (or a panorama, or a long video) from a diffusers pipeline by joint diffusion.

    safa generate --model DIR_OR_ID --prompt "rain" --seconds 40 \\
        --method safa --loop --steps 200 --guidance-scale 2.5 --seed 0 --out rain.wav
    safa generate --view-prompt rain --view-prompt wind --view-prompt calm --seconds 24 ...
    safa generate --model DIR --prompt "a castle" --image wide.png --strength 0.3 --out castle.png
    safa generate --model DIR --prompt "a castle" --image photo.png --width 4096 --at 1024 --loop --out pano.png
    safa generate --model CONTROLNET_DIR --prompt "a castle" --control-image edges.png --out castle.png
    safa generate --model X4_UPSCALER_DIR --prompt "a castle" --image small.png --out castle_x4.png
    safa generate --model WAN_DIR --prompt "waves" --frames 241 --width 832 --height 480 --out waves.mp4
    safa generate --timeline 0:rain --timeline 30:thunderstorm --timeline 45:calm --transition 4 --seconds 60 ...
    safa generate --prompt "a forest" --region "64,128,448,512:a red deer" --width 2048 ...

Writes WAV/FLAC (audio) plus ``<out>.png``, a spectrogram (time in s, mel frequency in Hz,
dB colour bar) with the views' windows and overlaps marked, a PNG (images) or an MP4 (video,
written frame by frame as the frames are decoded; docs/video.md). Files are
written atomically, and the free space is checked for both before any work. Long audio is
decoded in tiles and each tile is appended to the file as it is finished, so hours fit in
memory (docs/long-audio.md); a request that cannot fit is refused before any work, with
what to change. Arguments not given take the pipeline's own defaults, as the Python call
(``--steps``: 10 for AudioLDM, 50 for the built-in model; the paper ran audio at 200).

Under ``torchrun --nproc-per-node N -m safa generate ...`` (the same flags) the views are
spread over N processes: NCCL on ``cuda:LOCAL_RANK`` when CUDA is available, else gloo on
the CPU (docs/distributed.md). Rank 0 shows the progress and writes the files; the other
ranks print nothing unless they fail, and nothing is written unless every rank succeeded.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from ..errors import CLIError
from ..methods import METHODS
from .common import (BUILTIN_MODEL, NONNEGATIVE_NUMBER, POSITIVE_INT, POSITIVE_NUMBER, add_device_arguments,
                     add_layout_arguments, add_model_arguments, add_sampling_arguments, arg_type, check_backend,
                     load_pipeline, overlap_notice, resolve_device, set_scheduler, setup_logging, use_backend)

__all__ = ["add_parser", "run", "BUILTIN_MODEL", "DECODE_CHOICES"]



def _unit_fraction(name: str, value: float) -> float:
    """A fraction in (0, 1] (--resample-until), else ValueError."""
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return value


UNIT_FRACTION = arg_type(float, _unit_fraction, "a number in (0, 1]")
# safa.decode.DECODE_MODES, named here so that --help does not import torch (a test keeps them equal).
DECODE_CHOICES = ("auto", "full", "views", "tiled", "tiled-disk")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``generate`` on ``subparsers``."""
    p = subparsers.add_parser("generate", help="generate long audio / a panorama",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--prompt", default="", help="the prompt of every view (default: empty)")
    p.add_argument("--view-prompt", action="append", default=None,
                   help="a prompt per view instead of --prompt: repeat once per view, in order")
    p.add_argument("--timeline", action="append", default=None, metavar="START:PROMPT",
                   help="audio: a span of the timeline, from START seconds to the next span's start (repeat, "
                        "starting at 0; instead of --prompt); independent of the views")
    p.add_argument("--transition", type=NONNEGATIVE_NUMBER, default=None,
                   help="--timeline: seconds of the linear ramp centred on each span boundary (default: 2, or the "
                        "shortest span)")
    p.add_argument("--region", action="append", default=None, metavar="TOP,LEFT,BOTTOM,RIGHT:PROMPT",
                   help="images: a box in pixels (or MASK.png:PROMPT, white inside) with its own prompt over the "
                        "--prompt background (repeat)")
    p.add_argument("--bootstrap", type=NONNEGATIVE_NUMBER, default=None,
                   help="--region: fraction of the steps with MultiDiffusion's bootstrapping (default 0.2)")
    p.add_argument("--negative-prompt", default=None, help="negative prompt (default: the pipeline's own)")
    p.add_argument("--reference-prompt", default=None,
                   help="prompt of SaFa's reference window (default: the first view's)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--seconds", type=POSITIVE_NUMBER, default=None, help="audio (or video) length in seconds")
    length.add_argument("--frames", type=POSITIVE_INT, default=None,
                        help="video length in frames (video pipelines; e.g. 4k + 1 for Wan, 4k for a loop)")
    p.add_argument("--width", type=POSITIVE_INT, default=None,
                   help="panorama width in pixels (a video's frame width: default the pipeline's)")
    p.add_argument("--height", type=POSITIVE_INT, default=None,
                   help="panorama height in pixels (default: the model's native window height; a video's frame "
                        "height: default the pipeline's)")
    p.add_argument("--method", default="safa",
                   help=f"joint diffusion method: one of {', '.join(METHODS)}, optionally with parameters of its "
                        f"method object, e.g. safa:guide=0.5 or safa_stats:snr=0.05 (default safa)")
    add_sampling_arguments(p)
    add_layout_arguments(p)
    p.add_argument("--audio", default=None, help="your own WAV/FLAC clip to continue / extend / fill / loop "
                                                 "(resampled to the model's rate; its samples kept exactly)")
    p.add_argument("--at", type=NONNEGATIVE_NUMBER, default=0.0,
                   help="--audio: where the clip starts, seconds; --image narrower than --width (outpainting): "
                        "its left edge, pixels, a multiple of 8 (default 0)")
    p.add_argument("--keep", action="append", default=None, metavar="START:END",
                   help="--audio: a range of the output (seconds) to keep from the clip (repeat; default all of it)")
    p.add_argument("--crossfade", type=NONNEGATIVE_NUMBER, default=None,
                   help="crossfade at each junction with your clip (--audio: seconds, default 0.05) or image "
                        "(outpainting: pixels, default 16)")
    p.add_argument("--resample", type=POSITIVE_INT, default=1, metavar="N",
                   help="RePaint's resampling: each of the first --resample-until of the steps runs N times, jumping "
                        "back to its noise level between runs (default 1: off; DDIM, DDPM, Euler, DPM-Solver++)")
    p.add_argument("--resample-until", type=UNIT_FRACTION, default=1.0,
                   help="--resample: the fraction of the steps, from the first, that are resampled (default 1)")
    p.add_argument("--image", default=None,
                   help="an RGB image for the whole canvas: img2img's input (SD, SDXL; with --strength) or the x4 "
                        "upscaler's low-resolution input; it sets the output size (never resized). On SD / SDXL "
                        "an image narrower than --width (no --strength) is outpainted: kept at --at px, the rest "
                        "generated around it (--loop: a 360-degree panorama)")
    p.add_argument("--strength", type=NONNEGATIVE_NUMBER, default=None,
                   help="--image on SD / SDXL: how much of the image is regenerated, in [0, 1] (default 0.8)")
    p.add_argument("--control-image", default=None,
                   help="a ControlNet pipeline's control image for the whole canvas (each view takes its crop)")
    p.add_argument("--control-scale", type=float, default=None,
                   help="--control-image: controlnet_conditioning_scale (default 1.0)")
    p.add_argument("--noise-level", type=int, default=None,
                   help="the x4 upscaler's noise_level on its low-resolution --image (default the pipeline's, 20)")
    p.add_argument("--swap-interval", type=POSITIVE_INT, default=None,
                   help="swap interval w_swap of the swap methods (default: the method's, 1)")
    p.add_argument("--guide", type=float, default=None,
                   help="SaFa's reference guidance step rate r_guide (default: the method's, 0.3)")
    p.add_argument("--decode", choices=DECODE_CHOICES, default="auto",
                   help="decoding (default auto: the whole latent up to 4 windows, in tiles beyond, streamed to --out; "
                        "images: tiled-disk, the tiles in temporary files, when even the in-memory tiles do not fit)")
    p.add_argument("--out", default=None, help="output file: .wav/.flac for audio, .png for images, .mp4 for video "
                                               "(default out.wav / out.png / out.mp4)")
    p.add_argument("--no-spectrogram", action="store_true", help="do not write the spectrogram PNG")
    p.add_argument("--dist-timeout", type=POSITIVE_NUMBER, default=600.0,
                   help="under torchrun: seconds a rank waits for the others before it gives up (default 600)")
    add_device_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """``safa generate``: returns the exit code."""
    from .. import distributed

    # torchrun's environment -> the default process group (None in a plain run).
    launched = distributed.init_from_environment(args.dist_timeout, args.device)
    if launched is None:
        return _generate(args, None, None)
    group, device = launched
    try:
        return _generate(args, group, device)
    finally:
        import torch.distributed as dist
        dist.destroy_process_group()


def _generate(args: argparse.Namespace, group: Any, device: Any) -> int:
    from .. import distributed

    rank = 0 if group is None else group.rank()
    error: Optional[BaseException] = None
    try:
        prepared = _prepare(args, group, rank, device)
    except Exception as exc:  # noqa: BLE001  (every rank learns of it in agree(), then it is raised)
        error = exc
    # A rank that cannot start (a missing model on its node, rank 0's unwritable --out) stops
    # every rank here, before the generation, instead of leaving them waiting.
    distributed.agree(group, error)
    with use_backend(args.backend):
        return _generate_and_write(args, *prepared, rank)


def _prepare(args: argparse.Namespace, group: Any, rank: int,
             device: Any) -> Tuple[Any, str, Any, Dict[str, Any]]:
    """Everything before the generation: checks, the pipeline, the scheduler, the device.

    Returns ``(JointDiffusion, output path, device, the call's arguments)``; rank 0 alone checks the output path
    (it alone writes)."""
    from ..files import check_output_path
    from ..sampler import JointDiffusion

    call = _call_arguments(args)  # a bad --method / --guide fails here, before the model loads
    if args.view_prompt and args.prompt:
        raise CLIError("give either --prompt or --view-prompt (repeated), not both")
    _prompt_arguments(args)  # a malformed --timeline / --region fails here, before the model loads
    if args.out is not None and rank == 0:  # fail before the (long) generation, not after it
        check_output_path(args.out, name="--out")
    setup_logging(args.quiet or rank != 0)  # rank 0 speaks for every rank
    device = device if device is not None else resolve_device(args.device)
    check_backend(args.backend, device)
    pipe = load_pipeline(args.model, args.window if args.model == BUILTIN_MODEL else None)
    jd = JointDiffusion(pipe, process_group=group)  # ValueError (unsupported pipeline) -> exit 2
    kind = jd.adapter.kind
    call.update(_image_arguments(args, jd.adapter, call))
    out = args.out or {"audio": "out.wav", "image": "out.png", "video": "out.mp4"}[kind]
    if rank == 0:
        check_output_path(out, kinds=(kind,), name="--out")
    _video_length(args, jd, call)
    if kind == "audio" and args.seconds is None:
        raise CLIError("this is an audio pipeline: give --seconds")
    if kind == "image" and call["width"] is None:
        raise CLIError("this is an image pipeline: give --width (or --image / --control-image)")
    if args.scheduler:
        set_scheduler(pipe, args.scheduler)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=args.quiet or rank != 0)
    # A request that cannot fit fails here, before the layout (or anything long) is built.
    jd.estimate_memory(**{k: v for k, v in call.items() if k not in _IMAGE_CALL}, output_path=out, check=True)
    if rank == 0 and kind == "audio":
        _check_free_space(args, jd, out)
    overlap_notice(args.overlap, args.quiet or rank != 0)
    return jd, out, device, call


def _video_length(args: argparse.Namespace, jd: Any, call: Dict[str, Any]) -> None:
    """``--frames`` as the call's seconds (frames / the pipeline's fps): video pipelines only."""
    if jd.adapter.kind != "video":
        if args.frames is not None:
            raise CLIError(f"--frames is for video pipelines; this is an {jd.adapter.kind} pipeline")
        return
    if args.frames is None and args.seconds is None:
        raise CLIError("this is a video pipeline: give --frames (or --seconds)")
    if args.frames is not None:
        args.seconds = call["seconds"] = jd.adapter.seconds_for_frames(args.frames)


def _spectrogram_path(args: argparse.Namespace, out: str) -> Optional[str]:
    return None if args.no_spectrogram else os.path.splitext(out)[0] + ".png"


def _check_free_space(args: argparse.Namespace, jd: Any, out: str) -> None:
    """The audio file and its spectrogram PNG fit on the disk, checked together before any work."""
    from ..audio_io import audio_file_bytes
    from ..files import check_free_space
    from ..plots import spectrogram_png_bytes
    needs = {out: audio_file_bytes(out, jd.adapter.output_length(seconds=args.seconds),
                                   jd.adapter.output_elements_per_column())}
    spec_path = _spectrogram_path(args, out)
    if spec_path is not None:
        needs[spec_path] = spectrogram_png_bytes()
    try:
        check_free_space(needs)
    except OSError as exc:
        raise CLIError(f"not enough disk space for --out: {exc}") from None


def _call_arguments(args: argparse.Namespace) -> Dict[str, Any]:
    """The arguments of the JointDiffusion call that the memory estimate also takes."""
    from ..methods import parse_method_spec
    window = None if args.model == BUILTIN_MODEL else args.window  # the built-in model was built for it
    method = parse_method_spec(args.method, guide=args.guide, swap_interval=args.swap_interval)
    return dict(seconds=args.seconds, width=args.width, height=args.height, method=method, loop=args.loop,
                guidance_scale=args.guidance_scale, window=window, overlap=args.overlap,
                view_batch_size=args.view_batch_size, decode=args.decode)


def _generate_and_write(args: argparse.Namespace, jd: Any, out: str, device: Any, call: Dict[str, Any],
                        rank: int) -> int:
    import torch

    kind = jd.adapter.kind
    prompt_args = _prompt_arguments(args)
    layout = jd.layout_for(args.seconds, call["width"], height=call["height"], window=call["window"],
                           overlap=args.overlap, loop=args.loop, method=call["method"])
    if not args.quiet and rank == 0:
        print(f"layout: {jd.describe_layout(layout)}", file=sys.stderr)
    spectrogram = None
    spec_path = _spectrogram_path(args, out) if kind == "audio" else None
    if spec_path is not None:
        from ..spectrogram import SpectrogramAccumulator
        samples = jd.adapter.output_length(seconds=args.seconds)
        # Fed with every decoded piece as it is written: the waveform is never held whole.
        spectrogram = SpectrogramAccumulator(jd.sample_rate, samples / jd.sample_rate)
    steps = args.steps or jd.adapter.pipeline_default("num_inference_steps", 50)  # as the Python call
    started = time.perf_counter()
    result = jd(**call, num_inference_steps=steps, negative_prompt=args.negative_prompt,
                reference_prompt=args.reference_prompt, generator=torch.Generator(device=device).manual_seed(args.seed),
                output_path=out, **_known_arguments(args), resample_steps=args.resample,
                resample_until=args.resample_until,
                callback_on_output_chunk=(None if spectrogram is None
                                          else lambda _, start, chunk: spectrogram.add(chunk[0].numpy())),
                **prompt_args)
    elapsed = time.perf_counter() - started
    if rank != 0:  # the result is on rank 0, which wrote it
        return 0
    written = [out]
    if spectrogram is not None:
        from ..plots import layout_title, view_spans, write_spectrogram
        fps = jd.adapter.frames_per_second
        try:
            write_spectrogram(spec_path, spectrogram.finish(), view_spans(layout, fps), loop=layout.loop,
                              title=layout_title(args.method, args.view_prompt or [p for _, p in prompt_args.get(
                                  "timeline", [])] or [args.prompt], layout, fps),
                              given_spans=_given_spans(args))
        except OSError as exc:  # e.g. the disk filled since the check: the audio is complete, say so
            print(f"safa generate: error: wrote {out} but not its spectrogram {spec_path}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return 1
        written.append(spec_path)
    if kind == "audio":
        what = f"{result.output_length / result.sample_rate:.2f} s at {result.sample_rate} Hz"
    elif kind == "video":
        height, width = jd.adapter.frame_size
        what = f"{result.output_length} frames of {width}x{height} px at {jd.adapter.fps} fps"
    else:
        what = f"{call['width']}x{jd.adapter.output_elements_per_column(call['height']) // 3} px"
    denoise = result.timings["denoise"]
    print(f"wrote {', '.join(written)}: {what}, {jd.describe_layout(result.layout)}, {args.method}, seed {args.seed}; "
          f"{steps} steps in {denoise:.1f} s ({denoise / steps:.2f} s/step), decoded and written in "
          f"{result.timings['decode']:.1f} s, {elapsed:.1f} s in all; {result.window_evaluations} window evaluations"
          + (f" ({result.extra_window_evaluations} added by the {'timeline' if args.timeline else 'regions'})"
             if args.timeline or args.region else ""))
    return 0


def parse_timeline(items: Any) -> Any:
    """``["0:rain", "30:thunder"]`` -> ``[(0.0, "rain"), (30.0, "thunder")]`` (``--timeline``)."""
    spans = []
    for item in items:
        start, sep, prompt = item.partition(":")
        try:
            spans.append((float(start), prompt))
        except ValueError:
            sep = ""
        if not sep or not prompt:
            raise CLIError(f"--timeline takes START:PROMPT (START in seconds), got {item!r}")
    return spans


def parse_regions(items: Any) -> Any:
    """``["0,0,64,128:a deer", "mask.png:a lake"]`` -> ``[((0, 0, 64, 128), "a deer"), (<image>, "a lake")]``."""
    regions = []
    for item in items:
        where, sep, prompt = item.partition(":")
        if not sep or not prompt:
            raise CLIError(f"--region takes TOP,LEFT,BOTTOM,RIGHT:PROMPT (pixels) or MASK.png:PROMPT, got {item!r}")
        parts = where.split(",")
        if len(parts) == 4:
            try:
                regions.append((tuple(int(p) for p in parts), prompt))
                continue
            except ValueError:
                raise CLIError(f"--region: a box is four integers TOP,LEFT,BOTTOM,RIGHT in pixels, got {where!r}") from None
        if not os.path.isfile(where):
            raise CLIError(f"--region: {where!r} is neither a box TOP,LEFT,BOTTOM,RIGHT nor a mask image file")
        from PIL import Image
        regions.append((Image.open(where), prompt))
    return regions


def _prompt_arguments(args: argparse.Namespace) -> Dict[str, Any]:
    """--prompt / --view-prompt / --timeline / --region as the call's prompt arguments."""
    if args.timeline:
        if args.prompt or args.view_prompt or args.region:
            raise CLIError("give either --timeline (repeated) or --prompt / --view-prompt / --region, not both")
        return dict(timeline=parse_timeline(args.timeline), transition=args.transition)
    if args.transition is not None:
        raise CLIError("--transition is the ramp between --timeline spans: give --timeline with it")
    if args.region:
        if args.view_prompt:
            raise CLIError("give either --region (over the --prompt background) or --view-prompt, not both")
        return dict(prompt=args.prompt, regions=parse_regions(args.region), bootstrap=args.bootstrap)
    if args.bootstrap is not None:
        raise CLIError("--bootstrap is for --region: give --region with it")
    return dict(view_prompts=args.view_prompt) if args.view_prompt else dict(prompt=args.prompt)


def _known_arguments(args: argparse.Namespace) -> Dict[str, Any]:
    """``--audio`` / ``--at`` / ``--keep`` / ``--crossfade`` as the call's ``audio=`` arguments (safa.known)."""
    if args.audio is None:
        if args.keep or (args.at and args.image is None):
            raise CLIError("--at and --keep place your audio (--at also your --image): give --audio (or --image) "
                           "with them")
        return {}
    keep = None
    if args.keep:
        try:
            keep = [tuple(float(x) for x in k.split(":")) for k in args.keep]
        except ValueError:
            raise CLIError(f"--keep takes START:END in seconds, got {args.keep}") from None
        if any(len(k) != 2 for k in keep):
            raise CLIError(f"--keep takes START:END in seconds, got {args.keep}")
    return dict(audio=args.audio, audio_start=args.at, keep=keep,
                audio_crossfade=0.05 if args.crossfade is None else args.crossfade)


def _given_spans(args: argparse.Namespace) -> List[Tuple[float, float]]:
    """Where the user's audio lies in the output, in seconds (marked on the spectrogram): the
    ``--keep`` ranges, else the clip from ``--at`` on."""
    if args.audio is None:
        return []
    if args.keep:
        return [tuple(float(x) for x in k.split(":")) for k in args.keep]
    import soundfile
    start = args.at or 0.0
    return [(start, start + soundfile.info(args.audio).duration)]


# The call's image arguments (not the memory estimate's).
_IMAGE_CALL = ("image", "strength", "controlnet_conditioning_scale", "noise_level", "image_start", "image_crossfade")


def _image_arguments(args: argparse.Namespace, adapter: Any, call: Dict[str, Any]) -> Dict[str, Any]:
    """``--image`` / ``--control-image`` and their options as the call's ``image=`` arguments, with the
    output's width and height, which the image sets (checked as the call checks them)."""
    from ..request import check_image
    options = dict(strength=args.strength, controlnet_conditioning_scale=args.control_scale,
                   noise_level=args.noise_level)
    # Outpainting (an --image narrower than --width): --at and --crossfade in pixels.
    outpaint = {} if args.image is None or args.audio is not None else dict(
        image_start=_pixels("--at", args.at),
        **({} if args.crossfade is None else {"image_crossfade": _pixels("--crossfade", args.crossfade)}))
    if args.image is not None and args.control_image is not None:
        raise CLIError("give --image or --control-image, not both")
    path, flag = (args.control_image, "--control-image") if args.control_image is not None else (args.image, "--image")
    name = type(adapter.pipe).__name__
    if flag == "--control-image" and path is not None and adapter.image_role != "control":
        raise CLIError(f"--control-image is for ControlNet pipelines, not {name}")
    if flag == "--image" and path is not None and adapter.image_role == "control":
        raise CLIError(f"{name} takes its control image with --control-image")
    image = None
    if path is not None:
        from PIL import Image
        try:
            with Image.open(path) as opened:
                opened.load()
                image = opened
        except (OSError, ValueError) as exc:
            raise CLIError(f"{flag}: cannot read an image from {path} ({exc})") from None
    try:
        checked, width, height = check_image(adapter, image, width=call["width"], height=call["height"],
                                             window=call["window"], loop=call["loop"], **options, **outpaint)
    except ValueError as exc:
        raise CLIError(f"{flag} {path}: {exc}" if path is not None else str(exc)) from None
    if checked is None:
        return {}
    return dict(image=image, width=width, height=height, **{k: v for k, v in options.items() if v is not None},
                **outpaint)


def _pixels(flag: str, value: float) -> int:
    """``--at`` / ``--crossfade`` with an ``--image``: a whole number of pixels."""
    if not float(value).is_integer():
        raise CLIError(f"{flag} with --image takes pixels (an int), got {value:g}")
    return int(value)
