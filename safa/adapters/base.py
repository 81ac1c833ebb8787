"""The adapter protocol: what the joint-diffusion sampler needs to know about a pipeline family.

The sampler (``safa.sampler.JointDiffusion``) is model-agnostic. It owns the long latent,
the views, the reference window, the scheduler loop and the merge; everything that depends
on the wrapped diffusers pipeline goes through one small :class:`Adapter` subclass per
pipeline family. An adapter holds a reference to the pipeline (no weights are copied).

Writing an adapter (see ``safa/adapters/audioldm.py`` for a complete one):

1. Subclass :class:`AudioAdapter`, :class:`ImageAdapter` or :class:`VideoAdapter` (what differs
   between audio, images and video: units, lengths, output types, files), set the class attributes ``pipeline_classes``
   (class names it accepts), ``long_dim`` and ``reference_axis``.
2. Implement :meth:`latent_shape`, :meth:`native_window`, :meth:`columns_for`,
   :meth:`output_length`, :meth:`encode_prompts`, :meth:`predict` and :meth:`decode_latents`
   (and :meth:`finalize` plus ``finalize_scale`` when decoding has a second stage such as
   a vocoder). Override :meth:`set_timesteps` / :meth:`init_noise` only when the pipeline
   does something special (e.g. SD3's shifted flow-matching sigmas).
3. Decorate the class with :func:`register_adapter`. Modules placed in ``safa/adapters/``
   are imported automatically on the first lookup.

Axes: a *latent* is the pipeline's own latent tensor ``(B, ...)``. ``long_dim`` is the
long (time / panorama width) axis, a negative index so it is valid for the latent with or
without extra leading axes; ``reference_axis`` is the axis along which the reference swap
alternates (paper Sec. 2.3, docs/method.md section 3: the long axis for audio, rows for images).

Conditions: :meth:`encode_prompts` encodes a list of ``P`` prompts once; the sampler
then asks :meth:`predict` for a batch of windows where row ``r`` uses prompt
``rows[r]`` (a ``LongTensor``); :meth:`Conditions.take` does that indexing for any number
of tensors.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Optional, Sequence, Tuple, Type

import torch

from ..audio_io import audio_file_bytes

__all__ = ["Adapter", "AudioAdapter", "ImageAdapter", "VideoAdapter", "Conditions", "register_adapter",
           "registered_adapters", "adapter_class_for"]


@dataclass
class Conditions:
    """Encoded prompts. Every tensor in ``positive`` / ``negative`` has one row per prompt on dim 0.

    ``negative`` is None without classifier-free guidance. ``extra`` carries anything
    per-call that is not per prompt; it is passed through :meth:`take` unchanged. The
    sampler sets ``extra["seconds"]``: the requested output length in seconds for audio
    (None for images), for families conditioned on it (Stable Audio's timing).
    """

    positive: Dict[str, torch.Tensor]
    negative: Optional[Dict[str, torch.Tensor]] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    # Per-window conditions (safa.adapters.canvas: each view's crop of a canvas-sized image), one
    # row per crop, the same in both guidance branches. A row index then names a (prompt, crop)
    # pair: ``prompt + num_prompts * crop`` (:meth:`row`); without them it is the prompt alone.
    windows: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_prompts(self) -> int:
        return next(iter(self.positive.values())).shape[0]

    def row(self, prompts: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
        """The row indices of (prompt, crop) pairs, for :meth:`take`."""
        return prompts + self.num_prompts * crops

    def take(self, rows: torch.Tensor) -> "Conditions":
        """The conditions of a batch whose row ``r`` uses prompt ``rows[r]`` (with :attr:`windows`:
        the pair :meth:`row` encoded). The per-window tensors are gathered by index, and join
        both branches' dicts under their names."""
        crops = None
        if self.windows:
            rows, crops = rows % self.num_prompts, torch.div(rows, self.num_prompts, rounding_mode="floor")

        def pick(d: Optional[Dict[str, torch.Tensor]], index: torch.Tensor) -> Optional[Dict[str, torch.Tensor]]:
            if d is None:
                return None
            return {k: (v.index_select(0, index.to(v.device)) if isinstance(v, torch.Tensor) else v)
                    for k, v in d.items()}
        picked = pick(self.windows, crops) if crops is not None else {}
        negative = pick(self.negative, rows)
        return Conditions({**pick(self.positive, rows), **picked},  # type: ignore[dict-item]
                          {**negative, **picked} if negative is not None else None, dict(self.extra))


_REGISTRY: Dict[str, Type["Adapter"]] = {}


def register_adapter(cls: Type["Adapter"]) -> Type["Adapter"]:
    """Class decorator: make ``cls`` the adapter for each name in ``cls.pipeline_classes``."""
    if not cls.pipeline_classes:
        raise TypeError(f"{cls.__name__}.pipeline_classes is empty")
    for name in cls.pipeline_classes:
        _REGISTRY[name] = cls
    return cls


def registered_adapters() -> Dict[str, Type["Adapter"]]:
    """Pipeline class name -> adapter class, for every adapter imported so far."""
    return dict(_REGISTRY)


def adapter_class_for(pipe: Any) -> Type["Adapter"]:
    """The adapter class for ``pipe``'s class (or its nearest registered base class).

    Raises ``ValueError`` naming the supported pipeline classes when there is none.
    """
    for klass in type(pipe).__mro__:
        if klass.__name__ in _REGISTRY:
            return _REGISTRY[klass.__name__]
    supported = ", ".join(sorted(_REGISTRY)) or "(none registered)"
    raise ValueError(f"unsupported pipeline class {type(pipe).__name__}; supported: {supported}")


class Adapter:
    """Base class of the per-family adapters. Subclasses set the class attributes below.

    Attributes:
        pipeline_classes: names of the diffusers pipeline classes this adapter accepts.
        kind: a label, ``"audio"``, ``"image"`` or ``"video"``; what differs by kind lives in
            :class:`AudioAdapter`, :class:`ImageAdapter` and :class:`VideoAdapter`, which every family
            subclasses.
        length_argument: the call argument giving the output's length (``"seconds"`` / ``"width"``);
            ``length_hint`` says what to give when it is missing.
        per_output_argument: the pipelines' name for outputs per prompt.
        output_field: the :class:`~safa.JointDiffusionOutput` attribute holding the output.
        output_types: the accepted ``output_type`` values, the default first.
        window_unit: the unit of the call's ``window`` argument.
        streams_files: ``output_path`` is written tile by tile as it is decoded (audio), rather
            than whole at the end (images).
        long_dim: the long axis of the latent, negative (e.g. ``-2`` for AudioLDM's
            ``(B, 8, T, 16)``, ``-1`` for images ``(B, 4, H, W)``).
        reference_axis: axis along which the reference swap alternates (negative).
        decoded_dim: long axis of :meth:`decode_latents`' output (negative).
        decoded_scale: columns of :meth:`decode_latents`' output per latent column.
        finalize_scale: output columns (samples / pixels) per decoded column.
        decode_context: latent columns of context a tiled decode adds on each side of a tile
            (about the decoder's receptive field; the output there is discarded).
    """

    pipeline_classes: ClassVar[Tuple[str, ...]] = ()
    kind: ClassVar[str] = ""
    length_argument: ClassVar[str] = ""
    length_hint: ClassVar[str] = ""
    per_output_argument: ClassVar[str] = ""
    output_field: ClassVar[str] = ""
    output_types: ClassVar[Tuple[str, ...]] = ()
    window_unit: ClassVar[str] = ""
    streams_files: ClassVar[bool] = False
    long_dim: ClassVar[int] = -1
    reference_axis: ClassVar[int] = -1
    decoded_dim: ClassVar[int] = -1
    decoded_scale: ClassVar[int] = 1
    finalize_scale: ClassVar[int] = 1
    decode_context: ClassVar[int] = 8
    fixed_window: ClassVar[bool] = False  # the denoiser accepts its native window only
    # What the call's image= is to this family (safa.adapters.canvas, docs/conditions.md): "init"
    # (img2img: encoded, noised to the strength's timestep), "control" (a ControlNet's condition),
    # "low_res" (the x4 upscaler's input), or None (image= is refused).
    image_role: ClassVar[Optional[str]] = None

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    def pipeline_default(self, name: str, fallback: Any) -> Any:
        """The wrapped pipeline's own default for its call argument ``name`` (read from its
        ``__call__`` signature, so that a wrapped pipeline behaves as the pipeline does when
        the argument is not given), else ``fallback``."""
        try:
            parameter = inspect.signature(type(self.pipe).__call__).parameters.get(name)
        except (TypeError, ValueError):  # no signature to read
            parameter = None
        if parameter is None or parameter.default in (inspect.Parameter.empty, None):
            return fallback
        return parameter.default

    # -- geometry -----------------------------------------------------------------------
    @property
    def sample_rate(self) -> Optional[int]:
        """Output samples per second for audio; None for images."""
        return None

    def native_window(self) -> int:
        """The window (latent columns on ``long_dim``) the model was trained on."""
        raise NotImplementedError

    def window_columns(self, window: float) -> int:
        """Convert the user's ``window`` (:attr:`window_unit`) to latent columns."""
        raise NotImplementedError

    def check_length(self, seconds: Optional[float], width: Optional[int], height: Optional[int]) -> None:
        """Raise ``ValueError`` unless the call gave the length (and height) this kind of pipeline takes."""
        raise NotImplementedError

    def columns_for(self, seconds: Optional[float] = None, width: Optional[int] = None) -> int:
        """Latent columns needed for the requested length (``seconds`` for audio, ``width`` pixels for images)."""
        raise NotImplementedError

    def length_in_columns(self, seconds: Optional[float] = None, width: Optional[int] = None) -> float:
        """The requested length in latent columns, exactly (a loop must be a whole number of them)."""
        raise NotImplementedError

    def describe_columns(self, columns: float) -> str:
        """A length in latent columns as users give it: seconds for audio, pixels for images."""
        raise NotImplementedError

    def output_length(self, seconds: Optional[float] = None, width: Optional[int] = None) -> int:
        """Output columns (samples / pixels) to crop the decoded output to."""
        raise NotImplementedError

    def latent_shape(self, batch_size: int, length: int, height: Optional[int] = None) -> Tuple[int, ...]:
        """Shape of a latent with ``length`` columns on ``long_dim``.

        ``height``: the output height in pixels for image pipelines (None: the native
        window's); audio adapters take None only (the sampler checks).
        """
        raise NotImplementedError

    def window_multiple(self) -> int:
        """Window lengths (latent columns) the denoiser accepts are multiples of this (default 1)."""
        return 1

    def check_window(self, window: int) -> None:
        """Raise ``ValueError`` unless the denoiser accepts windows of ``window`` latent columns."""
        if self.fixed_window and window != self.native_window():
            raise ValueError(f"this model is defined on windows of exactly {self.describe_columns(self.native_window())}, "
                             f"got window {self.describe_columns(window)}")
        m = self.window_multiple()
        if window % m:
            raise ValueError(f"window must be a multiple of {m} latent columns for this model, got {window}")

    def short_window(self, columns: int) -> int:
        """The window the wrapped pipeline itself denoises for an output of ``columns`` (< one window).

        Below one window the sampler runs one view of this window and crops to ``columns``,
        so its output is the pipeline's own. Default: ``columns`` rounded up to
        :meth:`window_multiple` (the pipeline generates the requested length).
        """
        m = self.window_multiple()
        return -(-columns // m) * m

    # -- sampling -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    # The pipeline attribute holding the denoiser: "unet", or "transformer" for the DiT families.
    _denoiser: str = "unet"

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self._denoiser)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the latents (the denoiser's dtype)."""
        return self.denoiser.dtype

    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Optional[Sequence[str]],
                       guidance_scale: float) -> Conditions:
        """Encode ``prompts`` (one row each) and, when ``guidance_scale > 1``, their negative prompts.

        ``negative_prompts`` is None (the pipeline's own unconditional branch, e.g. ``""``) or
        one negative prompt per prompt.
        """
        raise NotImplementedError

    # Call arguments of precomputed embeddings this family accepts (the wrapped pipeline's names).
    embeds_arguments: ClassVar[Tuple[str, ...]] = ()

    def conditions_from_embeds(self, embeds: Dict[str, torch.Tensor], guidance_scale: float) -> Conditions:
        """Conditions from precomputed embeddings (``prompt_embeds`` and friends), one row per batch item.

        ``embeds`` holds the call's embedding arguments by the pipeline's names (those in
        :attr:`embeds_arguments`); without ``negative_prompt_embeds`` under guidance the
        pipeline's own unconditional branch is encoded.
        """
        raise ValueError(f"prompt_embeds is not supported for {type(self.pipe).__name__} here; give prompt")

    def set_timesteps(self, num_inference_steps: int, window_shape: Tuple[int, ...]) -> torch.Tensor:
        """Set the scheduler up for ``num_inference_steps``; return the timesteps to loop over.

        ``window_shape`` is the latent shape of one window (some pipelines shift the schedule
        by resolution).
        """
        self.pipe.scheduler.set_timesteps(num_inference_steps, device=self.device)
        return self.pipe.scheduler.timesteps

    def init_noise(self, shape: Tuple[int, ...], generator: Any, latents: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Initial noise of ``shape`` scaled by the scheduler's ``init_noise_sigma`` (as the pipeline does)."""
        from diffusers.utils.torch_utils import randn_tensor
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        else:
            if tuple(latents.shape) != tuple(shape):
                raise ValueError(f"latents must have shape {tuple(shape)}, got {tuple(latents.shape)}")
            latents = latents.to(device=self.device, dtype=self.dtype)
        return latents * getattr(self.pipe.scheduler, "init_noise_sigma", 1.0)

    def step_kwargs(self, generator: Any, eta: float) -> Dict[str, Any]:
        """Extra keyword arguments for ``scheduler.step`` (``eta``, ``generator`` where accepted)."""
        import inspect
        params = set(inspect.signature(self.pipe.scheduler.step).parameters)
        kwargs: Dict[str, Any] = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditions, guidance_scale: float) -> torch.Tensor:
        """The scheduler-ready model output for a batch of windows, with classifier-free guidance.

        ``latents`` is ``(N, ...)`` already passed through ``scheduler.scale_model_input``;
        ``cond`` holds N rows (from :meth:`Conditions.take`). With ``cond.negative`` set, the
        unconditional and conditional branches run as one batch ``[uncond; cond]`` (the
        pipelines' own batching) and are combined as
        ``eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)`` (Ho & Salimans, 2022).
        """
        if cond.negative is None:
            return self._denoise(latents, t, cond.positive, cond.extra)
        both = {k: torch.cat([cond.negative[k], cond.positive[k]]) for k in cond.positive}
        if isinstance(t, torch.Tensor) and t.numel() > 1:  # one timestep per row: duplicate them too
            t = torch.cat([t.reshape(-1), t.reshape(-1)])
        uncond, text = self._denoise(torch.cat([latents, latents]), t, both, cond.extra).chunk(2)
        return uncond + guidance_scale * (text - uncond)

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, c: Dict[str, torch.Tensor],
                 extra: Dict[str, Any]) -> torch.Tensor:
        """One call of the family's denoiser on ``x`` (``(N, ...)``) with per-row conditions ``c``.

        ``c`` maps each condition name to a tensor with N rows (under guidance the batch is
        already ``[uncond; cond]``); ``extra`` is :attr:`Conditions.extra`, unchanged.
        """
        raise NotImplementedError

    # -- decoding -------------------------------------------------------------------------
    def decode_latents(self, latent: torch.Tensor) -> torch.Tensor:
        """First decoding stage (the VAE): latent -> mel spectrogram / pixels, long axis on ``decoded_dim``."""
        raise NotImplementedError

    def finalize(self, decoded: torch.Tensor) -> torch.Tensor:
        """Second stage (the vocoder for mel pipelines); identity by default.

        Audio adapters return ``(B, samples)`` float32 on the CPU; image adapters
        ``(B, 3, H, W)`` in ``[0, 1]``.
        """
        return decoded

    def check_decode(self, decode: str) -> None:
        """Raise ``ValueError`` when this family cannot decode with ``decode`` (a mode of
        :data:`safa.decode.DECODE_MODES`); every mode is accepted by default."""

    # -- memory (safa.memory: the estimate checked before a call does any work) ------------
    def denoiser_memory(self, rows: int, guidance: bool, window_shape: Optional[Tuple[int, ...]] = None,
                        grad: bool = False) -> Optional[int]:
        """Working memory in bytes of one :meth:`predict` call on ``rows`` windows, or None if unknown.

        Beyond the input and the weights; ``guidance``: classifier-free guidance doubles the
        denoiser's batch; ``window_shape``: one window's latent shape ``(1, C, ...)``; ``grad``:
        the call records the graph for a backward pass (SyncDiffusion). The default walks a
        UNet's config (:func:`~safa.adapters.working_memory.unet_forward_bytes`, under ``grad``
        :func:`~safa.adapters.working_memory.unet_graph_bytes`); other denoisers are unknown
        unless the family overrides this.
        """
        from .working_memory import unet_forward_bytes, unet_graph_bytes
        config = getattr(getattr(self.pipe, "unet", None), "config", None)
        if config is None or window_shape is None or _get_config(config, "down_block_types") is None:
            return None
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        walk = unet_graph_bytes if grad else unet_forward_bytes
        return rows * (2 if guidance else 1) * walk(config, window_shape, itemsize)

    def decoder_memory(self, columns: int, batch_size: int, grad: bool = False,
                       height: Optional[int] = None) -> Optional[int]:
        """Bytes to decode ``columns`` latent columns of ``batch_size`` outputs at once (both stages,
        output included), or None if unknown. ``grad``: the decode records the graph for a backward
        pass (SyncDiffusion); ``height``: the image height (image pipelines). The default knows
        ``AutoencoderKL`` decoders, followed by a HiFi-GAN vocoder where the pipeline has one
        (:mod:`~safa.adapters.working_memory`)."""
        from .working_memory import hifigan_bytes, vae_decode_bytes
        vae, vocoder = getattr(self.pipe, "vae", None), getattr(self.pipe, "vocoder", None)
        if type(vae).__name__ != "AutoencoderKL":
            return None
        shape = self.latent_shape(1, columns, height)
        itemsize = torch.empty((), dtype=vae.dtype).element_size()
        per_row = vae_decode_bytes(vae.config, shape, itemsize, grad=grad)
        if vocoder is not None and not grad:  # SyncDiffusion's loss reads the VAE's mel, not the waveform
            if not hasattr(vocoder.config, "upsample_rates"):
                return None
            per_row += hifigan_bytes(vocoder.config, columns * self.decoded_scale, itemsize)
        return batch_size * per_row

    def output_elements_per_column(self, height: Optional[int] = None) -> int:
        """Elements of one output per output column (audio channels, or 3 x the image height)."""
        raise NotImplementedError

    def output_file_bytes(self, path: str, columns: int) -> int:
        """Bytes of one output file of ``columns`` output columns (0: not checked before writing)."""
        return 0

    def to_output(self, output: torch.Tensor, output_type: str) -> Any:
        """Convert the cropped final output to ``output_type`` (one of :attr:`output_types` but ``"latent"``)."""
        raise NotImplementedError

    def pipeline_tuple(self, output: Any) -> Tuple[Any, ...]:
        """What the wrapped pipeline returns with ``return_dict=False`` for ``output`` (decoded or latent)."""
        return (output,)


