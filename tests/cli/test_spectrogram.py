"""The streamed spectrogram (safa.spectrogram): chunking does not matter, levels, time and
frequency are where they should be (analytic oracles), pooling is a plain mean, bad input
is refused with the parameter named."""
import math

import numpy as np
import pytest

from safa import spectrogram
from safa.spectrogram import SpectrogramAccumulator, compute_spectrogram, hz_to_mel, mel_to_hz

SR = 16000


def _feed(audio, chunk_sizes, **kwargs):
    acc = SpectrogramAccumulator(SR, audio.shape[-1] / SR, **kwargs)
    pos = 0
    for size in chunk_sizes:
        acc.add(audio[..., pos:pos + size])
        pos += size
    assert pos >= audio.shape[-1]
    return acc.finish()


def _random_cuts(total, rng, largest):
    sizes = []
    while sum(sizes) < total:
        sizes.append(int(rng.choice([0, 1, 7, int(rng.integers(1, largest))])))
    return sizes


@pytest.mark.parametrize("shape", [(SR * 5 + 123,), (2, SR * 3 + 1)], ids=["mono", "stereo"])
@pytest.mark.parametrize("scale", ["mel", "log"])
@pytest.mark.parametrize("max_columns", [10_000, 97])
def test_chunked_equals_whole(shape, scale, max_columns, monkeypatch):
    rng = np.random.default_rng(0)
    audio = rng.standard_normal(shape) * np.linspace(0.01, 1.0, shape[-1])
    whole = compute_spectrogram(audio, SR, frequency_scale=scale, max_columns=max_columns)
    monkeypatch.setattr(spectrogram, "_FRAMES_PER_BLOCK", 7)  # chunks of many blocks, blocks across columns
    for largest in (300, 5000, 70_000):  # chunks shorter than a hop, than n_fft, and of many frames
        chunked = _feed(audio, _random_cuts(shape[-1], rng, largest), frequency_scale=scale, max_columns=max_columns)
        np.testing.assert_allclose(chunked.power, whole.power, rtol=1e-9, atol=1e-30)
        np.testing.assert_array_equal(chunked.column_edges, whole.column_edges)


def test_white_noise_level_is_flat_and_analytic():
    # Real white noise of variance s2 has E|X_k|^2 = s2 * sum(w^2) in every bin; with the
    # full-scale-sine normalisation (sum(w) / 2)^2 and a periodic Hann window
    # (sum w = N / 2, sum w^2 = 3N / 8) that is 6 * s2 / N in every band.
    sigma, n_fft = 0.1, 1024
    audio = np.random.default_rng(1).normal(0, sigma, SR * 60)
    spec = compute_spectrogram(audio, SR, n_fft=n_fft)
    expected = 6 * sigma ** 2 / n_fft
    np.testing.assert_allclose(spec.power.mean(axis=1), expected, rtol=0.1)


def test_full_scale_sine_at_a_bin_centre_is_0_db():
    n_fft = 1024
    freq = 40 * SR / n_fft  # 625 Hz, the centre of bin 40
    t = np.arange(SR * 2) / SR
    acc = SpectrogramAccumulator(SR, 2.0, n_fft=n_fft, bands=4000, frequency_scale="log")
    acc.add(np.sin(2 * np.pi * freq * t))
    spec = acc.finish()
    # Bands are convex combinations of bins, and the band nearest 625 Hz holds bin 40 alone.
    inner = spec.power[:, 2:-2]  # away from the zero padding at the ends
    np.testing.assert_allclose(inner.max(axis=0), 1.0, rtol=1e-9)
    assert abs(spec.band_centres[inner[:, 0].argmax()] - freq) < SR / n_fft


def test_a_tone_burst_appears_at_its_time_and_frequency():
    t = np.arange(SR * 4) / SR
    burst = (t >= 1.5) & (t < 2.5)
    audio = np.where(burst, 0.5 * np.sin(2 * np.pi * 3000 * t), 0.0) + 1e-4 * np.random.default_rng(2).standard_normal(t.size)
    spec = compute_spectrogram(audio, SR, max_columns=80)
    assert spec.column_edges[0] == 0 and spec.column_edges[-1] == pytest.approx(4.0)
    lo, hi = spec.column_edges[:-1], spec.column_edges[1:]
    inside = (lo >= 1.6) & (hi <= 2.4)
    outside = (hi <= 1.4) | (lo >= 2.6)
    band = int(np.argmax(spec.power[:, inside].mean(axis=1)))
    assert spec.band_edges[band] <= 3000 <= spec.band_edges[band + 1]
    db = spec.db()
    assert db[band, inside].min() > db[band, outside].max() + 40


