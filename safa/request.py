"""A call's arguments, validated once, and the geometry they imply (Algorithm 1's step 1).

:func:`build_request` checks every argument of :meth:`safa.JointDiffusion.__call__` (and of
``estimate_memory`` / ``layout_for``, which take a subset) in one place, before any work, and
returns a frozen :class:`GenerationRequest`: the pipeline's own defaults filled in, our names
and the pipeline families' names reconciled, the window and overlap in latent columns. Every
later stage reads the request, never the raw arguments. What differs between audio and image
pipelines (units, length argument, output types) is the adapter's (:mod:`safa.adapters.base`).

The geometry (:func:`prepare_layout`, :func:`planned_layout`, :func:`model_windows`) is
here too: it is the request's, and the memory planning (:mod:`safa.memory`) reads it without
building a layout.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from safa_kernels import GridLayout, ViewLayout

from . import output as _output
from . import prompts as _prompts
from ._checks import check_positive_int, check_range
from .adapters.base import Adapter
from .adapters.canvas import CanvasImage, read_image
from .decode import DECODE_MODES, TILED_DISK, exact_tiled
from .layouts import LoopLengthError, loop_layout, open_layout
from .methods import Method, get_method

__all__ = ["GenerationRequest", "build_request", "prepare_layout", "planned_layout", "model_windows",
           "check_generator", "check_image", "split_outpaint", "DEFAULT_IMAGE_CROSSFADE", "check_canvas_method", "strength_timesteps", "is_grid", "merge_dims", "canvas_shape", "window_shape", "planned_tile_height", "DEFAULT_VIEW_BATCH_SIZE", "CALL_ARGUMENTS_DOC"]

# view_batch_size=None: windows per model call. Bounded, so that the model's working memory is
# set by the window and not by the output's length (hours of audio are thousands of windows);
# on the CPU a bounded batch is also as fast or faster per window (benchmarks/README.md).
DEFAULT_VIEW_BATCH_SIZE = 16

# The pipeline families' names for outputs per prompt, and whose they are.
_PER_OUTPUT = {"num_waveforms_per_prompt": "audio", "num_images_per_prompt": "image", "num_videos_per_prompt": "video"}
_EMBEDS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


@dataclass(frozen=True)
class GenerationRequest:
    """The validated arguments of one call (their meaning: :data:`CALL_ARGUMENTS_DOC`).

    Attributes beyond the call's own names:
        batch_size: outputs of the call (batch prompts x ``per_prompt``).
        per_prompt: ``num_waveforms_per_prompt`` / ``num_images_per_prompt``.
        window_columns, overlap_columns, overlap_rate, stride_multiple: the window and overlap
            in latent columns (overlaps snapped to the method's grid, e.g. MAD's).
        paths: the output files, checked (None: no files, or not this rank's to write).
        to_files: the call writes files (on some rank).
        embeds: the precomputed embeddings that were given, by the pipeline's names.
        loop_rows: an image loops on its height too (``loop="both"`` / ``(True, True)``: a
            torus, a tileable texture); ``loop`` is then the width's flag.
    """

    method: Method
    seconds: Optional[float]
    width: Optional[int]
    height: Optional[int]
    loop: bool
    num_inference_steps: int
    guidance_scale: float
    per_prompt: int
    batch_size: int
    view_batch_size: Optional[int]
    eta: float
    decode: str
    decode_tile: Optional[int]
    output_type: str
    window_columns: int
    overlap_columns: int
    overlap_rate: float
    stride_multiple: int
    to_files: bool = False
    paths: Optional[List[str]] = None
    embeds: Dict[str, torch.Tensor] = field(default_factory=dict)
    loop_rows: bool = False

    @property
    def guidance(self) -> bool:
        """Classifier-free guidance is on (the pipelines' own rule)."""
        return self.guidance_scale > 1.0

    def with_length(self, adapter: Adapter, length: float) -> "GenerationRequest":
        """The same request for another length in the adapter's unit (memory planning's search)."""
        if adapter.length_argument == "seconds":
            return replace(self, seconds=float(length))
        return replace(self, width=int(length))

    @property
    def length(self) -> float:
        """The requested length in the adapter's unit (seconds or pixels)."""
        return self.seconds if self.seconds is not None else self.width  # type: ignore[return-value]


def _guidance_scale(adapter: Adapter, guidance_scale: Optional[float]) -> float:
    """As given (a finite number), else the wrapped pipeline's own default (1.0 if it has none)."""
    if guidance_scale is None:
        guidance_scale = adapter.pipeline_default("guidance_scale", 1.0)
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
            or not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number (<= 1: no classifier-free guidance), "
                         f"got {guidance_scale!r}")
    return float(guidance_scale)


def _length_and_per_prompt(adapter: Adapter, seconds: Optional[float], audio_length_in_s: Optional[float],
                           width: Optional[int], per_output: Dict[str, Optional[int]],
                           require_length: bool) -> Tuple[Optional[float], int]:
    """The length and outputs per prompt from our names or the pipeline families' own."""
    if audio_length_in_s is not None:
        if seconds is not None and seconds != audio_length_in_s:
            raise ValueError(f"seconds={seconds!r} and audio_length_in_s={audio_length_in_s!r} disagree: give one")
        seconds = audio_length_in_s
    if require_length and seconds is None and (width is None or adapter.length_argument == "seconds"):
        raise ValueError(f"give {adapter.length_hint} to generate")
    mine = adapter.per_output_argument
    for other, value in per_output.items():
        if other != mine and value is not None:
            raise ValueError(f"{other} is for {_PER_OUTPUT[other]} pipelines; give {mine}")
    per_prompt = per_output.get(mine)
    return seconds, check_positive_int(mine, 1 if per_prompt is None else per_prompt)  # type: ignore[return-value]


def _check_embeds(adapter: Adapter, given: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The precomputed-embedding arguments that were given, checked against what the family takes."""
    embeds = {k: v for k, v in given.items() if v is not None}
    if not embeds:
        return {}
    accepted = adapter.embeds_arguments
    for name, value in embeds.items():
        if name not in accepted:
            raise ValueError(f"{name} is not supported for {type(adapter.pipe).__name__} here"
                             f"{' (it takes ' + ', '.join(accepted) + ')' if accepted else ''}; give prompt")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if "prompt_embeds" not in embeds:
        raise ValueError(f"{', '.join(embeds)} given without prompt_embeds")
    rows = embeds["prompt_embeds"].shape[0]
    for name, value in embeds.items():
        if value.shape[0] != rows:
            raise ValueError(f"{name} has {value.shape[0]} rows but prompt_embeds has {rows} (one per batch prompt)")
    return embeds


def _check_scalars(adapter: Adapter, num_inference_steps: Any, view_batch_size: Any, decode: Any,
                   decode_tile: Any, output_type: Any) -> str:
    """The call's scalar options; returns the resolved ``output_type``."""
    check_positive_int("num_inference_steps", num_inference_steps)
    check_positive_int("view_batch_size", view_batch_size, allow_none=True)
    check_positive_int("decode_tile", decode_tile, allow_none=True)
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
    if decode == TILED_DISK and not exact_tiled(adapter):
        raise ValueError(f"decode={TILED_DISK!r} (the exact tiled VAE decode with its tiles on disk) is for image "
                         f"pipelines with an AutoencoderKL; use decode='auto', 'full', 'views' or 'tiled'")
    adapter.check_decode(decode)
    if output_type is None:
        return adapter.output_types[0]
    if output_type not in adapter.output_types:
        raise ValueError(f"output_type must be one of {adapter.output_types}, got {output_type!r}")
    return output_type


def _window_columns(adapter: Adapter, window: Optional[float]) -> int:
    """The window in latent columns (default: the model's native window)."""
    if window is None:
        return adapter.native_window()
    if isinstance(window, bool) or not isinstance(window, (int, float)):
        raise ValueError(f"window must be a number (int or float, {adapter.window_unit}), "
                         f"got {type(window).__name__}: {window!r}")
    if not window > 0:
        raise ValueError(f"window must be > 0 ({adapter.window_unit}), got {window!r}")
    w = adapter.window_columns(window)
    if w < 1:
        raise ValueError(f"window {window!r} ({adapter.window_unit}) is less than one latent column")
    adapter.check_window(w)
    return w


def _snap_overlap(overlap: float, window: int, multiple: int, method: Method) -> int:
    """``overlap`` columns rounded to the nearest multiple of ``multiple``, nonzero when it is (MAD's layouts)."""
    if window % multiple:
        raise ValueError(f"window must be a multiple of {multiple} latent columns for method {method.name!r} "
                         f"(the UNet's deepest attention downsampling), got {window}")
    snapped = multiple * int(math.floor(overlap / multiple + 0.5))
    if overlap > 0:
        snapped = max(snapped, multiple)
    if snapped >= window:
        raise ValueError(f"overlap of {overlap:g} columns rounds to {snapped}, a whole window of {window}, for method "
                         f"{method.name!r} (overlaps are multiples of {multiple} columns): ask for a smaller overlap")
    return snapped


def _window_and_overlap(adapter: Adapter, window: Optional[float], overlap: Any, loop: Any,
                        method: Method) -> Tuple[int, int, float, int]:
    """``(window, overlap columns, overlap rate, stride multiple)`` of a request, validated."""
    # Swap is defined between two views only (no column covered by three): docs/kernels.md.
    hi = method.max_overlap_rate
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)):
        raise ValueError(f"overlap must be a number (int or float, a rate of the window), "
                         f"got {type(overlap).__name__}: {overlap!r}")
    try:
        rate = check_range("overlap", overlap, 0.0, hi, hi_open=hi >= 1.0)
    except ValueError as exc:
        hint = (f" for method {method.name!r} (a swap is defined between two views; the averaging "
                f"methods accept overlaps below 1.0)" if hi < 1.0 else "")
        raise ValueError(f"{exc}{hint}") from None
    w = _window_columns(adapter, window)
    multiple = method.layout_multiple(adapter)
    o = int(round(rate * w)) if multiple == 1 else _snap_overlap(rate * w, w, multiple, method)
    if o >= w:
        raise ValueError(f"overlap rate {overlap} gives {o} overlapping columns for a window of {w}: "
                         f"it must leave at least one column of stride")
    return w, o, rate, multiple


