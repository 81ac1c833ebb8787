"""Atomic output files: audio (WAV/FLAC via soundfile) and images (PNG).

Every writer goes through :func:`atomic_path`: the data is written to a temporary file in
the destination directory and moved into place with ``os.replace``, so after an error or
Ctrl-C there is either the complete old file, the complete new file, or nothing. Figures
(the annotated spectrogram, the evaluation plot) are written the same way by :mod:`safa.plots`.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, Iterator

import numpy as np

__all__ = ["AUDIO_EXTENSIONS", "IMAGE_EXTENSIONS", "atomic_path", "check_writable", "write_audio", "write_image"]

AUDIO_EXTENSIONS = (".wav", ".flac")
IMAGE_EXTENSIONS = (".png",)


def check_writable(path: str) -> None:
    """Raise ``OSError`` with a one-line reason unless a file can be created at ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise OSError(f"output directory {directory} does not exist")
    if os.path.isdir(path):
        raise OSError(f"output path {path} is a directory")
    # os.access is not reliable (root, ACLs, read-only mounts): try creating a file.
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".safa-probe-")
    except OSError as exc:
        raise OSError(f"cannot write to {directory}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path`` (same extension); on success move it onto ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    base, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{base}.", suffix=f".part{ext}")
    os.close(fd)
    try:
        yield tmp
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt included: never leave the temporary file behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_audio(path: str, audio: Any, sample_rate: int) -> None:
    """Write ``audio`` (``(samples,)`` or ``(channels, samples)``) as WAV or FLAC (by extension), atomically."""
    import soundfile as sf
    ext = os.path.splitext(path)[1].lower()
    if ext not in AUDIO_EXTENSIONS:
        raise ValueError(f"audio output must end in one of {AUDIO_EXTENSIONS}, got {path!r}")
    data = np.asarray(audio, dtype=np.float32)
    if data.ndim == 2:
        data = data.T  # soundfile wants (frames, channels)
    # Random-weight and untrained models can exceed [-1, 1]; FLAC / 16-bit WAV would clip or fail.
    peak = float(np.max(np.abs(data))) if data.size else 0.0
    if peak > 1.0:
        data = data / peak
    subtype = "PCM_16" if ext == ".flac" else "FLOAT"
    with atomic_path(path) as tmp:
        sf.write(tmp, data, int(sample_rate), format=ext[1:].upper(), subtype=subtype)


def write_image(path: str, image: Any) -> None:
    """Write a PIL image (or ``(H, W, 3)`` array in [0, 1] / uint8) as PNG, atomically."""
    from PIL import Image
    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        image = Image.fromarray(arr)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
