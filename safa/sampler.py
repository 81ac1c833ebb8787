"""The joint-diffusion sampler: SaFa and its baselines over any supported diffusers pipeline.

Algorithm 1 of the paper (arXiv 2502.05130, section 3; docs/method.md), read top to bottom in
:meth:`JointDiffusion.__call__`, in the numbered blocks that the whole package cites:

1. check inputs: every argument validated once into a :class:`~safa.request.GenerationRequest`
   (:mod:`safa.request`), the method object included (:mod:`safa.methods`);
2. the memory (and disk) the request needs against what the device has, before anything is
   allocated (:mod:`safa.memory`): a request that cannot fit fails at once with a clear error;
3. ``prepare_layout``: the views ``F_i`` over the long latent ``J`` (open: the fewest views
   covering the request, then cropped; loop: exactly the requested length; below one window:
   one view of the pipeline's own size), and the prompt of every window (:mod:`safa.prompts`);
4. the timesteps, and how many of them the reference window ``X^0`` guides;
5. ``prepare_conditions``: every distinct prompt encoded once;
6. ``prepare_latents``: ``J_T`` drawn whole and gathered into the views, so overlapping views
   start equal; ``prepare_reference``: ``X^0`` with its own noise and its own copy of the
   scheduler (SaFa only); ``prepare_shard``: this process's views;
7. the denoising loop (:mod:`safa.loop`, blocks 7.1-7.7): per step, the method's hooks, one
   model batch, ``scheduler.step`` once on all views, one ``sync_`` merge of the overlaps
   (Eq. 9 or averaging) plus the reference swap (Eq. 10) while ``X^0`` guides;
8. ``J = stitch(views)``, decoded, cropped to the requested length, returned or written to
   files tile by tile (:mod:`safa.output`).

With ``process_group=`` the same call runs on every rank of a ``torch.distributed`` group:
each rank runs the model on its own block of views, the scheduler on the whole batch, and
exchanges only the overlap cells its merge reads (:mod:`safa.distributed`, docs/distributed.md).
"""
from __future__ import annotations

import collections
import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from diffusers.utils import BaseOutput

from safa_kernels import GridLayout, ViewLayout, gather, stitch

from . import distributed as _distributed
from . import known as _known
from . import loop as _loop
from . import memory as _memory
from . import output as _output
from . import prompts as _prompts
from . import regions as _regions
from . import request as _request
from .adapters import Adapter, get_adapter
from .adapters import canvas as _canvas
from .decode import TILED_MODES, tile_count
from .memory import MemoryEstimate
from .methods import METHODS, Method
from .prompts import PromptBatch
from .request import DEFAULT_VIEW_BATCH_SIZE, GenerationRequest

__all__ = ["JointDiffusion", "JointDiffusionOutput", "METHODS", "DEFAULT_VIEW_BATCH_SIZE"]


