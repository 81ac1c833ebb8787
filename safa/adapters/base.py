"""The adapter protocol: what the joint-diffusion sampler needs to know about a pipeline family.

The sampler (``safa.sampler.JointDiffusion``) is model-agnostic. It owns the long latent,
the views, the reference window, the scheduler loop and the merge; everything that depends
on the wrapped diffusers pipeline goes through one small :class:`Adapter` subclass per
pipeline family. An adapter holds a reference to the pipeline (no weights are copied).

Writing an adapter (see ``safa/adapters/audioldm.py`` for a complete one):

1. Subclass :class:`Adapter`, set the class attributes ``pipeline_classes`` (class names it
   accepts), ``kind`` (``"audio"`` or ``"image"``), ``long_dim`` and ``reference_axis``.
2. Implement :meth:`latent_shape`, :meth:`native_window`, :meth:`columns_for`,
   :meth:`output_length`, :meth:`encode_prompts`, :meth:`predict` and :meth:`decode_latents`
   (and :meth:`finalize` plus ``finalize_scale`` when decoding has a second stage such as
   a vocoder). Override :meth:`set_timesteps` / :meth:`init_noise` only when the pipeline
   does something special (e.g. SD3's shifted flow-matching sigmas).
3. Decorate the class with :func:`register_adapter`. Modules placed in ``safa/adapters/``
   are imported automatically on the first lookup; anything else calls
   ``register_adapter`` at import time and is listed in ``safa.adapters._EXTRA_MODULES``.

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

__all__ = ["Adapter", "Conditions", "register_adapter", "registered_adapters", "adapter_class_for"]


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

    @property
    def num_prompts(self) -> int:
        return next(iter(self.positive.values())).shape[0]

    def take(self, rows: torch.Tensor) -> "Conditions":
        """The conditions of a batch whose row ``r`` uses prompt ``rows[r]``."""
        def pick(d: Optional[Dict[str, torch.Tensor]]) -> Optional[Dict[str, torch.Tensor]]:
            if d is None:
                return None
            return {k: (v.index_select(0, rows.to(v.device)) if isinstance(v, torch.Tensor) else v)
                    for k, v in d.items()}
        return Conditions(pick(self.positive), pick(self.negative), dict(self.extra))


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
        kind: ``"audio"`` (output ``(B, samples)``) or ``"image"`` (output ``(B, 3, H, W)``).
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
    kind: ClassVar[str] = "audio"
    long_dim: ClassVar[int] = -1
    reference_axis: ClassVar[int] = -1
    decoded_dim: ClassVar[int] = -1
    decoded_scale: ClassVar[int] = 1
    finalize_scale: ClassVar[int] = 1
    decode_context: ClassVar[int] = 8
    fixed_window: ClassVar[bool] = False  # the denoiser accepts its native window only

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
        """Convert the user's ``window`` (seconds for audio, latent columns for images) to columns."""
        if self.kind == "audio":
            return int(round(float(window) * self.frames_per_second))
        if float(window) != int(window):
            raise ValueError(f"window is in latent columns for image pipelines: an int, got {window}")
        return int(window)

    @property
    def frames_per_second(self) -> float:
        """Latent columns per second of audio (audio adapters only)."""
        raise NotImplementedError

    def columns_for(self, seconds: Optional[float] = None, width: Optional[int] = None) -> int:
        """Latent columns needed for the requested length (``seconds`` for audio, ``width`` pixels for images)."""
        if self.kind == "audio":
            if seconds is None:
                raise ValueError("seconds is required for audio pipelines")
            return max(1, math.ceil(float(seconds) * self.frames_per_second - 1e-9))
        if width is None:
            raise ValueError("width is required for image pipelines")
        return max(1, math.ceil(int(width) / (self.decoded_scale * self.finalize_scale)))

    def length_in_columns(self, seconds: Optional[float] = None, width: Optional[int] = None) -> float:
        """The requested length in latent columns, exactly (a loop must be a whole number of them)."""
        if self.kind == "audio":
            return float(seconds) * self.frames_per_second
        return int(width) / (self.decoded_scale * self.finalize_scale)

    def describe_columns(self, columns: float) -> str:
        """A length in latent columns as users give it: seconds for audio, pixels for images."""
        if self.kind == "audio":
            return f"{columns / self.frames_per_second:.6g} s ({columns:.6g} latent frames)"
        return f"{columns * self.decoded_scale * self.finalize_scale:.6g} px ({columns:.6g} latent columns)"

    def output_length(self, seconds: Optional[float] = None, width: Optional[int] = None) -> int:
        """Output columns (samples / pixels) to crop the decoded output to."""
        if self.kind == "audio":
            return int(round(float(seconds) * self.sample_rate))
        return int(width)

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

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the latents (the denoiser's dtype)."""
        return self.pipe.unet.dtype

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

    # -- memory (safa.memory: the estimate checked before a call does any work) ------------
    def denoiser_memory(self, rows: int, guidance: bool) -> Optional[int]:
        """Working memory in bytes of one :meth:`predict` call on ``rows`` windows, or None if unknown.

        Beyond the input and the weights; ``guidance``: classifier-free guidance doubles the
        denoiser's batch. Families that can say override this (the built-in texture model does).
        """
        return None

    def decoder_memory(self, columns: int, batch_size: int) -> Optional[int]:
        """Bytes to decode ``columns`` latent columns of ``batch_size`` outputs at once (both stages,
        output included), or None if unknown."""
        return None

    def output_elements_per_column(self, height: Optional[int] = None) -> int:
        """Elements of one output per output column: audio channels (1 by default), or 3 x the
        image height in pixels."""
        if self.kind == "audio":
            return 1
        return 3 * self.latent_shape(1, 1, height)[-2] * self.decoded_scale

    def to_output(self, output: torch.Tensor, output_type: str) -> Any:
        """Convert the cropped final output to ``output_type`` (``"pt"``, ``"np"``, ``"pil"`` for images)."""
        if output_type == "pt":
            return output
        if output_type == "np":
            return output.float().cpu().numpy() if self.kind == "audio" else \
                output.float().cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "pil" and self.kind == "image":
            import numpy as np
            from PIL import Image
            arr = (output.float().clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
            return [Image.fromarray(a) for a in arr]
        allowed = ("pt", "np", "latent") + (("pil",) if self.kind == "image" else ())
        raise ValueError(f"output_type must be one of {allowed}, got {output_type!r}")
