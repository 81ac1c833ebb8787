"""Decoding the long latent: whole, per view then stitched, or tiled with bounded memory (docs/method.md, section 8).

All three take the adapter's two decoding stages: ``decode_latents`` (the VAE: latent ->
mel spectrogram / pixels, ``decoded_scale`` columns per latent column) and ``finalize``
(the vocoder for mel pipelines, ``finalize_scale`` output columns per decoded column;
identity otherwise). The final output has its long axis last: ``(B, samples)`` for audio,
``(B, 3, H, W)`` for images.

Loop layouts are decoded with circular context so the output loops without a seam.

Images (an ``AutoencoderKL`` behind an image adapter) decode ``"tiled"`` exactly: the VAE runs
layer by layer over tiles (:mod:`safa.tiled_vae`: convolution halos, whole-image GroupNorm
statistics, attention over all keys), so the result is the whole decode's up to float
rounding, strips and 2-D canvases alike, loops with circular halos (:func:`decode_image_tiled`).

``"auto"`` (the default) decodes the whole latent while it is at most
:data:`AUTO_WHOLE_WINDOWS` windows long (the pipeline's own path) and in tiles beyond that;
:func:`decode_tiles` yields the tiles one by one, so a caller can write each to disk as it is
finished (:mod:`safa.output`).
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Optional, Tuple, Union

import torch

from safa_kernels import GridLayout, ViewLayout, gather, stitch

from . import tiled_vae
from .adapters.base import Adapter

__all__ = ["DECODE_MODES", "TILED_DISK", "TILED_MODES", "offload_of", "AUTO_WHOLE_WINDOWS", "resolve_mode", "decode", "decode_full", "decode_views",
           "decode_tiles", "decode_tiled", "decode_grid", "tile_count", "exact_tiled", "vae_input", "image_tiles",
           "decode_image_tiled"]

DECODE_MODES = ("auto", "full", "views", "tiled", "tiled-disk")
# The exact tiled image decode with its tiles in temporary files (tiled_vae.DiskStore): resident
# memory is one tile's work whatever the image's size, at the cost of disk space and some time.
TILED_DISK = "tiled-disk"
TILED_MODES = ("tiled", TILED_DISK)
# decode="auto" decodes the whole latent up to this many windows, in one-window tiles beyond.
# Whole decoding grows in time per second and in memory with the length, one-window tiles do
# not (measured in docs/long-audio.md, section decode="auto"). Up to this length (41 s for the
# AudioLDM family, the paper's 24-32 s evaluations included) the output is the pipeline's own
# decode, which tiles only approximate for decoders with global state (GroupNorm statistics,
# Griffin-Lim's phase).
AUTO_WHOLE_WINDOWS = 4


def resolve_mode(mode: str, length: int, window: int) -> str:
    """The decoding ``"auto"`` stands for on a latent of ``length`` columns and views of ``window``
    (``"full"`` or ``"tiled"``); other modes unchanged."""
    if mode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    return "full" if length <= AUTO_WHOLE_WINDOWS * window else "tiled"


def offload_of(mode: str) -> Union[bool, str]:
    """Where the exact tiled image decode of a resolved ``mode`` keeps its tiles between layers
    (:func:`safa.tiled_vae.tile_store`): ``"disk"`` for ``"tiled-disk"``, else in memory."""
    return "disk" if mode == TILED_DISK else False


def _window(x: torch.Tensor, dim: int, start: int, stop: int, circular: bool) -> torch.Tensor:
    """Columns ``[start, stop)`` of ``x`` on ``dim``: wrapped when ``circular``, clamped to the edges otherwise."""
    n = x.shape[dim]
    if circular:
        idx = torch.arange(start, stop, device=x.device) % n
        return x.index_select(dim, idx)
    return x.narrow(dim, max(0, start), min(n, stop) - max(0, start))


def _apply_with_context(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dim: int, scale: int,
                        out_dim: int, start: int, stop: int, context: int, circular: bool) -> torch.Tensor:
    """``fn`` on columns ``[start, stop)`` of ``x`` plus ``context`` columns each side, cropped to ``[start, stop)``.

    ``fn`` maps ``c`` input columns on ``dim`` to ``c * scale`` output columns on ``out_dim``.
    Edge effects of the decoder fall in the context and are discarded.
    """
    n = x.shape[dim]
    lo = start - context if circular else max(0, start - context)
    hi = stop + context if circular else min(n, stop + context)
    y = fn(_window(x, dim, lo, hi, circular))
    return y.narrow(out_dim, (start - lo) * scale, (stop - start) * scale)


def decode_full(adapter: Adapter, latent: torch.Tensor, loop: bool) -> torch.Tensor:
    """Decode the whole long latent at once (memory grows with length)."""
    def both(z: torch.Tensor) -> torch.Tensor:
        return adapter.finalize(adapter.decode_latents(z))
    n = latent.shape[adapter.long_dim]
    if not loop:
        return both(latent)
    scale = adapter.decoded_scale * adapter.finalize_scale
    return _apply_with_context(both, latent, adapter.long_dim, scale, -1, 0, n,
                               min(adapter.decode_context, n), True)


def decode_grid(adapter: Adapter, latent: torch.Tensor, loops: Tuple[bool, bool], mode: str = "full",
                tile: Optional[int] = None) -> torch.Tensor:
    """Decode a 2-D canvas (an image beyond one window in height): ``"full"`` whole, with circular
    context on each axis in ``loops`` (rows, cols) so that a cylinder or a torus tiles without a
    seam; ``"tiled"`` exactly over ``tile`` latent tiles (default one window of the pipeline) with
    circular halos (:func:`decode_image_tiled`)."""
    if mode in TILED_MODES and exact_tiled(adapter):
        return decode_image_tiled(adapter, latent, loops, tile or tiled_vae.DEFAULT_TILE, offload_of(mode))
    scale = adapter.decoded_scale * adapter.finalize_scale

    def both(z: torch.Tensor) -> torch.Tensor:
        return adapter.finalize(adapter.decode_latents(z))

    def wrapped(fn: Callable[[torch.Tensor], torch.Tensor], dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(z: torch.Tensor) -> torch.Tensor:
            n = z.shape[dim]
            return _apply_with_context(fn, z, dim, scale, dim, 0, n, min(adapter.decode_context, n), True)
        return run

    fn = both
    for dim, loop in ((-2, loops[0]), (-1, loops[1])):
        if loop:
            fn = wrapped(fn, dim)
    return fn(latent)


def exact_tiled(adapter: Adapter) -> bool:
    """Whether ``decode="tiled"`` is exact for ``adapter``: an image adapter whose VAE
    :mod:`safa.tiled_vae` can run over tiles (diffusers' ``AutoencoderKL``)."""
    return adapter.kind == "image" and tiled_vae.supports(getattr(adapter.pipe, "vae", None))


def vae_input(adapter: Adapter, latent: torch.Tensor) -> torch.Tensor:
    """What ``adapter.decode_latents(latent)`` hands ``vae.decode``: the latent un-normalised,
    on the device and in the dtype the family decodes in (SDXL's fp16 VAE: float32).

    Read by running the adapter's own ``decode_latents`` with ``vae.decode`` answering its input,
    so every family's un-normalisation (scaling, shift, SDXL's latents mean / std) applies as is.
    """
    vae = adapter.pipe.vae
    own = vae.__dict__.get("decode")

    def echo(z: torch.Tensor, return_dict: bool = True, **_: object) -> object:
        return (z,) if not return_dict else _Sample(z)
    vae.decode = echo
    try:
        return adapter.decode_latents(latent)
    finally:
        del vae.decode
        if own is not None:
            vae.decode = own


class _Sample:
    """``DecoderOutput``'s one field, for adapters that read ``vae.decode(z).sample``."""

    def __init__(self, sample: torch.Tensor) -> None:
        self.sample = sample


def image_tiles(adapter: Adapter, latent: torch.Tensor, loops: Tuple[bool, bool],
                tile: int, offload: Union[bool, str] = False) -> Iterator[Tuple[int, int, torch.Tensor]]:
    """The image of ``latent`` as ``(first row, first column, tile)`` in row-major order (pixels in
    ``[0, 1]``, ``adapter.finalize`` applied), decoded exactly over ``tile x tile`` latent tiles;
    ``loops`` (rows, cols) wrap. The VAE decodes in the dtype the family asks for (upcast as the
    pipeline does when it hands the VAE float32). ``offload``: where the tiles are kept between
    layers (:func:`offload_of`; ``"disk"``: temporary files)."""
    vae = adapter.pipe.vae
    z = vae_input(adapter, latent)
    dtype = vae.dtype
    if z.dtype != dtype:
        vae.to(z.dtype)
    try:
        for r, c, piece in tiled_vae.decode_tiles(vae, z, tile, loops, offload):
            yield r, c, adapter.finalize(piece)
    finally:
        if z.dtype != dtype:
            vae.to(dtype)


def decode_image_tiled(adapter: Adapter, latent: torch.Tensor, loops: Tuple[bool, bool], tile: int,
                       offload: Union[bool, str] = False) -> torch.Tensor:
    """:func:`image_tiles` assembled: the whole decode's image up to float rounding."""
    out: Optional[torch.Tensor] = None
    scale = adapter.decoded_scale * adapter.finalize_scale
    for r, c, piece in image_tiles(adapter, latent, loops, tile, offload):
        if out is None:
            out = piece.new_empty(*piece.shape[:2], latent.shape[-2] * scale, latent.shape[-1] * scale)
        out[..., r:r + piece.shape[-2], c:c + piece.shape[-1]] = piece
    assert out is not None
    return out


def _decoded_layout(layout: ViewLayout, scale: int) -> ViewLayout:
    return ViewLayout(layout.length * scale, layout.window * scale, layout.overlap * scale, layout.loop,
                      tuple(s * scale for s in layout.starts) if not layout.uniform else ())


def decode_views(adapter: Adapter, latent: torch.Tensor, layout: ViewLayout,
                 view_batch_size: Optional[int] = None) -> torch.Tensor:
    """Decode every view's window with the VAE, stitch in the decoded domain, then ``finalize``.

    The paper's fix for 1-D VAEs (appendix, Make-An-Audio 2): concatenate at the mel level
    rather than the latent level. Two overlapping views are cut at the middle of their
    overlap (a swap with interval = half the overlap); overlaps wider than half a window
    (MultiDiffusion-style layouts) are cross-faded with triangular weights instead.
    """
    dim = adapter.long_dim
    views = gather(latent, layout, dim)  # (n, B, ...)
    n, b = views.shape[0], views.shape[1]
    flat = views.reshape(n * b, *views.shape[2:])
    chunk = (view_batch_size or n) * b
    decoded = torch.cat([adapter.decode_latents(flat[i:i + chunk]) for i in range(0, n * b, chunk)])
    decoded = decoded.reshape(n, b, *decoded.shape[1:])
    dlayout = _decoded_layout(layout, adapter.decoded_scale)
    if 2 * dlayout.overlap <= dlayout.window:
        merged = stitch(decoded, dlayout, adapter.decoded_dim, "swap", max(1, math.ceil(dlayout.overlap / 2)))
    else:
        merged = stitch(decoded, dlayout, adapter.decoded_dim, "triangular")
    if not layout.loop:
        return adapter.finalize(merged)
    m = merged.shape[adapter.decoded_dim]
    return _apply_with_context(adapter.finalize, merged, adapter.decoded_dim, adapter.finalize_scale, -1, 0, m,
                               min(adapter.decode_context * adapter.decoded_scale, m), True)


def decode_tiles(adapter: Adapter, latent: torch.Tensor, loop: bool, tile: int, stop: Optional[int] = None,
                 tiles: Optional[range] = None, offload: Union[bool, str] = False) -> Iterator[Tuple[int, torch.Tensor]]:
    """Decode ``tile`` latent columns at a time (plus ``adapter.decode_context`` each side), lazily.

    Yields ``(first output column, piece)`` for consecutive tiles, the output's long axis last;
    with ``stop`` (output columns) the tiles starting at or after it are not decoded; ``tiles``
    (default: all ``ceil(length / tile)`` of them) decodes only those tiles. Each tile's output
    depends only on the latent, so the tiles can be split between processes
    (:meth:`safa.distributed.ViewShard.decode_tiles`). Peak memory is that of decoding one tile,
    whatever the length. Tiles see only local context, so decoders with global statistics
    (GroupNorm) or a global phase estimate (Griffin-Lim) differ slightly from
    :func:`decode_full`; with ``tile >= length`` the one piece is ``decode_full``. Images with an
    ``AutoencoderKL`` (:func:`exact_tiled`) are the exception: one piece, :func:`decode_image_tiled`
    (its tiles kept per ``offload``, :func:`offload_of`).
    """
    dim = adapter.long_dim
    n = latent.shape[dim]
    if exact_tiled(adapter):  # the exact tiled decode: one piece (tiles share GroupNorm statistics)
        yield 0, decode_image_tiled(adapter, latent, (False, loop), tile, offload)
        return
    if tile >= n:
        yield 0, decode_full(adapter, latent, loop)
        return
    scale = adapter.decoded_scale * adapter.finalize_scale
    context = min(adapter.decode_context, n)

    def both(z: torch.Tensor) -> torch.Tensor:
        return adapter.finalize(adapter.decode_latents(z))

    for k in range(math.ceil(n / tile)) if tiles is None else tiles:
        start = k * tile
        if stop is not None and start * scale >= stop:
            return
        yield start * scale, _apply_with_context(both, latent, dim, scale, -1, start, min(n, start + tile), context,
                                                 loop)


def decode_tiled(adapter: Adapter, latent: torch.Tensor, loop: bool, tile: int) -> torch.Tensor:
    """:func:`decode_tiles` assembled in one output buffer (only the buffer grows with length)."""
    n = latent.shape[adapter.long_dim] * adapter.decoded_scale * adapter.finalize_scale
    out: Optional[torch.Tensor] = None
    for start, piece in decode_tiles(adapter, latent, loop, tile):
        if piece.shape[-1] == n:
            return piece
        if out is None:  # allocate once we know the output's other dims, dtype and device
            out = piece.new_empty(*piece.shape[:-1], n)
        out[..., start:start + piece.shape[-1]] = piece
    assert out is not None
    return out


def tile_count(adapter: Adapter, columns: int, tile: int, stop: Optional[int] = None) -> int:
    """How many tiles :func:`decode_tiles` decodes for ``columns`` latent columns (fewer when the
    output ``stop`` s earlier); 1 for an exact image decode (one piece: its tiles share statistics)."""
    if exact_tiled(adapter):
        return 1
    count = math.ceil(columns / tile)
    if stop is not None:
        count = min(count, math.ceil(stop / (tile * adapter.decoded_scale * adapter.finalize_scale)))
    return count


def decode(adapter: Adapter, latent: torch.Tensor, layout: Union[ViewLayout, GridLayout], mode: str = "auto",
           view_batch_size: Optional[int] = None, tile: Optional[int] = None) -> torch.Tensor:
    """Decode the long ``latent`` (``layout.length`` columns) with ``mode`` in :data:`DECODE_MODES`.

    ``tile`` (tiled mode) defaults to one window. A :class:`~safa_kernels.GridLayout` is decoded
    by :func:`decode_grid` (``"tiled"``: exactly over tiles, other modes whole).
    """
    if isinstance(layout, GridLayout):
        return decode_grid(adapter, latent, (layout.rows.loop, layout.cols.loop), mode,
                           tile or layout.cols.window)
    mode = resolve_mode(mode, layout.length, layout.window)
    if mode == "full":
        return decode_full(adapter, latent, layout.loop)
    if mode == "views":
        return decode_views(adapter, latent, layout, view_batch_size)
    if mode == "tiled":
        return decode_tiled(adapter, latent, layout.loop, tile or layout.window)
    if mode == TILED_DISK and exact_tiled(adapter):
        return decode_image_tiled(adapter, latent, (False, layout.loop), tile or layout.window, "disk")
    raise ValueError(f"decode must be one of {DECODE_MODES}, got {mode!r}")
