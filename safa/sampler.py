"""The joint-diffusion sampler: SaFa and its baselines over any supported diffusers pipeline.

Algorithm 1 of the paper (arXiv 2502.05130, section 3; docs/method.md), read top to bottom in
:meth:`JointDiffusion.__call__`:

1. ``check_inputs`` and the method object (:mod:`safa.methods`);
2. ``prepare_layout``: the views ``F_i`` over the long latent ``J`` (open: the fewest views
   covering the request, then cropped; loop: exactly the requested length; below one window:
   one view of the pipeline's own size);
3. ``prepare_conditions``: every distinct prompt encoded once;
4. ``prepare_latents``: ``J_T`` drawn whole and gathered into the views, so overlapping
   views start equal; ``prepare_reference``: the reference window ``X^0`` with its own noise
   and its own copy of the scheduler (SaFa only);
5. the loop, per step: the method's hook before the model (SyncDiffusion's gradient step);
   every view (plus ``X^0`` while it guides) through the model as one
   batch (chunked by ``view_batch_size`` only to bound memory; inside the method's model
   context, MAD's merged attention); the method's hook after the model (SaFaStats moves the
   views' clean predictions); ``scheduler.step`` ONCE on the
   views' rows (multistep history and stochastic noise are per row) and once on ``X^0`` with
   its own scheduler; then ONE ``sync_`` merges the overlaps in place (self-loop swap, Eq. 9,
   or averaging) plus the reference swap of the middles (Eq. 10) during the first
   ``round(guide * T)`` steps. ``X^0`` is read only then, so it is denoised only then: a SaFa
   call costs ``n T + round(guide T)`` window evaluations, not ``(n + 1) T``;
6. ``J = stitch(views)``, decoded, cropped to the requested length, returned or written to
   files tile by tile (:mod:`safa.output`).

Before any of it, the memory the request needs is estimated and checked against what the
device has (:mod:`safa.memory`), so a request that cannot fit fails at once with a clear error.

With ``process_group=`` the same call runs on every rank of a ``torch.distributed`` group:
each rank runs the model on its own block of views, the scheduler on the whole batch, and
exchanges only the overlap cells its merge reads (:mod:`safa.distributed`, docs/distributed.md).
"""
from __future__ import annotations

import collections
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch.profiler import record_function

from safa_kernels import ViewLayout, gather, stitch
from tqdm.auto import tqdm

from . import accel as _accel
from . import distributed as _distributed
from . import memory as _memory
from . import output as _output
from ._checks import check_positive_int, check_range
from .adapters import Adapter, get_adapter
from .decode import DECODE_MODES, resolve_mode, tile_count
from .layouts import loop_layout, open_layout
from .memory import MemoryEstimate
from . import prompts as _prompts
from .methods import METHODS, Method, MethodContext, get_method
from .prompts import PromptBatch
from .schedulers import scale_model_input

__all__ = ["JointDiffusion", "JointDiffusionOutput", "METHODS", "DEFAULT_VIEW_BATCH_SIZE"]

# view_batch_size=None: windows per model call. Bounded, so that the model's working memory is
# set by the window and not by the output's length (hours of audio are thousands of windows);
# on the CPU a bounded batch is also as fast or faster per window (benchmarks/README.md).
DEFAULT_VIEW_BATCH_SIZE = 16


@dataclass
class JointDiffusionOutput:
    """What :meth:`JointDiffusion.__call__` returns.

    Attributes:
        audio: ``(B, samples)`` at ``sample_rate`` for audio pipelines (numpy or torch by
            ``output_type``), else None.
        images: a list of PIL images / ``(B, H, W, 3)`` array / ``(B, 3, H, W)`` tensor for
            image pipelines, else None.
        latent: the final long latent ``J`` over the whole layout (``layout.length`` columns
            on the long axis, before cropping).
        layout: the :class:`~safa_kernels.ViewLayout` of the views.
        columns: the latent columns the output was cropped to (``<= layout.length``).
        sample_rate: samples per second for audio, None for images.
        method: the :class:`~safa.methods.Method` that ran.
        output_paths: the files written (one per output) when the call was given
            ``output_path``; ``audio`` / ``images`` are None then (the waveform was never held
            whole in memory).
        output_length: samples (pixels) of each output, returned or written.
        timings: wall-clock seconds of the ``"denoise"`` loop and of the ``"decode"`` stage
            (decoding, plus writing the files).

    In a distributed call (``process_group=``) ``audio``, ``images``, ``latent`` and
    ``output_paths`` are on rank 0 (which alone writes the files) and None on the other ranks.
    """

    audio: Any
    images: Any
    latent: Optional[torch.Tensor]
    layout: ViewLayout
    columns: int
    sample_rate: Optional[int]
    method: Optional[Method] = None
    output_paths: Optional[List[str]] = None
    output_length: int = 0
    timings: Dict[str, float] = field(default_factory=dict)


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