def build_request(adapter: Adapter, *, method: Union[str, Method] = "safa", guide: Optional[float] = None,
                  swap_interval: Optional[int] = None, seconds: Optional[float] = None,
                  audio_length_in_s: Optional[float] = None, width: Optional[int] = None,
                  height: Optional[int] = None, window: Optional[float] = None, overlap: float = 0.2,
                  loop: bool = False, num_inference_steps: Optional[int] = None,
                  guidance_scale: Optional[float] = None, num_waveforms_per_prompt: Optional[int] = None,
                  num_images_per_prompt: Optional[int] = None, num_videos_per_prompt: Optional[int] = None,
                  prompt: Any = None, view_prompts: Any = None,
                  batch_size: Optional[int] = None, view_batch_size: Optional[int] = None, eta: float = 0.0,
                  decode: str = "auto", decode_tile: Optional[int] = None, output_type: Optional[str] = None,
                  output_path: Union[None, str, Sequence[str]] = None, check_paths: bool = True,
                  require_length: bool = True, **embeds: Optional[torch.Tensor]) -> GenerationRequest:
    """Check every argument (in the order a user meets them) and return the :class:`GenerationRequest`.

    ``batch_size`` gives the number of outputs directly (``estimate_memory``); otherwise it is
    counted from the prompts. ``check_paths=False``: the output files are another rank's to
    check and write. ``embeds``: the ``*_embeds`` call arguments.
    """
    unknown = set(embeds) - set(_EMBEDS)
    if unknown:
        raise TypeError(f"unexpected arguments {sorted(unknown)}")
    # The method object (guide= / swap_interval= are its parameters) and the pipeline's own
    # defaults for what is not given, as the pipeline itself would use.
    method = get_method(method, guide=guide, swap_interval=swap_interval)
    loop, loop_rows = _loop_flags(adapter, loop)
    if num_inference_steps is None:
        num_inference_steps = adapter.pipeline_default("num_inference_steps", 50)
    scale = _guidance_scale(adapter, guidance_scale)
    check_range("eta", eta, 0.0, math.inf, hi_open=True)
    method.check_pipeline(adapter)
    seconds, per_prompt = _length_and_per_prompt(
        adapter, seconds, audio_length_in_s, width,
        dict(num_waveforms_per_prompt=num_waveforms_per_prompt, num_images_per_prompt=num_images_per_prompt,
             num_videos_per_prompt=num_videos_per_prompt),
        require_length)
    adapter.check_length(seconds, width, height)
    output_type = _check_scalars(adapter, num_inference_steps, view_batch_size, decode, decode_tile, output_type)
    given = _check_embeds(adapter, embeds)
    if batch_size is None:
        rows = int(given["prompt_embeds"].shape[0]) if given else None
        batch_size = _prompts.count_prompts(prompt, view_prompts, rows) * per_prompt  # type: ignore[operator]
    check_positive_int("batch_size", batch_size)
    if output_path is not None and output_type == "latent":
        raise ValueError("output_path writes the decoded output: it cannot be used with output_type='latent'")
    paths = _output.check_output_paths(output_path, batch_size, adapter) if check_paths else None
    w, o, rate, multiple = _window_and_overlap(adapter, window, overlap, loop, method)
    if adapter.kind == "image" and (loop_rows or adapter.latent_rows(height) > w):
        _check_grid(adapter, method, width, w, decode)
    return GenerationRequest(
        method=method, seconds=seconds, width=width, height=height, loop=loop,
        num_inference_steps=num_inference_steps, guidance_scale=scale, per_prompt=per_prompt,
        batch_size=batch_size, view_batch_size=view_batch_size, eta=eta, decode=decode, decode_tile=decode_tile,
        output_type=output_type, window_columns=w, overlap_columns=o, overlap_rate=rate, stride_multiple=multiple,
        to_files=output_path is not None, paths=paths, embeds=given, loop_rows=loop_rows)


