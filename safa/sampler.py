"""The joint-diffusion sampler: SaFa, SaFa*, MultiDiffusion and MD* over any supported pipeline.

Algorithm 1 of the paper (SPEC section 2), with the state laid out as ONE batch:

- ``state`` is ``(n + 1, B, *window_latent)``: rows ``0 .. n-1`` are the views
  ``X^i = F_i(J)``, row ``n`` is the reference window ``X^0`` (its own noise, its own
  prompt, never written by the views).
- Each step, all ``n + 1`` windows go through the model (chunked by ``view_batch_size``
  only to bound memory) and ``scheduler.step`` is called ONCE on the whole batch, so
  multistep histories and stochastic noise are per batch row and the scheduler's step
  counter advances once per step.
- Then one ``sync_`` merges the overlaps in place: self-loop swap / mean / triangular mean,
  plus the reference-guided swap of the middles during the first ``round(guide * T)`` steps
  (SaFa only). ``sync_`` equals re-gathering the views from the stitched long latent, so the
  views always are windows of one long latent ``J``.
- After the last step ``J = stitch(views)`` is cropped to the requested length and decoded.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from safa_kernels import ViewLayout, gather, stitch
from torch.profiler import record_function

from . import accel as _accel
from .adapters import Adapter, get_adapter
from . import decode as _decoding
from .decode import DECODE_MODES

__all__ = ["JointDiffusion", "JointDiffusionOutput", "METHODS", "plan_layout"]

# method -> (merge mode of safa_kernels, whether the reference-guided swap is used)
METHODS: Dict[str, Tuple[str, bool]] = {
    "safa": ("swap", True),                       # self-loop swap + reference-guided swap
    "safa_selfloop": ("swap", False),             # SaFa*: self-loop swap only
    "multidiffusion": ("mean", False),            # MD: plain mean over the overlaps
    "multidiffusion_triangular": ("triangular", False),  # MD*: triangular-window weighted mean
}


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
    """

    audio: Any
    images: Any
    latent: torch.Tensor
    layout: ViewLayout
    columns: int
    sample_rate: Optional[int]


def plan_layout(columns: int, window: int, overlap: int, loop: bool, mode: str) -> ViewLayout:
    """The layout of views for ``columns`` latent columns (the caller crops to ``columns``).

    Open layouts: the fewest views that cover ``columns``. Loop layouts must have exactly
    ``columns`` columns to loop without a seam, so the overlap is re-spaced: among the
    strides dividing ``columns`` (overlap ``<= window / 2`` in swap mode, ``< window``
    otherwise; at least two views) the one whose overlap is closest to ``overlap`` by ratio,
    and nonzero when ``overlap`` is. When no
    stride divides ``columns`` the covering loop is generated and cropped, with a warning.
    """
    if columns < window:
        raise ValueError(f"the requested length ({columns} latent columns) is shorter than one window "
                         f"({window} columns): lower window or ask for a longer output")
    if not loop:
        return ViewLayout.covering(columns, window, overlap, loop=False)
    max_overlap = window // 2 if mode == "swap" else window - 1
    # Closest overlap by ratio (at 60 s of AudioLDM, 106 columns is nearer a requested 51
    # than 6 is: a 6-column seam barely blends), and never none at all when one was asked for:
    # with zero overlap nothing joins neighbouring views.
    def badness(o: int) -> Tuple[bool, float, int]:
        return (overlap > 0 and o == 0, abs(math.log((o + 1) / (overlap + 1))), -o)

    best: Optional[int] = None
    for stride in range(max(1, window - max_overlap), window + 1):
        if columns % stride == 0 and columns // stride >= 2:
            o = window - stride
            if best is None or badness(o) < badness(best):
                best = o
    if best is not None:
        return ViewLayout(columns, window, best, loop=True)
    layout = ViewLayout.covering(columns, window, overlap, loop=True)
    warnings.warn(f"no loop layout of window {window} has exactly {columns} columns; generating "
                  f"{layout.length} and cropping, so the loop point is not seamless", stacklevel=3)
    return layout