class JointDiffusion:
    """Long-form generation with a diffusers pipeline by joint diffusion over overlapping views.

    ``JointDiffusion(pipe)`` keeps a reference to ``pipe`` (no weights are copied) and picks
    the adapter for its class; an unsupported class raises ``ValueError`` listing the
    supported ones. Use the pipeline's own ``scheduler`` (swap it on ``pipe`` as usual).

    Args:
        pipe: a supported diffusers pipeline (see ``safa.adapters.registered_adapters()``).
        compile: ``torch.compile`` the denoiser and the merge (``fullgraph``).
        cuda_graphs: capture the denoiser call into a CUDA graph per batch composition and
            replay it every step (CUDA only). Both live in :mod:`safa.accel`.
        merge_step: the per-step merge, with the signature of :func:`safa.accel.merge_step`
            (default: that function, one ``safa_kernels.sync_`` call); another one is swapped
            in to compare merges (``safa profile --compare``).
        process_group: a ``torch.distributed`` process group to spread every call over (default
            None: one process). Every rank then makes the same call (checked: different
            arguments are an error on every rank); the result is on rank 0. With a
            deterministic scheduler and ``view_batch_size=1`` the output is bitwise the
            one-process output for any number of ranks up to the number of views
            (docs/distributed.md).
    """

    def __init__(self, pipe: Any, *, compile: bool = False, cuda_graphs: bool = False,
                 merge_step: Optional[Callable[..., None]] = None, process_group: Any = None) -> None:
        if not isinstance(compile, bool) or not isinstance(cuda_graphs, bool):
            raise ValueError(f"compile and cuda_graphs must be bools, got {compile!r}, {cuda_graphs!r}")
        if process_group is not None and not (torch.distributed.is_available() and torch.distributed.is_initialized()
                                              and isinstance(process_group, torch.distributed.ProcessGroup)):
            raise ValueError(f"process_group must be None or a torch.distributed.ProcessGroup of an initialised "
                             f"default group (torch.distributed.init_process_group), got {process_group!r}")
        if cuda_graphs and not torch.cuda.is_available():
            raise RuntimeError("cuda_graphs=True needs CUDA, and this machine has none (CUDA graphs do not "
                               "exist on CPU): use cuda_graphs=False; compile=True works on CPU")
        self.pipe = pipe
        self.adapter: Adapter = get_adapter(pipe)
        self.compile, self.cuda_graphs = compile, cuda_graphs
        self.merge_step = merge_step
        self.process_group = process_group

    @property
    def sample_rate(self) -> Optional[int]:
        return self.adapter.sample_rate

    # -- geometry -----------------------------------------------------------------------
    def window_columns(self, window: Optional[float] = None) -> int:
        """The window in latent columns (default: the model's native window)."""
        if window is None:
            return self.adapter.native_window()
        if isinstance(window, bool) or not isinstance(window, (int, float)) or not window > 0:
            raise ValueError(f"window must be > 0 ({'seconds' if self.adapter.kind == 'audio' else 'latent columns'}), "
                             f"got {window!r}")
        w = self.adapter.window_columns(window)
        if w < 1:
            raise ValueError(f"window {window!r} is less than one latent column")
        self.adapter.check_window(w)
        return w

    def describe_layout(self, layout: ViewLayout) -> str:
        """The layout in the user's units, e.g. ``5 views of 10 s (250 latent frames), overlap 0.2 ... loop``."""
        fmt = self.adapter.describe_columns
        rate = layout.overlap / layout.window
        return (f"{layout.num_views} view{'s' if layout.num_views != 1 else ''} of {fmt(layout.window)}, "
                f"overlap {rate:.3g} ({layout.overlap} latent columns), "
                f"{'loop of ' + fmt(layout.length) if layout.loop else 'covering ' + fmt(layout.length)}")

    def layout_for(self, seconds: Optional[float] = None, width: Optional[int] = None, *,
                   window: Optional[float] = None, overlap: float = 0.2, loop: bool = False,
                   method: Union[str, Method] = "safa") -> ViewLayout:
        """The view layout a call with these arguments uses (e.g. to size a per-view prompt list)."""
        self._check_length(seconds, width)
        return self.prepare_layout(seconds, width, window, overlap, loop, get_method(method))[0]

    def _check_length(self, seconds: Optional[float], width: Optional[int]) -> None:
        """``seconds`` (audio) or ``width`` (images): the one the pipeline takes, and a valid one."""
        if self.adapter.kind == "audio":
            if width is not None:
                raise ValueError("width is for image pipelines; give seconds for audio")
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0 \
                    or math.isinf(seconds):
                raise ValueError(f"seconds must be a finite number > 0, got {seconds!r}")
        else:
            if seconds is not None:
                raise ValueError("seconds is for audio pipelines; give width (pixels) for images")
            if isinstance(width, bool) or not isinstance(width, int) or width < 1:
                raise ValueError(f"width must be an int >= 1 (pixels), got {width!r}")

    def check_inputs(self, seconds: Optional[float], width: Optional[int], height: Optional[int], loop: bool,
                     num_inference_steps: int, batch_size: int, view_batch_size: Optional[int], decode: str,
                     decode_tile: Optional[int], output_type: Optional[str]) -> str:
        """Validate the call's scalar arguments; returns the resolved ``output_type``."""
        kind = self.adapter.kind
        if kind == "audio" and height is not None:
            raise ValueError("height is for image pipelines; give seconds for audio")
        self._check_length(seconds, width)
        if kind == "image":
            self.adapter.latent_rows(height)  # type: ignore[attr-defined]  (validates height)
        check_positive_int("num_inference_steps", num_inference_steps)
        check_positive_int("batch_size", batch_size)
        check_positive_int("view_batch_size", view_batch_size, allow_none=True)
        check_positive_int("decode_tile", decode_tile, allow_none=True)
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        if output_type is None:
            output_type = "np" if kind == "audio" else "pil"
        allowed = ("np", "pt", "latent") + (("pil",) if kind == "image" else ())
        if output_type not in allowed:
            raise ValueError(f"output_type must be one of {allowed}, got {output_type!r}")
        return output_type

    def prepare_layout(self, seconds: Optional[float], width: Optional[int], window: Optional[float],
                       overlap: float, loop: bool, method: Method) -> Tuple[ViewLayout, int, int]:
        """(layout, latent columns to crop to, output samples / pixels to crop to).

        Open layouts take the fewest views of ``window`` covering the request; loop layouts
        have exactly the requested length, with the window and overlap rate nearest the
        requested ones that make it exact (:mod:`safa.layouts`). A request shorter than one
        window is the wrapped pipeline's own call: one view of ``adapter.short_window``.
        """
        adapter = self.adapter
        w, o, rate, multiple = self._window_and_overlap(window, overlap, loop, method)
        out_len = adapter.output_length(seconds=seconds, width=width)
        if loop:
            layout = loop_layout(adapter.length_in_columns(seconds=seconds, width=width), w, rate, method.merge_mode,
                                 adapter.window_multiple(), adapter.fixed_window, adapter.describe_columns,
                                 stride_multiple=multiple)
            return layout, layout.length, out_len
        columns = adapter.columns_for(seconds=seconds, width=width)
        if columns >= w:
            return open_layout(columns, w, o), columns, out_len
        short = adapter.short_window(columns)
        return ViewLayout(short, short, 0), columns, out_len

    def _window_and_overlap(self, window: Optional[float], overlap: float, loop: bool,
                            method: Method) -> Tuple[int, int, float, int]:
        """``(window, overlap columns, overlap rate, stride multiple)`` of a request, validated."""
        if not isinstance(loop, bool):
            raise ValueError(f"loop must be a bool, got {loop!r}")
        # Swap is defined between two views only (no column covered by three): docs/kernels.md.
        hi = method.max_overlap_rate
        try:
            rate = check_range("overlap", overlap, 0.0, hi, hi_open=hi >= 1.0)
        except ValueError as exc:
            hint = (f" for method {method.name!r} (a swap is defined between two views; the averaging "
                    f"methods accept overlaps below 1.0)" if hi < 1.0 else "")
            raise ValueError(f"{exc}{hint}") from None
        w = self.window_columns(window)
        multiple = method.layout_multiple(self.adapter)
        o = int(round(rate * w)) if multiple == 1 else _snap_overlap(rate * w, w, multiple, method)
        if o >= w:
            raise ValueError(f"overlap rate {overlap} gives {o} overlapping columns for a window of {w}: "
                             f"it must leave at least one column of stride")
        return w, o, rate, multiple

    # -- memory --------------------------------------------------------------------------
    def estimate_memory(self, seconds: Optional[float] = None, *, width: Optional[int] = None,
                        height: Optional[int] = None, window: Optional[float] = None, overlap: float = 0.2,
                        loop: bool = False, method: Union[str, Method] = "safa", batch_size: int = 1,
                        guidance_scale: Optional[float] = None, view_batch_size: Optional[int] = None,
                        decode: str = "auto",
                        decode_tile: Optional[int] = None, output_type: Optional[str] = None,
                        output_path: Union[None, str, Sequence[str]] = None, check: bool = False) -> MemoryEstimate:
        """The memory a call with these arguments needs, by phase and part (:mod:`safa.memory`).

        Computed from the request's geometry alone (no layout is built, nothing is allocated),
        so it answers at once for any length. ``batch_size`` is the number of outputs; the other
        arguments mean what they mean in :meth:`__call__`, which makes this check before it
        starts. ``check=True``: raise :class:`~safa.memory.InsufficientMemoryError` (naming the
        estimate, what is available and what to change) when it does not fit in the device's
        free memory.
        """
        method = get_method(method)
        guidance_scale = self._guidance_scale(guidance_scale)
        output_type = self.check_inputs(seconds, width, height, loop, 1, batch_size, view_batch_size, decode,
                                        decode_tile, output_type)
        args = (seconds, width, height, window, overlap, loop, method, batch_size, guidance_scale, view_batch_size,
                decode, decode_tile, output_type, output_path is not None)
        return self._require_memory(*args) if check else self._estimate(*args)

    def _guidance_scale(self, guidance_scale: Optional[float]) -> float:
        """As given (a finite number), else the wrapped pipeline's own default (1.0 if it has none)."""
        if guidance_scale is None:
            guidance_scale = self.adapter.pipeline_default("guidance_scale", 1.0)
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
                or not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number (<= 1: no classifier-free guidance), "
                             f"got {guidance_scale!r}")
        return float(guidance_scale)

    def _model_windows(self, view_batch_size: Optional[int], windows: int, method: Method) -> int:
        """Windows per model call: ``view_batch_size``, else all of them up to :data:`DEFAULT_VIEW_BATCH_SIZE`
        (all of them for a method that attends over every view at once)."""
        if view_batch_size is not None:
            return min(view_batch_size, windows)
        return windows if method.all_views_in_one_call else min(windows, DEFAULT_VIEW_BATCH_SIZE)

    def _planned_layout(self, seconds: Optional[float], width: Optional[int], window: Optional[float],
                        overlap: float, loop: bool, method: Method) -> Tuple[int, int, int]:
        """``(length, window, views)`` of the layout :meth:`prepare_layout` would build, without building it
        (a loop's window and view count may differ by a little: the estimate does not need more)."""
        adapter = self.adapter
        w, o, _, _ = self._window_and_overlap(window, overlap, loop, method)
        if loop:
            length = max(w, math.ceil(adapter.length_in_columns(seconds=seconds, width=width)))
            return length, w, max(2, round(length / (w - o)))
        columns = adapter.columns_for(seconds=seconds, width=width)
        if columns < w:
            short = adapter.short_window(columns)
            return short, short, 1
        views = 1 + math.ceil((columns - w) / (w - o))
        return w + (views - 1) * (w - o), w, views

    def _estimate(self, seconds: Optional[float], width: Optional[int], height: Optional[int],
                  window: Optional[float], overlap: float, loop: bool, method: Method, batch_size: int,
                  guidance_scale: float, view_batch_size: Optional[int], decode: str, decode_tile: Optional[int],
                  output_type: str, to_files: bool) -> MemoryEstimate:
        adapter = self.adapter
        length, w, n = self._planned_layout(seconds, width, window, overlap, loop, method)
        with_reference = n > 1 and method.has_reference  # one window, however many steps it guides
        mode = resolve_mode(decode, length, w)
        tile = min(decode_tile or w, length)
        decode_columns = tile + 2 * min(adapter.decode_context, length) if mode == "tiled" and tile < length \
            else length
        return _memory.estimate_memory(
            adapter, self.pipe.scheduler, length=length, window=w, num_views=n, batch_size=batch_size, height=height,
            model_windows=self._model_windows(view_batch_size, n + with_reference, method),
            guidance=guidance_scale > 1.0, with_reference=with_reference, decode_columns=decode_columns,
            output_columns=adapter.output_length(seconds=seconds, width=width),
            streamed=to_files and mode == "tiled" and adapter.kind == "audio", output_type=output_type)

    def _require_memory(self, seconds: Optional[float], width: Optional[int], height: Optional[int],
                        window: Optional[float], overlap: float, loop: bool, method: Method, batch_size: int,
                        guidance_scale: float, view_batch_size: Optional[int], decode: str,
                        decode_tile: Optional[int], output_type: str, to_files: bool) -> MemoryEstimate:
        """The estimate, or :class:`~safa.memory.InsufficientMemoryError` saying what to change."""
        audio = self.adapter.kind == "audio"

        def estimate(length: float, vbs: Optional[int] = view_batch_size, files: bool = to_files) -> MemoryEstimate:
            return self._estimate(length if audio else None, None if audio else int(length), height, window,
                                  overlap, loop, method, batch_size, guidance_scale, vbs, decode, decode_tile,
                                  output_type, files)

        length = seconds if audio else width
        found = estimate(length)
        missing = _memory.shortfall(found)
        if missing is None:
            return found
        _, available, where = missing
        advice = []
        if not method.all_views_in_one_call:
            n = self._planned_layout(seconds, width, window, overlap, loop, method)[2]
            k = self._model_windows(view_batch_size, n + 1, method) // 2
            while k >= 1 and _memory.shortfall(estimate(length, k)) is not None:
                k //= 2
            if k >= 1:
                advice.append(f"view_batch_size={k} (windows per model call) fits")
        if audio and not to_files and _memory.shortfall(estimate(length, files=True)) is None:
            advice.append("output_path= (write the audio to a file tile by tile instead of returning it) fits")
        if not advice:
            # The longest output that fits (the estimate grows with length): with this model batch,
            # else with the smallest one.
            for vbs in ((view_batch_size,) if method.all_views_in_one_call else (view_batch_size, 1)):
                lo, hi = 0.0, float(length)
                for _ in range(64):
                    mid = (lo + hi) / 2 if audio else float(int((lo + hi) / 2))
                    if mid <= lo:
                        break
                    lo, hi = (mid, hi) if _memory.shortfall(estimate(mid, vbs)) is None else (lo, mid)
                if lo > 0:
                    with_vbs = "" if vbs == view_batch_size else " with view_batch_size=1"
                    advice.append(f"a shorter output: {'seconds' if audio else 'width'}={lo:.4g}{with_vbs} fits")
                    break
            else:
                advice.append("not even the shortest output fits")
        what = (f"seconds={seconds:g}" if audio else f"width={width}") + \
            (f" with {batch_size} outputs" if batch_size > 1 else "")
        raise _memory.InsufficientMemoryError(
            f"{what} needs {found.describe()}, but {_memory.format_bytes(available)} of {where} is available: "
            + "; ".join(advice), found, available)

    def prepare_conditions(self, prompts: PromptBatch, embeds: Dict[str, torch.Tensor], with_reference: bool,
                           guidance_scale: float, seconds: Optional[float]
                           ) -> Tuple[Any, torch.Tensor, Optional[torch.Tensor]]:
        """Encode every distinct (prompt, negative prompt) once: ``(conditions, view_rows, reference_rows)``.

        ``view_rows[r]`` is the condition index of the views' scheduler row ``r`` (rows are
        (view, output), view-major); ``reference_rows`` those of ``X^0`` (None without one).
        With precomputed ``embeds`` (``prompt_embeds`` ...) each output uses its batch row.
        """
        B = prompts.batch_size
        n = len(prompts.views[0])
        if embeds:
            cond = self.adapter.conditions_from_embeds(embeds, guidance_scale)
            items = [prompts.item(b) for b in range(B)]
            rows = torch.tensor(items * (n + (1 if with_reference else 0)))
        else:
            keys, _ = _prompts.window_keys(prompts, with_reference)
            distinct = _prompts.unique(keys)
            negatives = [neg for _, neg in distinct] if prompts.negative is not None else None
            cond = self.adapter.encode_prompts([text for text, _ in distinct], negatives, guidance_scale)
            rows = torch.tensor([distinct.index(k) for k in keys])
        cond.extra["seconds"] = seconds
        return cond, rows[:n * B], (rows[n * B:] if with_reference else None)

    def prepare_latents(self, layout: ViewLayout, batch_size: int, height: Optional[int], generator: Any,
                        latents: Optional[torch.Tensor]) -> torch.Tensor:
        """The views of the initial long noise ``J_T``: ``(num_views, B, *window)``.

        ``J_T`` is drawn whole (first, so that a one-view layout sees exactly the pipeline's
        own noise) and gathered, so overlapping views start equal.
        """
        adapter = self.adapter
        j_t = adapter.init_noise(adapter.latent_shape(batch_size, layout.length, height), generator, latents)
        return gather(j_t, layout, adapter.long_dim)

    def prepare_shard(self, layout: ViewLayout, method: Method, batch_size: int) -> _distributed.ViewShard:
        """This process's part of the call: every view in one process, a block of them per rank
        with ``process_group`` (an error on every rank when there are more ranks than views)."""
        if self.process_group is not None and method.couples_views:
            raise ValueError(f"method {method.name!r} couples the views inside each step (its hooks see every "
                             f"view at once), so it runs in one process only: call it without process_group")
        return _distributed.ViewShard(self.process_group, layout, self.adapter.long_dim, method.merge_mode,
                                      method.swap_interval, batch_size)

    def prepare_reference(self, window_shape: Tuple[int, ...], generator: Any,
                          reference_latents: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Any]:
        """The reference window ``X^0`` (its own noise) and its own copy of the scheduler.

        The copy is taken after ``set_timesteps`` and before the first step: ``X^0`` is
        stepped only while it guides, so sharing the views' scheduler would leave its
        multistep history and step counter out of step with theirs.
        """
        reference = self.adapter.init_noise(window_shape, generator, reference_latents)
        return reference, copy.deepcopy(self.pipe.scheduler)

    # -- generation ----------------------------------------------------------------------
    @torch.no_grad()
    @_distributed.collective
    def __call__(self, prompt: Optional[Union[str, Sequence[str]]] = None, seconds: Optional[float] = None, *,
                 audio_length_in_s: Optional[float] = None, width: Optional[int] = None,
                 height: Optional[int] = None, view_prompts: Optional[Sequence[Any]] = None,
                 negative_prompt: Optional[Union[str, Sequence[str]]] = None,
                 reference_prompt: Optional[Union[str, Sequence[str]]] = None,
                 method: Union[str, Method] = "safa", loop: bool = False,
                 num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                 num_waveforms_per_prompt: Optional[int] = None, num_images_per_prompt: Optional[int] = None,
                 generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
                 window: Optional[float] = None, overlap: float = 0.2, swap_interval: Optional[int] = None,
                 guide: Optional[float] = None, view_batch_size: Optional[int] = None,
                 eta: float = 0.0, latents: Optional[torch.Tensor] = None,
                 reference_latents: Optional[torch.Tensor] = None,
                 prompt_embeds: Optional[torch.Tensor] = None, negative_prompt_embeds: Optional[torch.Tensor] = None,
                 pooled_prompt_embeds: Optional[torch.Tensor] = None,
                 negative_pooled_prompt_embeds: Optional[torch.Tensor] = None,
                 decode: str = "auto", decode_tile: Optional[int] = None,
                 callback_on_step_end: Optional[Callable[..., Optional[Dict[str, Any]]]] = None,
                 output_type: Optional[str] = None, output_path: Union[None, str, Sequence[str]] = None,
                 callback_on_output_chunk: Optional[Callable[..., None]] = None, return_dict: bool = True) -> Any:
        """Generate ``seconds`` of audio (or a panorama ``width`` x ``height`` pixels).

        Args:
            prompt: the prompt of every window, or a list of prompts: a batch, one output each
                (as in diffusers).
            seconds / audio_length_in_s: audio length (audio pipelines; the second is the
                pipelines' own name). Honoured exactly: the covering layout is generated and
                cropped; a loop is exactly this long. Below one window: one view of the
                pipeline's own size (its own output).
            width / height: panorama size in pixels (image pipelines; ``height`` a multiple of
                the VAE factor, default the native window's, e.g. 512 for SD 1.x).
            view_prompts: a prompt per view instead of ``prompt`` (rain -> thunder -> calm):
                a list of ``layout_for(...).num_views`` prompts, or one such list per batch prompt.
            negative_prompt: a str, or one per batch prompt (default: the pipeline's own
                unconditional branch).
            reference_prompt: prompt of the reference window ``X^0`` (a str or one per batch
                prompt; default: each batch prompt's first view prompt).
            method: a :class:`~safa.methods.Method` or its shorthand: ``"safa"`` (default:
                self-loop swap + reference-guided swap), ``"safa_selfloop"`` (SaFa*),
                ``"multidiffusion"`` (MD), ``"multidiffusion_triangular"`` (MD*), ``"mad"``
                (merged self-attention, UNet pipelines; overlaps rounded to the UNet's attention
                grid), ``"syncdiffusion"`` (gradient steps towards an anchor view).
            loop: seamless loop / 360-degree layout (the last view overlaps the first).
            num_inference_steps: denoising steps (default: the wrapped pipeline's own, e.g. 10 for
                AudioLDM, 200 for AudioLDM2 and MusicLDM, 50 for SD; the paper used 200 for audio).
            guidance_scale: classifier-free guidance, off when <= 1 (default: the wrapped
                pipeline's own, e.g. 2.5 for AudioLDM, 7.5 for SD).
            num_waveforms_per_prompt / num_images_per_prompt: outputs per batch prompt (default 1).
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
                default one window).
            callback_on_step_end: ``f(jd, step, timestep, callback_kwargs)`` after each step's
                merge, ``callback_kwargs = {"views", "view_range", "reference", "layout"}``:
                ``views`` are this process's views, ``view_range`` their indices in the layout
                (every view in one process); ``reference`` is None once it stops guiding.
                Returning a dict with ``"views"`` / ``"reference"`` tensors replaces them (in
                a distributed call, a replaced reference must be the same on every rank).
            output_type: ``"np"`` (audio default), ``"pil"`` (image default), ``"pt"`` or
                ``"latent"`` (no decoding).
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
            return_dict: return a :class:`JointDiffusionOutput` (default) or, as diffusers
                does, a tuple ``(audio,)`` / ``(images,)``.
        """
        adapter, pipe = self.adapter, self.pipe
        # 1. Check inputs; the method object (guide= / swap_interval= are its parameters); the
        # pipeline's own defaults for what is not given, as the pipeline itself would use.
        method = get_method(method, guide=guide, swap_interval=swap_interval)
        if num_inference_steps is None:
            num_inference_steps = adapter.pipeline_default("num_inference_steps", 50)
        guidance_scale = self._guidance_scale(guidance_scale)
        check_range("eta", eta, 0.0, math.inf, hi_open=True)
        method.check_pipeline(adapter)
        seconds, per_prompt = self._pipeline_names(seconds, audio_length_in_s, width, num_waveforms_per_prompt,
                                                   num_images_per_prompt)
        output_type = self.check_inputs(seconds, width, height, loop, num_inference_steps, per_prompt,
                                        view_batch_size, decode, decode_tile, output_type)
        embeds = self._check_embeds(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                    pooled_prompt_embeds=pooled_prompt_embeds,
                                    negative_pooled_prompt_embeds=negative_pooled_prompt_embeds)
        outputs = _prompts.count_prompts(prompt, view_prompts, int(prompt_embeds.shape[0]) if embeds else None) \
            * per_prompt
        if output_path is not None and output_type == "latent":
            raise ValueError("output_path writes the decoded output: it cannot be used with output_type='latent'")
        # In a distributed call rank 0 alone writes the files (and checks them).
        rank = _distributed.rank_of(self.process_group)
        paths = _output.check_output_paths(output_path, outputs, adapter.kind) if rank == 0 else None

        # 1b. What the request needs against what the device has, before anything is allocated:
        # a clear error (what to change) rather than an allocator failure later (safa.memory).
        self._require_memory(seconds, width, height, window, overlap, loop, method, outputs, guidance_scale,
                             view_batch_size, decode, decode_tile, output_type, output_path is not None)
        if paths is not None and adapter.kind == "audio":
            _output.check_disk_space(paths, adapter.output_length(seconds=seconds),
                                     adapter.output_elements_per_column())

        # 2. Layout of the views over the long latent J, and the prompts of every window.
        layout, columns, out_len = self.prepare_layout(seconds, width, window, overlap, loop, method)
        n, dim = layout.num_views, adapter.long_dim
        prompts = _prompts.resolve_prompts(prompt, view_prompts, negative_prompt, reference_prompt, per_prompt, n,
                                           embeds_rows=int(prompt_embeds.shape[0]) if embeds else None)
        batch_size = prompts.batch_size
        _check_generator(generator, batch_size)
        window_shape = adapter.latent_shape(batch_size, layout.window, height)

        # 3. Timesteps; the reference guides the first round(guide * T) of them (Algorithm 1,
        # with the guidance window of the paper's text: docs/method.md).
        timesteps = adapter.set_timesteps(num_inference_steps, window_shape)
        scheduler = pipe.scheduler
        num_steps = len(timesteps)
        guide_steps = method.reference_steps(num_steps, scheduler) if n > 1 else 0
        if reference_latents is not None and guide_steps == 0:
            raise ValueError(f"reference_latents given but method {method.name!r} with {n} view(s) and "
                             f"{num_steps} steps uses no reference window")

        # 4. Conditions: each distinct (prompt, negative prompt) encoded once.
        cond, view_rows, reference_rows = self.prepare_conditions(prompts, embeds, guide_steps > 0, guidance_scale,
                                                                  seconds)

        # 5. Initial latents: the views of J_T (the same on every rank), then X^0 with its own
        # scheduler; this process's views (all of them unless process_group is set).
        shard = self.prepare_shard(layout, method, batch_size)
        own, own_rows = shard.views, shard.rows
        reference_here = guide_steps > 0 and shard.has_reference
        views = self.prepare_latents(layout, batch_size, height, generator, latents)
        reference, ref_scheduler = (self.prepare_reference(window_shape, generator, reference_latents)
                                    if guide_steps else (None, None))

        # 6. Denoising loop.
        if self.cuda_graphs:
            _accel.check_cuda_graphs(views.device)
        config = _accel.StepConfig(
            adapter=adapter, conditions=cond, view_rows=view_rows[own_rows],
            reference_rows=reference_rows if reference_here else None,
            guidance_scale=guidance_scale, timesteps=timesteps,
            chunk_rows=self._model_windows(view_batch_size, len(own) + (1 if reference_here else 0), method)
            * batch_size, layout=layout,
            dim=dim, merge_mode=method.merge_mode, swap_interval=method.swap_interval,
            reference_axis=adapter.reference_axis)
        runner = _accel.StepRunner(config, compile=self.compile, cuda_graphs=self.cuda_graphs, merge=self.merge_step)
        # Stochastic schedulers draw noise for every row: a generator list (one per output)
        # covers the views' rows (view-major) once per view.
        view_step_kwargs = adapter.step_kwargs(generator * n if isinstance(generator, list) else generator, eta)
        ref_step_kwargs = adapter.step_kwargs(generator, eta)
        # The method's hooks inside the step (MAD, SyncDiffusion); entered around the loop.
        hooks = method.hooks(MethodContext(adapter=adapter, scheduler=scheduler, step=config,
                                           scheduler_timesteps=runner.scheduler_timesteps,
                                           window_shape=window_shape, cuda_graphs=self.cuda_graphs))
        view_rows_count, own_rows_count = n * batch_size, len(own) * batch_size
        progress_bar = pipe.progress_bar(total=num_steps) if shard.rank == 0 else tqdm(total=num_steps, disable=True)
        # record_function ranges: `safa profile` splits each step into model / scheduler / merge.
        started = time.perf_counter()
        with hooks, progress_bar as progress:
            if shard.rank == 0 and "desc" not in (getattr(pipe, "_progress_bar_config", None) or {}):
                progress.set_description("denoising", refresh=False)
            for i, t in enumerate(timesteps):
                guiding = i < guide_steps
                with_reference = guiding and shard.has_reference
                shard.begin_step(i, num_steps)
                with record_function("safa.step"):
                    t_sched = runner.scheduler_timestep(i)  # a host copy on CUDA: see safa/accel.py
                    # 6.0 The method's pre-model hook: SyncDiffusion's gradient step on the views' x_t.
                    hooks.before_model(i, views)
                    flat = views.view(view_rows_count, *window_shape[1:])  # the scheduler's batch
                    # 6.1 Model input: this process's views, plus X^0 (on its own scheduler) while
                    # it guides, on the rank that holds it.
                    with record_function("safa.scheduler"):
                        model_in = scale_model_input(scheduler, flat[own_rows], t_sched)
                        if with_reference:
                            model_in = torch.cat([model_in, scale_model_input(ref_scheduler, reference, t_sched)])
                    # 6.2 One model batch (classifier-free guidance inside adapter.predict), in the
                    # method's model context (MAD: self-attention merged over the long latent).
                    with record_function("safa.model"), hooks.model_context(i):
                        model_out = runner.predict(model_in, i, with_reference)
                    # 6.2b The method's post-model hook: SaFaStats moves the views' clean predictions.
                    hooks.after_model(i, views, reference if guiding else None, model_in, model_out)
                    # Memory: the scheduler's step is the peak of the loop; nothing views-sized that it
                    # does not read may live through it (the concatenated model input here, its
                    # pred_original_sample below): docs/long-audio.md.
                    model_in = None
                    # 6.3 Scheduler step of all views as one batch (in a distributed call every rank
                    # steps every row: the model output of other ranks' rows is zeros, their results
                    # unused).
                    with record_function("safa.scheduler"):
                        views = scheduler.step(shard.whole_batch(model_out[:own_rows_count]), t_sched, flat,
                                               **view_step_kwargs).prev_sample.contiguous().view(n, *window_shape)
                    # (distributed) The step's one exchange: X^0's model output from its rank, and
                    # the overlap cells the merge of this rank's views reads.
                    with record_function("safa.exchange"):
                        reference_out = shard.exchange(views, model_out[own_rows_count:] if with_reference
                                                       else None, guiding)
                    # X^0 on its own scheduler (on every rank).
                    with record_function("safa.scheduler"):
                        if guiding:
                            reference = ref_scheduler.step(reference_out, t_sched, reference,
                                                           **ref_step_kwargs).prev_sample
                    # 6.4 The merge, one op: self-loop swap (Eq. 9) or averaging over the overlaps,
                    # plus the reference-guided swap of the middles (Eq. 10) while guiding.
                    with record_function("safa.merge"):
                        runner.merge(views, reference if guiding and method.swaps_reference else None)
                    # 6.5 Callback: may replace this process's views / the reference.
                    if callback_on_step_end is not None:
                        got = callback_on_step_end(self, i, t, {"views": views[own.start:own.stop],
                                                                "view_range": own,
                                                                "reference": reference if guiding else None,
                                                                "layout": layout})
                        if got:
                            if got.get("views") is not None:
                                views[own.start:own.stop].copy_(got["views"])
                            if guiding and got.get("reference") is not None:
                                reference = got["reference"]
                if i + 1 == guide_steps:  # X^0 has guided its last step: free it and its scheduler
                    reference = ref_scheduler = None
                progress.update()

        # 7. Every view on rank 0 (a no-op in one process), or on every rank when the ranks
        # share a tiled decode; the other ranks are then done.
        mode = resolve_mode(decode, layout.length, layout.window)
        tile = decode_tile or layout.window
        tiles = tile_count(adapter, layout.length, tile, out_len)
        shared_decode = output_type != "latent" and mode == "tiled" and shard.can_share_decode(tiles)
        views = shard.gather(views, everywhere=shared_decode)
        nothing = JointDiffusionOutput(audio=None, images=None, latent=None, layout=layout, columns=columns,
                                       sample_rate=adapter.sample_rate, method=method)
        if views is None:
            return nothing if return_dict else (None,)
        # 8. J = stitch(views), then the output stage (safa.output): the whole layout decoded
        # (a loop as a loop, with circular context; the covering layout's extra columns only
        # cost compute), cropped, and returned or written to output_path tile by tile.
        latent = stitch(views, layout, dim, method.merge_mode, method.swap_interval)
        views = flat = model_out = reference = None  # the step's state is not needed to decode: free it
        if latent.device.type == "cuda":
            torch.cuda.synchronize(latent.device)  # the loop's kernels end here, not in the decode's time
        timings = {"denoise": time.perf_counter() - started}
        audio = images = None
        if output_type != "latent":
            started = time.perf_counter()
            # Shared: the ranks decode the tiles round-robin and rank 0 receives them in order.
            pieces = shard.decode_tiles(adapter, latent, layout.loop, tile, tiles) if shared_decode else None
            if shard.rank != 0:
                collections.deque(pieces, maxlen=0)  # run this rank's rounds: its tiles go to rank 0
                return nothing if return_dict else (None,)
            on_chunk = (None if callback_on_output_chunk is None
                        else lambda start, chunk: callback_on_output_chunk(self, start, chunk))
            result = _output.produce_output(adapter, latent, layout, mode=mode, tile=tile,
                                            view_batch_size=view_batch_size, out_len=out_len,
                                            output_type=output_type, paths=paths, on_chunk=on_chunk, pieces=pieces)
            timings["decode"] = time.perf_counter() - started
            if adapter.kind == "audio":
                audio = result
            else:
                images = result
        if not return_dict:
            return (audio if adapter.kind == "audio" else images if output_type != "latent" else latent,)
        return JointDiffusionOutput(audio=audio, images=images, latent=latent, layout=layout,
                                    columns=columns, sample_rate=adapter.sample_rate, method=method,
                                    output_paths=paths, output_length=out_len if output_type != "latent" else 0,
                                    timings=timings)

    # -- argument handling ------------------------------------------------------------------
    def _pipeline_names(self, seconds: Optional[float], audio_length_in_s: Optional[float], width: Optional[int],
                        num_waveforms_per_prompt: Optional[int],
                        num_images_per_prompt: Optional[int]) -> Tuple[Optional[float], int]:
        """The length and outputs per prompt from our names or the pipeline families' own."""
        kind = self.adapter.kind
        if audio_length_in_s is not None:
            if seconds is not None and seconds != audio_length_in_s:
                raise ValueError(f"seconds={seconds!r} and audio_length_in_s={audio_length_in_s!r} disagree: give one")
            seconds = audio_length_in_s
        if kind == "audio" and seconds is None:
            raise ValueError("give seconds= (or audio_length_in_s=): the length of the audio to generate")
        if kind == "image" and width is None and seconds is None:
            raise ValueError("give width= (pixels): the width of the panorama to generate")
        mine, other = (("num_waveforms_per_prompt", "num_images_per_prompt") if kind == "audio"
                       else ("num_images_per_prompt", "num_waveforms_per_prompt"))
        values = {"num_waveforms_per_prompt": num_waveforms_per_prompt, "num_images_per_prompt": num_images_per_prompt}
        if values[other] is not None:
            raise ValueError(f"{other} is for {'image' if kind == 'audio' else 'audio'} pipelines; give {mine}")
        per_prompt = values[mine] if values[mine] is not None else 1
        check_positive_int(mine, per_prompt)
        return seconds, per_prompt

    def _check_embeds(self, **given: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The precomputed-embedding arguments that were given, checked against what the family takes."""
        embeds = {k: v for k, v in given.items() if v is not None}
        if not embeds:
            return {}
        accepted = self.adapter.embeds_arguments
        for name, value in embeds.items():
            if name not in accepted:
                raise ValueError(f"{name} is not supported for {type(self.pipe).__name__} here"
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


def _check_generator(generator: Any, batch_size: int) -> None:
    """As diffusers: a generator list must have one generator per output."""
    if isinstance(generator, list):
        if len(generator) != batch_size or not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError(f"generator is a list of {len(generator)} but this call makes {batch_size} output(s) "
                             f"(batch prompts x outputs per prompt): give one torch.Generator per output, or one")
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")
