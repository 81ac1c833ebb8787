"""How much memory a generation needs, estimated before any work, and how much the device has.

:meth:`safa.JointDiffusion.__call__` compares the estimate of its request (:func:`require_memory`,
from the request's geometry alone: :func:`estimate_request`) with :func:`available_memory` before
it allocates anything and raises :class:`InsufficientMemoryError`
(a ``ValueError``: the CLI prints it as one line, exit 2) naming the request, the estimate, what
is available and what to change. Where the memory goes (docs/long-audio.md has the
measurements these rules were checked against):

- **prepare**: the initial noise ``J_T`` is drawn whole and gathered into the views.
- **model call**: the views' state ``S`` (``(1 + overlap) x`` the long latent), the model
  input (a copy while the reference window joins the batch) and output, the model outputs a
  multistep scheduler keeps (:func:`scheduler_history`), and the model's working memory for
  one call of ``view_batch_size`` windows (classifier-free guidance doubles its batch) as
  the adapter reports it (:meth:`~safa.adapters.base.Adapter.denoiser_memory`).
- **scheduler step** (the peak for long outputs): ``S``, the model output, the scheduler's
  history and its temporaries: ``(STEP_STATE_COPIES + history) x S``.
- **gradient step** (SyncDiffusion): one view through the model and the decoder with their
  graphs kept for the backward pass (``grad=True`` of the two methods above).
- **decode**: the stitched long latent, the scheduler's history (kept until the next call),
  decoding one tile or the whole latent (:meth:`~safa.adapters.base.Adapter.decoder_memory`),
  and the decoded output when it is held in memory rather than streamed to a file.

Weights are not counted: they are loaded already, so the free memory is measured after them.
Parts an adapter cannot estimate are named in the estimate (``not_estimated``).
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .decode import TILED_DISK, TILED_MODES, exact_tiled, resolve_mode
from .request import GenerationRequest, is_grid, model_windows, planned_layout, planned_tile_height

__all__ = ["MemoryEstimate", "InsufficientMemoryError", "estimate_memory", "estimate_request", "require_memory",
           "check_disk_space", "available_memory", "scheduler_history", "shortfall", "format_bytes",
           "STEP_STATE_COPIES", "MODEL_CALL_STATE_COPIES", "tiled_decode_bytes", "tiled_disk_decode_bytes", "resolve_decode",
           "WHOLE_DECODE_SHARE"]

# Views-sized tensors alive at the peak of scheduler.step besides the scheduler's history: the
# views, the model output and the scheduler's temporaries (measured with DDIM, which keeps no
# history: 6.2 x S peak RSS at 4 h of audio; DPM-Solver++(2M), history 2: 8.3 x S).
STEP_STATE_COPIES = 6
# ... and around the model call: the views, the model input (a concatenated copy while the
# reference window joins the batch) and the model output, besides history and activations.
MODEL_CALL_STATE_COPIES = 3
# decode="auto" on images decodes whole while the whole decode's estimate is at most this share
# of the available memory, else exactly over tiles (the two agree up to float rounding). A
# margin, not a measurement: the rest of the decode phase and the allocator's slack need room.
WHOLE_DECODE_SHARE = 0.5


class InsufficientMemoryError(ValueError, MemoryError):
    """The request cannot fit in the device's memory (raised before any work).

    A ``ValueError`` (a request the caller can change) and a ``MemoryError``. ``estimate`` and
    ``available`` (bytes) say why.
    """

    def __init__(self, message: str, estimate: "MemoryEstimate", available: int) -> None:
        super().__init__(message)
        self.estimate, self.available = estimate, available


def format_bytes(n: float) -> str:
    """``1.5 GiB``-style sizes (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024.0
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a call needs, by phase and part (see the module docstring).

    Attributes:
        device: where the latents live.
        phases: ``{phase: {part: bytes}}`` for ``"prepare"``, ``"model call"``, ``"scheduler step"``
            and ``"decode"`` (not for ``output_type="latent"``).
        host: parts held in host memory even when ``device`` is a GPU (the decoded audio).
        not_estimated: parts this pipeline cannot estimate (not included above).
        decode: the decode mode counted, as the call will run it (``"full"``, ``"views"``,
            ``"tiled"`` or ``"tiled-disk"``: :func:`resolve_decode`); None without a decode.
    """

    device: torch.device
    phases: Dict[str, Dict[str, int]]
    host: Dict[str, Dict[str, int]] = field(default_factory=dict)
    not_estimated: Tuple[str, ...] = ()
    decode: Optional[str] = None

    def _total(self, phase: str, device_only: bool) -> int:
        parts = sum(self.phases[phase].values())
        if not device_only or self.device.type == "cpu":
            parts += sum(self.host.get(phase, {}).values())
        return parts

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: self._total(p, device_only=False))

    @property
    def peak(self) -> int:
        """Bytes at the peak on the device (plus host parts when the device is the CPU)."""
        return max(self._total(p, device_only=True) for p in self.phases)

    @property
    def host_peak(self) -> int:
        """Bytes at the peak in host memory (the whole peak on a CPU device)."""
        if self.device.type == "cpu":
            return self.peak
        return max((sum(parts.values()) for parts in self.host.values()), default=0)

    def describe(self) -> str:
        """``about 3.4 GiB at its peak (scheduler step: views 439 MiB, ...)``."""
        phase = self.peak_phase
        parts = {**self.phases[phase], **(self.host.get(phase, {}))}
        listed = ", ".join(f"{name} {format_bytes(b)}" for name, b in parts.items() if b)
        missing = f"; not included: {', '.join(self.not_estimated)}" if self.not_estimated else ""
        return f"about {format_bytes(self._total(phase, device_only=False))} at its peak ({phase}: {listed}{missing})"


def scheduler_history(scheduler: Any) -> int:
    """Views-sized tensors a diffusers scheduler keeps from one step to the next.

    Multistep solvers keep their last ``solver_order`` model outputs (UniPC also the last
    sample), PNDM and LMS up to four, Heun-type second-order schedulers a sample and a
    derivative between their two stages; DDIM, DDPM and Euler keep none.
    """
    order = getattr(getattr(scheduler, "config", None), "solver_order", None)
    if order is not None:
        return int(order) + (1 if hasattr(scheduler, "last_sample") else 0)
    if hasattr(scheduler, "ets") or hasattr(scheduler, "derivatives"):
        return 4
    if hasattr(type(scheduler), "state_in_first_order"):
        return 2
    return 0


def estimate_memory(adapter: Any, scheduler: Any, *, length: int, window: int, num_views: int, batch_size: int,
                    height: Optional[int], model_windows: int, guidance: bool, with_reference: bool,
                    decode_columns: int, output_columns: int, streamed: bool, output_type: str,
                    gradient_steps: bool = False, decoding: Optional[int] = None,
                    decode: Optional[str] = None) -> MemoryEstimate:
    """The :class:`MemoryEstimate` of a call with this geometry (pure arithmetic: nothing is allocated).

    Args:
        adapter, scheduler: the pipeline's adapter and the scheduler that will step the views.
        length, window, num_views: the layout (latent columns, views).
        batch_size: outputs of the call.
        height: the image height (image pipelines) or None.
        model_windows: windows per model call (``view_batch_size`` as resolved).
        guidance: classifier-free guidance on (doubles the model batch).
        with_reference: SaFa's reference window is denoised alongside the views.
        decode_columns: latent columns decoded at once (one tile plus context, or the whole latent).
        output_columns: output samples (pixels) per output after cropping.
        streamed: the output is written to files tile by tile instead of being returned.
        output_type: ``"latent"`` means no decoding at all.
        gradient_steps: the method takes gradient steps through the model and the decoder of one
            view at a time (SyncDiffusion): a ``"gradient step"`` phase with both graphs' saved
            activations.
        decoding: the decode's working memory when it is not ``decode_columns`` decoded at once
            (the exact tiled image decode: :func:`tiled_decode_bytes`, :func:`tiled_disk_decode_bytes`).
        decode: the resolved decode mode counted (:func:`resolve_decode`), reported as
            :attr:`MemoryEstimate.decode`.
    """
    itemsize = torch.empty((), dtype=adapter.dtype).element_size()
    window_bytes = math.prod(adapter.latent_shape(batch_size, window, height)) * itemsize
    latent = math.prod(adapter.latent_shape(batch_size, length, height)) * itemsize
    views = num_views * window_bytes
    reference = window_bytes if with_reference else 0
    history = scheduler_history(scheduler)
    not_estimated = []
    window_shape = tuple(adapter.latent_shape(1, window, height))
    model = adapter.denoiser_memory(model_windows * batch_size, guidance, window_shape)
    if model is None:
        not_estimated.append("model activations")
    state = views + reference
    phases: Dict[str, Dict[str, int]] = {
        "prepare": {"initial noise": latent, "views": state},
        "model call": {"views": state, "model input and output": (MODEL_CALL_STATE_COPIES - 1) * state,
                       "scheduler history": history * state, "model": model or 0},
        "scheduler step": {"views": state, "step tensors": (STEP_STATE_COPIES - 1) * state,
                           "scheduler history": history * state},
    }
    if gradient_steps:
        model_graph = adapter.denoiser_memory(batch_size, guidance, window_shape, grad=True)
        decoder_graph = adapter.decoder_memory(window, batch_size, grad=True, height=height)
        not_estimated += [what for what, b in (("model activations with gradient", model_graph),
                                                ("decoder activations with gradient", decoder_graph)) if b is None]
        phases["gradient step"] = {"views": state, "model input and output": (MODEL_CALL_STATE_COPIES - 1) * state,
                                   "scheduler history": history * state, "model graph": model_graph or 0,
                                   "decoder graph": decoder_graph or 0}
    host: Dict[str, Dict[str, int]] = {}
    if output_type != "latent":
        if decoding is None:
            decoding = adapter.decoder_memory(decode_columns, batch_size, height=height)
        if decoding is None:
            not_estimated.append("decoding")
        phases["decode"] = {"latent": latent, "scheduler history": history * state, "decoding": decoding or 0}
        if not streamed:
            host["decode"] = {"output": batch_size * output_columns * adapter.output_elements_per_column(height) * 4}
    return MemoryEstimate(torch.device(adapter.device), phases, host, tuple(not_estimated),
                          decode if output_type != "latent" else None)


def _meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_available() -> Optional[int]:
    """Room left under this process's cgroup memory limit (v2, then v1), if it has one."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2 ** 60:  # "max" / a huge number: no limit
            return max(0, int(limit) - usage)
    return None


def available_memory(device: Any) -> int:
    """Bytes a new allocation can still get on ``device``.

    CUDA: ``torch.cuda.mem_get_info`` plus what PyTorch's caching allocator holds unused. Host
    (CPU, MPS's unified memory): ``MemAvailable`` of ``/proc/meminfo`` and the room under a
    cgroup limit, the smaller; elsewhere the free physical pages.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    known = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    if known:
        return min(known)
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def shortfall(estimate: MemoryEstimate) -> Optional[Tuple[int, int, str]]:
    """``(needed, available, where)`` for the first memory ``estimate`` does not fit in, else None.

    The device's peak against the device (on CUDA, the host-side parts against host memory too).
    """
    device = estimate.device
    checks = [(estimate.peak, device, f"{device.type} memory" if device.type != "cuda" else f"{device} memory")]
    if device.type == "cuda":
        checks.append((estimate.host_peak, torch.device("cpu"), "host memory"))
    for needed, where, label in checks:
        if needed:
            available = available_memory(where)
            if needed > available:
                return needed, available, label
    return None


# -- the exact tiled VAE decode of images (safa.tiled_vae) ------------------------------------
def tiled_decode_bytes(config: Any, latent_shape: Sequence[int], itemsize: int, tile: int) -> int:
    """Peak bytes of :func:`safa.tiled_vae.decode` of a ``(B, C, h, w)`` latent in ``tile`` x ``tile``
    latent tiles with an ``AutoencoderKL`` of ``config`` (the assembled output included).

    The tiled activations of one block at a time: a resnet block holds its input, its middle
    activation and its output (``c_in + 2 c_out`` maps of the level's pixels), an upsampling
    its input and its 4x output, the attention its input, keys, values and output; plus one
    tile's work (its region with halos, the normalised copy and the result: 3 maps of the
    widest channels at the tile's size, with a 1-pixel halo) and the query chunk's scores.
    """
    from .adapters.working_memory import _decoder_levels
    from .tiled_vae import ATTENTION_SCORES
    batch = int(latent_shape[0]) if len(latent_shape) == 4 else 1
    channels, tokens, per_level = _decoder_levels(config, latent_shape)
    out_channels = int(getattr(config, "out_channels", None) or 3)
    peak = 4 * channels[0] * tokens[0] + min(ATTENTION_SCORES, tokens[0] ** 2)
    work = 0
    for level, c_out in enumerate(channels):
        n, c_in = tokens[level], channels[max(level - 1, 0)]
        peak = max(peak, (c_in + 2 * c_out) * n)
        side = tile * 2 ** level + 2
        work = max(work, 3 * max(c_in, c_out) * side * side)
        if level < len(channels) - 1:
            peak = max(peak, c_out * n + c_out * tokens[level + 1])
    del per_level
    peak = max(peak, (channels[-1] + out_channels) * tokens[-1])
    return int(batch * (peak + work) * itemsize)


def tiled_disk_decode_bytes(config: Any, latent_shape: Sequence[int], itemsize: int, tile: int) -> int:
    """Peak bytes of live tensors of :func:`safa.tiled_vae.decode_tiles` with ``offload="disk"``,
    its tiles consumed one tile row at a time (``output_path=``): every layer's tiles and the
    attention's keys and values are in files, so what is resident is one tile's work.

    The largest of: a convolution's tile (its input region with a 1-pixel halo, then the
    normalised piece or the output tile; an upsampling convolution's region, its x2 copy and the
    output), the float64 copy of a few groups for the GroupNorm sums, the attention's query tile
    and one chunk of scores; plus the consumer's band of one tile row of output pixels. Only the
    band grows with the image (with its width).
    """
    from .adapters.working_memory import _decoder_levels
    from .tiled_vae import ATTENTION_SCORES, STATS_ELEMENTS, DiskStore
    batch = int(latent_shape[0]) if len(latent_shape) == 4 else 1
    channels, tokens, _ = _decoder_levels(config, latent_shape)
    out_channels = int(getattr(config, "out_channels", None) or 3)
    h, w = min(tile, int(latent_shape[-2])), min(tile, int(latent_shape[-1]))
    work = 0
    for level, c_out in enumerate(channels):
        c_in, f = channels[max(level - 1, 0)], 2 ** level
        region = c_in * (h * f + 2) * (w * f + 2)
        work = max(work, region + max(c_in, c_out) * h * f * w * f)
        if level:  # the upsampling convolution into this level: its region, the x2 copy, the output
            work = max(work, c_in * (h * f // 2 + 2) * (w * f // 2 + 2) + 2 * c_in * (h * f + 4) * (w * f + 4))
        work = max(work, 2 * min(c_in * h * f * w * f, STATS_ELEMENTS) * 8 // itemsize)
    attention = 3 * channels[0] * h * w
    key_chunk = DiskStore.key_chunk
    if tokens[0] > key_chunk:  # the keys in passes: a chunk of scores and its product with the values
        attention += 2 * min(ATTENTION_SCORES, h * w * key_chunk) * max(4, itemsize) // itemsize
    scale = 2 ** (len(channels) - 1)
    band = out_channels * h * scale * int(latent_shape[-1]) * scale
    return int(batch * (max(work, attention) + band) * itemsize)


def resolve_decode(adapter: Any, mode: str, length: int, window: int, batch_size: int,
                   height: Optional[int], grid: bool = False, tile: Optional[int] = None) -> str:
    """The decode mode a request runs: ``"full"`` / ``"tiled"`` / ``"tiled-disk"`` / ``"views"``.

    :func:`~safa.decode.resolve_mode`, except for images with the exact tiled decode
    (:func:`~safa.decode.exact_tiled`), where ``"auto"`` is the whole decode while its estimate
    (:meth:`~safa.adapters.base.Adapter.decoder_memory`) is at most :data:`WHOLE_DECODE_SHARE` of
    the available memory, else tiled in memory while :func:`tiled_decode_bytes` (``tile`` latent
    pixels a side, default one window) is, else ``"tiled-disk"`` (the tiles in temporary files)
    where :func:`tiled_disk_decode_bytes` is smaller. A grid (``grid``) decodes tiled or whole.
    """
    if mode == "auto" and exact_tiled(adapter):
        budget = WHOLE_DECODE_SHARE * available_memory(adapter.device)
        whole = adapter.decoder_memory(length, batch_size, height=height)
        if whole is None or whole <= budget:
            return "full"
        vae = adapter.pipe.vae
        shape = adapter.latent_shape(batch_size, length, height)
        itemsize = torch.empty((), dtype=vae.dtype).element_size()
        tiled = tiled_decode_bytes(vae.config, shape, itemsize, tile or window)
        # on disk when the tiles in memory do not fit, unless the disk store's estimate is no smaller
        # (a small image: its band of output rows and one tile's work are then most of the decode)
        on_disk = tiled > budget and tiled_disk_decode_bytes(vae.config, shape, itemsize, tile or window) < tiled
        return TILED_DISK if on_disk else "tiled"
    if grid:
        return mode if mode in TILED_MODES else "full"
    return resolve_mode(mode, length, window)


# -- a request's needs (safa.request), before the call does any work --------------------------
def estimate_request(adapter: Any, scheduler: Any, request: GenerationRequest) -> MemoryEstimate:
    """The :class:`MemoryEstimate` of ``request``, from its geometry alone (no layout is built)."""
    length, w, n = planned_layout(adapter, request)
    method = request.method
    # One window, however many steps it guides; none when it guides no step (SaFa's r_guide x a
    # few steps rounds to 0). A window set by noise level needs the scheduler's timesteps: counted.
    with_reference = n > 1 and method.has_reference
    try:
        with_reference = with_reference and method.reference_steps(request.num_inference_steps) > 0
    except ValueError:
        pass
    # A grid is counted as the strip of its tiles' height with as many cells, decoded whole.
    height, grid = planned_tile_height(adapter, request), is_grid(adapter, request)
    output_columns = adapter.output_length(seconds=request.seconds, width=request.width)
    if grid:
        output_columns = math.ceil(output_columns * adapter.latent_rows(request.height) * adapter.decoded_scale / height)
    # the decoded canvas: a grid's full height and width, a strip's length at its height
    columns, rows_px = (adapter.columns_for(width=request.width), request.height) if grid else (length, height)
    mode = resolve_decode(adapter, request.decode, columns, w, request.batch_size, rows_px, grid, request.decode_tile)
    tile = min(request.decode_tile or w, length)
    decode_columns = tile + 2 * min(adapter.decode_context, length) if mode in TILED_MODES and tile < length \
        else length
    decoding = None
    if mode in TILED_MODES and exact_tiled(adapter):
        vae = adapter.pipe.vae
        shape = adapter.latent_shape(request.batch_size, columns, rows_px)
        rule = tiled_disk_decode_bytes if mode == TILED_DISK else tiled_decode_bytes
        decoding = rule(vae.config, shape, torch.empty((), dtype=vae.dtype).element_size(), request.decode_tile or w)
    return estimate_memory(
        adapter, scheduler, length=length, window=w, num_views=n, batch_size=request.batch_size,
        height=height, model_windows=model_windows(request.view_batch_size, n + with_reference, method),
        guidance=request.guidance, with_reference=with_reference, decode_columns=decode_columns,
        output_columns=output_columns, streamed=request.to_files and mode in TILED_MODES and adapter.streams_files,
        output_type=request.output_type, gradient_steps=method.name == "syncdiffusion" and n > 1, decoding=decoding,
        decode=mode)


def _advice(adapter: Any, scheduler: Any, request: GenerationRequest) -> List[str]:
    """What to change so that ``request`` fits: a smaller model batch, streaming to a file, or a
    shorter output (the longest that fits, found by bisection: the estimate grows with length)."""
    def fits(r: GenerationRequest) -> bool:
        return shortfall(estimate_request(adapter, scheduler, r)) is None

    advice = []
    method = request.method
    if not method.all_views_in_one_call:
        k = model_windows(request.view_batch_size, planned_layout(adapter, request)[2] + 1, method) // 2
        while k >= 1 and not fits(replace(request, view_batch_size=k)):
            k //= 2
        if k >= 1:
            advice.append(f"view_batch_size={k} (windows per model call) fits")
    if adapter.streams_files and not request.to_files and fits(replace(request, to_files=True)):
        advice.append("output_path= (write the audio to a file tile by tile instead of returning it) fits")
    if request.decode in ("full", "tiled") and exact_tiled(adapter) and fits(replace(request, decode=TILED_DISK)):
        advice.append("decode='tiled-disk' (the tiled VAE decode with its tiles in temporary files) fits")
    if advice:
        return advice
    continuous = adapter.length_argument == "seconds"  # seconds are a float, pixels an int
    for vbs in ((request.view_batch_size,) if method.all_views_in_one_call else (request.view_batch_size, 1)):
        lo, hi = 0.0, float(request.length)
        for _ in range(64):
            mid = (lo + hi) / 2 if continuous else float(int((lo + hi) / 2))
            if mid <= lo:
                break
            lo, hi = (mid, hi) if fits(replace(request.with_length(adapter, mid), view_batch_size=vbs)) else (lo, mid)
        if lo > 0:
            with_vbs = "" if vbs == request.view_batch_size else " with view_batch_size=1"
            return [f"a shorter output: {adapter.length_argument}={lo:.4g}{with_vbs} fits"]
    return ["not even the shortest output fits"]


def require_memory(adapter: Any, scheduler: Any, request: GenerationRequest) -> MemoryEstimate:
    """The estimate of ``request``, or :class:`InsufficientMemoryError` saying what to change."""
    found = estimate_request(adapter, scheduler, request)
    missing = shortfall(found)
    if missing is None:
        return found
    _, available, where = missing
    length = f"{request.seconds:g}" if request.seconds is not None else str(request.width)
    what = f"{adapter.length_argument}={length}" + \
        (f" with {request.batch_size} outputs" if request.batch_size > 1 else "")
    disk = " (even with the decode's tiles kept on disk, decode='tiled-disk')" \
        if found.decode == TILED_DISK else ""
    raise InsufficientMemoryError(f"{what} needs {found.describe()}{disk}, but {format_bytes(available)} of {where} "
                                  f"is available: " + "; ".join(_advice(adapter, scheduler, request)), found, available)


def check_disk_space(adapter: Any, paths: Optional[Sequence[str]], columns: int) -> None:
    """Raise ``ValueError`` unless every output file of ``columns`` output columns fits on its filesystem
    (files whose size the adapter cannot tell in advance, e.g. PNG, are not checked)."""
    need: dict = {}
    for path in paths or ():
        directory = os.path.dirname(os.path.abspath(path))
        device = os.stat(directory).st_dev
        need.setdefault(device, [directory, 0])[1] += adapter.output_file_bytes(path, columns)
    for directory, total in need.values():
        free = shutil.disk_usage(directory).free
        if total > free:
            raise ValueError(f"the output needs about {format_bytes(total)} in {directory} but {format_bytes(free)} is "
                             f"free there: free some space, write FLAC instead of WAV, or generate a shorter output")