@dataclass
class JointDiffusionOutput(BaseOutput):
    """What :meth:`JointDiffusion.__call__` returns (a diffusers ``BaseOutput``).

    Attributes:
        audio: ``(B, samples)`` at ``sample_rate`` for audio pipelines (numpy or torch by
            ``output_type``), else None.
        images: a list of PIL images / ``(B, H, W, 3)`` array / ``(B, 3, H, W)`` tensor for
            image pipelines (the pipeline's own ``image_processor`` output), else None.
        frames: the videos of video pipelines (``(B, F, H, W, 3)`` for ``"np"``), else None.
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
        window_evaluations: model evaluations of one window per output over the call (the
            views' at every step, the reference window's while it guides; classifier-free
            guidance's two branches count as one, as the pipeline's own call).
        extra_window_evaluations: those of them that a ``timeline`` / ``regions`` added (a view
            that spans k prompts runs k branches; docs/timelines.md).

    As every ``BaseOutput``, it is also a dict of its fields that are not None (``out["latent"]``,
    ``out.to_tuple()``, ``out[0]`` the first of them). In a distributed call (``process_group=``)
    ``audio``, ``images``, ``latent`` and ``output_paths`` are on rank 0 (which alone writes the
    files) and None on the other ranks.
    """

    audio: Any = None
    images: Any = None
    frames: Any = None
    latent: Optional[torch.Tensor] = None
    layout: Optional[ViewLayout] = None
    columns: int = 0
    sample_rate: Optional[int] = None
    method: Optional[Method] = None
    output_paths: Optional[List[str]] = None
    output_length: int = 0
    timings: Dict[str, float] = field(default_factory=dict)
    window_evaluations: int = 0
    extra_window_evaluations: int = 0


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
    def describe_layout(self, layout: Union[ViewLayout, GridLayout]) -> str:
        """The layout in the user's units, e.g. ``5 views of 10 s (250 latent frames), overlap 0.2 ... loop``;
        a grid as ``3 x 4 tiles of 512 x 512 px, ...``, one line."""
        fmt = self.adapter.describe_columns
        if isinstance(layout, GridLayout):
            rows, cols, px = layout.rows, layout.cols, self.adapter.decoded_scale

            def axis(name: str, a: ViewLayout) -> str:
                return (f"{name} overlap {a.overlap / a.window:.3g} ({a.overlap} latent), "
                        f"{'loop of ' if a.loop else 'covering '}{a.length * px} px")
            return (f"{rows.num_views} x {cols.num_views} tiles of {rows.window * px} x {cols.window * px} px "
                    f"({rows.window} x {cols.window} latent), {axis('rows', rows)}; {axis('cols', cols)}"
                    f"{' (a torus: tileable both ways)' if rows.loop and cols.loop else ''}")
        rate = layout.overlap / layout.window
        return (f"{layout.num_views} view{'s' if layout.num_views != 1 else ''} of {fmt(layout.window)}, "
                f"overlap {rate:.3g} ({layout.overlap} latent columns), "
                f"{'loop of ' + fmt(layout.length) if layout.loop else 'covering ' + fmt(layout.length)}")

    def layout_for(self, seconds: Optional[float] = None, width: Optional[int] = None, *,
                   height: Optional[int] = None, window: Optional[float] = None, overlap: float = 0.2,
                   loop: Union[bool, str, Tuple[bool, bool]] = False,
                   method: Union[str, Method] = "safa") -> Union[ViewLayout, GridLayout]:
        """The view layout a call with these arguments uses (e.g. to size a per-view prompt list),
        the arguments validated as the call validates them."""
        request = _request.build_request(self.adapter, seconds=seconds, width=width, height=height, window=window,
                                         overlap=overlap, loop=loop, method=method, batch_size=1)
        return self.prepare_layout(request)[0]

    def prepare_layout(self, request: GenerationRequest) -> Tuple[Union[ViewLayout, GridLayout], int, int]:
        """(layout, latent columns to crop to, output samples / pixels to crop to): see
        :func:`safa.request.prepare_layout`."""
        return _request.prepare_layout(self.adapter, request)

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
        request = _request.build_request(
            self.adapter, seconds=seconds, width=width, height=height, window=window, overlap=overlap, loop=loop,
            method=method, batch_size=batch_size, guidance_scale=guidance_scale, view_batch_size=view_batch_size,
            decode=decode, decode_tile=decode_tile, output_type=output_type, output_path=output_path,
            check_paths=False)
        if check:
            return _memory.require_memory(self.adapter, self.pipe.scheduler, request)
        return _memory.estimate_request(self.adapter, self.pipe.scheduler, request)

    # -- preparation (steps 5 and 6) ------------------------------------------------------
    def prepare_known(self, request: GenerationRequest, layout: Any, batch_size: int, outpaint: Any,
                      **audio_args: Any) -> Optional[_known.KnownColumns]:
        """The user's audio (checked, resampled) or image to outpaint, encoded once into known latent
        columns (:mod:`safa.known`); None when the call has neither."""
        known = _known.prepare_known(self.adapter, seconds=request.seconds, loop=request.loop, batch_size=batch_size,
                                     layout=layout, **audio_args)
        if outpaint is not None:
            known = _known.prepare_known_image(self.adapter, outpaint, width=request.width, loop=request.loop,
                                               batch_size=batch_size)
        return known

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
            keys = _prompts.window_keys(prompts, with_reference)
            distinct = _prompts.unique(keys)
            negatives = [neg for _, neg in distinct] if prompts.negative is not None else None
            cond = self.adapter.encode_prompts([text for text, _ in distinct], negatives, guidance_scale)
            rows = torch.tensor([distinct.index(k) for k in keys])
        cond.extra["seconds"] = seconds
        return cond, rows[:n * B], (rows[n * B:] if with_reference else None)

    def prepare_latents(self, layout: Union[ViewLayout, GridLayout], batch_size: int, height: Optional[int],
                        generator: Any, latents: Optional[torch.Tensor],
                        known: Optional[_known.KnownColumns] = None, init: Optional[_canvas.CanvasImage] = None,
                        first_timestep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The views of the initial long noise ``J_T``: ``(num_views, B, *window)``.

        ``J_T`` is drawn whole (first, so that a one-view layout sees exactly the pipeline's
        own noise) and gathered, so overlapping views start equal. A grid's ``J_T`` is the
        whole canvas, rows x cols. With the user's audio (``known``), its known columns take
        their fixed noise from ``J_T`` (:mod:`safa.known`). img2img (``init``): ``J`` is the
        encoded image noised to ``first_timestep`` (``latents`` then is the noise), as the
        img2img pipelines do (:func:`safa.adapters.canvas.noised_init_latents`).
        """
        adapter = self.adapter
        shape = _request.canvas_shape(adapter, batch_size, layout, height)
        if init is not None and init.role == "init":
            j_t = _canvas.noised_init_latents(adapter, self.pipe.scheduler, init, shape, first_timestep, generator,
                                              latents)
        else:
            j_t = adapter.init_noise(shape, generator, latents)
        views = gather(j_t, layout, _request.merge_dims(adapter, layout))
        if known is not None:
            known.bind(layout, views, float(getattr(self.pipe.scheduler, "init_noise_sigma", 1.0)))
        return views

    def prepare_shard(self, layout: Union[ViewLayout, GridLayout], method: Method,
                      batch_size: int) -> _distributed.ViewShard:
        """This process's part of the call: every view in one process, a block of them per rank
        with ``process_group`` (a grid's tiles in row-major blocks; an error on every rank when
        there are more ranks than views)."""
        if self.process_group is not None and method.couples_views:
            raise ValueError(f"method {method.name!r} couples the views inside each step (its hooks see every "
                             f"view at once), so it runs in one process only: call it without process_group")
        return _distributed.ViewShard(self.process_group, layout, _request.merge_dims(self.adapter, layout),
                                      method.merge_mode, method.swap_interval, batch_size)

    def prepare_reference(self, window_shape: Tuple[int, ...], generator: Any,
                          reference_latents: Optional[torch.Tensor], known: Optional[_known.KnownColumns] = None,
                          columns: int = 0) -> Tuple[torch.Tensor, Any]:
        """The reference window ``X^0`` (its own noise) and its own copy of the scheduler.

        The copy is taken after ``set_timesteps`` and before the first step: ``X^0`` is
        stepped only while it guides, so sharing the views' scheduler would leave its
        multistep history and step counter out of step with theirs. With the user's audio
        (``known``) and no ``reference_latents``, ``X^0`` holds the clip (:meth:`KnownColumns.bind_reference`).
        """
        reference = self.adapter.init_noise(window_shape, generator, reference_latents)
        if known is not None and reference_latents is None:
            known.bind_reference(reference, columns, float(getattr(self.pipe.scheduler, "init_noise_sigma", 1.0)))
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
                 num_videos_per_prompt: Optional[int] = None,
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
                 callback_on_output_chunk: Optional[Callable[..., None]] = None, return_dict: bool = True,
                 audio: Any = None, sample_rate: Optional[int] = None, audio_start: float = 0.0,
                 keep: Optional[Sequence[Tuple[float, float]]] = None, audio_latents: Optional[torch.Tensor] = None,
                 audio_crossfade: float = 0.05, paste_audio: bool = True, image: Any = None,
                 image_start: int = 0, image_crossfade: int = _request.DEFAULT_IMAGE_CROSSFADE,
                 paste_image: bool = True, strength: Optional[float] = None,
                 controlnet_conditioning_scale: Optional[float] = None, noise_level: Optional[int] = None,
                 timeline: Optional[Sequence[Any]] = None, transition: Optional[float] = None,
                 regions: Optional[Sequence[Any]] = None, bootstrap: Optional[float] = None,
                 resample_steps: int = 1, resample_until: float = 1.0) -> Any:
        adapter = self.adapter
        # 1. Check inputs: every argument once, into the request (in a distributed call rank 0
        # alone checks and writes the output files). A canvas image sets the output's size; an
        # image narrower than width on SD / SDXL is outpainted (known columns, safa.known).
        canvas_image, width, height = _request.check_image(
            adapter, image, strength=strength, controlnet_conditioning_scale=controlnet_conditioning_scale,
            noise_level=noise_level, width=width, height=height, window=window, image_start=image_start,
            image_crossfade=image_crossfade, paste_image=paste_image, loop=loop)
        outpaint, canvas_image = _request.split_outpaint(canvas_image)
        request = _request.build_request(
            adapter, method=method, guide=guide, swap_interval=swap_interval, seconds=seconds,
            audio_length_in_s=audio_length_in_s, width=width, height=height, window=window, overlap=overlap,
            loop=loop, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            num_waveforms_per_prompt=num_waveforms_per_prompt, num_images_per_prompt=num_images_per_prompt,
            num_videos_per_prompt=num_videos_per_prompt,
            prompt=prompt, view_prompts=view_prompts, view_batch_size=view_batch_size, eta=eta, decode=decode,
            decode_tile=decode_tile, output_type=output_type, output_path=output_path,
            check_paths=_distributed.rank_of(self.process_group) == 0, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds)
        method = request.method
        _request.check_canvas_method(canvas_image, method, guide)
        # 2. What the request needs against what the device (and the disk) has, before anything is
        # allocated: a clear error (what to change) rather than an allocator failure later.
        # The decode mode is decided here, once, by the estimate (whole / tiled / tiled with its tiles on disk).
        decode_mode = _memory.require_memory(adapter, self.pipe.scheduler, request).decode
        _memory.check_disk_space(adapter, request.paths, adapter.output_length(seconds=request.seconds,
                                                                                 width=request.width))
        # 3. Layout of the views over the long latent J, and the prompt of every window.
        layout, columns, out_len = self.prepare_layout(request)
        # A timeline / regions: prompts weighted per latent cell over the canvas (safa.regions).
        canvas = _regions.canvas_prompts(adapter, request, layout, timeline=timeline, transition=transition,
                                         regions=regions, bootstrap=bootstrap, prompt=prompt, view_prompts=view_prompts)
        if canvas is not None and self.process_group is not None:
            raise ValueError("timeline / regions run in one process only for now: call it without process_group")
        if canvas is not None and canvas_image is not None:
            raise ValueError("regions / timeline with image= (img2img, ControlNet, the upscaler) are not combined "
                             "yet: give regions or image, not both")
        prompts = _prompts.resolve_prompts(
            prompt if canvas is None else canvas.prompts[0], view_prompts, negative_prompt,
            reference_prompt if canvas is None or reference_prompt is not None else _regions.dominant_prompt(canvas, layout),
            request.per_prompt, layout.num_views, embeds_rows=int(prompt_embeds.shape[0]) if request.embeds else None)
        _request.check_generator(generator, prompts.batch_size)
        known = self.prepare_known(request, layout, prompts.batch_size, outpaint, audio=audio, sample_rate=sample_rate,
                                   audio_latents=audio_latents, audio_start=audio_start, keep=keep,
                                   audio_crossfade=audio_crossfade, paste_audio=paste_audio)
        window_shape = _request.window_shape(adapter, prompts.batch_size, layout, request.height)
        # 4. Timesteps; the reference guides the first round(guide * T) of them (Algorithm 1, with
        # the guidance window of the paper's text: docs/method.md section 5).
        timesteps = adapter.set_timesteps(request.num_inference_steps, window_shape)
        if canvas_image is not None and canvas_image.role == "init":  # img2img: the strength's last steps
            timesteps = _request.strength_timesteps(self.pipe.scheduler, timesteps, request.num_inference_steps,
                                                    canvas_image.strength)
        # A canvas image gives every view its own crop: a reference window has no place on it.
        guide_steps = (method.reference_steps(len(timesteps), self.pipe.scheduler)
                       if layout.num_views > 1 and canvas_image is None else 0)
        resample = _known.check_resample(  # RePaint's jumps back (safa.known.Resampling)
            self.pipe.scheduler, resample_steps, resample_until, len(timesteps), seed=_regions.seed_of(generator),
            noise_shape=_request.canvas_shape(adapter, prompts.batch_size, layout, request.height),
            gather=lambda j: gather(j, layout, _request.merge_dims(adapter, layout)), device=adapter.device)
        if reference_latents is not None and guide_steps == 0:
            raise ValueError(f"reference_latents given but method {method.name!r} with {layout.num_views} view(s) "
                             f"and {len(timesteps)} steps uses no reference window")
        # 5. Conditions: each distinct (prompt, negative prompt) encoded once.
        # With a timeline / regions: the prompts each view spans, as model branches (safa.regions).
        if canvas is None:
            cond, view_rows, reference_rows = self.prepare_conditions(prompts, request.embeds, guide_steps > 0,
                                                                      request.guidance_scale, request.seconds)
            mix = None
        else:
            cond, view_rows, reference_rows, mix = _regions.mix_conditions(
                adapter, canvas, prompts, layout, window_shape, guide_steps > 0, request.guidance_scale, len(timesteps))
            cond.extra["seconds"] = request.seconds
        if canvas_image is not None:  # per-pixel conditions: every view its crop (docs/conditions.md)
            view_rows = _canvas.add_view_crops(adapter, cond, view_rows, canvas_image, layout, request.height,
                                               prompts.batch_size, generator)
        # 6. This process's views; the views of J_T (the same on every rank); X^0 with its own scheduler.
        plan = _loop.LoopPlan(layout, window_shape, timesteps, guide_steps, cond, view_rows, reference_rows,
                              self.prepare_shard(layout, method, prompts.batch_size), known, mix,
                              _regions.seed_of(generator), resample)
        # 7. The denoising loop (safa.loop, blocks 7.1-7.7). The initial latents are passed, not
        # held here, so that the loop frees them at its first step.
        views, started = _loop.denoise(
            self, request, plan, self.prepare_latents(layout, prompts.batch_size, request.height, generator, latents,
                                                      known, canvas_image, timesteps[:1]),
            self.prepare_reference(window_shape, generator, reference_latents, known, columns) if guide_steps else None,
            generator, callback_on_step_end)
        # 8. J = stitch(views), decoded, cropped, returned or written (safa.output).
        return self._output_stage(request, plan, columns, out_len, views, started, callback_on_output_chunk,
                                  return_dict, decode_mode)

    __call__.__doc__ = """Generate ``seconds`` of audio (or a panorama ``width`` x ``height`` pixels).
""" + _request.CALL_ARGUMENTS_DOC

    def _output_stage(self, request: GenerationRequest, plan: _loop.LoopPlan, columns: int, out_len: int,
                      views: torch.Tensor, started: float, callback_on_output_chunk: Optional[Callable[..., None]],
                      return_dict: bool, decode_mode: Optional[str]) -> Any:
        """Step 8: every view on rank 0 (on every rank when the ranks share a tiled decode), ``J =
        stitch(views)``, then the output stage (:mod:`safa.output`): the whole layout decoded (a
        loop as a loop, with circular context; the covering layout's extra columns only cost
        compute), cropped, and returned or written to ``output_path`` tile by tile. ``decode_mode``:
        the resolved decode mode (:attr:`safa.memory.MemoryEstimate.decode`; None without a decode)."""
        adapter, layout, shard, method = self.adapter, plan.layout, plan.shard, request.method
        grid = isinstance(layout, GridLayout)  # decoded whole (checked in build_request), rows cropped
        mode = decode_mode or "full"
        tile = request.decode_tile or (layout.cols.window if grid else layout.window)
        tiles = 1 if grid else tile_count(adapter, layout.length, tile, out_len)
        # (a video's causal VAE decodes its frames in order, carrying its cache: on rank 0 alone)
        shared_decode = request.output_type != "latent" and mode in TILED_MODES and adapter.kind != "video" \
            and shard.can_share_decode(tiles)
        views = shard.gather(views, everywhere=shared_decode)
        nothing = JointDiffusionOutput(layout=layout, columns=columns, sample_rate=adapter.sample_rate, method=method)
        if views is None:
            return nothing if return_dict else adapter.pipeline_tuple(None)
        latent = stitch(views, layout, _request.merge_dims(adapter, layout), method.merge_mode, method.swap_interval)
        views = None  # the step's state is not needed to decode: free it
        if latent.device.type == "cuda":
            torch.cuda.synchronize(latent.device)  # the loop's kernels end here, not in the decode's time
        timings = {"denoise": time.perf_counter() - started}
        result = None
        if request.output_type != "latent":
            started = time.perf_counter()
            # Shared: the ranks decode the tiles round-robin and rank 0 receives them in order.
            pieces = shard.decode_tiles(adapter, latent, layout.loop, tile, tiles) if shared_decode else None
            if shard.rank != 0:
                collections.deque(pieces, maxlen=0)  # run this rank's rounds: its tiles go to rank 0
                return nothing if return_dict else adapter.pipeline_tuple(None)
            on_chunk = None if callback_on_output_chunk is None \
                else lambda start, chunk: callback_on_output_chunk(self, start, chunk)
            # The user's own samples / pixels back into every decoded piece, before it is seen or written.
            paste = plan.known.paste if plan.known is not None and plan.known.given is not None else None
            shown = latent.narrow(-2, 0, adapter.latent_rows(request.height)) if grid else latent
            result = _output.produce_output(adapter, shown, layout, mode=mode, tile=tile,
                                            view_batch_size=request.view_batch_size, out_len=out_len,
                                            output_type=request.output_type, paths=request.paths,
                                            on_chunk=on_chunk, paste=paste, pieces=pieces)
            timings["decode"] = time.perf_counter() - started
        if not return_dict:  # what the wrapped pipeline returns; its output is the latent for "latent"
            return adapter.pipeline_tuple(latent if request.output_type == "latent" else result)
        evaluations, extra = _regions.window_evaluations(plan.mix, layout.num_views, len(plan.timesteps),
                                                         plan.guide_steps, request.batch_size)
        if plan.resample is not None:  # every redone step is a model evaluation of each window again
            evaluations += plan.resample.extra_evaluations((evaluations - plan.guide_steps) // len(plan.timesteps),
                                                           plan.guide_steps)
        return JointDiffusionOutput(**{adapter.output_field: result}, latent=latent, layout=layout, columns=columns,
                                    sample_rate=adapter.sample_rate, method=method, output_paths=request.paths,
                                    output_length=out_len if request.output_type != "latent" else 0,
                                    timings=timings, window_evaluations=evaluations, extra_window_evaluations=extra)
