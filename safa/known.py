"""The user's own audio or image in a call: continue it, extend it on both sides, fill its gaps, loop it.

``jd(prompt, audio=clip, sample_rate=sr, seconds=300)`` places ``clip`` at ``audio_start``
seconds (default 0: a continuation) and generates the rest of the ``seconds``; ``keep=[(start,
end), ...]`` (seconds of the output) keeps only those parts of the clip and regenerates the
gaps; ``loop=True`` makes a seamless loop that contains the clip. The names follow diffusers':
``audio`` / ``sample_rate`` as the audio pipelines' ``initial_audio_waveforms`` /
``initial_audio_sampling_rate``, ``audio_latents`` as ``latents`` (the clip already encoded).

Mechanism (docs/own-audio.md):

1. :func:`read_audio`: the clip (an array / tensor, or a WAV / FLAC path) as float32
   ``(channels, samples)`` at the model's rate (``scipy.signal.resample_poly``), mono models
   given a multichannel clip downmix it (with a notice), stereo models given mono duplicate it.
2. :func:`prepare_known`: the clip encoded ONCE with the pipeline's own encoder
   (``adapter.encode_audio``: AudioLDM's mel + VAE, Stable Audio's Oobleck VAE, the texture
   model's inverse decoder) into latent columns, and the latent columns of the long latent
   ``J`` that the keep-ranges cover whole.
3. Every step, after the merge (loop block 7.6), :meth:`KnownColumns.impose` writes into every
   view the known latent brought to the noise level of the step's output by the scheduler's own
   forward process (:func:`noised_known`), one ``index_put_`` over all views; at the last step
   the clean known latent. This is diffusers' inpainting rule (``StableDiffusionInpaintPipeline``:
   ``add_noise(image_latents, noise, timesteps[i + 1])``), with the same fixed noise (the
   columns of ``J_T``) at every step.
4. :meth:`KnownColumns.paste` puts the user's samples back into the decoded output over each
   keep-range, with a raised-cosine crossfade of ``audio_crossfade`` seconds inside each end
   that joins generated audio, so the clip never loses its samples to the VAE round trip
   (``paste_audio=False``: the decoded version).

Images (outpainting, SD 1.x/2.x and SDXL): ``jd(prompt, image=img, width=4096)`` with ``img``
narrower than ``width`` and no ``strength`` places it at pixel column ``image_start`` and
generates the rest around it (``loop=True``: a 360-degree panorama containing it). The same
:class:`KnownColumns` does it: :func:`prepare_known_image` encodes the image once into the latent
columns it covers, imposed every step as above, and its pixels are pasted back with a
raised-cosine crossfade of ``image_crossfade`` pixel columns (``paste_image=False``: the decoded
version).
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from safa_kernels import ViewLayout

from .methods.base import leading_steps

__all__ = ["KnownColumns", "KnownAudio", "read_audio", "prepare_known", "prepare_known_image", "noised_known",
           "keep_ranges", "Resampling", "check_resample", "step_runs", "noise_level", "renoise",
           "RESAMPLE_SCHEDULERS"]


def read_audio(audio: Any, sample_rate: Optional[int], target_rate: int, channels: int,
               name: str = "audio") -> np.ndarray:
    """``audio`` (path, numpy array or tensor; ``(samples,)`` or ``(channels, samples)``) as float32
    ``(channels, samples)`` at ``target_rate``.

    A path is read with ``soundfile`` (WAV, FLAC, ...), whose rate is used unless ``sample_rate``
    is given; an array needs ``sample_rate``. Silence-only warns (the model is then asked to
    continue silence); more channels than the model has are averaged, with a notice.
    """
    if isinstance(audio, (str, os.PathLike)):
        import soundfile
        path = os.fspath(audio)
        if not os.path.isfile(path):
            raise ValueError(f"{name}: no such file {path!r}")
        try:
            data, file_rate = soundfile.read(path, dtype="float32", always_2d=True)
        except Exception as exc:  # soundfile raises its own LibsndfileError / RuntimeError
            raise ValueError(f"{name}: cannot read {path!r} as audio ({str(exc).splitlines()[0]})") from None
        data = data.T
        sample_rate = file_rate if sample_rate is None else sample_rate
    else:
        if isinstance(audio, torch.Tensor):
            audio = audio.detach().float().cpu().numpy()
        if not isinstance(audio, np.ndarray):
            raise ValueError(f"{name} must be a path, a numpy array or a torch tensor, got {type(audio).__name__}")
        if audio.ndim not in (1, 2):
            raise ValueError(f"{name} must be (samples,) or (channels, samples), got shape {audio.shape}")
        if audio.size == 0:
            raise ValueError(f"{name} is empty (0 samples)")
        data = np.asarray(audio, dtype=np.float32).reshape(-1, audio.shape[-1])
        if sample_rate is None:
            raise ValueError(f"sample_rate is required with an {name} array (samples per second of {name})")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be an int > 0 (samples per second), got {sample_rate!r}")
    if data.shape[-1] == 0:
        raise ValueError(f"{name} is empty (0 samples)")
    if not np.isfinite(data).all():
        raise ValueError(f"{name} contains NaN or infinite samples")
    if data.shape[0] > channels:
        warnings.warn(f"{name} has {data.shape[0]} channels and the model {channels}: downmixed to mono", stacklevel=3)
        data = data.mean(axis=0, keepdims=True)
    if data.shape[0] < channels:
        data = np.repeat(data[:1], channels, axis=0)
    if not np.any(data):
        warnings.warn(f"{name} is silence only: the model is asked to continue silence", stacklevel=3)
    if int(sample_rate) != target_rate:
        from scipy.signal import resample_poly
        g = math.gcd(int(sample_rate), int(target_rate))
        data = resample_poly(data, target_rate // g, int(sample_rate) // g, axis=-1).astype(np.float32)
    return np.ascontiguousarray(data, dtype=np.float32)


def keep_ranges(keep: Optional[Sequence[Tuple[float, float]]], clip: Tuple[float, float], seconds: float,
                ) -> List[Tuple[float, float]]:
    """The keep-ranges in seconds of the output, checked, sorted and merged (default: the whole clip)."""
    start, end = clip
    if end > seconds + 1e-9:
        raise ValueError(f"the clip ends at {end:.6g} s (audio_start {start:.6g} s + its {end - start:.6g} s), "
                        f"beyond the requested {seconds:.6g} s: ask for more seconds or a shorter clip")
    if keep is None:
        return [(start, min(end, seconds))]
    try:
        ranges = [(float(a), float(b)) for a, b in keep]
    except (TypeError, ValueError):
        raise ValueError(f"keep must be a list of (start, end) pairs in seconds, got {keep!r}") from None
    if not ranges:
        raise ValueError("keep is empty: give at least one (start, end) range, or no keep for the whole clip")
    for a, b in ranges:
        if not (start - 1e-9 <= a < b <= end + 1e-9):
            raise ValueError(f"keep-range ({a:g}, {b:g}) s must satisfy {start:.6g} <= start < end <= {end:.6g} "
                            f"(inside the clip, placed at audio_start)")
    ranges.sort()
    merged = [ranges[0]]
    for a, b in ranges[1:]:
        if a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


def noised_known(scheduler: Any, known: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                 i: int) -> torch.Tensor:
    """``known`` (clean) at the noise level of step ``i``'s output, by the scheduler's own forward process.

    Step ``i`` turns ``x`` at ``timesteps[i]`` into ``x`` at ``timesteps[i + 1]`` (what the next step
    reads it as), and the last step into the clean sample: so ``add_noise(known, noise,
    timesteps[i + 1])`` (``scale_noise`` for flow matching: ``(1 - s) x0 + s noise``), and
    ``known`` itself after the last step. ``add_noise`` maps the timestep to the scheduler's own
    noise level: ``alphas_cumprod`` (DDIM, DDPM, PNDM), ``sigmas[i + 1]`` through the step index
    (DPM-Solver, UniPC, Euler and the EDM-form Cosine DPM-Solver, whose ``x = x0 + sigma noise``).
    Tested against each scheduler's own step with an exact model (tests/sampler/test_known_audio.py).
    """
    if i + 1 >= len(timesteps):
        return known
    t_next = timesteps[i + 1:i + 2]
    if hasattr(scheduler, "scale_noise"):
        return scheduler.scale_noise(known, t_next, noise)
    return scheduler.add_noise(known, noise, t_next)


@dataclass
class KnownColumns:
    """The known part of a call, for audio and images alike: a span of latent columns on the long
    axis to impose every step, and the user's own output (samples, pixel columns) to paste at the end.

    Attributes:
        latent: the clean known latent ``(B, ..., K)`` on the long axis ``dim`` (``K`` columns
            from long-latent column ``first_column``; for a loop modulo the layout's length).
        columns: the long-latent columns imposed (sorted), a subset of the ``K``.
        given: the user's output, its long axis last: a clip at the model's rate ``(channels,
            samples)`` (numpy), or an image ``(1 or B, 3, H, w)`` in ``[0, 1]`` (a tensor); placed at
            output sample / pixel column ``given_start`` (None: nothing to paste).
        output_ranges: the kept ranges in output samples / pixel columns (a loop's may run past
            ``out_len``: they wrap).
        crossfade: samples / pixel columns of each crossfade (0: none).
        loop: the output is a loop (the junction at its end joins its start).
    """

    latent: torch.Tensor
    first_column: int
    columns: List[int]
    dim: int
    given: Any = None
    given_start: int = 0
    output_ranges: Tuple[Tuple[int, int], ...] = ()
    crossfade: int = 0
    loop: bool = False
    out_len: int = 0
    noise: Optional[torch.Tensor] = None
    _index: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
    _reference: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None

    def bind(self, layout: ViewLayout, j_t_views: torch.Tensor, init_noise_sigma: float) -> None:
        """Index every (view, local column) holding a known column, and take the fixed noise of the
        known columns from the views of ``J_T`` (overlapping views hold the same noise there)."""
        length, window = layout.length, layout.window
        wanted = {c % length: c - self.first_column for c in self.columns}
        view_idx, local_idx, src_idx = [], [], []
        for v, s in enumerate(layout.starts):
            for k in range(window):
                c = (s + k) % length if layout.loop else s + k
                if c in wanted:
                    view_idx.append(v), local_idx.append(k), src_idx.append(wanted[c])
        device = j_t_views.device
        self._index = (torch.tensor(view_idx, device=device), torch.tensor(local_idx, device=device),
                       torch.tensor(src_idx, device=device))
        # Noise of each known column from the first view holding it; columns not imposed keep 0.
        moved = j_t_views.movedim(self.dim, 1)  # (n, W, B, ...)
        noise = torch.zeros_like(self.latent.movedim(self.dim, 0))
        first = {}
        for v, k, s in zip(view_idx, local_idx, src_idx):
            first.setdefault(s, (v, k))
        for s, (v, k) in first.items():
            noise[s] = moved[v, k] / init_noise_sigma
        self.noise = noise.movedim(0, self.dim)

    def impose(self, views: torch.Tensor, scheduler: Any, timesteps: torch.Tensor, i: int) -> None:
        """Write the known latent at step ``i``'s output noise level into every view, in place
        (one ``index_put_`` over all views)."""
        if self._index is None or not self.columns:
            return
        view_idx, local_idx, src_idx = self._index
        value = noised_known(scheduler, self.latent, self.noise, timesteps, i).to(views.dtype)
        target = views.movedim(self.dim, 1)  # (n, W, B, ...) a view of the same storage
        target.index_put_((view_idx, local_idx), value.movedim(self.dim, 0)[src_idx])

    def bind_reference(self, reference_t: torch.Tensor, output_columns: int, init_noise_sigma: float) -> None:
        """Place the clip in SaFa's reference window ``X^0`` (``(B, ..., window)`` on ``dim``).

        The reference's middle is swapped into every view during the first steps (Eq. 10), so
        whatever it holds sets the output's global character; holding the clip, it carries the
        clip's character (sub-style) to views a window away, which the known columns alone do not
        reach. Placed: the longest run of known columns (its last ``window`` columns if longer),
        at the reference's start, or at its end when the run ends the output (an extension to the
        left); the rest of the reference is generated around it. Its noise is the reference's own.
        """
        window = reference_t.shape[self.dim]
        runs: List[List[int]] = []
        for c in self.columns:
            if runs and c == runs[-1][-1] + 1:
                runs[-1].append(c)
            else:
                runs.append([c])
        if not runs:
            return
        run = max(runs, key=len)[-window:]
        at_end = run[-1] + 1 >= output_columns and not self.loop
        local = list(range(window - len(run), window)) if at_end else list(range(len(run)))
        device = reference_t.device
        local_idx = torch.tensor(local, device=device)
        src_idx = torch.tensor([c - self.first_column for c in run], device=device)
        noise = reference_t.index_select(self.dim, local_idx) / init_noise_sigma
        self._reference = (local_idx, self.latent.index_select(self.dim, src_idx), noise)

    def impose_reference(self, reference: torch.Tensor, scheduler: Any, timesteps: torch.Tensor, i: int) -> None:
        """Write the clip into the reference window at step ``i``'s output noise level, in place
        (``scheduler``: the reference's own copy)."""
        if self._reference is None:
            return
        local_idx, clip, noise = self._reference
        value = noised_known(scheduler, clip, noise, timesteps, i)
        reference.index_copy_(self.dim % reference.dim(), local_idx, value.to(reference.dtype))

    # -- the output: the user's samples back, crossfaded into the generation ----------------
    def paste(self, start: int, piece: torch.Tensor) -> None:
        """Paste the user's output into ``piece`` (output samples / pixel columns ``[start, start +
        len)``, long axis last: audio ``(B, S)`` or ``(B, C, S)``, an image ``(B, 3, H, S)``) in place,
        crossfading at every end that joins generated output. In a loop a range that runs past the
        output's end wraps to its start."""
        if self.given is None:
            return
        stop = start + piece.shape[-1]
        for shift in ((0, self.out_len) if self.loop else (0,)):
            for a, b in self.output_ranges:
                lo, hi = max(a, start + shift), min(b, stop + shift)
                if lo >= hi:
                    continue
                user = torch.as_tensor(self.given[..., lo - self.given_start:hi - self.given_start]).to(piece.device)
                if piece.dim() == 2:
                    user = user[0]
                weight = torch.from_numpy(self._weights(a, b, lo, hi)).to(piece.device, piece.dtype)
                region = piece[..., lo - shift - start:hi - shift - start]
                region.copy_(region * (1 - weight) + user.to(piece.dtype) * weight)

    def _weights(self, a: int, b: int, lo: int, hi: int) -> np.ndarray:
        """The clip's weight at output samples ``[lo, hi)`` of keep-range ``[a, b)``: 1 inside, a
        raised-cosine ramp over ``crossfade`` samples at each end that joins generated audio (the
        output's own ends join nothing, except in a loop)."""
        n = np.arange(lo, hi, dtype=np.float64)
        w = np.ones_like(n)
        f = min(self.crossfade, (b - a) // 2)
        if f > 0:
            if a > 0 or self.loop:
                w = np.minimum(w, np.sin(0.5 * np.pi * np.clip((n - a + 0.5) / f, 0, 1)) ** 2)
            if b < self.out_len or self.loop:
                w = np.minimum(w, np.sin(0.5 * np.pi * np.clip((b - n - 0.5) / f, 0, 1)) ** 2)
        return w.astype(np.float32)


# The audio name of the known columns (the class was written for audio first).
KnownAudio = KnownColumns


def prepare_known(adapter: Any, *, audio: Any, sample_rate: Optional[int], audio_latents: Optional[torch.Tensor],
                  audio_start: float, keep: Optional[Sequence[Tuple[float, float]]], seconds: float,
                  loop: bool, audio_crossfade: float, paste_audio: bool, batch_size: int,
                  layout: Any) -> Optional[KnownColumns]:
    """Check the known-audio arguments of a call and encode the clip once (None: no clip given)."""
    if audio is None and audio_latents is None:
        for name, value, default in (("keep", keep, None), ("audio_start", audio_start, 0.0)):
            if value != default:
                raise ValueError(f"{name} places the user's audio: give audio= (or audio_latents=) with it")
        return None
    if adapter.kind != "audio":
        raise ValueError(f"audio= is for audio pipelines; {type(adapter.pipe).__name__} makes {adapter.kind}s")
    if audio is not None and audio_latents is not None:
        raise ValueError("give audio= or audio_latents=, not both")
    for name, value in (("audio_start", audio_start), ("audio_crossfade", audio_crossfade)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
    if not isinstance(paste_audio, bool):
        raise ValueError(f"paste_audio must be a bool, got {paste_audio!r}")
    layout_length = layout.length  # a strip: audio layouts are never grids
    fps, rate = adapter.frames_per_second, adapter.sample_rate
    per_column = int(round(rate / fps))  # output samples per latent column
    if audio is not None:
        channels = adapter.output_elements_per_column()
        wave = read_audio(audio, sample_rate, rate, channels)
        start_sample = int(round(audio_start * rate))
        first_column = start_sample // per_column
        pad_left = start_sample - first_column * per_column
        total = pad_left + wave.shape[-1]
        padded = np.zeros((channels, -(-total // per_column) * per_column), dtype=np.float32)
        padded[:, pad_left:total] = wave
        latent = adapter.encode_audio(torch.from_numpy(padded)[None])
        clip_seconds = wave.shape[-1] / rate
    else:
        if not isinstance(audio_latents, torch.Tensor):
            raise ValueError(f"audio_latents must be a torch.Tensor, got {type(audio_latents).__name__}")
        if sample_rate is not None:
            raise ValueError("sample_rate is the rate of audio=; audio_latents are already the model's")
        wave, latent = None, audio_latents.to(device=adapter.device, dtype=adapter.dtype)
        first_column = int(round(audio_start * fps))
        start_sample = first_column * per_column
        clip_seconds = latent.shape[adapter.long_dim] / fps
    ranges = keep_ranges(keep, (start_sample / rate, start_sample / rate + clip_seconds), seconds)
    sample_ranges = tuple((int(round(a * rate)), int(round(b * rate))) for a, b in ranges)
    k = latent.shape[adapter.long_dim]
    expected = adapter.latent_shape(latent.shape[0], k)
    if tuple(latent.shape) != tuple(expected):
        what = "audio_latents" if audio is None else f"the clip encoded by {type(adapter.pipe).__name__}'s encoder"
        raise ValueError(f"{what} has shape {tuple(latent.shape)}, the model's latent {tuple(expected)}")
    # Columns whose samples the keep-ranges cover whole (and that the clip's latent holds).
    columns = sorted({c for a, b in sample_ranges
                      for c in range(-(-a // per_column), b // per_column)
                      if first_column <= c < first_column + k and c < layout_length})
    if len(columns) >= min(layout_length, adapter.columns_for(seconds=seconds)):
        raise ValueError(f"the kept audio covers the whole {seconds:g} s: nothing is left to generate "
                        f"(ask for more seconds, or keep less)")
    if latent.shape[0] not in (1, batch_size):
        raise ValueError(f"audio_latents has {latent.shape[0]} rows; give 1 or one per output ({batch_size})")
    latent = latent.expand(batch_size, *latent.shape[1:]).contiguous()
    return KnownColumns(latent=latent, first_column=first_column, columns=columns, dim=adapter.long_dim,
                        given=wave if paste_audio else None, given_start=start_sample,
                        output_ranges=sample_ranges, crossfade=int(round(audio_crossfade * rate)), loop=loop,
                        out_len=adapter.output_length(seconds=seconds))


def prepare_known_image(adapter: Any, image: Any, *, width: int, loop: bool, batch_size: int) -> KnownColumns:
    """Outpainting: the user's image (a :class:`~safa.adapters.canvas.CanvasImage` of role
    ``"outpaint"``: pixels ``(1 or B, 3, H, w)`` in ``[0, 1]``, ``H`` the output's height, placed at
    pixel column ``image_start`` of a ``width`` px output, all checked by
    :func:`safa.request.check_image`) encoded ONCE with the img2img path's VAE encode (the
    posterior's mode, so that the call's generator draws ``J_T`` as it does without an image)
    into the known latent columns it covers: ``image_start / f`` to ``(image_start + w) / f``
    (``f`` the VAE factor), modulo the loop's length in a 360-degree panorama."""
    from .adapters.canvas import encode_canvas_image
    pixels = image.pixels
    if pixels.shape[0] not in (1, batch_size):
        raise ValueError(f"image has {pixels.shape[0]} images but this call makes {batch_size} output(s): give one "
                         f"image for all of them, or one per output")
    latent = encode_canvas_image(adapter, pixels, None, sample_mode="argmax")
    first_column = image.image_start // adapter.decoded_scale
    columns = list(range(first_column, first_column + latent.shape[adapter.long_dim]))
    latent = latent.expand(batch_size, *latent.shape[1:]).contiguous()
    return KnownColumns(latent=latent, first_column=first_column, columns=columns, dim=adapter.long_dim,
                        given=pixels.to(adapter.device) if image.paste else None, given_start=image.image_start,
                        output_ranges=((image.image_start, image.image_start + int(pixels.shape[-1])),),
                        crossfade=image.crossfade, loop=loop, out_len=width)
# -- RePaint's resampling (jumps back), for the known columns to harmonise with the rest -----------
# Schedulers whose step can be redone from a renoised sample: the single-step ones (their only state
# is the step index) and DPM-Solver++'s multistep history (restored around each jump: the redo sees
# the history the first pass saw). UniPC is not: its corrector recomputes x_t from the previous
# sample, which throws the jump's renoised x_t away; PNDM's and Heun's multi-stage states neither.
RESAMPLE_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
                       "EulerAncestralDiscreteScheduler", "FlowMatchEulerDiscreteScheduler",
                       "DPMSolverMultistepScheduler")


def noise_level(scheduler: Any, timesteps: torch.Tensor, i: int) -> Tuple[float, float]:
    """``(alpha, sigma)`` of the sample that step ``i`` reads, ``x = alpha x0 + sigma noise`` (``i ==
    len(timesteps)``: what the last step returns), in the scheduler's own parametrisation.

    DDIM / DDPM: ``alpha^2 = alphas_cumprod[t]`` and ``sigma^2 = 1 - alpha^2`` (DDIM's last step
    lands on ``final_alpha_cumprod``, DDPM's on the clean sample); Euler: ``(1, sigmas[k])`` (its
    unscaled ``x = x0 + sigma noise``); flow matching: ``(1 - sigmas[k], sigmas[k])``; DPM-Solver:
    ``_sigma_to_alpha_sigma_t(sigmas[k])``. ``k`` counts the scheduler's own steps, so an
    img2img call (``timesteps`` a suffix of the scheduler's) is offset by the steps it skips.
    """
    name = type(scheduler).__name__
    if name in ("DDIMScheduler", "DDPMScheduler"):
        if i < len(timesteps):
            a = float(scheduler.alphas_cumprod[int(timesteps[i])])
        elif name == "DDIMScheduler":
            a = float(scheduler.final_alpha_cumprod)
        else:
            a = 1.0
        return math.sqrt(a), math.sqrt(1.0 - a)
    k = len(scheduler.timesteps) - len(timesteps) + i
    sigma = scheduler.sigmas[k]
    if name == "FlowMatchEulerDiscreteScheduler":
        return 1.0 - float(sigma), float(sigma)
    if name == "DPMSolverMultistepScheduler":
        alpha_t, sigma_t = scheduler._sigma_to_alpha_sigma_t(sigma)
        return float(alpha_t), float(sigma_t)
    return 1.0, float(sigma)


def renoise(sample: torch.Tensor, scheduler: Any, timesteps: torch.Tensor, i: int,
            noise: torch.Tensor) -> torch.Tensor:
    """RePaint's jump back: ``sample`` (what step ``i`` returned) brought back to the noise level step
    ``i`` read, by the forward transition ``q(x_t | x_t')`` of the scheduler's process.

    With ``x_t' = a' x0 + s' e`` and ``x_t = a x0 + s e`` (:func:`noise_level`), the transition that
    keeps every marginal is ``x_t = (a / a') x_t' + sqrt(s^2 - (a / a')^2 s'^2) e_new``: for a
    variance-preserving process (DDIM, DPM-Solver) ``sqrt(abar_t / abar_t') x_t' + sqrt(1 - abar_t /
    abar_t') e`` (Lugmayr et al. 2022, Eq. 1 over one jump); for Euler's ``x0 + sigma e``, ``x_t' +
    sqrt(sigma^2 - sigma'^2) e``; for flow matching ``((1 - s) / (1 - s')) x_t' + sqrt(s^2 - ((1 - s)
    s' / (1 - s'))^2) e``.
    """
    a, s = noise_level(scheduler, timesteps, i)
    a_next, s_next = noise_level(scheduler, timesteps, i + 1)
    ratio = a / a_next
    spread = math.sqrt(max(s * s - (ratio * s_next) ** 2, 0.0))
    return (sample * ratio + noise.to(sample.dtype) * spread).to(sample.dtype)


def scheduler_state(scheduler: Any) -> Dict[str, Any]:
    """What ``scheduler.step`` changes (its step index, DPM-Solver's model-output history and
    lower-order count): its attributes, lists copied (the history is shifted in place)."""
    return {k: list(v) if isinstance(v, list) else v for k, v in vars(scheduler).items()}


def restore_scheduler(scheduler: Any, state: Dict[str, Any]) -> None:
    """Put back what :func:`scheduler_state` saved (before a step is redone)."""
    scheduler.__dict__.update({k: list(v) if isinstance(v, list) else v for k, v in state.items()})


@dataclass
class Resampling:
    """RePaint's resampling in a call: every step ``i < round(until * T)`` runs ``steps`` times; between
    two runs the merged views (and ``X^0`` while it guides) jump back to the step's input noise level
    (:func:`renoise`), with the schedulers' state restored, and the step is redone.

    Attributes:
        steps: runs of each resampled step (``r``; 1 is off).
        until: fraction of the steps, from the first, that are resampled.
        num_steps: steps of the call.
        generator: the jumps' noise (its own: the call's generator stream is untouched).
        noise_shape: the long latent's shape (the jump's noise is drawn on it and gathered into
            the views, so overlapping views stay equal).
        gather: ``J -> views`` for that noise.
    """

    steps: int
    until: float
    num_steps: int
    generator: Optional[torch.Generator] = None
    noise_shape: Tuple[int, ...] = ()
    gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    @property
    def resampled_steps(self) -> int:
        """How many steps (the first ones) are resampled."""
        return min(self.num_steps, leading_steps(self.until, self.num_steps)) if self.steps > 1 else 0

    def passes(self, i: int) -> int:
        """Runs of step ``i``."""
        return self.steps if i < self.resampled_steps else 1

    def extra_evaluations(self, views: int, guide_steps: int) -> int:
        """Window evaluations per output that the redone steps add (``views`` per step, plus ``X^0``
        on the guided ones)."""
        k = self.resampled_steps
        return (self.steps - 1) * (views * k + min(k, guide_steps))

    def save(self, scheduler: Any, ref_scheduler: Any) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
        """The schedulers' state before a resampled step's first run (``ref_scheduler``: ``X^0``'s, or None)."""
        return scheduler_state(scheduler), None if ref_scheduler is None else scheduler_state(ref_scheduler)

    def jump(self, views: torch.Tensor, reference: Optional[torch.Tensor], scheduler: Any, ref_scheduler: Any,
             timesteps: torch.Tensor, i: int, states: Tuple[Dict[str, Any], Optional[Dict[str, Any]]],
             ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The views (and ``X^0`` while it guides) that step ``i`` returned, renoised to the level step
        ``i`` read, and the schedulers put back as they were before its first run."""
        noise = torch.randn(self.noise_shape, generator=self.generator, device=self.generator.device,
                            dtype=torch.float32).to(views.device, views.dtype)
        views = renoise(views, scheduler, timesteps, i, self.gather(noise)).contiguous()
        restore_scheduler(scheduler, states[0])
        if reference is not None:
            ref_noise = torch.randn(reference.shape, generator=self.generator, device=self.generator.device,
                                    dtype=torch.float32).to(reference.device, reference.dtype)
            reference = renoise(reference, ref_scheduler, timesteps, i, ref_noise)
            restore_scheduler(ref_scheduler, states[1])
        return views, reference


def step_runs(timesteps: torch.Tensor, resample: Optional[Resampling]) -> Iterator[Tuple[int, Any, int, bool]]:
    """``(i, t, run, last)`` for every run of every step: one run per step without resampling."""
    for i, t in enumerate(timesteps):
        passes = resample.passes(i) if resample is not None else 1
        for run in range(passes):
            yield i, t, run, run == passes - 1


def check_resample(scheduler: Any, resample_steps: Any, resample_until: Any, num_steps: int, *, seed: int = 0,
                   noise_shape: Tuple[int, ...] = (), gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                   device: Any = "cpu") -> Resampling:
    """``resample_steps`` / ``resample_until`` checked (one-line ValueErrors) into a :class:`Resampling`
    whose jumps draw their noise (``noise_shape``: the long latent, ``gather``: into the views) from a
    generator of their own seeded from ``seed`` (the call's generator stream is untouched)."""
    if isinstance(resample_steps, bool) or not isinstance(resample_steps, (int, np.integer)) or resample_steps < 1:
        raise ValueError(f"resample_steps must be an int >= 1 (runs of each resampled step; 1: no resampling), "
                         f"got {resample_steps!r}")
    if isinstance(resample_until, bool) or not isinstance(resample_until, (int, float)) \
            or not 0.0 < resample_until <= 1.0:
        raise ValueError(f"resample_until must be a fraction of the steps in (0, 1], got {resample_until!r}")
    name = type(scheduler).__name__
    if resample_steps > 1 and name not in RESAMPLE_SCHEDULERS:
        raise ValueError(f"resample_steps > 1 needs a scheduler whose step can be redone from a renoised sample: "
                         f"{', '.join(s.replace('Scheduler', '') for s in RESAMPLE_SCHEDULERS)}; "
                         f"{name} is not one (set pipe.scheduler, e.g. DDIM)")
    resample = Resampling(int(resample_steps), float(resample_until), num_steps, noise_shape=tuple(noise_shape),
                          gather=gather)
    if resample.resampled_steps:
        resample.generator = torch.Generator(device=device).manual_seed(seed + 0x5EED)
    return resample