def _loop_flags(adapter: Adapter, loop: Any) -> Tuple[bool, bool]:
    """``(width loops, height loops)`` of ``loop``: a bool (the long axis), or for images ``"both"``
    or a pair of bools ``(height, width)``."""
    if isinstance(loop, bool):
        return loop, False
    both = loop == "both" if isinstance(loop, str) else None
    pair = tuple(loop) if isinstance(loop, (tuple, list)) and len(loop) == 2 else None
    if adapter.kind != "image" and (both is not None or pair is not None):
        raise ValueError(f"loop must be a bool for {adapter.kind} pipelines (one long axis), got {loop!r}")
    if both:
        return True, True
    if pair is not None and all(isinstance(flag, bool) for flag in pair):
        return pair[1], pair[0]
    raise ValueError(f"loop must be a bool (the width), 'both' or a pair of bools (height, width), got {loop!r}")


def _check_grid(adapter: Adapter, method: Method, width: Optional[int], window: int, decode: str) -> None:
    """A 2-D canvas (an image beyond one window in height, or looping on its height): at least one
    tile wide, and refused for the methods that have no grid form."""
    if width is not None and width < window * adapter.decoded_scale:
        raise ValueError(f"width must be at least one window ({window * adapter.decoded_scale} px) when the height "
                         f"exceeds one window or loops (the tiles are {window} x {window} latent cells), got {width}")
    if decode not in ("auto", "full", "tiled", TILED_DISK):
        raise ValueError(f"decode={decode!r} decodes a strip along the width; an image beyond one window in height "
                         f"is decoded whole or tiled: use decode='auto', 'full', 'tiled' or 'tiled-disk'")
    if method.grid_refusal is not None:
        raise ValueError(f"method {method.name!r} runs on strips only ({method.grid_refusal}): an image beyond one "
                         f"window in height (or loop on its height) needs safa, safa_selfloop, multidiffusion, "
                         f"multidiffusion_triangular, multidiffusion_gaussian, mad or syncdiffusion")


# image=: what the call's image is to each role, and the option each role takes (docs/conditions.md).
_IMAGE_OPTIONS = {"init": "strength", "control": "controlnet_conditioning_scale", "low_res": "noise_level"}
_IMAGE_MEANING = {"init": "the image to transform (img2img)", "control": "the control image",
                  "low_res": "the low-resolution image to upscale"}
# The img2img pipelines' own default strength.
DEFAULT_STRENGTH = 0.8
# Outpainting: pixel columns of the crossfade at each junction of the user's image with the generation.
DEFAULT_IMAGE_CROSSFADE = 16


def _given(value: Any, default: Any) -> bool:
    """An option was given: anything but its default (of the default's type)."""
    return not (type(value) is type(default) and value == default)