def _get_config(config: Any, name: str) -> Any:
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


def _side(sample_size: Any) -> int:
    """The latent height/width of a ``sample_size`` config entry (an int, or ``(h, w)``)."""
    if isinstance(sample_size, (list, tuple)):
        return int(sample_size[-1])
    return int(sample_size)


def _check_number(name: str, value: Any, unit: str) -> float:
    """``value`` as a finite number > 0; a type error says the type, a range error the range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number (int or float, {unit}), got {type(value).__name__}: {value!r}")
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class AudioAdapter(Adapter):
    """What every audio family shares: lengths and windows in seconds, waveforms out, WAV/FLAC files.

    Subclasses provide :attr:`sample_rate`; latent frames per second follow from it and the
    output samples per latent frame (``decoded_scale * finalize_scale``).
    """

    kind = "audio"
    length_argument = "seconds"
    length_hint = "seconds= (or audio_length_in_s=): the length of the audio"
    per_output_argument = "num_waveforms_per_prompt"
    output_field = "audio"
    output_types = ("np", "pt", "latent")
    window_unit = "seconds"
    streams_files = True

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / (self.decoded_scale * self.finalize_scale)

    def window_columns(self, window: float) -> int:
        return int(round(float(window) * self.frames_per_second))

    def check_length(self, seconds: Optional[float], width: Optional[int], height: Optional[int]) -> None:
        for name, value in (("width", width), ("height", height)):
            if value is not None:
                raise ValueError(f"{name} is for image pipelines; give seconds for audio")
        _check_number("seconds", seconds, "seconds")

    def columns_for(self, seconds: Optional[float] = None, width: Optional[int] = None) -> int:
        if seconds is None:
            raise ValueError("seconds is required for audio pipelines")
        return max(1, math.ceil(float(seconds) * self.frames_per_second - 1e-9))

    def length_in_columns(self, seconds: Optional[float] = None, width: Optional[int] = None) -> float:
        return float(seconds) * self.frames_per_second  # type: ignore[arg-type]

    def describe_columns(self, columns: float) -> str:
        return f"{columns / self.frames_per_second:.6g} s ({columns:.6g} latent frames)"

    def output_length(self, seconds: Optional[float] = None, width: Optional[int] = None) -> int:
        return int(round(float(seconds) * self.sample_rate))  # type: ignore[arg-type]

    def output_elements_per_column(self, height: Optional[int] = None) -> int:
        return 1  # mono; multi-channel families override

    def output_file_bytes(self, path: str, columns: int) -> int:
        return audio_file_bytes(path, columns, self.output_elements_per_column())

    def to_output(self, output: torch.Tensor, output_type: str) -> Any:
        # As the audio pipelines: a float tensor, or its numpy array for "np".
        return output.float().cpu().numpy() if output_type == "np" else output

    def encode_audio(self, waveform: torch.Tensor) -> torch.Tensor:
        """The pipeline's own encoder (safa.known): ``(1, channels, samples)`` at :attr:`sample_rate`,
        ``samples`` a whole number of latent columns -> the latent ``(1, ...)`` of those columns."""
        raise NotImplementedError(f"{type(self).__name__} has no audio encoder: audio= is not supported for "
                                  f"{type(self.pipe).__name__}")


class ImageAdapter(Adapter):
    """What every latent-image family shares: width / height in pixels, windows in latent columns,
    geometry from the denoiser's ``sample_size``, classifier-free guidance batching, VAE decoding
    to ``[0, 1]`` and images out through the pipeline's own ``image_processor.postprocess``
    (``finalize`` has already mapped the decoded pixels to ``[0, 1]``, so that decoded tiles are
    images).

    Subclasses provide ``_conditions`` (the pipeline's ``encode_prompt`` as :class:`Conditions`)
    and :meth:`_denoise` (one model call on an already CFG-batched input), and name the
    denoiser in ``_denoiser``.
    """

    kind = "image"
    length_argument = "width"
    length_hint = "width= (pixels): the width of the panorama"
    per_output_argument = "num_images_per_prompt"
    output_field = "images"
    output_types = ("pil", "np", "pt", "latent")
    window_unit = "latent columns"
    long_dim = -1
    reference_axis = -2  # images: the reference swap alternates over rows (paper Sec. 2.3, Fig. 4)
    decoded_dim = -1
    finalize_scale = 1
    # decode_context: the base default (8 latent columns each side of a tile). The SD VAE decoder
    # has GroupNorm and a mid-block self-attention, so no finite context makes a tiled decode
    # exact; 8 covers its convolutions' effective reach (diffusers' own tiled VAE decode blends
    # over a comparable margin).
    # The panorama has a nsfw flag per image in the pipeline's tuple (SD 1.x / 2.x): the safety
    # checker is not run here, so it is None, as the pipeline's own without a safety checker.
    returns_nsfw_flags: ClassVar[bool] = False

    def window_columns(self, window: float) -> int:
        if float(window) != int(window):
            raise ValueError(f"window is in latent columns for image pipelines: an int, got {window}")
        return int(window)

    def check_length(self, seconds: Optional[float], width: Optional[int], height: Optional[int]) -> None:
        if seconds is not None:
            raise ValueError("seconds is for audio pipelines; give width (pixels) for images")
        if isinstance(width, bool) or not isinstance(width, int):
            raise ValueError(f"width must be an int (pixels), got {type(width).__name__}: {width!r}")
        if width < 1:
            raise ValueError(f"width must be an int >= 1 (pixels), got {width!r}")
        self.latent_rows(height)  # validates height

    def columns_for(self, seconds: Optional[float] = None, width: Optional[int] = None) -> int:
        if width is None:
            raise ValueError("width is required for image pipelines")
        return max(1, math.ceil(int(width) / (self.decoded_scale * self.finalize_scale)))

    def length_in_columns(self, seconds: Optional[float] = None, width: Optional[int] = None) -> float:
        return int(width) / (self.decoded_scale * self.finalize_scale)  # type: ignore[arg-type]

    def describe_columns(self, columns: float) -> str:
        return f"{columns * self.decoded_scale * self.finalize_scale:.6g} px ({columns:.6g} latent columns)"

    def output_length(self, seconds: Optional[float] = None, width: Optional[int] = None) -> int:
        return int(width)  # type: ignore[arg-type]

    def output_elements_per_column(self, height: Optional[int] = None) -> int:
        return 3 * self.latent_shape(1, 1, height)[-2] * self.decoded_scale

    def to_output(self, output: torch.Tensor, output_type: str) -> Any:
        processor = getattr(self.pipe, "image_processor", None)
        if processor is None:  # a pipeline without one: VaeImageProcessor's own conversion
            from diffusers.image_processor import VaeImageProcessor
            processor = VaeImageProcessor()
        return processor.postprocess(output, output_type=output_type, do_denormalize=[False] * output.shape[0])

    def pipeline_tuple(self, output: Any) -> Tuple[Any, ...]:
        return (output, None) if self.returns_nsfw_flags else (output,)

    @property
    def decoded_scale(self) -> int:  # type: ignore[override]
        return int(self.pipe.vae_scale_factor)

    def native_window(self) -> int:
        return _side(self.denoiser.config.sample_size)

    def latent_rows(self, height: Optional[int] = None) -> int:
        """Latent rows (dim -2) of every window and of the panorama for ``height`` pixels.

        ``None``: the native window's height (a square window, what the model was trained on).
        """
        if height is None:
            return self.native_window()
        m = self.decoded_scale * self.window_multiple()
        if isinstance(height, bool) or not isinstance(height, int):
            raise ValueError(f"height must be an int (pixels), got {type(height).__name__}: {height!r}")
        if height < m or height % m:
            raise ValueError(f"height must be a positive multiple of {m} pixels, got {height!r}")
        return height // self.decoded_scale

    def latent_shape(self, batch_size: int, length: int, height: Optional[int] = None) -> Tuple[int, ...]:
        return (batch_size, int(self.denoiser.config.in_channels), self.latent_rows(height), int(length))

    # -- decoding ----------------------------------------------------------------------------
    def _vae_input(self, latent: torch.Tensor) -> torch.Tensor:
        """Undo the latent normalisation the way the pipeline does before ``vae.decode``."""
        return latent / self.pipe.vae.config.scaling_factor

    def decode_latents(self, latent: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        z = self._vae_input(latent.to(device=self.device, dtype=vae.dtype))
        return vae.decode(z, return_dict=False)[0]

    def finalize(self, decoded: torch.Tensor) -> torch.Tensor:
        # The pipelines' image_processor.postprocess: [-1, 1] -> [0, 1] (denormalize), float.
        return (decoded.float() / 2 + 0.5).clamp(0, 1)

    # -- image= : a canvas-sized image (safa.adapters.canvas, docs/conditions.md) -------------
    @property
    def image_pixels_per_column(self) -> int:
        """Pixels of the call's ``image`` per latent column (the VAE factor: the image is the output's size)."""
        return self.decoded_scale

    def image_conditions(self, image: Any, generator: Any) -> Dict[str, torch.Tensor]:
        """The per-pixel conditions of a :class:`~safa.adapters.canvas.CanvasImage` for the whole canvas,
        by the denoiser's argument names (cropped per view by the sampler); none for img2img."""
        return {}

    def encode_image(self, pixels: torch.Tensor, generator: Any, sample_mode: str = "sample") -> torch.Tensor:
        """img2img: ``pixels`` ``(B, 3, H, W)`` in ``[0, 1]`` -> the latent, as the pipeline's img2img
        ``prepare_latents`` encodes it (a sample of the VAE's posterior drawn from ``generator``,
        one generator per row for a list, times ``scaling_factor``; ``sample_mode="argmax"``: its mode)."""
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
        vae = self.pipe.vae
        x = (pixels * 2.0 - 1.0).to(device=self.device, dtype=vae.dtype)  # VaeImageProcessor.normalize
        if isinstance(generator, list):
            if x.shape[0] < len(generator):
                x = x.repeat(len(generator) // x.shape[0], 1, 1, 1)
            latent = torch.cat([retrieve_latents(vae.encode(x[i:i + 1]), generator=generator[i],
                                                 sample_mode=sample_mode) for i in range(x.shape[0])])
        else:
            latent = retrieve_latents(vae.encode(x), generator=generator, sample_mode=sample_mode)
        return vae.config.scaling_factor * latent.to(self.dtype)

    # -- conditions: the pipeline's own encode_prompt, from prompts or from embeddings -------
    def _conditions(self, cfg: bool, **kwargs: Any) -> Conditions:
        """``pipe.encode_prompt(**kwargs)`` as :class:`Conditions`."""
        raise NotImplementedError

    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Optional[Sequence[str]],
                       guidance_scale: float) -> Conditions:
        cfg = guidance_scale > 1.0  # the pipelines' own rule
        prompts, negative = self._split(prompts, negative_prompts, cfg)
        return self._conditions(cfg, prompt=prompts, negative_prompt=negative)

    def conditions_from_embeds(self, embeds: Dict[str, torch.Tensor], guidance_scale: float) -> Conditions:
        return self._conditions(guidance_scale > 1.0, prompt=None, **embeds)

    # -- shared prompt handling ------------------------------------------------------------
    @staticmethod
    def _split(prompts: Sequence[str], negative_prompts: Optional[Sequence[str]],
               cfg: bool) -> Tuple[list, Optional[list]]:
        return list(prompts), (list(negative_prompts) if (cfg and negative_prompts is not None) else None)


