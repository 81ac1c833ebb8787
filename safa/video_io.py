"""MP4 writer for videos (H.264 through PyAV), streamed and atomic like the audio writer.

:class:`VideoWriter` appends frames as they are decoded (the long video never sits whole in
memory) into a temporary file next to the destination (:class:`safa.files.AtomicFile`) that is
moved into place when the block ends normally; an error or Ctrl-C leaves no file. PyAV (the
``av`` package, FFmpeg's libraries in its wheel) is imported only here: ``pip install av``, or
the ``video`` extra (``pip install safa[video]``).
"""
from __future__ import annotations

import contextlib
from fractions import Fraction
from typing import Any, Optional

import numpy as np

from .files import AtomicFile

__all__ = ["VideoWriter", "VIDEO_CODEC", "require_av"]

# H.264 with yuv420p: what players and browsers expect of an .mp4. crf 18: visually lossless.
VIDEO_CODEC = "libx264"
_OPTIONS = {"crf": "18", "preset": "medium"}


def require_av() -> Any:
    """The ``av`` module, or a ``ValueError`` saying how to install it."""
    try:
        import av
    except ImportError:
        raise ValueError("writing video needs PyAV: pip install av (or pip install safa[video])") from None
    return av


class VideoWriter:
    """Append frames to an MP4 at ``fps`` frames per second as they are produced, atomically.

    ``with VideoWriter(path, fps, height, width, frames) as w: w.write(chunk)`` takes chunks of
    frames ``(3, H, W, f)`` in ``[0, 1]`` (the frames last, as the output stage streams them);
    ``frames``, when given, is the total count, checked at :meth:`close`. Height and width must
    be even (H.264's 4:2:0 chroma).
    """

    def __init__(self, path: str, fps: int, height: int, width: int, frames: Optional[int] = None) -> None:
        av = require_av()
        if height % 2 or width % 2:
            raise ValueError(f"an H.264 video needs an even frame size, got {height} x {width}")
        self.path, self.frames, self.written = path, frames, 0
        self._file = AtomicFile(path)
        try:
            self._container = av.open(self._file.tmp, mode="w", format="mp4")
            self._stream = self._container.add_stream(VIDEO_CODEC, rate=Fraction(int(fps)), options=dict(_OPTIONS))
            self._stream.width, self._stream.height = int(width), int(height)
            self._stream.pix_fmt = "yuv420p"
        except BaseException:
            self._file.discard()
            raise

    def write(self, chunk: Any) -> None:
        """Append ``chunk``: ``(3, H, W, f)`` floats in ``[0, 1]`` (f frames)."""
        import av
        data = np.asarray(chunk, dtype=np.float32)
        if data.ndim != 4 or data.shape[0] != 3:
            raise ValueError(f"a chunk must be (3, height, width, frames), got shape {data.shape}")
        pixels = np.clip(np.rint(data * 255.0), 0, 255).astype(np.uint8).transpose(3, 1, 2, 0)  # (f, H, W, 3)
        for image in pixels:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        self.written += pixels.shape[0]

    def close(self) -> None:
        """Flush the encoder, finish the file and move it onto ``path``."""
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        if self.frames is not None and self.written != self.frames:
            self._file.discard()
            raise ValueError(f"{self.path}: {self.written} frames written, {self.frames} expected")
        self._file.commit()

    def abort(self) -> None:
        """Drop everything written so far: no file at ``path``, no temporary file."""
        with contextlib.suppress(Exception):
            self._container.close()
        self._file.discard()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