def _check_outpaint(adapter: Adapter, pixels: torch.Tensor, *, strength: Any, width: Any, height: Any, window: Any,
                    image_start: Any, image_crossfade: Any, paste_image: Any, loop: Any) -> CanvasImage:
    """An image narrower than ``width`` on SD / SDXL: outpainted, every bad input one ValueError."""
    w, h = int(pixels.shape[-1]), int(pixels.shape[-2])
    m = adapter.decoded_scale
    if isinstance(width, bool) or not isinstance(width, numbers.Integral):
        raise ValueError(f"width must be an int (pixels), got {width!r}")
    if w > width:
        raise ValueError(f"image is {w} px wide, wider than the canvas (width={width}), and it is never resized: "
                         f"give a larger width to outpaint it (or leave width out for img2img)")
    if strength is not None:
        raise ValueError(f"strength is img2img's, whose image covers the canvas ({width} px wide); an image narrower "
                         f"than width ({w} px) is outpainted: leave strength out (or give an image of {width} px)")
    if isinstance(image_start, (tuple, list)):
        raise ValueError(f"image_start must be one int (pixel column of the image's left edge): a 2-D placement "
                         f"(top, left) is not supported; the image has the output's height, got {image_start!r}")
    if isinstance(image_start, bool) or not isinstance(image_start, numbers.Integral) or image_start % m:
        raise ValueError(f"image_start must be an int multiple of {m} (the VAE's factor), pixels from the left, "
                         f"got {image_start!r}")
    image_start = int(image_start)
    if not isinstance(loop, bool):
        raise ValueError(f"loop must be a bool when outpainting (the width loops: a 360-degree panorama), got {loop!r}")
    last = width if loop else width - w
    if not 0 <= image_start <= last - (1 if loop else 0):
        raise ValueError(f"image_start must be in [0, {last - 1 if loop else last}] for an image {w} px wide in a "
                         f"{'loop' if loop else 'canvas'} of {width} px, got {image_start}")
    if height is not None and height != h:
        raise ValueError(f"image is {h} px high but height={height}: outpainting extends the width only; give an "
                         f"image of the output's height (or leave height out)")
    if w % m or h % m:
        raise ValueError(f"image must be a multiple of {m} px on both sides (the VAE's factor), got {w} x {h} px")
    try:
        rows = adapter.latent_rows(h)
    except ValueError as exc:
        raise ValueError(f"image: {w} x {h} px gives an output {h} px high, and {exc}") from None
    if rows > _window_columns(adapter, window):
        raise ValueError(f"image is {h} px high, more than one window ({_window_columns(adapter, window) * m} px): "
                         f"outpainting runs on a strip of one window's height (a grid is not supported yet)")
    if isinstance(image_crossfade, bool) or not isinstance(image_crossfade, int) or image_crossfade < 0:
        raise ValueError(f"image_crossfade must be an int >= 0 (pixel columns), got {image_crossfade!r}")
    if not isinstance(paste_image, bool):
        raise ValueError(f"paste_image must be a bool, got {paste_image!r}")
    return CanvasImage(pixels, "outpaint", image_start=image_start, crossfade=image_crossfade, paste=paste_image)


def check_image(adapter: Adapter, image: Any, *, strength: Any = None, controlnet_conditioning_scale: Any = None,
                noise_level: Any = None, width: Optional[int] = None, height: Optional[int] = None,
                window: Optional[float] = None, image_start: Any = 0, image_crossfade: Any = DEFAULT_IMAGE_CROSSFADE,
                paste_image: Any = True, loop: Any = False
                ) -> Tuple[Optional[CanvasImage], Optional[int], Optional[int]]:
    """The call's ``image=`` read and checked for the family's role (:attr:`Adapter.image_role`),
    with the option of that role; returns it with the output ``(width, height)`` it sets (the
    image is never resized: a ``width`` / ``height`` that disagrees with it is an error).

    On SD / SDXL an image narrower than ``width`` (and no ``strength``) is outpainted
    (:func:`_check_outpaint`): role ``"outpaint"``, placed at ``image_start``."""
    role = adapter.image_role
    options = {"strength": strength, "controlnet_conditioning_scale": controlnet_conditioning_scale,
               "noise_level": noise_level}
    name = type(adapter.pipe).__name__
    outpaint_options = {"image_start": (image_start, 0), "image_crossfade": (image_crossfade, DEFAULT_IMAGE_CROSSFADE),
                        "paste_image": (paste_image, True)}
    if image is None:
        if role in ("control", "low_res"):
            raise ValueError(f"image is required for {name}: {_IMAGE_MEANING[role]}")
        for option, value in options.items():
            if value is not None:
                raise ValueError(f"{option} is given without image")
        for option, (value, default) in outpaint_options.items():
            if _given(value, default):
                raise ValueError(f"{option} places the user's image (outpainting): give image= with it")
        return None, width, height
    if adapter.kind != "image":
        raise ValueError(f"image is for image pipelines; {name} takes audio= (your own audio to continue, fill "
                         f"or loop)")
    if role is None:
        raise ValueError(f"image is not supported for {name}: img2img and outpainting (an image narrower than "
                         f"width) run on SD 1.x/2.x and SDXL")
    for option, value in options.items():
        if value is not None and option != _IMAGE_OPTIONS[role]:
            raise ValueError(f"{option} is not an option of {name} (its image is {_IMAGE_MEANING[role]})")
    pixels = read_image(image)
    scale = adapter.decoded_scale // adapter.image_pixels_per_column
    size = (int(pixels.shape[-1]) * scale, int(pixels.shape[-2]) * scale)
    if role == "init" and width is not None and width != size[0]:
        out = _check_outpaint(adapter, pixels, strength=strength, width=width, height=height, window=window,
                              image_start=image_start, image_crossfade=image_crossfade, paste_image=paste_image,
                              loop=loop)
        return out, width, int(pixels.shape[-2])
    for option, (value, default) in outpaint_options.items():
        if _given(value, default):
            raise ValueError(f"{option} is for outpainting (an image narrower than width); this image "
                             f"({size[0]} x {size[1]} px) covers the canvas{' (img2img)' if role == 'init' else ''}: "
                             f"give a larger width to outpaint it")
    for option, given, own in (("width", width, size[0]), ("height", height, size[1])):
        if given is not None and given != own:
            raise ValueError(f"{option}={given!r} disagrees with the image ({pixels.shape[-1]} x {pixels.shape[-2]} px, "
                             f"an output of {size[0]} x {size[1]} px): the image is never resized; leave "
                             f"{option} out or resize the image")
    try:
        adapter.latent_rows(size[1])
    except ValueError as exc:
        raise ValueError(f"image: {pixels.shape[-1]} x {pixels.shape[-2]} px gives an output {size[1]} px high, and "
                         f"{exc}") from None
    values: Dict[str, Any] = {}
    if role == "init":
        values["strength"] = check_range("strength", DEFAULT_STRENGTH if strength is None else strength, 0.0, 1.0)
        w = _window_columns(adapter, window) * adapter.decoded_scale
        m = adapter.decoded_scale
        if size[0] % m or size[1] % m:
            raise ValueError(f"image must be a multiple of {m} px on both sides (the VAE's factor), got "
                             f"{size[0]} x {size[1]} px")
        if min(size) < w:
            raise ValueError(f"image must be at least one window ({w} x {w} px) for img2img, got "
                             f"{size[0]} x {size[1]} px (an image narrower than width is outpainted: give width)")
    elif role == "control":
        scale_value = 1.0 if controlnet_conditioning_scale is None else controlnet_conditioning_scale
        if isinstance(scale_value, bool) or not isinstance(scale_value, (int, float)) \
                or not math.isfinite(scale_value):
            raise ValueError(f"controlnet_conditioning_scale must be a finite number, got {scale_value!r}")
        values["conditioning_scale"] = float(scale_value)
    else:
        top = int(getattr(adapter, "max_noise_level", 350))
        level = adapter.pipeline_default("noise_level", 20) if noise_level is None else noise_level
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= top:
            raise ValueError(f"noise_level must be an int in [0, {top}] (the pipeline's max_noise_level), "
                             f"got {level!r}")
        values["noise_level"] = level
    return CanvasImage(pixels, role, **values), size[0], size[1]


