"""What the web app runs, without the web: requests checked field by field, one model served one
request at a time, each request on a worker thread that reports its progress and stops when asked.

Nothing here imports Gradio (:mod:`safa.serve.app` is the page). The library is called as from
Python: :class:`~safa.JointDiffusion` with ``callback_on_step_end`` (progress, and the point where a
cancelled request stops) and ``callback_on_output_chunk`` (decode progress, and the spectrogram fed
piece by piece); the audio is written by the call itself (``output_path``), atomically, so a request
cancelled or failing at any point leaves no file behind.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ["Cancelled", "FieldError", "GenerationRequest", "GenerationResult", "Job", "JobProgress", "Studio",
           "history_row", "method_defaults", "whole_number", "FIELDS", "DECODE_CHOICES"]

# The request's fields, as the page names its inputs (a FieldError names one of them).
FIELDS = ("prompt", "length", "loop", "method", "method_params", "steps", "seed", "guidance_scale",
          "negative_prompt", "overlap", "view_batch_size", "decode", "height")
# The sampler's error messages start with the parameter's name: the field that shows them.
_PARAMETER_FIELDS = {"seconds": "length", "width": "length", "overlap": "overlap", "guidance_scale": "guidance_scale",
                     "view_batch_size": "view_batch_size", "decode": "decode", "height": "height",
                     "num_inference_steps": "steps", "loop": "length",
                     "no": "length"}  # "no seamless loop of exactly 12 s ...": the length field
DECODE_CHOICES = ("auto", "full", "views", "tiled", "tiled-disk")


class Cancelled(Exception):
    """The request was cancelled; raised inside the library call at its next step or decoded piece."""


class FieldError(ValueError):
    """Bad input in one field of the page: ``field`` (one of :data:`FIELDS`) and the message."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
        self.field = field_name


def method_defaults(name: str) -> str:
    """The parameters of a method shorthand with their defaults, as a method spec's tail:
    ``"guide=0.3:swap_interval=1"`` for ``"safa"`` (the page shows them next to the method)."""
    from ..methods import METHODS
    entry = METHODS[name]
    fixed = entry.fixed
    shown = []
    for f in dataclasses.fields(entry.cls):
        # Parameters without a plain default (a loss function, an anchor index) stay the method's.
        if f.name in fixed or f.default is None or f.default is dataclasses.MISSING:
            continue
        value = f.default
        shown.append(f"{f.name}={str(value).lower() if isinstance(value, bool) else value}")
    return ":".join(shown)


@dataclass(frozen=True)
class GenerationRequest:
    """One request from the page, checked (:meth:`Studio.parse`). ``length``: seconds (audio) or
    pixels (images); ``guidance_scale`` / ``view_batch_size`` / ``height`` None: the default."""

    prompt: str
    length: float
    loop: bool
    method: str  # a method spec: "safa:guide=0.3:swap_interval=1"
    steps: int
    seed: int
    guidance_scale: Optional[float] = None
    negative_prompt: Optional[str] = None
    overlap: float = 0.2
    view_batch_size: Optional[int] = None
    decode: str = "auto"
    height: Optional[int] = None


@dataclass
class GenerationResult:
    """What a finished request produced: the files, the layout line and the timings."""

    output_path: str
    spectrogram_path: Optional[str]
    layout: str
    timings: Dict[str, float]
    summary: str
    request: GenerationRequest


@dataclass
class JobProgress:
    """Where a job is: ``phase`` (waiting, denoising, decoding, ...) and ``done`` of ``total`` ``unit``."""

    phase: str = "waiting for the model"
    done: float = 0
    total: float = 0
    unit: str = ""


