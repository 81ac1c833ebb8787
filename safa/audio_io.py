"""Audio files: WAV / FLAC via soundfile, whole or streamed, written atomically.

The file is written through :class:`safa.files.AtomicFile` (a temporary file moved into
place), so after an error or Ctrl-C there is either the complete old file, the complete new
file, or nothing. Images and figures are written by :mod:`safa.plots`.

Audio is written by :class:`AudioWriter`, which appends chunks as they are produced (hours of
audio never need to be in memory at once); :func:`write_audio` is one chunk. One rule for
both: WAV is 32-bit float (any value is stored as it is), FLAC 16-bit PCM, for which samples
outside ``[-1, 1]`` are clipped (with a warning saying how many): a stream cannot be
normalised by a peak it has not seen yet.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Optional

import numpy as np

from .files import AUDIO_EXTENSIONS, AtomicFile

__all__ = ["AudioWriter", "audio_file_bytes", "write_audio"]

# A RIFF WAV file counts its bytes in 32 bits; longer audio is written as RF64 (the WAV
# extension for files over 4 GiB that soundfile and ffmpeg read).
_WAV_MAX_BYTES = 2 ** 32 - 1 - 1024


def _audio_format(path: str) -> tuple:
    ext = os.path.splitext(path)[1].lower()
    if ext not in AUDIO_EXTENSIONS:
        raise ValueError(f"audio output must end in one of {AUDIO_EXTENSIONS}, got {path!r}")
    return ("WAV", "FLOAT") if ext == ".wav" else ("FLAC", "PCM_16")


def audio_file_bytes(path: str, frames: int, channels: int = 1) -> int:
    """Bytes :class:`AudioWriter` needs on disk for ``frames`` x ``channels`` samples (FLAC: before compression)."""
    return int(frames) * int(channels) * (4 if _audio_format(path)[0] == "WAV" else 2)


class AudioWriter:
    """Append audio to a WAV or FLAC file (by extension) as it is produced, atomically.

    ``with AudioWriter(path, sample_rate, channels, frames) as w: w.write(chunk)`` writes
    ``(samples,)`` / ``(channels, samples)`` chunks through soundfile's streaming writer into a
    temporary file that is moved onto ``path`` when the block ends normally; on an exception
    (KeyboardInterrupt included) it is removed. ``frames``, when given, is the total length:
    :meth:`close` checks it, and a WAV over 4 GiB is written as RF64.
    """

    def __init__(self, path: str, sample_rate: int, channels: int = 1, frames: Optional[int] = None) -> None:
        import soundfile as sf
        fmt, self.subtype = _audio_format(path)
        if frames is not None and fmt == "WAV" and audio_file_bytes(path, frames, channels) > _WAV_MAX_BYTES:
            fmt = "RF64"
        self.path, self.channels, self.frames = path, int(channels), frames
        self.written = self.clipped = 0
        self.peak = 0.0
        self._file = AtomicFile(path)
        try:
            self._sound = sf.SoundFile(self._file.tmp, "w", samplerate=int(sample_rate), channels=self.channels,
                                       format=fmt, subtype=self.subtype)
        except BaseException:
            self._file.discard()
            raise

    def write(self, chunk: Any) -> None:
        """Append ``chunk``: ``(samples,)`` for mono or ``(channels, samples)``."""
        data = np.asarray(chunk, dtype=np.float32)
        if data.ndim == 1:
            data = data[None]
        if data.ndim != 2 or data.shape[0] != self.channels:
            raise ValueError(f"a chunk must be (samples,) or ({self.channels}, samples), got shape {np.shape(chunk)}")
        if data.size:
            self.peak = max(self.peak, float(np.max(np.abs(data))))
        if self.subtype != "FLOAT":  # PCM cannot hold |x| > 1: clip (soundfile would wrap around)
            over = np.abs(data) > 1.0
            if over.any():
                self.clipped += int(over.sum())
                data = np.clip(data, -1.0, 1.0)
        self._sound.write(data.T)  # soundfile wants (frames, channels)
        self.written += data.shape[1]

    def close(self) -> None:
        """Finish the file and move it onto ``path``."""
        self._sound.close()
        if self.frames is not None and self.written != self.frames:
            self._file.discard()
            raise ValueError(f"{self.path}: {self.written} samples written, {self.frames} expected")
        self._file.commit()
        if self.clipped:
            warnings.warn(f"{self.path}: {self.clipped} samples outside [-1, 1] (peak {self.peak:.3g}) were clipped "
                          f"to 16-bit PCM; write .wav (32-bit float) to keep them", stacklevel=2)

    def abort(self) -> None:
        """Drop everything written so far: no file at ``path``, no temporary file."""
        with contextlib.suppress(Exception):
            self._sound.close()
        self._file.discard()

    def __enter__(self) -> "AudioWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_audio(path: str, audio: Any, sample_rate: int) -> None:
    """Write ``audio`` (``(samples,)`` or ``(channels, samples)``) as WAV or FLAC (by extension), atomically."""
    data = np.asarray(audio, dtype=np.float32)
    with AudioWriter(path, sample_rate, 1 if data.ndim == 1 else data.shape[0], data.shape[-1]) as writer:
        writer.write(data)