def split_outpaint(image: Optional[CanvasImage]) -> Tuple[Optional[CanvasImage], Optional[CanvasImage]]:
    """``(image to outpaint, canvas image)`` of the call's checked image: at most one of them is not None
    (an outpainted image is known columns, :mod:`safa.known`, not a canvas condition)."""
    if image is not None and image.role == "outpaint":
        return image, None
    return None, image


def check_canvas_method(image: Optional[CanvasImage], method: Method, guide: Optional[float]) -> None:
    """A canvas image gives every view its own crop, so no reference window runs (it has no place
    on the canvas): an explicit ``guide`` > 0 is refused, and MAD (whose merged attention groups
    the views by prompt alone)."""
    if image is None:
        return
    if guide:
        raise ValueError(f"guide={guide!r}: with image= every view takes its own crop of the image, and the "
                         f"reference window has no place on it; leave guide out (or 0)")
    if method.name.startswith("mad"):
        raise ValueError(f"method {method.name!r} does not take image= here: use safa, safa_selfloop, "
                         f"multidiffusion, multidiffusion_triangular, multidiffusion_gaussian or syncdiffusion")


def strength_timesteps(scheduler: Any, timesteps: torch.Tensor, num_inference_steps: int,
                       strength: float) -> torch.Tensor:
    """img2img: the last ``int(num_inference_steps * strength)`` timesteps, and the scheduler told
    where they begin (diffusers' img2img ``get_timesteps``)."""
    init = min(int(num_inference_steps * strength), num_inference_steps)
    if init < 1:
        raise ValueError(f"strength={strength!r} leaves no denoising step of num_inference_steps="
                         f"{num_inference_steps}: strength * num_inference_steps must be >= 1")
    start = (num_inference_steps - init) * getattr(scheduler, "order", 1)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return timesteps[start:]


def check_generator(generator: Any, batch_size: int) -> None:
    """As diffusers: a generator list must have one generator per output."""
    if isinstance(generator, list):
        if len(generator) != batch_size or not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError(f"generator is a list of {len(generator)} but this call makes {batch_size} output(s) "
                             f"(batch prompts x outputs per prompt): give one torch.Generator per output, or one")
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")


# -- the request's geometry -------------------------------------------------------------------
AnyLayout = Union[ViewLayout, GridLayout]


def is_grid(adapter: Adapter, request: GenerationRequest) -> bool:
    """Whether the request's latent is a 2-D grid of tiles: an image taller than one window, or one
    that loops on its height. Below that the layout is today's strip along the width."""
    if adapter.kind != "image" or request.seconds is not None:
        return False
    return request.loop_rows or adapter.latent_rows(request.height) > request.window_columns


def merge_dims(adapter: Adapter, layout: AnyLayout) -> Union[int, Tuple[int, int]]:
    """The latent axes the ops merge ``layout`` over: ``(rows, cols)`` for a grid, the long axis for a strip."""
    return (-2, -1) if isinstance(layout, GridLayout) else adapter.long_dim


def _grid_shape(adapter: Adapter, batch_size: int, rows: int, cols: int) -> Tuple[int, ...]:
    shape = list(adapter.latent_shape(batch_size, cols, None))
    shape[-2] = rows
    return tuple(shape)