class Job:
    """``work(job)`` on a daemon thread. ``work`` calls :meth:`report` as it goes; once :meth:`cancel`
    is called, the next :meth:`report` raises :class:`Cancelled` inside ``work``."""

    def __init__(self, work: Callable[["Job"], Any]) -> None:
        self.progress = JobProgress()
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self._work = work
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="safa-serve-job", daemon=True)

    def start(self) -> "Job":
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.result = self._work(self)
        except BaseException as exc:  # noqa: BLE001  (handed to the page, which shows it)
            self.error = exc

    def report(self, phase: str, done: float = 0, total: float = 0, unit: str = "") -> None:
        """Record the progress; raise :class:`Cancelled` when the job was cancelled."""
        self.progress = JobProgress(phase, done, total, unit)
        if self._cancel.is_set():
            raise Cancelled(f"cancelled while {phase}")

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait up to ``timeout`` seconds; True when the job has finished (or failed, or stopped)."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:40] or "untitled"


def whole_number(name: str, value: Any, low: int, high: Optional[int] = None) -> int:
    """``value`` as an int in ``[low, high]`` (a whole float from a number field is fine)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise FieldError(name, f"{name} must be a whole number {bounds}, got {value!r}")
    return int(value)


class Studio:
    """One loaded model served one request at a time.

    Args:
        jd: the :class:`~safa.JointDiffusion` of the served pipeline.
        model_name: what ``--model`` named (shown on the page).
        results_dir: where the files of every request go (one file per result, never overwritten).
        device: the device of the pipeline (the generators draw the noise there).
    """

    def __init__(self, jd: Any, model_name: str, results_dir: str, device: Any = "cpu") -> None:
        self.jd, self.model_name, self.results_dir, self.device = jd, model_name, results_dir, device
        self.kind: str = jd.adapter.kind
        if self.kind == "video":  # the page shows audio or an image
            raise ValueError(f"safa serve makes audio and images; {type(jd.pipe).__name__} makes video: "
                             f"use safa generate")
        # The built-in texture model knows a few classes: the page offers them and checks the prompt.
        self.prompt_names: Optional[List[str]] = list(getattr(getattr(jd.pipe, "model", None), "class_names", [])) \
            or None
        # Gradio's queue runs one request of this model at a time; the lock also covers a cancelled
        # request that is still finishing its step when the next one starts.
        self.lock = threading.Lock()
        os.makedirs(results_dir, exist_ok=True)

    # -- defaults the page shows -----------------------------------------------------------
    def default(self, name: str, fallback: Any) -> Any:
        """The wrapped pipeline's own default of ``name`` (``num_inference_steps``, ``guidance_scale``)."""
        try:
            return self.jd.adapter.pipeline_default(name, fallback)
        except (AttributeError, TypeError):
            return fallback

    # -- checks ----------------------------------------------------------------------------
    def parse(self, values: Dict[str, Any]) -> GenerationRequest:
        """The page's raw values (keys of :data:`FIELDS`) as a checked request; :class:`FieldError`
        names the first bad field. Checks everything that needs no memory estimate."""
        prompt = str(values.get("prompt") or "").strip()
        if self.prompt_names is not None:
            if prompt not in self.prompt_names:
                raise FieldError("prompt", f"prompt: the built-in model knows {', '.join(self.prompt_names)}; "
                                           f"got {prompt!r}")
        method = self._method_spec(values.get("method"), values.get("method_params"))
        steps = whole_number("steps", values.get("steps"), 1, 10000)
        seed = whole_number("seed", values.get("seed"), 0, 2 ** 63 - 1)
        length = values.get("length")
        if isinstance(length, bool) or not isinstance(length, (int, float)) or not math.isfinite(length) \
                or not length > 0:
            unit = "seconds" if self.kind == "audio" else "pixels"
            raise FieldError("length", f"length must be a number of {unit} > 0, got {length!r}")
        if self.kind == "image":
            length = whole_number("length", length, 1)
        view_batch_size = values.get("view_batch_size") or None
        if view_batch_size is not None:
            view_batch_size = whole_number("view_batch_size", view_batch_size, 1)
        height = values.get("height") or None
        if height is not None:
            height = whole_number("height", height, 1)
        decode = values.get("decode") or "auto"
        if decode not in DECODE_CHOICES:
            raise FieldError("decode", f"decode must be one of {', '.join(DECODE_CHOICES)}, got {decode!r}")
        guidance = values.get("guidance_scale")
        request = GenerationRequest(
            prompt=prompt, length=length, loop=bool(values.get("loop")), method=method, steps=steps, seed=seed,
            guidance_scale=None if guidance is None else float(guidance),
            negative_prompt=(values.get("negative_prompt") or "").strip() or None,
            overlap=float(values.get("overlap") if values.get("overlap") is not None else 0.2),
            view_batch_size=view_batch_size, decode=decode, height=height if self.kind == "image" else None)
        self.layout(request)  # length, loop, overlap: the layout exists
        return request

    def _method_spec(self, name: Any, params: Any) -> str:
        from ..methods import METHODS, parse_method_spec
        if name not in METHODS:
            raise FieldError("method", f"method must be one of {', '.join(METHODS)}, got {name!r}")
        params = str(params or "").strip().strip(":")
        spec = f"{name}:{params}" if params else str(name)
        try:
            method = parse_method_spec(spec)
        except ValueError as exc:
            raise FieldError("method_params", str(exc)) from None
        try:
            method.check_pipeline(self.jd.adapter)
        except ValueError as exc:  # NotApplicable: e.g. MAD on a model without attention
            raise FieldError("method", str(exc)) from None
        return spec

    def call_arguments(self, request: GenerationRequest) -> Dict[str, Any]:
        """The arguments of the library call that the layout and the memory estimate also take."""
        from ..methods import parse_method_spec
        length = dict(seconds=request.length) if self.kind == "audio" else dict(width=int(request.length))
        return dict(**length, method=parse_method_spec(request.method), loop=request.loop, overlap=request.overlap)

    def layout(self, request: GenerationRequest) -> Any:
        """The request's view layout; :class:`FieldError` on the field the sampler's message names."""
        try:
            return self.jd.layout_for(**self.call_arguments(request))
        except ValueError as exc:
            raise _field_error(exc) from None

    def check_memory(self, request: GenerationRequest, output_path: str) -> Any:
        """The memory estimate of the request; :class:`safa.memory.InsufficientMemoryError` (a
        ``ValueError`` naming the estimate, what is available and what fits) when it cannot fit."""
        call = self.call_arguments(request)
        try:
            return self.jd.estimate_memory(**call, height=request.height, guidance_scale=request.guidance_scale,
                                           view_batch_size=request.view_batch_size, decode=request.decode,
                                           output_path=output_path, check=True)
        except MemoryError:
            raise
        except ValueError as exc:
            raise _field_error(exc) from None

    # -- the work --------------------------------------------------------------------------
    def output_path(self, request: GenerationRequest) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        ext = ".wav" if self.kind == "audio" else ".png"
        base = os.path.join(self.results_dir, f"{stamp}-{_slug(request.prompt)}-{request.seed}")
        path, n = base + ext, 1
        while os.path.exists(path) or os.path.exists(base + ".png"):
            n += 1
            path = f"{base}-{n}{ext}"
            base = f"{base}-{n}"
        return path

    def generate(self, request: GenerationRequest, job: Job) -> GenerationResult:
        """Run ``request`` (call it on the job's thread: :class:`Job`); the files appear only complete."""
        queued = time.perf_counter()
        job.report("waiting for the model")
        with self.lock:
            waited = time.perf_counter() - queued
            path = self.output_path(request)
            written: List[str] = []
            try:
                return self._generate(request, job, path, written, waited)
            except BaseException:
                for done in written:  # a request stopped after its audio was written: no orphan files
                    if os.path.exists(done):
                        os.remove(done)
                raise

    def _generate(self, request: GenerationRequest, job: Job, path: str, written: List[str],
                  waited: float) -> GenerationResult:
        import torch
        jd = self.jd
        call = self.call_arguments(request)
        job.report("estimating memory")
        self.check_memory(request, path)
        layout = jd.layout_for(**call)
        spectrogram, out_len = None, jd.adapter.output_length(**{k: call[k] for k in ("seconds", "width") if k in call})
        if self.kind == "audio":
            from ..spectrogram import SpectrogramAccumulator
            spectrogram = SpectrogramAccumulator(jd.sample_rate, out_len / jd.sample_rate)
        scale = (1.0 / jd.sample_rate) if self.kind == "audio" else 1.0
        unit = "s of audio" if self.kind == "audio" else "pixel columns"

        def on_step(_: Any, i: int, t: Any, kwargs: Dict[str, Any]) -> None:
            job.report("denoising", min(i + 1, request.steps), request.steps, "steps")

        def on_chunk(_: Any, start: int, chunk: Any) -> None:
            if spectrogram is not None:
                spectrogram.add(chunk[0].numpy())
            job.report("decoding", round((start + chunk.shape[-1]) * scale, 2), round(out_len * scale, 2), unit)

        job.report("denoising", 0, request.steps, "steps")
        started = time.perf_counter()
        result = jd(request.prompt, **call, num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
                    negative_prompt=request.negative_prompt, view_batch_size=request.view_batch_size,
                    decode=request.decode, height=request.height,
                    generator=torch.Generator(device=self.device).manual_seed(request.seed), output_path=path,
                    callback_on_step_end=on_step, callback_on_output_chunk=on_chunk)
        written.append(path)
        timings = dict(result.timings, waited=waited)
        spec_path = None
        if spectrogram is not None:
            job.report("drawing the spectrogram")
            spec_path = self._write_spectrogram(request, spectrogram, layout, path)
            written.append(spec_path)
        timings["total"] = time.perf_counter() - started
        line = jd.describe_layout(result.layout)
        return GenerationResult(path, spec_path, line, timings, _summary(request, timings, line, self.kind), request)

    def _write_spectrogram(self, request: GenerationRequest, spectrogram: Any, layout: Any, path: str) -> str:
        from ..plots import layout_title, view_spans, write_spectrogram
        fps = self.jd.adapter.frames_per_second
        spec_path = os.path.splitext(path)[0] + ".png"
        write_spectrogram(spec_path, spectrogram.finish(), view_spans(layout, fps), loop=layout.loop,
                          title=layout_title(request.method, request.prompt, layout, fps))
        return spec_path


