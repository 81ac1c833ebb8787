"""The figures (safa.plots, safa.evaluate.evaluation_figure): inspected as Figure objects
before anything is written (axes, scales, colour bar, what is drawn where), and written
atomically."""
import os

import numpy as np
import pytest
from matplotlib.collections import QuadMesh
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from safa import plots
from safa.evaluate import EvalResult, RowStats, evaluation_figure, write_plot
from safa.spectrogram import compute_spectrogram
from safa_kernels import ViewLayout

SR = 8000


def _spec(seconds=12.0, **kwargs):
    t = np.arange(int(SR * seconds)) / SR
    return compute_spectrogram(0.3 * np.sin(2 * np.pi * 440 * t), SR, **kwargs)


def _spectrogram_axes(fig):
    return [ax for ax in fig.axes if ax.get_ylabel() == "frequency (Hz)"]


def _colorbar_axes(fig):
    return [ax for ax in fig.axes if "dB" in ax.get_ylabel()]


def _vlines(ax):
    return sorted(line.get_xdata()[0] for line in ax.get_lines()
                  if len(set(line.get_xdata())) == 1 and tuple(line.get_ydata()) == (0, 1))


def _bands(ax):
    return sorted((round(p.get_x(), 6), round(p.get_x() + p.get_width(), 6)) for p in ax.patches
                  if isinstance(p, Rectangle))


def test_overlap_intervals():
    # Open: [0, 4), [3, 7), [6, 10) -> overlaps [3, 4), [6, 7); touching views do not overlap.
    assert plots.overlap_intervals([(0, 4), (3, 7), (6, 10)], 10) == [(3, 4), (6, 7)]
    assert plots.overlap_intervals([(0, 5), (5, 10)], 10) == []
    # Loop of 12 s: the last view [8, 14) wraps onto [0, 2).
    assert plots.overlap_intervals([(0, 5), (4, 9), (8, 14)], 12, loop=True) == [(0, 2), (4, 5), (8, 9)]
    # Without loop the same view is clipped at the end: no wrap overlap.
    assert plots.overlap_intervals([(0, 5), (4, 9), (8, 14)], 12) == [(4, 5), (8, 9)]


def test_spectrogram_figure_has_labelled_axes_colour_bar_and_views():
    layout = ViewLayout(300, window=100, overlap=25, loop=True)  # 4 views at 25 frames/s: 12 s
    spans = plots.view_spans(layout, 25.0)
    assert spans == [(0.0, 4.0), (3.0, 7.0), (6.0, 10.0), (9.0, 13.0)]
    spec = _spec()
    title = plots.layout_title("safa", "rain", layout, 25.0)
    fig = plots.spectrogram_figure(spec, spans, loop=True, title=title)
    assert isinstance(fig, Figure) and fig.get_suptitle() == title
    for needle in ("safa", "'rain'", "loop layout of 4 views of 4.00 s overlapping 1.00 s", "length 300",
                   "window 100", "overlap 25"):
        assert needle in title
    (ax,) = _spectrogram_axes(fig)
    assert ax.get_xlabel() == "time (s)" and ax.get_ylabel() == "frequency (Hz)"
    assert ax.get_yscale() == "function"  # mel
    assert ax.get_xlim() == (0.0, 12.0) and ax.get_ylim() == (0.0, SR / 2)
    mesh = next(c for c in ax.collections if isinstance(c, QuadMesh))
    np.testing.assert_array_equal(np.asarray(mesh.get_array()).reshape(spec.power.shape), spec.db())
    (cbar,) = _colorbar_axes(fig)
    lo, hi = mesh.get_clim()
    assert 10 <= hi - lo <= plots.DYNAMIC_RANGE_DB and hi >= spec.db().max()
    # Window boundaries as thin lines: starts 0, 3, 6, 9 and ends 4, 7, 10, 13 -> 1 (wrapped).
    np.testing.assert_allclose(_vlines(ax), [1, 3, 4, 6, 7, 9, 10])
    # The view track above: overlaps as bands, including the wrap-around one.
    (track,) = [a for a in fig.axes if a.get_ylabel() == "views"]
    assert _bands(track) == [(0.0, 1.0), (3.0, 4.0), (6.0, 7.0), (9.0, 10.0)]
    assert not _bands(ax)  # nothing painted over the spectrogram itself


def test_log_scale_and_many_views():
    spec = _spec(frequency_scale="log")
    spans = [(0.125 * i, 0.125 * i + 0.25) for i in range(plots.MAX_VIEW_LINES + 1)]  # exact in binary
    fig = plots.spectrogram_figure(spec, spans)
    (ax,) = _spectrogram_axes(fig)
    assert ax.get_yscale() == "log" and ax.get_ylim()[0] == pytest.approx(spec.band_edges[0])
    assert _vlines(ax) == []  # too many views to draw over the spectrogram
    (track,) = [a for a in fig.axes if a.get_ylabel() == "views"]
    assert len(_bands(track)) == 1  # every point of [0.125, 8.125) is covered twice: one band


