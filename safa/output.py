"""The output stage of :class:`safa.JointDiffusion`: decode the long latent, crop it, return it or write it.

After the last step the sampler stitches the long latent ``J`` and hands it here:

- :func:`decoded_chunks` decodes it with the call's ``decode`` mode (:mod:`safa.decode`) and
  yields the cropped output in consecutive pieces: one piece for a whole (or per-view) decode,
  one per tile for a tiled decode, which stops at the requested length.
- :func:`produce_output` either assembles the pieces in memory (``output_type``) or, with
  ``output_path``, writes each audio piece to its file as soon as it is decoded
  (:class:`~safa.audio_io.AudioWriter`: a temporary file moved into place at the end, so an
  interrupted run leaves nothing). Memory is then one tile's, whatever the length.
  Images are written whole (PNG), through the pipeline's ``image_processor``, except an exact
  tiled decode (``decode="tiled"``, or ``"auto"`` choosing it), which is written row band by
  row band as its tiles come out (:class:`PngRows`): the image never exists whole as floats;
  videos frame by frame as they are decoded (MP4, :class:`~safa.video_io.VideoWriter`).

The stage only reads the stitched latent and the layout, so it runs the same wherever that
latent came from (e.g. gathered from several processes).
"""
from __future__ import annotations

import contextlib
import os
import struct
import zlib

import numpy as np
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from safa_kernels import GridLayout, ViewLayout

from .adapters.base import Adapter
from .audio_io import AudioWriter
from .files import AtomicFile, check_output_path
from .plots import write_image
from .decode import TILED_MODES, decode, decode_tiles, exact_tiled, image_tiles, offload_of

__all__ = ["decoded_chunks", "produce_output", "check_output_paths", "PngRows"]

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
    if adapter.kind == "video":  # the writer's library, before any work rather than at the first frames
        from .video_io import require_av
        require_av()
    return paths


class PngRows:
    """An 8-bit RGB PNG written band of rows by band of rows, atomically (a temporary file next
    to ``path`` becomes ``path`` on :meth:`close` once all ``height`` rows are in).

    Rows are PNG-filtered with "Sub" and compressed by one zlib stream into IDAT chunks as they
    come, so memory is one band's, whatever the image's size.
    """

    SIGNATURE = b"\x89PNG\r\n\x1a\n"

    def __init__(self, path: str, width: int, height: int) -> None:
        self.width, self.height, self.rows = width, height, 0
        self._file = AtomicFile(path)
        self._out = open(self._file.tmp, "wb")
        self._zip = zlib.compressobj(6)
        self._out.write(self.SIGNATURE)
        self._chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))  # 8-bit RGB

    def _chunk(self, kind: bytes, data: bytes) -> None:
        self._out.write(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data)))

    def write(self, band: np.ndarray) -> None:
        """Append ``band``: ``(rows, width, 3)`` uint8."""
        if band.shape[1:] != (self.width, 3) or band.dtype != np.uint8 or self.rows + band.shape[0] > self.height:
            raise ValueError(f"a band of {self.width} x 3 uint8 pixels within {self.height} rows, got {band.shape} "
                             f"{band.dtype} after {self.rows} rows")
        flat = band.reshape(band.shape[0], -1)
        sub = flat.copy()
        sub[:, 3:] -= flat[:, :-3]  # filter "Sub": each byte minus the same channel's left neighbour (mod 256)
        data = np.concatenate([np.ones((flat.shape[0], 1), np.uint8), sub], 1)
        packed = self._zip.compress(data.tobytes())
        if packed:
            self._chunk(b"IDAT", packed)
        self.rows += band.shape[0]

    def close(self) -> None:
        """Finish the file and move it into place (all rows written), else discard it."""
        try:
            if self.rows != self.height:
                raise ValueError(f"the PNG has {self.rows} of its {self.height} rows")
            self._chunk(b"IDAT", self._zip.flush())
            self._chunk(b"IEND", b"")
            self._out.close()
            self._file.commit()
        finally:
            self._out.close()
            self._file.discard()

    def discard(self) -> None:
        self._out.close()
        self._file.discard()


def _stream_images(adapter: Adapter, latent: torch.Tensor, layout: Any, tile: int, out_len: int,
                   paths: List[str], paste: Optional[ChunkCallback] = None, offload: Union[bool, str] = False) -> None:
    """Decode exactly over tiles (:func:`safa.decode.image_tiles`) and write each band of tile
    rows to its PNG as soon as the row is complete, cropped to ``out_len`` columns; the pixels
    are the pipeline's (``round(x * 255)``). ``paste(first column, tile)``: the user's pixels into
    every tile of a strip before its band is written. ``offload``: where the tiled decode keeps its
    tiles (:func:`safa.decode.offload_of`)."""
    loops = (layout.rows.loop, layout.cols.loop) if isinstance(layout, GridLayout) else (False, layout.loop)
    height = latent.shape[-2] * adapter.decoded_scale
    writers = [PngRows(p, out_len, height) for p in paths]
    try:
        band: List[torch.Tensor] = []
        for _, c, piece in image_tiles(adapter, latent, loops, tile, offload):
            if c == 0 and band:
                _write_band(writers, band, out_len)
                band = []
            if paste is not None:
                paste(c, piece)
            band.append(piece)
        _write_band(writers, band, out_len)
        for writer in writers:
            writer.close()
    except BaseException:
        for writer in writers:
            writer.discard()
        raise


