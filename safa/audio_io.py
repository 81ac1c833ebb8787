"""Atomic output files: audio (WAV/FLAC via soundfile), images (PNG) and an annotated spectrogram PNG.

Every writer goes through :func:`atomic_path`: the data is written to a temporary file in
the destination directory and moved into place with ``os.replace``, so after an error or
Ctrl-C there is either the complete old file, the complete new file, or nothing.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, Iterator, Optional, Sequence

import numpy as np

__all__ = ["AUDIO_EXTENSIONS", "IMAGE_EXTENSIONS", "atomic_path", "check_writable", "write_audio",
           "write_image", "write_spectrogram"]

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


def _log_spectrogram(audio: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """``(freq, frames)`` log magnitude in [0, 1] (Hann window, numpy FFT)."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if audio.size < n_fft:
        audio = np.pad(audio, (0, n_fft - audio.size))
    frames = 1 + (audio.size - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    spec = np.abs(np.fft.rfft(audio[idx] * np.hanning(n_fft).astype(np.float32), axis=1)).T
    db = 20 * np.log10(spec + 1e-10)
    db = np.clip(db, db.max() - 80.0, None)  # 80 dB of dynamic range
    rng = db.max() - db.min()
    return (db - db.min()) / rng if rng > 0 else np.zeros_like(db)


def write_spectrogram(path: str, audio: Any, sample_rate: int, view_spans: Sequence[tuple] = (),
                      duration: Optional[float] = None, loop: bool = False, height: int = 256,
                      max_width: int = 4096) -> None:
    """Write a spectrogram PNG of ``audio`` with the views' windows marked, atomically.

    ``audio``: ``(samples,)`` or ``(channels, samples)`` (mixed down). ``view_spans``:
    ``(start_s, end_s)`` of every view in seconds; with ``loop`` a view that ends past
    ``duration`` wraps to the start, otherwise it is clipped (a cropped covering layout).
    Window boundaries are drawn as vertical lines and overlaps (time covered by two views)
    are tinted. Drawn with PIL (no matplotlib needed).
    """
    from PIL import Image, ImageDraw
    audio = np.asarray(audio, dtype=np.float32)
    audio = audio.reshape(-1, audio.shape[-1]).mean(axis=0)  # (channels, samples): mix down to mono
    duration = duration if duration is not None else audio.size / sample_rate
    n_fft = 512
    hop = max(n_fft // 4, int(np.ceil(audio.size / max_width)))
    spec = _log_spectrogram(audio, n_fft, hop)[::-1]  # low frequencies at the bottom
    # A small perceptual palette (dark blue -> purple -> orange -> yellow), linear in between.
    stops = np.array([[0, 0, 4], [80, 18, 123], [182, 54, 121], [251, 136, 97], [252, 253, 191]], np.float32)
    pos = spec * (len(stops) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    frac = (pos - lo)[..., None]
    rgb = (stops[lo] * (1 - frac) + stops[lo + 1] * frac).astype(np.uint8)
    img = Image.fromarray(rgb).resize((spec.shape[1], height), Image.BILINEAR).convert("RGBA")
    width = img.size[0]
    overlay = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)

    def x_of(seconds: float) -> int:
        return int(round(seconds / duration * width)) if duration > 0 else 0

    # Coverage count per pixel column: tint where two views overlap.
    cover = np.zeros(width + 1, np.int32)
    for start, end in view_spans:
        a, b = x_of(start), x_of(end)
        wrapped = (0, max(0, b - width)) if loop else (0, 0)
        for lo_px, hi_px in ((a, min(b, width)), wrapped):
            if hi_px > lo_px:
                cover[lo_px:hi_px] += 1
    for x in np.nonzero(cover[:width] >= 2)[0]:
        draw.line([(int(x), 0), (int(x), height)], fill=(255, 255, 255, 60))
    for start, end in view_spans:
        for s in (start, end):
            x = x_of(s)
            if loop and width:
                x %= width
            if not 0 <= x < width:
                continue
            draw.line([(x, 0), (x, height)], fill=(0, 255, 255, 200))
    img = Image.alpha_composite(img, overlay).convert("RGB")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