def _field_error(exc: ValueError) -> FieldError:
    """A sampler ``ValueError`` on the field its message starts with (the parameter's name)."""
    message = str(exc)
    first = re.match(r"\W*(\w+)", message)
    name = first.group(1) if first else ""
    return FieldError(_PARAMETER_FIELDS.get(name, "length"), message)


def _summary(request: GenerationRequest, timings: Dict[str, float], layout: str, kind: str) -> str:
    """The timings line: steps, decode, in all (and the wait for the model, when there was one)."""
    denoise, decode = timings.get("denoise", 0.0), timings.get("decode", 0.0)
    what = f"{request.length:g} s" if kind == "audio" else f"{int(request.length)} px wide"
    waited = timings.get("waited", 0.0)
    return (f"{what}: {request.steps} steps in {denoise:.1f} s ({denoise / request.steps:.2f} s/step), "
            f"decoded and written in {decode:.1f} s, {timings.get('total', denoise + decode):.1f} s in all"
            + (f" (after {waited:.1f} s waiting for the model)" if waited >= 0.1 else ""))


def history_row(result: GenerationResult) -> Tuple[str, str, str, str, int, int, str]:
    """One row of the session's results table."""
    r = result.request
    return (time.strftime("%H:%M:%S"), r.prompt, f"{r.length:g}{' loop' if r.loop else ''}", r.method, r.steps,
            r.seed, os.path.basename(result.output_path))