def canvas_shape(adapter: Adapter, batch_size: int, layout: AnyLayout, height: Optional[int]) -> Tuple[int, ...]:
    """The long latent ``J``'s shape for ``layout`` (a grid's rows x cols, a strip's ``height``)."""
    if isinstance(layout, GridLayout):
        return _grid_shape(adapter, batch_size, layout.rows.length, layout.cols.length)
    return adapter.latent_shape(batch_size, layout.length, height)


def window_shape(adapter: Adapter, batch_size: int, layout: AnyLayout, height: Optional[int]) -> Tuple[int, ...]:
    """One view's latent shape: a grid's tile, or a strip's window of the image's ``height``."""
    if isinstance(layout, GridLayout):
        return _grid_shape(adapter, batch_size, layout.rows.window, layout.cols.window)
    return adapter.latent_shape(batch_size, layout.window, height)


def _axis_layout(adapter: Adapter, request: GenerationRequest, columns: float, loop: bool, axis: str) -> ViewLayout:
    """One axis of the request: a loop of exactly ``columns``, or the fewest windows covering it."""
    w = request.window_columns
    if loop:
        try:
            return loop_layout(columns, w, request.overlap_rate, request.method.merge_mode, adapter.window_multiple(),
                               adapter.fixed_window, adapter.describe_columns, stride_multiple=request.stride_multiple)
        except LoopLengthError as exc:
            if axis == "width":
                raise
            raise LoopLengthError(f"loop on the {axis}: {exc}", exc.nearest) from None
    return open_layout(math.ceil(columns), w, request.overlap_columns)


def prepare_layout(adapter: Adapter, request: GenerationRequest) -> Tuple[AnyLayout, int, int]:
    """(layout, latent columns to crop to, output samples / pixels to crop to).

    Open layouts take the fewest views of the window covering the request; loop layouts have
    exactly the requested length, with the window and overlap rate nearest the requested ones
    that make it exact (:mod:`safa.layouts`). A request shorter than one window is the wrapped
    pipeline's own call: one view of ``adapter.short_window``. An image taller than one window
    (or looping on its height) is a :class:`~safa_kernels.GridLayout`: each axis chosen so, rows
    over the latent height, cols over the width (cropped to ``height`` rows at the output).
    """
    seconds, width, w = request.seconds, request.width, request.window_columns
    out_len = adapter.output_length(seconds=seconds, width=width)
    if is_grid(adapter, request):
        rows = _axis_layout(adapter, request, adapter.latent_rows(request.height), request.loop_rows, "height")
        cols = _axis_layout(adapter, request, adapter.length_in_columns(width=width), request.loop, "width")
        return GridLayout(rows, cols), cols.length, out_len
    if request.loop:
        layout = loop_layout(adapter.length_in_columns(seconds=seconds, width=width), w, request.overlap_rate,
                             request.method.merge_mode, adapter.window_multiple(), adapter.fixed_window,
                             adapter.describe_columns, stride_multiple=request.stride_multiple)
        return layout, layout.length, out_len
    columns = adapter.columns_for(seconds=seconds, width=width)
    if columns >= w:
        return open_layout(columns, w, request.overlap_columns), columns, out_len
    short = adapter.short_window(columns)
    return ViewLayout(short, short, 0), columns, out_len


def _planned_axis(columns: float, w: int, o: int, loop: bool) -> Tuple[int, int]:
    """``(length, views)`` of one axis as :func:`prepare_layout` would lay it out (a loop's may differ a little)."""
    if loop:
        length = max(w, math.ceil(columns))
        return length, max(2, round(length / (w - o)))
    views = 1 + math.ceil((math.ceil(columns) - w) / (w - o))
    return w + (views - 1) * (w - o), views


def planned_tile_height(adapter: Adapter, request: GenerationRequest) -> Optional[int]:
    """The height (pixels) of one view of the request: a grid's tile, else the image's ``height``."""
    return request.window_columns * adapter.decoded_scale if is_grid(adapter, request) else request.height


def planned_layout(adapter: Adapter, request: GenerationRequest) -> Tuple[int, int, int]:
    """``(length, window, views)`` of the layout :func:`prepare_layout` would build, without building it
    (a loop's window and view count may differ by a little: the memory estimate does not need more).

    A grid is given as the strip of its tiles' height (:func:`planned_tile_height`) with the same
    number of latent cells: ``length`` is the canvas's cells over the tile height, ``views`` every tile.
    """
    w, o = request.window_columns, request.overlap_columns
    if is_grid(adapter, request):
        rows, row_views = _planned_axis(adapter.latent_rows(request.height), w, o, request.loop_rows)
        cols, col_views = _planned_axis(adapter.length_in_columns(width=request.width), w, o, request.loop)
        return math.ceil(rows * cols / w), w, row_views * col_views
    if request.loop:
        length, views = _planned_axis(adapter.length_in_columns(seconds=request.seconds, width=request.width),
                                      w, o, True)
        return length, w, views
    columns = adapter.columns_for(seconds=request.seconds, width=request.width)
    if columns < w:
        short = adapter.short_window(columns)
        return short, short, 1
    views = 1 + math.ceil((columns - w) / (w - o))
    return w + (views - 1) * (w - o), w, views


def model_windows(view_batch_size: Optional[int], windows: int, method: Method) -> int:
    """Windows per model call: ``view_batch_size``, else all of them up to :data:`DEFAULT_VIEW_BATCH_SIZE`
    (all of them for a method that attends over every view at once)."""
    if view_batch_size is not None:
        return min(view_batch_size, windows)
    return windows if method.all_views_in_one_call else min(windows, DEFAULT_VIEW_BATCH_SIZE)


