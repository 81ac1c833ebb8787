"""The output stage of :class:`safa.JointDiffusion`: decode the long latent, crop it, return it or write it.

After the last step the sampler stitches the long latent ``J`` and hands it here:

- :func:`decoded_chunks` decodes it with the call's ``decode`` mode (:mod:`safa.decode`) and
  yields the cropped output in consecutive pieces: one piece for a whole (or per-view) decode,
  one per tile for a tiled decode, which stops at the requested length.
- :func:`produce_output` either assembles the pieces in memory (``output_type``) or, with
  ``output_path``, writes each audio piece to its file as soon as it is decoded
  (:class:`~safa.audio_io.AudioWriter`: a temporary file moved into place at the end, so an
  interrupted run leaves nothing). Memory is then one tile's, whatever the length.
  Images are written whole (PNG), through the pipeline's ``image_processor``.

The stage only reads the stitched latent and the layout, so it runs the same wherever that
latent came from (e.g. gathered from several processes).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from safa_kernels import GridLayout, ViewLayout

from .adapters.base import Adapter
from .audio_io import AudioWriter
from .files import check_output_path
from .plots import write_image
from .decode import decode, decode_tiles

__all__ = ["decoded_chunks", "produce_output", "check_output_paths"]

ChunkCallback = Callable[[int, torch.Tensor], None]


def check_output_paths(output_path: Union[None, str, Sequence[str]], batch_size: int,
                       adapter: Adapter) -> Optional[List[str]]:
    """``output_path`` as one path per output (None: no files), checked before any work.

    A str for a call with one output, or a list of ``batch_size`` paths, each ending in one of
    the output extensions of the adapter's kind (WAV/FLAC for audio, PNG for images); each must be creatable
    (the directory exists and is writable).
    """
    if output_path is None:
        return None
    paths = [output_path] if isinstance(output_path, (str, os.PathLike)) else list(output_path)
    if not paths or not all(isinstance(p, (str, os.PathLike)) for p in paths):
        raise ValueError(f"output_path must be a path or a list of paths (one per output), got {output_path!r}")
    if len(paths) != batch_size:
        raise ValueError(f"output_path gives {len(paths)} path(s) but this call makes {batch_size} output(s) "
                         f"(batch prompts x outputs per prompt): give one path per output")
    paths = [os.fspath(p) for p in paths]
    for path in paths:
        check_output_path(path, kinds=(adapter.kind,), name="output_path")
    if len(set(map(os.path.abspath, paths))) != len(paths):
        raise ValueError(f"output_path names the same file twice: {paths}")
    return paths


def decoded_chunks(adapter: Adapter, latent: torch.Tensor, layout: ViewLayout, mode: str, tile: int,
                   view_batch_size: Optional[int], out_len: int,
                   pieces: Optional[Iterator[Tuple[int, torch.Tensor]]] = None) -> Iterator[Tuple[int, torch.Tensor]]:
    """``(first output column, piece)`` of the output cropped to ``out_len`` columns, in order.

    ``mode`` is a resolved decode mode (not ``"auto"``); the long axis of a piece is its last.
    ``pieces``: the decoded pieces when they were decoded elsewhere (several processes,
    :meth:`safa.distributed.ViewShard.decode_tiles`), else they are decoded here.
    """
    if pieces is None and mode == "tiled" and not isinstance(layout, GridLayout):
        pieces = decode_tiles(adapter, latent, layout.loop, tile, stop=out_len)
    elif pieces is None:
        pieces = iter([(0, decode(adapter, latent, layout, mode, view_batch_size))])
    for start, piece in pieces:
        yield start, piece[..., :out_len - start]


def _progress(pipe: Any, out_len: int, sample_rate: Optional[int]) -> Any:
    """The decoding bar, counting output columns, shown in seconds of audio (or pixels) with its rate."""
    from tqdm.auto import tqdm
    config = dict(getattr(pipe, "_progress_bar_config", None) or {})
    config.setdefault("desc", "decoding")
    if not sample_rate:
        return tqdm(total=out_len, unit="px", **config)
    config.setdefault("bar_format", "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s audio "
                                    "[{elapsed}<{remaining}, {rate_fmt}]")
    return tqdm(total=out_len, unit=" s audio", unit_scale=1.0 / sample_rate, **config)


def produce_output(adapter: Adapter, latent: torch.Tensor, layout: ViewLayout, *, mode: str, tile: int,
                   view_batch_size: Optional[int], out_len: int, output_type: str, paths: Optional[List[str]],
                   on_chunk: Optional[ChunkCallback] = None,
                   pieces: Optional[Iterator[Tuple[int, torch.Tensor]]] = None) -> Any:
    """Decode ``latent`` (``layout.length`` columns) and return the output, or write it to ``paths``.

    Without ``paths``: the output cropped to ``out_len`` in ``output_type``. With ``paths`` (one
    per output): audio is written piece by piece as it is decoded, images whole; returns None.
    ``on_chunk(start, piece)`` sees every piece before it is written. ``pieces``: see
    :func:`decoded_chunks`.
    """
    chunks = decoded_chunks(adapter, latent, layout, mode, tile, view_batch_size, out_len, pieces)
    progress = _progress(adapter.pipe, out_len, adapter.sample_rate)
    with progress, contextlib.ExitStack() as files:
        writers: Optional[List[AudioWriter]] = None
        out: Optional[torch.Tensor] = None
        for start, piece in chunks:
            if on_chunk is not None:
                on_chunk(start, piece)
            if paths is not None and adapter.streams_files:
                if writers is None:  # opened at the first piece: its shape gives the channels
                    channels = piece.shape[1] if piece.dim() == 3 else 1
                    writers = [files.enter_context(AudioWriter(p, adapter.sample_rate, channels, out_len))
                               for p in paths]
                for writer, row in zip(writers, piece.float().cpu().numpy()):
                    writer.write(row)
            elif start == 0 and piece.shape[-1] == out_len:
                out = piece  # the whole output in one piece: no copy
            else:
                if out is None:
                    out = piece.new_empty(*piece.shape[:-1], out_len)
                out[..., start:start + piece.shape[-1]] = piece
            progress.update(piece.shape[-1])
    if paths is None:
        return adapter.to_output(out, output_type)
    if not adapter.streams_files:  # images: written whole, through the pipeline's own conversion
        for path, image in zip(paths, adapter.to_output(out, "pil")):
            write_image(path, image)
    return None