def _write_band(writers: List[PngRows], band: List[torch.Tensor], out_len: int) -> None:
    pixels = torch.cat(band, -1)[..., :out_len]
    rgb = (pixels.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for writer, image in zip(writers, rgb):
        writer.write(image)


def decoded_chunks(adapter: Adapter, latent: torch.Tensor, layout: ViewLayout, mode: str, tile: int,
                   view_batch_size: Optional[int], out_len: int,
                   pieces: Optional[Iterator[Tuple[int, torch.Tensor]]] = None) -> Iterator[Tuple[int, torch.Tensor]]:
    """``(first output column, piece)`` of the output cropped to ``out_len`` columns, in order.

    ``mode`` is a resolved decode mode (not ``"auto"``); the long axis of a piece is its last.
    ``pieces``: the decoded pieces when they were decoded elsewhere (several processes,
    :meth:`safa.distributed.ViewShard.decode_tiles`), else they are decoded here.
    """
    if pieces is None and adapter.kind == "video":  # the causal VAE decodes the frames in order, with its cache
        pieces = adapter.decode_frames(latent, layout.loop, mode, tile)  # type: ignore[attr-defined]
    elif pieces is None and mode in TILED_MODES and not isinstance(layout, GridLayout):
        pieces = decode_tiles(adapter, latent, layout.loop, tile, stop=out_len, offload=offload_of(mode))
    elif pieces is None:
        pieces = iter([(0, decode(adapter, latent, layout, mode, view_batch_size))])
    for start, piece in pieces:
        yield start, piece[..., :out_len - start]


def _open_writer(adapter: Adapter, path: str, piece: torch.Tensor, out_len: int) -> Any:
    """The streaming writer of one output file: WAV / FLAC for audio, MP4 for video."""
    if adapter.kind == "video":
        from .video_io import VideoWriter
        return VideoWriter(path, adapter.fps, piece.shape[-3], piece.shape[-2], out_len)  # type: ignore[attr-defined]
    return AudioWriter(path, adapter.sample_rate, piece.shape[1] if piece.dim() == 3 else 1, out_len)


def _progress(pipe: Any, out_len: int, sample_rate: Optional[int], unit: str = "px") -> Any:
    """The decoding bar, counting output columns, shown in seconds of audio (or pixels, or frames) with its rate."""
    from tqdm.auto import tqdm
    config = dict(getattr(pipe, "_progress_bar_config", None) or {})
    config.setdefault("desc", "decoding")
    if not sample_rate:
        return tqdm(total=out_len, unit=unit, **config)
    config.setdefault("bar_format", "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s audio "
                                    "[{elapsed}<{remaining}, {rate_fmt}]")
    return tqdm(total=out_len, unit=" s audio", unit_scale=1.0 / sample_rate, **config)


def produce_output(adapter: Adapter, latent: torch.Tensor, layout: ViewLayout, *, mode: str, tile: int,
                   view_batch_size: Optional[int], out_len: int, output_type: str, paths: Optional[List[str]],
                   on_chunk: Optional[ChunkCallback] = None,
                   pieces: Optional[Iterator[Tuple[int, torch.Tensor]]] = None,
                   paste: Optional[ChunkCallback] = None) -> Any:
    """Decode ``latent`` (``layout.length`` columns) and return the output, or write it to ``paths``.

    Without ``paths``: the output cropped to ``out_len`` in ``output_type``. With ``paths`` (one
    per output): audio is written piece by piece as it is decoded, images whole, or band by band
    for an exact tiled decode without ``on_chunk``; returns None.
    ``paste(start, piece)`` changes every piece in place first (the user's own samples / pixels,
    :meth:`safa.known.KnownColumns.paste`), then ``on_chunk(start, piece)`` sees it, before it is
    written. ``pieces``: see :func:`decoded_chunks`.
    """
    if paths is not None and mode in TILED_MODES and exact_tiled(adapter) and pieces is None and on_chunk is None:
        with _progress(adapter.pipe, out_len, adapter.sample_rate) as progress:
            _stream_images(adapter, latent, layout, tile, out_len, paths, paste, offload_of(mode))
            progress.update(out_len)
        return None
    chunks = decoded_chunks(adapter, latent, layout, mode, tile, view_batch_size, out_len, pieces)
    progress = _progress(adapter.pipe, out_len, adapter.sample_rate, " frames" if adapter.kind == "video" else "px")
    with progress, contextlib.ExitStack() as files:
        writers: Optional[List[Any]] = None
        out: Optional[torch.Tensor] = None
        for start, piece in chunks:
            if paste is not None:
                paste(start, piece)
            if on_chunk is not None:
                on_chunk(start, piece)
            if paths is not None and adapter.streams_files:
                if writers is None:  # opened at the first piece: its shape gives the channels
                    writers = [files.enter_context(_open_writer(adapter, p, piece, out_len)) for p in paths]
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