def _check_rate(name: str, value: Any, lo: float, hi: float, hi_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or not (lo <= value and (value < hi if hi_open else value <= hi)):
        raise ValueError(f"{name} must be in [{lo}, {hi}{')' if hi_open else ']'}, got {value!r}")
    return float(value)


def _check_positive_int(name: str, value: Any, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1{' or None' if allow_none else ''}, got {value!r}")
    return value


class JointDiffusion:
    """Long-form generation with a diffusers pipeline by joint diffusion over overlapping views.

    ``JointDiffusion(pipe)`` keeps a reference to ``pipe`` (no weights are copied) and picks
    the adapter for its class; an unsupported class raises ``ValueError`` listing the
    supported ones. Use the pipeline's own ``scheduler`` (swap it on ``pipe`` as usual).
    """

    def __init__(self, pipe: Any, *, compile: bool = False, cuda_graphs: bool = False,
                 merge_step: Optional[Callable[..., None]] = None) -> None:
        # compile: torch.compile the denoiser and the merge (fullgraph); cuda_graphs: capture
        # the denoiser call once per generation and replay it each step (CUDA only).
        # Both live in safa/accel.py. merge_step: the per-step merge, with the signature of
        # safa.accel.merge_step (default: that function, one safa_kernels.sync_ call);
        # another one is swapped in to compare merges (`safa profile --compare`).
        if not isinstance(compile, bool) or not isinstance(cuda_graphs, bool):
            raise ValueError(f"compile and cuda_graphs must be bools, got {compile!r}, {cuda_graphs!r}")
        if cuda_graphs and not torch.cuda.is_available():
            raise RuntimeError("cuda_graphs=True needs CUDA, and this machine has none (CUDA graphs do not "
                               "exist on CPU): use cuda_graphs=False; compile=True works on CPU")
        self.pipe = pipe
        self.adapter: Adapter = get_adapter(pipe)
        self.compile, self.cuda_graphs = compile, cuda_graphs
        self.merge_step = merge_step

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
        return w

    def layout_for(self, seconds: Optional[float] = None, width: Optional[int] = None, *,
                   window: Optional[float] = None, overlap: float = 0.2, loop: bool = False,
                   method: str = "safa") -> ViewLayout:
        """The view layout a call with these arguments uses (e.g. to size a per-view prompt list)."""
        return self._plan(seconds, width, window, overlap, loop, method)[0]

    def _plan(self, seconds: Optional[float], width: Optional[int], window: Optional[float], overlap: float,
              loop: bool, method: str) -> Tuple[ViewLayout, int, int]:
        """(layout, columns to crop to, output length) with every geometric argument validated."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
        mode = METHODS[method][0]
        if not isinstance(loop, bool):
            raise ValueError(f"loop must be a bool, got {loop!r}")
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
        # Swap is defined between two views only (no column covered by three): SPEC 2.3.
        if mode == "swap":
            rate = _check_rate("overlap", overlap, 0.0, 0.5, hi_open=False)
        else:
            rate = _check_rate("overlap", overlap, 0.0, 1.0, hi_open=True)
        w = self.window_columns(window)
        o = int(round(rate * w))
        if o >= w:
            raise ValueError(f"overlap rate {overlap} gives {o} overlapping columns for a window of {w}: "
                             f"it must leave at least one column of stride")
        if mode == "swap" and 2 * o > w:
            raise ValueError(f"overlap rate {overlap} gives {o} > window / 2 = {w / 2} columns, "
                             f"too many for method {method!r}")
        columns = self.adapter.columns_for(seconds=seconds, width=width)
        if columns < w:
            unit = (f"{w / self.adapter.frames_per_second:.3f} s" if self.adapter.kind == "audio"
                    else f"{w * self.adapter.decoded_scale * self.adapter.finalize_scale} px")
            raise ValueError(f"the requested length ({'seconds' if seconds is not None else 'width'}="
                             f"{seconds if seconds is not None else width}) is shorter than one window "
                             f"({unit}); lower window or ask for more")
        layout = plan_layout(columns, w, o, loop, mode)
        return layout, columns, self.adapter.output_length(seconds=seconds, width=width)

    # -- generation ----------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: Union[str, Sequence[str]], seconds: Optional[float] = None, *,
                 width: Optional[int] = None, method: str = "safa", loop: bool = False,
                 num_inference_steps: int = 200, guidance_scale: float = 2.5,
                 negative_prompt: Optional[str] = None, reference_prompt: Optional[str] = None,
                 generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
                 window: Optional[float] = None, overlap: float = 0.2, swap_interval: int = 1,
                 guide: float = 0.3, view_batch_size: Optional[int] = None, batch_size: int = 1,
                 eta: float = 0.0, latents: Optional[torch.Tensor] = None,
                 reference_latents: Optional[torch.Tensor] = None, decode: str = "full",
                 decode_tile: Optional[int] = None,
                 callback_on_step_end: Optional[Callable[..., Optional[Dict[str, Any]]]] = None,
                 output_type: Optional[str] = None) -> JointDiffusionOutput:
        """Generate ``seconds`` of audio (or a panorama ``width`` pixels wide).

        Args:
            prompt: one prompt for every window, or a list with one prompt per view
                (``layout_for(...).num_views`` of them; a 1-element list is broadcast).
            seconds / width: output length (audio / image pipelines), honoured exactly: the
                covering layout is generated and cropped.
            method: ``"safa"`` (default: self-loop swap + reference-guided swap),
                ``"safa_selfloop"`` (SaFa*), ``"multidiffusion"`` (MD), ``"multidiffusion_triangular"`` (MD*).
            loop: seamless loop / 360-degree layout (the last view overlaps the first).
            num_inference_steps: denoising steps (default 200, the paper's).
            guidance_scale: classifier-free guidance (default 2.5, AudioLDM's; off when <= 1).
            negative_prompt: shared by every window (default none).
            reference_prompt: prompt of the reference window ``X^0`` (default: the first prompt).
            generator: torch generator(s) for the initial noise and stochastic schedulers.
            window: window in seconds for audio, latent columns for images (default: the
                model's native window, 10.24 s for the AudioLDM family).
            overlap: overlap rate ``r_overlap`` (default 0.2): in ``[0, 0.5]`` for the swap
                methods, ``[0, 1)`` for the averaging ones. Loop layouts re-space it so
                the loop length is exact.
            swap_interval: ``w_swap`` of Eq. 9 (default 1).
            guide: ``r_guide`` (default 0.3): the reference swap runs during the first
                ``round(guide * T)`` of the ``T`` scheduler steps (SaFa only). With a single
                view there is nothing to keep consistent, so no reference is used.
            view_batch_size: windows per model call (default: all ``n + 1`` at once); bounds memory.
            batch_size: outputs per prompt (default 1).
            eta: DDIM's eta (default 0).
            latents: initial long noise ``J_T`` (unscaled, the covering layout's shape
                ``adapter.latent_shape(batch_size, layout.length)``); default drawn from ``generator``.
            reference_latents: initial noise of the reference window (one window's shape).
            decode: ``"full"`` (default), ``"views"`` (decode each view, stitch at the mel /
                pixel level) or ``"tiled"`` (bounded memory; ``decode_tile`` latent columns per
                tile, default one window).
            callback_on_step_end: ``f(jd, step, timestep, callback_kwargs)`` after each step's
                merge, ``callback_kwargs = {"views", "reference", "layout"}``; returning a dict
                with ``"views"`` / ``"reference"`` tensors replaces them.
            output_type: ``"np"`` (audio default), ``"pil"`` (image default), ``"pt"`` or
                ``"latent"`` (no decoding).
        """
        adapter, pipe = self.adapter, self.pipe
        mode, use_reference = METHODS.get(method, (None, False))
        layout, columns, out_len = self._plan(seconds, width, window, overlap, loop, method)
        n = layout.num_views
        guide = _check_rate("guide", guide, 0.0, 1.0, hi_open=False)
        if isinstance(swap_interval, bool) or not isinstance(swap_interval, int) or swap_interval < 1:
            raise ValueError(f"swap_interval must be an int >= 1, got {swap_interval!r}")
        _check_positive_int("num_inference_steps", num_inference_steps)
        _check_positive_int("batch_size", batch_size)
        view_batch_size = _check_positive_int("view_batch_size", view_batch_size, allow_none=True)
        decode_tile = _check_positive_int("decode_tile", decode_tile, allow_none=True)
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        if output_type is None:
            output_type = "np" if adapter.kind == "audio" else "pil"
        allowed_outputs = ("np", "pt", "latent") + (("pil",) if adapter.kind == "image" else ())
        if output_type not in allowed_outputs:
            raise ValueError(f"output_type must be one of {allowed_outputs}, got {output_type!r}")
        view_prompts = self._view_prompts(prompt, n)
        use_reference = use_reference and n > 1
        ref_prompt = (reference_prompt if reference_prompt is not None else view_prompts[0])
        if not isinstance(ref_prompt, str):
            raise ValueError(f"reference_prompt must be a str, got {ref_prompt!r}")

        # Conditions: each distinct prompt encoded once; window k uses prompt_of[k].
        windows_prompts = view_prompts + ([ref_prompt] if use_reference else [])
        unique = list(dict.fromkeys(windows_prompts))
        cond = adapter.encode_prompts(unique, negative_prompt, guidance_scale)
        num_windows = len(windows_prompts)
        prompt_of = torch.tensor([unique.index(p) for p in windows_prompts])
        rows_prompt = prompt_of.repeat_interleave(batch_size)  # rows are (window, batch item)

        timesteps = adapter.set_timesteps(num_inference_steps, layout.window)
        scheduler = pipe.scheduler
        num_steps = len(timesteps)
        guide_steps = int(math.floor(guide * num_steps + 0.5)) if use_reference else 0

        # Initial noise: the long latent J_T, gathered, so overlapping views start equal;
        # J_T is drawn first so that a one-view layout sees exactly the pipeline's own noise.
        dim = adapter.long_dim
        j_t = adapter.init_noise(adapter.latent_shape(batch_size, layout.length), generator, latents)
        window_shape = adapter.latent_shape(batch_size, layout.window)
        state = j_t.new_empty((num_windows,) + tuple(window_shape))
        state[:n] = gather(j_t, layout, dim)
        if use_reference:
            state[n] = adapter.init_noise(window_shape, generator, reference_latents)
        elif reference_latents is not None:
            raise ValueError(f"reference_latents given but method {method!r} with {n} view(s) uses no reference")
        del j_t
        flat = state.view(num_windows * batch_size, *window_shape[1:])  # the scheduler's batch
        step_kwargs = adapter.step_kwargs(generator, eta)
        chunk_rows = (view_batch_size or num_windows) * batch_size
        scale_input = hasattr(scheduler, "scale_model_input")

        if self.cuda_graphs:
            _accel.check_cuda_graphs(flat.device)
        runner = _accel.StepRunner(adapter, cond, rows_prompt, chunk_rows, guidance_scale, timesteps, layout, dim,
                                   mode, swap_interval, adapter.reference_axis, n,
                                   compile=self.compile, cuda_graphs=self.cuda_graphs, merge=self.merge_step)
        # record_function ranges: `safa profile` splits each step into model / scheduler / merge.
        with pipe.progress_bar(total=num_steps) as progress:
            for i, t in enumerate(timesteps):
                with record_function("safa.step"):
                    t_sched = runner.scheduler_timestep(i)  # a host copy on CUDA: see safa/accel.py
                    with record_function("safa.scheduler"):
                        # Flow-matching schedulers have no scale_model_input: their input is the sample.
                        model_in = scheduler.scale_model_input(flat, t_sched) if scale_input else flat
                    with record_function("safa.model"):
                        model_out = runner.predict(model_in, i)
                    with record_function("safa.scheduler"):
                        flat = scheduler.step(model_out, t_sched, flat, **step_kwargs).prev_sample.contiguous()
                    state = flat.view(num_windows, *window_shape)
                    # The whole merge of Algorithm 1, one op: self-loop swap / averaging over the overlaps,
                    # plus the reference-guided swap of the middles for the first guide_steps steps.
                    with record_function("safa.merge"):
                        runner.merge(state, i < guide_steps)
                    if callback_on_step_end is not None:
                        got = callback_on_step_end(self, i, t, {"views": state[:n],
                                                                "reference": state[n] if use_reference else None,
                                                                "layout": layout})
                        if got:
                            if got.get("views") is not None:
                                state[:n] = got["views"]
                            if use_reference and got.get("reference") is not None:
                                state[n] = got["reference"]
                    progress.update()

        latent = stitch(state[:n], layout, dim, mode, swap_interval)
        audio = images = None
        if output_type != "latent":
            # Decode the whole layout, then crop the output: a loop is decoded as a loop
            # (circular context), and the covering layout's extra columns only cost compute.
            out = _decoding.decode(adapter, latent, layout, decode, view_batch_size, decode_tile)
            out = out[..., :out_len]
            result = adapter.to_output(out, output_type)
            if adapter.kind == "audio":
                audio = result
            else:
                images = result
        return JointDiffusionOutput(audio=audio, images=images, latent=latent, layout=layout,
                                    columns=columns, sample_rate=adapter.sample_rate)

    def _view_prompts(self, prompt: Union[str, Sequence[str]], n: int) -> List[str]:
        if isinstance(prompt, str):
            return [prompt] * n
        if isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
            if len(prompt) == 1:
                return list(prompt) * n
            if len(prompt) == n:
                return list(prompt)
            raise ValueError(f"prompt must be a str or a list of 1 or {n} prompts (one per view of this "
                             f"layout), got {len(prompt)}")
        raise ValueError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
