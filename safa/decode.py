"""Decoding the long latent: whole, per view then stitched, or tiled with bounded memory (docs/method.md, section 8).

All three take the adapter's two decoding stages: ``decode_latents`` (the VAE: latent ->
mel spectrogram / pixels, ``decoded_scale`` columns per latent column) and ``finalize``
(the vocoder for mel pipelines, ``finalize_scale`` output columns per decoded column;
identity otherwise). The final output has its long axis last: ``(B, samples)`` for audio,
``(B, 3, H, W)`` for images.

Loop layouts are decoded with circular context so the output loops without a seam.

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

from .adapters.base import Adapter

__all__ = ["DECODE_MODES", "AUTO_WHOLE_WINDOWS", "resolve_mode", "decode", "decode_full", "decode_views",
           "decode_tiles", "decode_tiled", "decode_grid", "tile_count"]

DECODE_MODES = ("auto", "full", "views", "tiled")
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


def decode_grid(adapter: Adapter, latent: torch.Tensor, loops: Tuple[bool, bool]) -> torch.Tensor:
    """Decode a 2-D canvas (an image beyond one window in height) whole, with circular context on
    each axis in ``loops`` (rows, cols) so that a cylinder or a torus tiles without a seam."""
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
                 tiles: Optional[range] = None) -> Iterator[Tuple[int, torch.Tensor]]:
    """Decode ``tile`` latent columns at a time (plus ``adapter.decode_context`` each side), lazily.

    Yields ``(first output column, piece)`` for consecutive tiles, the output's long axis last;
    with ``stop`` (output columns) the tiles starting at or after it are not decoded; ``tiles``
    (default: all ``ceil(length / tile)`` of them) decodes only those tiles. Each tile's output
    depends only on the latent, so the tiles can be split between processes
    (:meth:`safa.distributed.ViewShard.decode_tiles`). Peak memory is that of decoding one tile,
    whatever the length. Tiles see only local context, so decoders with global statistics
    (GroupNorm) or a global phase estimate (Griffin-Lim) differ slightly from
    :func:`decode_full`; with ``tile >= length`` the one piece is ``decode_full``.
    """
    dim = adapter.long_dim
    n = latent.shape[dim]
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
    output ``stop`` s earlier)."""
    count = math.ceil(columns / tile)
    if stop is not None:
        count = min(count, math.ceil(stop / (tile * adapter.decoded_scale * adapter.finalize_scale)))
    return count


def decode(adapter: Adapter, latent: torch.Tensor, layout: Union[ViewLayout, GridLayout], mode: str = "auto",
           view_batch_size: Optional[int] = None, tile: Optional[int] = None) -> torch.Tensor:
    """Decode the long ``latent`` (``layout.length`` columns) with ``mode`` in :data:`DECODE_MODES`.

    ``tile`` (tiled mode) defaults to one window. A :class:`~safa_kernels.GridLayout` is decoded
    whole (:func:`decode_grid`), whatever ``mode``.
    """
    if isinstance(layout, GridLayout):
        return decode_grid(adapter, latent, (layout.rows.loop, layout.cols.loop))
    mode = resolve_mode(mode, layout.length, layout.window)
    if mode == "full":
        return decode_full(adapter, latent, layout.loop)
    if mode == "views":
        return decode_views(adapter, latent, layout, view_batch_size)
    if mode == "tiled":
        return decode_tiled(adapter, latent, layout.loop, tile or layout.window)
    raise ValueError(f"decode must be one of {DECODE_MODES}, got {mode!r}")
