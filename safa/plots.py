"""Pictures people read: the annotated spectrogram of generated audio, generated images
(:func:`write_image`), and the helpers every figure of the package uses (matplotlib,
non-interactive Agg canvas, atomic PNG writes). Every PNG of the package is written here.

Figures are built on :class:`matplotlib.figure.Figure` with a ``FigureCanvasAgg`` attached,
never through ``pyplot``: no global state, no GUI backend, safe in threads and servers.
Functions named ``*_figure`` return the Figure (tests inspect its axes before anything is
written); ``write_*`` / :func:`save_figure` write it as PNG through
:func:`safa.files.atomic_path`, so an error or Ctrl-C never leaves a partial file.
matplotlib is imported when a figure is made, not with this module.

The spectrogram itself (streamed, pooled to the picture's resolution) is
:mod:`safa.spectrogram`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple, Union

import numpy as np

from .files import atomic_path
from .spectrogram import Spectrogram, hz_to_mel, mel_to_hz

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["new_figure", "save_figure", "write_image", "spectrogram_png_bytes", "spectrogram_figure", "write_spectrogram", "view_spans",
           "layout_title", "overlap_intervals", "DYNAMIC_RANGE_DB", "MAX_VIEW_LINES"]

# The dB colour bar spans at most this many dB; quieter cells get its darkest colour.
DYNAMIC_RANGE_DB = 80.0
# Above this many views the window boundaries are not drawn over the spectrogram (they
# would hide it); the view track above it still shows every overlap.
MAX_VIEW_LINES = 64
# Frequency ticks (Hz) per scale, spaced for the scale's low end; those inside the bands are used.
# The spectrogram figure: width and height per panel (inches), dots per inch.
_SPECTROGRAM_WIDTH, _SPECTROGRAM_TITLE_HEIGHT, _SPECTROGRAM_PANEL_HEIGHT, _DPI = 14.0, 0.8, 4.2, 100
_FREQUENCY_TICKS = {"mel": (0, 200, 500, 1000, 2000, 4000, 8000, 16000),
                    "log": (20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)}


def new_figure(width: float, height: float) -> Figure:
    """A Figure of ``width`` x ``height`` inches on an Agg canvas, with constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str, dpi: int = _DPI) -> None:
    """Write ``fig`` as PNG to ``path``, atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


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


def _spectrogram_size(panels: int) -> Tuple[float, float]:
    return _SPECTROGRAM_WIDTH, _SPECTROGRAM_TITLE_HEIGHT + _SPECTROGRAM_PANEL_HEIGHT * panels


def spectrogram_png_bytes(panels: int = 1) -> int:
    """An upper bound of the bytes of :func:`write_spectrogram`'s PNG: the uncompressed RGBA pixels
    (a PNG's deflate never grows them by more than its few header bytes, counted in the slack)."""
    width, height = _spectrogram_size(panels)
    return int(width * _DPI) * int(height * _DPI) * 4 + 65536


# -- views on the time axis --------------------------------------------------------------------
def view_spans(layout: Any, frames_per_second: float) -> List[Tuple[float, float]]:
    """``(start_s, end_s)`` of every view of a :class:`~safa_kernels.ViewLayout` (a loop view may end past the length)."""
    return [(start / frames_per_second, (start + layout.window) / frames_per_second) for start in layout.starts]


def layout_title(method: str, prompt: Union[str, Sequence[str]], layout: Any, frames_per_second: float) -> str:
    """One line naming the method, the prompt(s) and the layout in seconds and latent frames."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    what = " → ".join(repr(p) for p in prompts)
    fps = frames_per_second
    # The layout's length is not given in seconds: an open layout may cover more than the
    # audio, which is cropped to the requested length (the time axis shows that one).
    return (f"{method}: {what}, {'loop' if layout.loop else 'open'} layout of {layout.num_views} views of "
            f"{layout.window / fps:.2f} s overlapping {layout.overlap / fps:.2f} s "
            f"(latent frames: length {layout.length}, window {layout.window}, overlap {layout.overlap})")


def _segments(spans: Sequence[Tuple[float, float]], duration: float, loop: bool) -> List[List[Tuple[float, float]]]:
    """Per view, its pieces inside ``[0, duration]``: wrapped to the start (loop) or clipped."""
    out = []
    for start, end in spans:
        pieces = [(max(0.0, start), min(end, duration))]
        if loop and end > duration:
            pieces.append((0.0, min(end - duration, duration)))
        out.append([(a, b) for a, b in pieces if b > a])
    return out


def overlap_intervals(spans: Sequence[Tuple[float, float]], duration: float,
                      loop: bool = False) -> List[Tuple[float, float]]:
    """The maximal intervals of ``[0, duration]`` covered by two or more views."""
    changes: dict = {}
    for pieces in _segments(spans, duration, loop):
        for a, b in pieces:
            changes[a] = changes.get(a, 0) + 1
            changes[b] = changes.get(b, 0) - 1
    out: List[Tuple[float, float]] = []
    depth, begin = 0, 0.0
    for t in sorted(changes):  # all views starting or ending at t at once: touching views do not overlap
        after = depth + changes[t]
        if depth < 2 <= after:
            begin = t
        elif after < 2 <= depth:
            out.append((begin, t))
        depth = after
    return out


# -- spectrogram -------------------------------------------------------------------------------
def _frequency_axis(ax: Any, spec: Spectrogram) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter
    lo, hi = float(spec.band_edges[0]), float(spec.band_edges[-1])
    if spec.frequency_scale == "mel":
        ax.set_yscale("function", functions=(hz_to_mel, mel_to_hz))
    else:
        ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    ax.yaxis.set_major_locator(FixedLocator([f for f in _FREQUENCY_TICKS[spec.frequency_scale] if lo <= f <= hi]))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylabel("frequency (Hz)")


def _draw_views(track: Any, spec_ax: Any, spans: Sequence[Tuple[float, float]], duration: float,
                loop: bool) -> None:
    """Views as thin bars in two alternating lanes of ``track``, overlaps as light bands; the
    window boundaries as thin lines over the spectrogram (up to :data:`MAX_VIEW_LINES` views)."""
    from matplotlib.ticker import NullLocator
    for a, b in overlap_intervals(spans, duration, loop):
        track.axvspan(a, b, color="tab:orange", alpha=0.25, lw=0)
    for i, pieces in enumerate(_segments(spans, duration, loop)):
        y = 0.7 if i % 2 == 0 else 0.3
        for a, b in pieces:
            track.plot([a, b], [y, y], color="0.25", lw=2.0, solid_capstyle="butt")
    track.set_ylim(0, 1)
    track.yaxis.set_major_locator(NullLocator())
    track.set_ylabel("views", rotation=0, ha="right", va="center")
    track.tick_params(axis="x", labelbottom=False)
    if len(spans) <= MAX_VIEW_LINES:
        edges = {round(t % duration if loop else t, 9) for start, end in spans for t in (start, end)}
        for t in sorted(e for e in edges if 0.0 < e < duration):
            spec_ax.axvline(t, color="white", lw=0.8, alpha=0.7)


def spectrogram_figure(spectrogram: Union[Spectrogram, Sequence[Spectrogram]],
                       view_spans: Sequence[Tuple[float, float]] = (), loop: bool = False,
                       title: Optional[str] = None, panel_titles: Sequence[str] = (),
                       given_spans: Sequence[Tuple[float, float]] = ()) -> Figure:
    """The annotated spectrogram(s) of generated audio, as a Figure (nothing written).

    Args:
        spectrogram: one :class:`~safa.spectrogram.Spectrogram`, or several of the same
            duration and layout (e.g. the same loop by two methods) drawn one above the other
            on a shared time axis and one colour scale.
        view_spans: ``(start_s, end_s)`` of every view (:func:`view_spans`); with ``loop`` a
            view ending past the duration wraps to the start, otherwise it is clipped. Drawn
            in a thin track above each spectrogram (views in two alternating lanes, overlaps
            as light bands) and as thin lines at the window boundaries.
        title: the figure's title (:func:`layout_title`: method, prompt, layout).
        panel_titles: one title per spectrogram.
        given_spans: ``(start_s, end_s)`` of the user's own audio in the output (``audio=``,
            :mod:`safa.known`), outlined and hatched over each spectrogram so the generated
            parts stand out.
    """
    specs = [spectrogram] if isinstance(spectrogram, Spectrogram) else list(spectrogram)
    if not specs:
        raise ValueError("spectrogram_figure needs at least one spectrogram")
    if panel_titles and len(panel_titles) != len(specs):
        raise ValueError(f"{len(panel_titles)} panel titles for {len(specs)} spectrograms")
    duration = max(s.duration for s in specs)
    # Round limits: the loudest cell at most, and the quietest cells' level (0.1th percentile:
    # a few outliers do not stretch the scale) but at most DYNAMIC_RANGE_DB below.
    dbs = [s.db() for s in specs]
    vmax = 10.0 * np.ceil(max(float(db.max()) for db in dbs) / 10.0)
    floor = 10.0 * np.floor(min(float(np.percentile(db, 0.1)) for db in dbs) / 10.0)
    vmin = max(vmax - DYNAMIC_RANGE_DB, min(floor, vmax - 10.0))
    show_views = bool(view_spans)
    rows_per_panel = 2 if show_views else 1
    fig = new_figure(*_spectrogram_size(len(specs)))
    grid = fig.add_gridspec(rows_per_panel * len(specs), 1,
                            height_ratios=([0.35, 4.0] if show_views else [4.0]) * len(specs))
    spec_axes, mesh, first = [], None, None
    for i, (spec, db) in enumerate(zip(specs, dbs)):
        row = rows_per_panel * i
        ax = fig.add_subplot(grid[row + rows_per_panel - 1], sharex=first)
        first = first or ax
        mesh = ax.pcolormesh(spec.column_edges, spec.band_edges, db, cmap="magma", vmin=vmin, vmax=vmax,
                             shading="flat", rasterized=True)
        _frequency_axis(ax, spec)
        for n, (a, b) in enumerate(given_spans):
            ax.axvspan(a, b, facecolor="none", edgecolor="cyan", hatch="//", linewidth=1.0,
                       label="your audio" if n == 0 else None)
        if given_spans:
            ax.legend(loc="upper right", fontsize="small", framealpha=0.7)
        ax.set_xlim(0.0, duration)
        ax.set_xlabel("time (s)")
        top = ax
        if show_views:
            top = fig.add_subplot(grid[row], sharex=first)
            _draw_views(top, ax, view_spans, spec.duration, loop)
        if panel_titles:
            top.set_title(panel_titles[i], loc="left", fontsize="medium")
        spec_axes.append(ax)
    colorbar = fig.colorbar(mesh, ax=spec_axes, pad=0.01, fraction=0.03, extend="min")
    colorbar.set_label("power per FFT bin (dB re full-scale sine)")
    if title:
        fig.suptitle(title, fontsize="medium")
    return fig


def write_spectrogram(path: str, spectrogram: Union[Spectrogram, Sequence[Spectrogram]],
                      view_spans: Sequence[Tuple[float, float]] = (), loop: bool = False,
                      title: Optional[str] = None, panel_titles: Sequence[str] = (),
                      given_spans: Sequence[Tuple[float, float]] = ()) -> None:
    """:func:`spectrogram_figure` written as PNG to ``path``, atomically."""
    save_figure(spectrogram_figure(spectrogram, view_spans, loop, title, panel_titles, given_spans=given_spans), path)