def test_several_spectrograms_share_time_and_colour_scale():
    quiet, loud = _spec(), _spec()
    loud.power = loud.power * 100  # +20 dB
    fig = plots.spectrogram_figure([quiet, loud], panel_titles=["quiet", "loud"])
    axes = _spectrogram_axes(fig)
    assert len(axes) == 2 and len(_colorbar_axes(fig)) == 1
    clims = {next(c for c in ax.collections if isinstance(c, QuadMesh)).get_clim() for ax in axes}
    assert len(clims) == 1 and max(clims.pop()) >= loud.db().max()
    assert axes[0].get_shared_x_axes().joined(axes[0], axes[1])
    assert [ax.get_title(loc="left") for ax in axes] == ["quiet", "loud"]
    with pytest.raises(ValueError, match="panel titles"):
        plots.spectrogram_figure([quiet, loud], panel_titles=["one"])


def test_write_spectrogram_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "spec.png"
    plots.write_spectrogram(str(target), _spec(), [(0, 6), (5, 12)], title="t")
    width, height = Image.open(target).size
    assert width > 1000 and height > 300
    target.write_bytes(b"old")

    def failing_savefig(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"half a png")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", failing_savefig)
    with pytest.raises(KeyboardInterrupt):
        plots.write_spectrogram(str(target), _spec(), [(0, 6), (5, 12)])
    assert os.listdir(tmp_path) == ["spec.png"] and target.read_bytes() == b"old"


def _eval_result(loop):
    freqs = np.fft.rfftfreq(8)  # 0 ... 0.5 cycles per frame
    rng = np.random.default_rng(0)
    interior = rng.uniform(1, 2, freqs.size)
    rows, curves = [], {}
    for name, tilt in (("true", 0.0), ("safa", 0.01), ("multidiffusion", -0.3)):
        curve = tilt * freqs / 0.5  # log10 amplitude ratio rising / falling to `tilt` at Nyquist
        hf = (rng.uniform(0.9, 1.1, 4) * 10 ** (2 * tilt), rng.uniform(0.9, 1.1, 4))
        rows.append(RowStats(name, hf=hf, wrap_hf=hf if loop else None, spectrum_overlap=interior * 10 ** (2 * curve),
                             spectrum_interior=interior))
        curves[name] = curve
    rows.append(RowStats("one window"))  # no spectra, no HF: not drawn
    settings = dict(samples=4, seconds=8.0, steps=3, prompts=["rain"], loop=loop, overlap=0.2, guidance_scale=1.0,
                    seed=0, window=48, layout="ViewLayout(...)", scheduler="DDIM", min_eigenvalue=1.0)
    return EvalResult(rows, freqs, None, settings), curves


@pytest.mark.parametrize("loop", [False, True])
def test_evaluation_figure_curves_legend_and_intervals(loop):
    res, curves = _eval_result(loop)
    fig = evaluation_figure(res)
    curves_ax, hf_ax = fig.axes
    assert "frequency" in curves_ax.get_xlabel() and "log10 amplitude" in curves_ax.get_ylabel()
    assert "HF energy" in hf_ax.get_ylabel() and "Fig. 2b" in curves_ax.get_title()
    legend = [t.get_text() for t in curves_ax.get_legend().get_texts()]
    assert {"true", "safa", "multidiffusion", "interior (reference)"} <= set(legend) and "one window" not in legend
    drawn = {line.get_label(): line for line in curves_ax.get_lines()}
    for name, curve in curves.items():  # the overlap / interior log-amplitude, per temporal frequency
        np.testing.assert_allclose(drawn[name].get_ydata(), curve, atol=1e-12)
        np.testing.assert_allclose(drawn[name].get_xdata(), res.freqs)
    assert [t.get_text() for t in hf_ax.get_xticklabels()] == ["true", "safa", "multidiffusion"]
    assert (hf_ax.get_legend() is not None) == loop  # the wrap-seam markers only for loops
    assert "4 samples/row" in fig.get_suptitle()


def test_evaluation_figure_speaks_hz_and_seconds():
    # An audio user reads Hz, and the title names the layout in seconds, not a ViewLayout repr.
    res, curves = _eval_result(False)
    res.settings.update(frames_per_second=25.0, layout="3 views of 1.92 s (48 latent frames), overlap 0.2")
    curves_ax, _ = evaluation_figure(res).axes
    assert curves_ax.get_xlabel() == "temporal frequency of the latent (Hz)"
    drawn = {line.get_label(): line for line in curves_ax.get_lines()}
    np.testing.assert_allclose(drawn["safa"].get_xdata(), res.freqs * 25.0)
    assert curves_ax.get_xlim() == (0.0, 12.5)
    title = evaluation_figure(res).get_suptitle()
    assert "3 views of 1.92 s" in title and "ViewLayout" not in title


def test_summary_table_is_short_and_plain():
    from safa.evaluate import format_summary
    res, _ = _eval_result(True)
    res.notes = ["multidiffusion: a long note " * 10]
    text = format_summary(res)
    assert max(map(len, text.splitlines())) <= 100
    head = next(line for line in text.splitlines() if line.startswith("method"))
    assert head.split("  ")[0] == "method" and "HF kept in overlaps" in head and "loop seam" in head
    assert "one window" not in text  # no seams: nothing of it in the summary


def test_write_plot_is_atomic(tmp_path, monkeypatch):
    res, _ = _eval_result(False)
    target = tmp_path / "ev.png"
    write_plot(res, str(target))
    assert Image.open(target).size[0] > 800

    def failing_savefig(self, fname, **kwargs):
        open(fname, "wb").close()
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", failing_savefig)
    with pytest.raises(RuntimeError):
        write_plot(res, str(target))
    assert os.listdir(tmp_path) == ["ev.png"] and Image.open(target).size[0] > 800
