"""Spectrograms of long audio computed from streamed chunks, at the resolution of the picture.

:class:`SpectrogramAccumulator` takes consecutive chunks of a waveform (``(samples,)`` or
``(channels, samples)``) and keeps only what the picture needs: the STFT is computed frame
by frame as samples arrive (frames straddling a chunk boundary are completed by the next
chunk, so the result does not depend on how the audio was cut), the power of every frame
is summed into mel- or log-spaced frequency bands, and consecutive frames are pooled into
at most ``max_columns`` image columns. Memory is ``O(bands * max_columns + n_fft)`` whatever
the duration, so hours of audio streamed to disk tile by tile can be drawn without ever
holding the waveform. :func:`compute_spectrogram` feeds a whole waveform at once.

Conventions:

* frames are centred: frame ``k`` is centred on sample ``k * hop`` (the signal is padded
  with ``n_fft // 2`` zeros at both ends), so there are ``ceil(samples / hop)`` frames and
  time 0 is the first sample;
* power is ``|STFT|^2`` with a Hann window, scaled so that a full-scale sine at the centre
  of an FFT bin has power 1 (0 dB) in that bin; channels are averaged in power (a stereo
  pair in antiphase does not cancel);
* a band is a triangle over its neighbours' centres on the warped axis (mel: the HTK
  formula ``2595 log10(1 + f / 700)``; log: ``ln f``), normalised to unit area, so a band
  holds the mean power per FFT bin around its centre and white noise reads flat. A band
  narrower than one FFT bin falls back to linear interpolation between the two nearest
  bins, so no band is ever empty;
* a column is the mean power of the frames pooled into it.

The rendering (matplotlib) is :mod:`safa.plots`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ._checks import check_int_range, check_positive_int, check_positive_number

__all__ = ["Spectrogram", "SpectrogramAccumulator", "compute_spectrogram", "FREQUENCY_SCALES",
           "hz_to_mel", "mel_to_hz", "default_n_fft"]

FREQUENCY_SCALES = ("mel", "log")
# Frames transformed at once: bounds the temporary memory of a long chunk (~16 MB at n_fft 1024).
_FRAMES_PER_BLOCK = 2048


def hz_to_mel(hz: Any) -> np.ndarray:
    """Mel (HTK formula), odd-extended below 0 Hz so that it is defined on the whole real line."""
    hz = np.asarray(hz, dtype=np.float64)
    return np.sign(hz) * 2595.0 * np.log10(1.0 + np.abs(hz) / 700.0)


def mel_to_hz(mel: Any) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    mel = np.asarray(mel, dtype=np.float64)
    return np.sign(mel) * 700.0 * (10.0 ** (np.abs(mel) / 2595.0) - 1.0)


_WARPS = {"mel": (hz_to_mel, mel_to_hz), "log": (np.log, np.exp)}


def default_n_fft(sample_rate: int) -> int:
    """The power of two closest to 46 ms of samples (1024 at 16-24 kHz, 2048 at 44.1-48 kHz)."""
    return int(2 ** max(4, round(math.log2(sample_rate * 0.046))))


@dataclass
class Spectrogram:
    """A finished spectrogram: ``power`` is ``(bands, columns)``, low frequencies first.

    ``column_edges`` (``columns + 1`` seconds, from 0 to ``duration``) and ``band_edges``
    (``bands + 1`` Hz) bound the cells; ``band_centres`` are the bands' centre frequencies.
    """

    power: np.ndarray
    column_edges: np.ndarray
    band_edges: np.ndarray
    band_centres: np.ndarray
    sample_rate: int
    duration: float
    frequency_scale: str
    n_fft: int
    hop: int
    frames_per_column: int

    def db(self, floor: float = 1e-12) -> np.ndarray:
        """Power in dB re a full-scale sine (``10 log10``), floored at ``10 log10(floor)``."""
        return 10.0 * np.log10(np.maximum(self.power, floor))


class SpectrogramAccumulator:
    """Build a :class:`Spectrogram` of ``duration`` seconds of audio from consecutive chunks.

    Args:
        sample_rate: samples per second (> 0).
        duration: total length in seconds; exactly ``round(duration * sample_rate)`` samples
            must be added before :meth:`finish`. Needed up front to pool frames into columns.
        max_columns: most image columns (>= 1); frames are pooled ``ceil(frames / max_columns)``
            at a time.
        bands: frequency bands (>= 2).
        frequency_scale: ``"mel"`` (0 Hz to Nyquist) or ``"log"`` (``fmin`` to Nyquist).
        n_fft: FFT size (default :func:`default_n_fft`); hop is ``n_fft // 4``.
        fmin: lowest band edge in Hz (default 0 for mel, ``sample_rate / n_fft`` for log).
    """

    def __init__(self, sample_rate: int, duration: float, max_columns: int = 1200, bands: int = 128,
                 frequency_scale: str = "mel", n_fft: Optional[int] = None, fmin: Optional[float] = None) -> None:
        def plain(x: Any) -> Any:  # numpy scalars as Python numbers, for the shared checks
            return x.item() if isinstance(x, np.generic) else x

        sample_rate = check_positive_int("sample_rate", plain(sample_rate))
        duration = check_positive_number("duration (seconds)", plain(duration))
        max_columns = check_positive_int("max_columns", plain(max_columns))
        bands = check_int_range("bands", plain(bands), 2)
        if frequency_scale not in FREQUENCY_SCALES:
            raise ValueError(f"frequency_scale must be one of {FREQUENCY_SCALES}, got {frequency_scale!r}")
        n_fft = check_int_range("n_fft", plain(default_n_fft(sample_rate) if n_fft is None else n_fft), 16)
        self.sample_rate, self.duration = int(sample_rate), float(duration)
        self.n_fft, self.hop = int(n_fft), int(n_fft) // 4
        self.num_samples = int(round(self.duration * self.sample_rate))
        if self.num_samples < 1:
            raise ValueError(f"duration must cover at least one sample at {sample_rate} Hz, got {duration!r} s")
        nyquist = self.sample_rate / 2.0
        if fmin is None:
            fmin = 0.0 if frequency_scale == "mel" else self.sample_rate / self.n_fft
        lowest = 0.0 if frequency_scale == "mel" else 1e-6  # log needs fmin > 0
        if not (math.isfinite(fmin) and lowest <= fmin < nyquist):
            raise ValueError(f"fmin must be in [{lowest:g}, {nyquist:g}) Hz for a {frequency_scale} scale at "
                             f"{sample_rate} Hz, got {fmin!r}")
        self.frequency_scale = frequency_scale
        self._weights, self.band_centres, self.band_edges = _band_weights(
            self.sample_rate, self.n_fft, int(bands), float(fmin), nyquist, frequency_scale)
        # Frames: ceil(samples / hop), pooled into columns of `frames_per_column` frames each.
        self.num_frames = -(-self.num_samples // self.hop)
        self.frames_per_column = -(-self.num_frames // int(max_columns))
        self.num_columns = -(-self.num_frames // self.frames_per_column)
        window = np.hanning(self.n_fft + 1)[:-1]  # periodic Hann: exact overlap-add at hop n_fft/4
        # |X|^2 of a full-scale sine at a bin centre is (sum(w) / 2)^2: that is power 1.
        self._window = window / (window.sum() / 2.0)
        self._sums = np.zeros((len(self.band_centres), self.num_columns))
        self._channels: Optional[int] = None
        # Pending samples (channels, n) of the padded signal, starting at frame `_next_frame`.
        self._pending = np.zeros((0, 0))
        self._next_frame = 0
        self._received = 0
        self._finished = False

    def add(self, chunk: Any) -> None:
        """Add the next ``(samples,)`` or ``(channels, samples)`` chunk (same channels every time)."""
        if self._finished:
            raise RuntimeError("this spectrogram is finished; start a new SpectrogramAccumulator")
        data = np.asarray(chunk, dtype=np.float64)
        if data.ndim == 1:
            data = data[None]
        if data.ndim != 2 or data.shape[0] < 1:
            raise ValueError(f"a chunk must be (samples,) or (channels, samples), got shape {np.shape(chunk)}")
        if self._channels is None:
            self._channels = data.shape[0]
            self._pending = np.zeros((self._channels, self.n_fft // 2))  # the centring pad
        elif data.shape[0] != self._channels:
            raise ValueError(f"a chunk has {data.shape[0]} channels, earlier chunks had {self._channels}")
        if self._received + data.shape[1] > self.num_samples:
            raise ValueError(f"more audio than the declared duration: {self._received + data.shape[1]} samples, "
                             f"expected {self.num_samples} ({self.duration:g} s at {self.sample_rate} Hz)")
        if not np.isfinite(data).all():
            raise ValueError("audio contains NaN or infinity")
        self._received += data.shape[1]
        self._pending = np.concatenate([self._pending, data], axis=1)
        self._consume()

    def finish(self) -> Spectrogram:
        """The spectrogram, once exactly ``round(duration * sample_rate)`` samples were added."""
        if self._received != self.num_samples:
            raise ValueError(f"received {self._received} samples, expected {self.num_samples} "
                             f"({self.duration:g} s at {self.sample_rate} Hz)")
        if not self._finished:
            tail = np.zeros((self._channels, self.n_fft - self.n_fft // 2))  # the centring pad at the end
            self._pending = np.concatenate([self._pending, tail], axis=1)
            self._consume()
            assert self._next_frame == self.num_frames
            self._finished = True
        counts = np.diff(np.minimum(np.arange(self.num_columns + 1) * self.frames_per_column, self.num_frames))
        column_edges = np.minimum(np.arange(self.num_columns + 1) * self.frames_per_column * self.hop,
                                  self.num_samples) / self.sample_rate
        # A frame is centred on its sample, so a column spans half a hop either side of its
        # frames' centres; the outer edges are the signal's ends.
        column_edges = np.clip(column_edges - 0.5 * self.hop / self.sample_rate, 0.0, None)
        column_edges[0], column_edges[-1] = 0.0, self.num_samples / self.sample_rate
        return Spectrogram(power=self._sums / counts, column_edges=column_edges, band_edges=self.band_edges.copy(),
                           band_centres=self.band_centres.copy(), sample_rate=self.sample_rate,
                           duration=self.num_samples / self.sample_rate, frequency_scale=self.frequency_scale,
                           n_fft=self.n_fft, hop=self.hop, frames_per_column=self.frames_per_column)

    def _consume(self) -> None:
        """Compute every frame complete in ``_pending`` (never past the last one) and pool it."""
        available = self._pending.shape[1]
        complete = (available - self.n_fft) // self.hop + 1 if available >= self.n_fft else 0
        remaining = min(complete, self.num_frames - self._next_frame)
        done = 0
        while done < remaining:  # in blocks, so that a long chunk never holds all its frames at once
            count = min(_FRAMES_PER_BLOCK, remaining - done)
            starts = self.hop * (done + np.arange(count))
            frames = self._pending[:, starts[:, None] + np.arange(self.n_fft)]  # (channels, count, n_fft)
            power = (np.abs(np.fft.rfft(frames * self._window, axis=-1)) ** 2).mean(axis=0)  # (count, bins)
            band_power = self._weights @ power.T  # (bands, count)
            columns = (self._next_frame + done + np.arange(count)) // self.frames_per_column
            first = np.flatnonzero(np.r_[True, columns[1:] != columns[:-1]])  # columns are consecutive
            self._sums[:, columns[first]] += np.add.reduceat(band_power, first, axis=1)
            done += count
        self._next_frame += remaining
        self._pending = self._pending[:, remaining * self.hop:]


def _band_weights(sample_rate: int, n_fft: int, bands: int, fmin: float, fmax: float, scale: str):
    """``(weights (bands, bins), centres (bands,) Hz, edges (bands + 1,) Hz)``; rows sum to 1."""
    forward, inverse = _WARPS[scale]
    lo, hi = float(forward(fmin)), float(forward(fmax))
    step = (hi - lo) / bands
    centres_w = lo + step * (np.arange(bands) + 0.5)  # cells of equal height on the warped axis
    edges = inverse(lo + step * np.arange(bands + 1))
    edges[0], edges[-1] = fmin, fmax
    bins_hz = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    with np.errstate(divide="ignore"):
        bins_w = forward(bins_hz)  # log(0) = -inf: the DC bin lies outside every log band
    # Triangle on the warped axis from the previous to the next band centre.
    weights = np.clip(1.0 - np.abs(bins_w[None, :] - centres_w[:, None]) / step, 0.0, None)
    centres = inverse(centres_w)
    for b in np.flatnonzero(weights.sum(1) == 0):  # narrower than a bin: interpolate at the centre
        pos = centres[b] / (sample_rate / n_fft)
        i = min(int(np.floor(pos)), len(bins_hz) - 2)
        weights[b, i], weights[b, i + 1] = 1.0 - (pos - i), pos - i
    return weights / weights.sum(1, keepdims=True), centres, edges


def compute_spectrogram(audio: Any, sample_rate: int, **kwargs: Any) -> Spectrogram:
    """The :class:`Spectrogram` of a whole ``(samples,)`` or ``(channels, samples)`` waveform.

    ``kwargs`` go to :class:`SpectrogramAccumulator` (``max_columns``, ``bands``, ...).
    """
    audio = np.asarray(audio)
    if audio.ndim not in (1, 2) or audio.shape[-1] == 0:
        raise ValueError(f"audio must be (samples,) or (channels, samples) with samples > 0, got shape {audio.shape}")
    acc = SpectrogramAccumulator(sample_rate, audio.shape[-1] / sample_rate, **kwargs)
    acc.add(audio)
    return acc.finish()