class VideoAdapter(Adapter):
    """What every latent-video family shares: a long video as joint diffusion along the latent
    FRAME axis (docs/video.md). Lengths are seconds at the pipeline's :attr:`fps` (``frames / fps``:
    give a whole number of frames), windows in seconds; the frame size is the call's ``height`` /
    ``width`` in pixels (default the pipeline's own), held for the call by :meth:`check_length`.

    The latent is ``(B, C, F, H, W)`` with frames on dim -3 (the long axis, and the axis the
    reference swap alternates along, as time for audio). A causal video VAE compresses
    ``temporal_compression`` frames into one latent frame, the first frame alone: an open video of
    ``L`` latent frames has ``t (L - 1) + 1`` frames, so ``(frames - 1) % t == 0``; in a loop every
    latent frame is ``t`` frames (``frames % t == 0``). Outputs: ``"np"`` ``(B, F, H, W, 3)``, ``"pt"``
    ``(B, F, 3, H, W)`` in ``[0, 1]``, ``"pil"`` a list of frame lists, as the video pipelines return
    them; between :meth:`finalize` and :meth:`to_output` the frames are the last axis (the output
    stage crops and streams along the last axis). Files: MP4 (:mod:`safa.video_io`).
    """

    kind = "video"
    length_argument = "seconds"
    length_hint = "seconds= (the video's length: frames / fps)"
    per_output_argument = "num_videos_per_prompt"
    output_field = "frames"
    output_types = ("np", "pt", "pil", "latent")
    window_unit = "seconds"
    streams_files = True
    long_dim = -3
    reference_axis = -3  # the reference swap alternates along frames, as along time for audio
    decoded_dim = -3
    finalize_scale = 1

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        self._frame_size: Optional[Tuple[int, int]] = None  # (height, width) in pixels of the current call

    # -- what a family provides ----------------------------------------------------------------
    @property
    def fps(self) -> int:
        """Frames per second of the output (the rate the pipeline's videos are exported at)."""
        raise NotImplementedError

    @property
    def temporal_compression(self) -> int:
        """Video frames per latent frame (the first latent frame holds one)."""
        raise NotImplementedError

    @property
    def spatial_compression(self) -> int:
        raise NotImplementedError

    def size_multiple(self) -> int:
        """Frame height and width must be multiples of this many pixels (VAE x patch)."""
        return self.spatial_compression

    def default_frame_size(self) -> Tuple[int, int]:
        return (int(self.pipeline_default("height", 480)), int(self.pipeline_default("width", 832)))

    @property
    def decoded_scale(self) -> int:  # type: ignore[override]
        return self.temporal_compression

    @property
    def frame_size(self) -> Tuple[int, int]:
        """``(height, width)`` in pixels of the frames of the current call (the pipeline's default before one)."""
        return self._frame_size or self.default_frame_size()

    # -- lengths: seconds <-> frames <-> latent frames ------------------------------------------
    def frames_in(self, seconds: float) -> float:
        return float(seconds) * self.fps

    def seconds_for_frames(self, frames: int) -> float:
        """The ``seconds`` to give for a video of ``frames`` frames."""
        return frames / self.fps

    def valid_frame_counts(self, frames: float, loop: bool) -> Tuple[int, ...]:
        """The frame counts nearest ``frames`` that a video (``loop``: a looping one) can have."""
        t = self.temporal_compression
        offset = 0 if loop else 1
        below = math.floor((frames - offset) / t) * t + offset
        return tuple(n for n in (below, below + t) if n >= max(1, t if loop else 1) and n != frames) or (below + t,)

    def _describe_frames(self, counts: Sequence[int]) -> str:
        return " or ".join(f"{n} frames (seconds={self.seconds_for_frames(n):.6g})" for n in counts)

    def window_columns(self, window: float) -> int:
        # A window of w latent frames spans t * w frames of a long video (t w - t + 1 alone).
        return int(round(self.frames_in(window) / self.temporal_compression))

    def check_length(self, seconds: Optional[float], width: Optional[int], height: Optional[int]) -> None:
        _check_number("seconds", seconds, "seconds")
        frames = self.frames_in(seconds)  # type: ignore[arg-type]
        if abs(frames - round(frames)) > 1e-6:
            raise ValueError(f"seconds={seconds!r} is {frames:.6g} frames at {self.fps} fps: give a whole number of "
                             f"frames, e.g. {self._describe_frames(self.valid_frame_counts(frames, False))}")
        default = self.default_frame_size()
        m = self.size_multiple()
        size = []
        for name, value, fallback in (("height", height, default[0]), ("width", width, default[1])):
            value = fallback if value is None else value
            if isinstance(value, bool) or not isinstance(value, int) or value < m or value % m:
                raise ValueError(f"{name} must be a positive multiple of {m} pixels for {type(self.pipe).__name__} "
                                 f"(the frame size), got {value!r}")
            size.append(value)
        self._frame_size = (size[0], size[1])

    def columns_for(self, seconds: Optional[float] = None, width: Optional[int] = None) -> int:
        if seconds is None:
            raise ValueError("seconds is required for video pipelines")
        t, frames = self.temporal_compression, self.frames_in(seconds)
        if abs(frames - round(frames)) <= 1e-6:
            frames = round(frames)
            if (frames - 1) % t:
                raise ValueError(f"a video of {frames} frames does not fit the VAE's temporal compression "
                                 f"((frames - 1) % {t} == 0 for {type(self.pipe).__name__}): nearest "
                                 f"{self._describe_frames(self.valid_frame_counts(frames, False))}")
        # (a fractional count only comes from the memory planner's length search: rounded up)
        return max(1, math.ceil((frames - 1) / t - 1e-9) + 1)

    def length_in_columns(self, seconds: Optional[float] = None, width: Optional[int] = None) -> float:
        # A loop has no first frame: every latent frame is t frames (a LoopLengthError names the
        # nearest lengths when frames % t != 0).
        return self.frames_in(seconds) / self.temporal_compression  # type: ignore[arg-type]

    def describe_columns(self, columns: float) -> str:
        frames = columns * self.temporal_compression
        return f"{frames / self.fps:.6g} s ({columns:.6g} latent frames, {frames:.6g} frames)"

    def output_length(self, seconds: Optional[float] = None, width: Optional[int] = None) -> int:
        return int(round(self.frames_in(seconds)))  # type: ignore[arg-type]

    def latent_shape(self, batch_size: int, length: int, height: Optional[int] = None) -> Tuple[int, ...]:
        h, w = self.frame_size
        s = self.spatial_compression
        return (batch_size, int(self.denoiser.config.in_channels), int(length), h // s, w // s)

    def latent_rows(self, height: Optional[int] = None) -> int:
        return self.frame_size[0] // self.spatial_compression

    def output_elements_per_column(self, height: Optional[int] = None) -> int:
        h, w = self.frame_size
        return 3 * h * w

    def output_file_bytes(self, path: str, columns: int) -> int:
        # A generous size for H.264 at the writer's crf 18: 4 bits per pixel and frame (the tiny test
        # model's videos, random noise, took 3.2; natural video takes far less).
        return columns * self.output_elements_per_column() // 6 + 4096

    def check_decode(self, decode: str) -> None:
        if decode == "views":
            raise ValueError("decode='views' (decode each view, stitch the pixels) is not available for video: the "
                             "causal VAE decodes the frames in order; use decode='auto', 'full' or 'tiled'")

    # -- outputs ---------------------------------------------------------------------------------
    def finalize(self, decoded: torch.Tensor) -> torch.Tensor:
        # The video processor's denormalisation, [-1, 1] -> [0, 1], with the frames moved last.
        return (decoded.float() / 2 + 0.5).clamp(0, 1).permute(0, 1, 3, 4, 2)

    def to_output(self, output: torch.Tensor, output_type: str) -> Any:
        frames = output.permute(0, 4, 1, 2, 3)  # (B, F, 3, H, W), as the pipelines' "pt"
        if output_type == "pt":
            return frames
        array = frames.permute(0, 1, 3, 4, 2).cpu().float().numpy()  # (B, F, H, W, 3), as "np"
        if output_type == "np":
            return array
        from diffusers.image_processor import VaeImageProcessor
        return [VaeImageProcessor.numpy_to_pil(video) for video in array]