CALL_ARGUMENTS_DOC = """
        Args:
            prompt: the prompt of every window, or a list of prompts: a batch, one output each
                (as in diffusers).
            seconds / audio_length_in_s: audio length (audio pipelines; the second is the
                pipelines' own name). Honoured exactly: the covering layout is generated and
                cropped; a loop is exactly this long. Below one window: one view of the
                pipeline's own size (its own output).
            width / height: panorama size in pixels (image pipelines; ``height`` a multiple of
                the VAE factor, default the native window's, e.g. 512 for SD 1.x). A height
                above one window lays the image out as a grid of square tiles (rows x cols),
                merged in both directions; ``layout`` is then a ``safa_kernels.GridLayout``.
            view_prompts: a prompt per view instead of ``prompt`` (rain -> thunder -> calm):
                a list of ``layout_for(...).num_views`` prompts, or one such list per batch prompt.
            timeline: audio: ``[(start seconds, prompt), ...]`` instead of ``prompt``, starts from 0
                increasing, each span to the next start, independent of the views; a loop wraps it
                (docs/timelines.md). A view spanning k prompts runs k model branches, combined per
                latent column before the scheduler step (``window_evaluations`` counts them).
            transition: seconds of the linear ramp centred on each timeline boundary (default 2, or
                the shortest span when shorter; 0: a hard switch).
            regions: images: ``[(mask, prompt), ...]`` or ``(mask, prompt, {"guidance_scale": g,
                "negative_prompt": n})`` over the background ``prompt``; a mask is a box ``(top, left,
                bottom, right)`` in pixels, a PIL image or an array / tensor of the canvas's pixel size
                with values in [0, 1] (docs/timelines.md).
            bootstrap: regions: the fraction of the steps with MultiDiffusion's bootstrapping (a region's
                input outside its mask replaced by a noised random constant colour; default 0.2).
            negative_prompt: a str, or one per batch prompt (default: the pipeline's own
                unconditional branch).
            reference_prompt: prompt of the reference window ``X^0`` (a str or one per batch
                prompt; default: each batch prompt's first view prompt).
            method: a :class:`~safa.methods.Method` or its shorthand: ``"safa"`` (default:
                self-loop swap + reference-guided swap), ``"safa_selfloop"`` (SaFa*),
                ``"multidiffusion"`` (MD), ``"multidiffusion_triangular"`` (MD*),
                ``"multidiffusion_gaussian"`` (Mixture of Diffusers' Gaussian weights), ``"mad"``
                (merged self-attention, UNet pipelines; overlaps rounded to the UNet's attention
                grid), ``"syncdiffusion"`` (gradient steps towards an anchor view).
            loop: seamless loop / 360-degree layout (the last view overlaps the first). Images
                also take ``"both"`` or a pair of flags ``(height, width)``: looping the height
                too gives a torus (a tileable texture), each looping axis exactly its length.
            num_inference_steps: denoising steps (default: the wrapped pipeline's own, e.g. 10 for
                AudioLDM, 200 for AudioLDM2 and MusicLDM, 50 for SD; the paper used 200 for audio).
            guidance_scale: classifier-free guidance, off when <= 1 (default: the wrapped
                pipeline's own, e.g. 2.5 for AudioLDM, 7.5 for SD).
            num_waveforms_per_prompt / num_images_per_prompt / num_videos_per_prompt: outputs per batch
                prompt (default 1).
            generator: a torch generator, or a list with one per output (as in diffusers), for
                the initial noise and stochastic schedulers.
            window: window in seconds for audio, latent columns for images (default: the
                model's native window, 10.24 s for the AudioLDM family).
            overlap: overlap rate ``r_overlap`` (default 0.2): in ``[0, 0.5]`` for the swap
                methods, ``[0, 1)`` for the averaging ones. Loop layouts take the nearest
                rate (and window) that makes the loop exact.
            swap_interval: ``w_swap`` of Eq. 9-10 for the swap methods (default: the method's, 1).
            guide: ``r_guide`` for SaFa (default: the method's, 0.3): the reference swap runs
                during the first ``round(guide * T)`` of the ``T`` scheduler steps, and the
                reference window is denoised only then. With a single view there is nothing
                to keep consistent, so no reference is used.
            view_batch_size: windows per model call; bounds the model's memory (default: all of
                them up to :data:`DEFAULT_VIEW_BATCH_SIZE`, 16; all of them for MAD).
            eta: DDIM's eta (default 0).
            latents: initial long noise ``J_T`` (unscaled, the layout's shape
                ``adapter.latent_shape(batch, layout.length, height)``); default drawn from
                ``generator``.
            reference_latents: initial noise of the reference window (one window's shape).
            prompt_embeds / negative_prompt_embeds / pooled_prompt_embeds /
                negative_pooled_prompt_embeds: precomputed text embeddings, one row per batch
                prompt, where the wrapped pipeline takes them (``adapter.embeds_arguments``).
            decode: ``"auto"`` (default: ``"full"`` up to ``safa.decode.AUTO_WHOLE_WINDOWS``
                windows, ``"tiled"`` beyond), ``"full"`` (the whole latent at once: the
                pipeline's own decode), ``"views"`` (decode each view, stitch at the mel / pixel
                level) or ``"tiled"`` (bounded memory; ``decode_tile`` latent columns per tile,
                default one window). Images with an ``AutoencoderKL`` tile exactly (the whole
                decode's image to float rounding); there ``"auto"`` decodes whole while the whole
                decode's estimate is at most ``safa.memory.WHOLE_DECODE_SHARE`` of the available
                memory, tiled in memory while the tiled decode's is, else ``"tiled-disk"``: tiled
                with every layer's tiles in temporary files (resident memory one tile's work,
                disk space growing with the image), which can also be asked for.
            callback_on_step_end: ``f(jd, step, timestep, callback_kwargs)`` after each step's
                merge, ``callback_kwargs = {"views", "view_range", "reference", "layout"}``:
                ``views`` are this process's views, ``view_range`` their indices in the layout
                (every view in one process); ``reference`` is None once it stops guiding.
                Returning a dict with ``"views"`` / ``"reference"`` tensors replaces them (in
                a distributed call, a replaced reference must be the same on every rank).
            output_type: ``"np"`` (audio default), ``"pil"`` (image default, through the
                pipeline's ``image_processor``), ``"pt"`` or ``"latent"`` (no decoding).
            output_path: write the output to this file (WAV/FLAC for audio, PNG for images), or
                to one file per output (a list), instead of returning it. Audio decoded in tiles
                is written tile by tile as it is decoded, so memory does not grow with its
                length; the file appears when it is complete (an interrupted call leaves
                nothing). The result's ``audio`` / ``images`` are None then; ``output_paths``
                names the files.
            callback_on_output_chunk: ``f(jd, start, chunk)`` for every piece of the final
                output as it is decoded (``chunk``: the long axis last, cropped; ``start``: its
                first sample / pixel column), e.g. to accumulate a spectrogram of a streamed
                output (:class:`safa.spectrogram.SpectrogramAccumulator`); on rank 0 only in a
                distributed call.
            audio: the user's own audio to continue, extend, fill or loop (audio pipelines,
                :mod:`safa.known`, docs/own-audio.md): a WAV / FLAC path, or a numpy array /
                tensor ``(samples,)`` or ``(channels, samples)``; resampled to the model's rate,
                downmixed (with a notice) for a mono model. Encoded once with the pipeline's own
                encoder; its latent columns are imposed in every view at every step, brought to
                that step's noise level by the scheduler's forward process.
            sample_rate: samples per second of an ``audio`` array (a file's own rate by default).
            audio_start: where the clip starts in the output, seconds (default 0: a continuation).
            keep: ``[(start, end), ...]`` seconds of the output to keep from the clip (default:
                all of it); the rest of the output, gaps included, is generated.
            audio_latents: the clip already encoded (the model's latent with the clip's columns
                on the long axis), instead of ``audio``; nothing is pasted then.
            audio_crossfade: seconds of the raised-cosine crossfade at each junction between the
                user's samples and the generation (default 0.05).
            paste_audio: the output holds the user's samples exactly over ``keep`` (default);
                False returns the decoded generation there instead.
            resample_steps: RePaint's resampling (Lugmayr et al. 2022), for the known columns to
                harmonise with what is generated around them: each resampled step runs this many
                times (default 1: off, bitwise the call without it); between runs the merged views
                (and ``X^0`` while it guides) jump back to the step's input noise level by the
                scheduler's forward transition, with its state (step index, DPM-Solver++'s history)
                restored (:class:`safa.known.Resampling`). Every run is a model evaluation of every
                window (``window_evaluations`` counts them) and one merge. DDIM, DDPM, Euler, Euler
                ancestral, flow-matching Euler and DPM-Solver++ only (UniPC's corrector would discard
                the jump): another scheduler is a ValueError.
            resample_until: the fraction of the steps, from the first, that are resampled, in
                ``(0, 1]`` (default 1: all).
            image: an image for the whole canvas, cropped per view (docs/conditions.md): a PIL RGB
                image, a list of them, an ``(H, W, 3)`` array or a ``(3, H, W)`` / ``(B, 3, H, W)``
                tensor in ``[0, 1]``; one for every output or one per output. What it is follows
                the pipeline (``adapter.image_role``): a ControlNet pipeline's control image, the x4
                upscaler's low-resolution input (required for both), or on SD / SDXL the image of
                img2img. It sets the output's size (4x for the upscaler) and is never resized.
                No reference window runs with it (``guide`` > 0 and MAD are refused).
                Outpainting (SD 1.x/2.x / SDXL): an image NARROWER than ``width``, of the output's
                height (at most one window; ``height`` defaults to it), without ``strength``, is kept
                and the rest of the canvas generated around it (:mod:`safa.known`,
                docs/own-audio.md): encoded once (the VAE posterior's mode), the latent columns it
                covers imposed in every view at every step at that step's noise level, and in
                SaFa's reference window; ``loop=True`` makes a 360-degree panorama containing it.
                The rule: an image as wide as the canvas (or no ``width``) is img2img; ``strength``
                with a narrower image, an image wider than ``width`` or of another height is an error.
            image_start: outpainting: the pixel column of the image's left edge (default 0), a
                multiple of the VAE factor (8); in a loop it may run across the seam.
            image_crossfade: outpainting: pixel columns of the raised-cosine crossfade at each
                junction of the user's pixels with the generation (default 16).
            paste_image: outpainting: the output holds the user's pixels exactly (default; their
                ``uint8`` values come back in ``"pil"`` and PNG files); False returns the decoded
                generation there instead.
            strength: img2img (SD / SDXL): in ``[0, 1]`` (default 0.8): the last
                ``int(num_inference_steps * strength)`` steps run, from the image encoded and
                noised to the first of them; ``latents`` is then that noise.
            controlnet_conditioning_scale: ControlNet pipelines: the residuals' scale (default 1.0).
            noise_level: the x4 upscaler: noise added to its low-resolution image (default the
                pipeline's, 20; at most its ``max_noise_level``).
            return_dict: return a :class:`JointDiffusionOutput` (default) or, as diffusers
                does, what the wrapped pipeline returns with ``return_dict=False``: ``(audio,)``
                for audio pipelines, ``(images,)`` for SDXL and SD3, ``(images, None)`` for SD
                1.x / 2.x (their nsfw flags: the safety checker is not run). With
                ``output_type="latent"`` the latent ``J`` takes the output's place.
"""