def test_channels_are_averaged_in_power():
    x = np.random.default_rng(3).standard_normal(SR)
    mono = compute_spectrogram(x, SR)
    np.testing.assert_allclose(compute_spectrogram(np.stack([x, -x]), SR).power, mono.power, rtol=1e-12)
    np.testing.assert_allclose(compute_spectrogram(np.stack([x, 0 * x]), SR).power, mono.power / 2, rtol=1e-12)


def test_pooling_is_the_mean_of_consecutive_frames():
    audio = np.random.default_rng(4).standard_normal(SR * 2 + 77)
    frames = compute_spectrogram(audio, SR, max_columns=10**6)
    assert frames.frames_per_column == 1 and frames.power.shape[1] == math.ceil(audio.size / frames.hop)
    pooled = compute_spectrogram(audio, SR, max_columns=9)
    pool = pooled.frames_per_column
    assert pooled.power.shape[1] <= 9 and pool == math.ceil(frames.power.shape[1] / 9)
    expected = np.stack([frames.power[:, i:i + pool].mean(axis=1) for i in range(0, frames.power.shape[1], pool)], 1)
    np.testing.assert_allclose(pooled.power, expected, rtol=1e-12)


def test_bands_tile_the_frequency_axis():
    for scale, fmin in (("mel", 0.0), ("log", SR / 1024)):
        spec = compute_spectrogram(np.zeros(SR), SR, frequency_scale=scale, bands=64)
        assert spec.power.shape == (64, spec.power.shape[1]) and (spec.power == 0).all()
        assert spec.band_edges[0] == pytest.approx(fmin) and spec.band_edges[-1] == SR / 2
        assert np.all(np.diff(spec.band_edges) > 0)
        assert np.all((spec.band_edges[:-1] < spec.band_centres) & (spec.band_centres < spec.band_edges[1:]))
    f = np.array([-3000.0, 0.0, 700.0, 8000.0])
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(f)), f)
    assert hz_to_mel(700.0) == pytest.approx(2595 * math.log10(2))


def test_short_audio_and_one_sample():
    spec = compute_spectrogram(np.ones(1), SR)
    assert spec.power.shape[1] == 1 and spec.duration == 1 / SR


@pytest.mark.parametrize("kwargs, match", [
    (dict(sample_rate=0), "sample_rate"), (dict(duration=-1.0), "duration"), (dict(duration=float("nan")), "duration"),
    (dict(max_columns=0), "max_columns"), (dict(bands=1), "bands"), (dict(frequency_scale="bark"), "frequency_scale"),
    (dict(n_fft=8), "n_fft"), (dict(fmin=9000.0), "fmin"), (dict(frequency_scale="log", fmin=0.0), "fmin"),
])
def test_bad_parameters_are_named(kwargs, match):
    args = dict(sample_rate=SR, duration=1.0) | kwargs
    with pytest.raises(ValueError, match=match):
        SpectrogramAccumulator(**args)


def test_bad_chunks_are_refused():
    acc = SpectrogramAccumulator(SR, 1.0)
    with pytest.raises(ValueError, match="chunk must be"):
        acc.add(np.zeros((1, 2, 3)))
    acc.add(np.zeros((2, 100)))
    with pytest.raises(ValueError, match="channels"):
        acc.add(np.zeros(100))
    with pytest.raises(ValueError, match="NaN"):
        acc.add(np.full((2, 10), np.nan))
    with pytest.raises(ValueError, match="more audio than the declared duration"):
        acc.add(np.zeros((2, SR)))
    with pytest.raises(ValueError, match="received 100 samples, expected 16000"):
        acc.finish()
    acc.add(np.zeros((2, SR - 100)))
    acc.finish()
    with pytest.raises(RuntimeError, match="finished"):
        acc.add(np.zeros((2, 1)))
    with pytest.raises(ValueError, match="audio must be"):
        compute_spectrogram(np.zeros(0), SR)
