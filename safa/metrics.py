"""Seam-fidelity metrics for joint diffusion, exact against the built-in texture model, plus
generic embedding metrics for any model.

Region geometry comes from a :class:`safa_kernels.ViewLayout`:

* an *overlap region* is the ``o`` columns shared by two neighbouring views (the pair
  ``(n-1, 0)`` of a loop layout is the *wrap seam*);
* an *interior segment* is ``o`` columns centred in a view's middle (the columns covered by
  no other view).

Metrics
-------
* :func:`region_spectra` / :func:`hf_energy_ratio`: the paper's Fig. 2b. Power spectra along
  time of overlap regions vs interior segments of the same length (Hann taper, averaged
  over channels, frequency bins, regions), the relative log-amplitude per temporal-frequency
  band, and the ratio of high-frequency energy overlap / interior (1 for a stationary
  texture; < 1 means the overlaps were smoothed).
* :func:`probe_fidelity`: distance of generated windows to the *true* distribution by region
  kind. Probe windows of ``P`` columns straddle each seam (centred on the overlap) or sit
  in a view's interior; each is whitened by the exact marginal covariance of its most likely
  texture component (the model's covariance restricted to ``P`` frames, exact because the
  temporal kernel is stationary), and the variances of the whitened coefficients are
  measured per temporal-frequency band: 1 is exact, < 1 over-smoothing, > 1 excess noise;
  the Gaussian KL ``0.5 (v - 1 - ln v)`` averaged over bands counts both.
* :func:`cross_view_consistency`: whether every view of a long sample has the same most
  likely sub-style.
* :func:`middle_correlation`: whether the views repeat each other (the correlation of their
  middles; about 0 for a stationary texture).
* 2-D grids (:class:`safa_kernels.GridLayout`, the 2-D texture model): :func:`grid_seam_statistics`,
  the above along each axis for vertical, horizontal and corner seams and a torus's wrap seams
  (``safa evaluate --task seams2d``, :mod:`safa.evaluate2d`).
* Generic: :func:`frechet_distance`, :func:`class_kl`, :func:`intra_similarity` for users
  with their own embedding / classifier functions.

All statistics are returned per long sample so that callers can put confidence intervals
over samples (:func:`mean_ci`, :func:`proportion_ci`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from safa_kernels import ViewLayout

__all__ = ["HF_CUTOFF", "overlap_columns", "interior_columns", "region_spectra", "hf_energy_ratio", "RegionSpectra",
           "hf_energies", "ratio_ci", "probe_fidelity", "ProbeFidelity", "cross_view_consistency", "frechet_distance",
           "frechet_distance_from_embeddings", "class_kl", "intra_similarity", "mean_ci", "proportion_ci", "paired_ratio_difference_ci", "mcnemar_p", "log_ratio_ci", "paired_log_ratio_ci",
           "whitened_band_variances", "most_likely_components", "gaussian_kl_to_unit", "middle_correlation"]


# -- geometry ----------------------------------------------------------------------------
def overlap_columns(layout: ViewLayout) -> List[Tuple[Tuple[int, int], List[int]]]:
    """``[((i, j), columns)]``: the long-axis columns of every overlap, in overlap order.

    Every overlap is given as ``min_overlap`` columns (a spaced layout's overlaps differ by one
    column; the wider ones lose their last column), so all regions have one length.
    """
    size = layout.min_overlap
    return [((i, j), layout.columns(i)[layout.window - layout.pair_overlap(i):][:size])
            for i, j in layout.neighbour_pairs()]


def _centred(layout: ViewLayout, view: int, lo: int, hi: int, size: int) -> List[int]:
    """``size`` long-axis columns of ``view`` centred on its local span ``[lo, hi)``."""
    centre = (lo + hi) / 2.0
    start = int(math.floor(centre - size / 2.0 + 0.5))
    start = min(max(start, 0), layout.window - size)
    cols = layout.columns(view)
    return cols[start:start + size]


def interior_columns(layout: ViewLayout, size: int) -> List[Tuple[int, List[int]]]:
    """``[(view, columns)]``: ``size`` columns centred in each view's middle region.

    Raises ``ValueError`` when a middle region is shorter than ``size`` (then no segment of
    that size is covered by one view only).
    """
    out = []
    for v in range(layout.num_views):
        lo, hi = layout.middle(v)
        if hi - lo < size:
            raise ValueError(f"view {v}'s middle region has {hi - lo} columns, fewer than the {size} "
                             f"needed for an interior segment (overlap {layout.overlap}, window {layout.window})")
        out.append((v, _centred(layout, v, lo, hi, size)))
    return out


def seam_probe_columns(layout: ViewLayout, size: int) -> List[Tuple[Tuple[int, int], List[int]]]:
    """``[((i, j), columns)]``: ``size`` columns centred on each overlap (straddling the seam)."""
    out = []
    w, n = layout.window, layout.length
    for i, j in layout.neighbour_pairs():
        centre = layout.starts[i] + (layout.view_stride(i) + w) / 2.0
        start = int(math.floor(centre - size / 2.0 + 0.5))
        if not layout.loop:
            start = min(max(start, 0), n - size)
        out.append(((i, j), [(start + k) % n for k in range(size)]))
    return out


def _take(latent: torch.Tensor, dim: int, cols: Sequence[int]) -> torch.Tensor:
    return latent.index_select(dim, torch.as_tensor(list(cols), device=latent.device))


# -- spectra (Fig. 2b) -------------------------------------------------------------------
@dataclass
class RegionSpectra:
    """Per-sample power spectra along time. ``overlap`` / ``interior``: ``(B, bands)``;
    ``wrap``: ``(B, bands)`` for the loop layout's wrap seam alone (None for open layouts);
    ``freqs``: band centres in cycles per latent frame."""

    freqs: np.ndarray
    overlap: np.ndarray
    interior: np.ndarray
    wrap: Optional[np.ndarray] = None

    def relative_log_amplitude(self) -> Dict[str, np.ndarray]:
        """log10 amplitude per band relative to the interior's lowest band, averaged over samples."""
        ref = self.interior.mean(0)[0]
        out = {"interior": 0.5 * np.log10(self.interior.mean(0) / ref),
               "overlap": 0.5 * np.log10(self.overlap.mean(0) / ref)}
        if self.wrap is not None:
            out["wrap"] = 0.5 * np.log10(self.wrap.mean(0) / ref)
        return out


def _power(segments: torch.Tensor, dim: int) -> torch.Tensor:
    """``(B, ...)`` segments with time on ``dim`` -> ``(B, bands)`` Hann-tapered power, averaged."""
    x = segments.movedim(dim, -1).to(torch.float64)
    taper = torch.hann_window(x.shape[-1], periodic=False, dtype=torch.float64, device=x.device)
    taper = taper / taper.pow(2).mean().sqrt()  # unit power: white noise has flat spectrum 1 * var
    p = torch.fft.rfft(x * taper, dim=-1).abs().pow(2) / x.shape[-1]
    return p.reshape(p.shape[0], -1, p.shape[-1]).mean(1)


def region_spectra(latent: torch.Tensor, layout: ViewLayout, dim: int = -2) -> RegionSpectra:
    """Power spectra along the long axis of overlap regions vs interior segments (same length ``o``)."""
    o = layout.min_overlap
    if o < 4:
        raise ValueError(f"an overlap of {o} columns is too short for a spectrum (need >= 4)")
    if latent.shape[dim] != layout.length:
        raise ValueError(f"latent has {latent.shape[dim]} columns on dim {dim}, layout {layout.length}")
    ov = overlap_columns(layout)
    p_ov = torch.stack([_power(_take(latent, dim, c), dim) for _, c in ov]).mean(0)
    p_in = torch.stack([_power(_take(latent, dim, c), dim) for _, c in interior_columns(layout, o)]).mean(0)
    wrap = None
    if layout.loop:
        wrap = _power(_take(latent, dim, ov[-1][1]), dim).numpy()
    freqs = np.fft.rfftfreq(o)
    return RegionSpectra(freqs, p_ov.numpy(), p_in.numpy(), wrap)


# Lowest "high" temporal frequency of the HF energy ratio, in cycles per frame (half Nyquist).
HF_CUTOFF = 0.25


def hf_energies(spectra: RegionSpectra, cutoff: float = HF_CUTOFF, which: str = "overlap") -> Tuple[np.ndarray, np.ndarray]:
    """Per-sample high-frequency energy of the ``which`` region and of the interior.

    High frequency: bands at or above ``cutoff`` cycles per frame (0.25 = half Nyquist).
    """
    band = spectra.freqs >= cutoff
    if not band.any():
        raise ValueError(f"no band at or above {cutoff} cycles/frame")
    return getattr(spectra, which)[:, band].sum(1), spectra.interior[:, band].sum(1)


def hf_energy_ratio(spectra: RegionSpectra, cutoff: float = HF_CUTOFF, which: str = "overlap") -> np.ndarray:
    """Per-sample high-frequency energy ratio (``which`` region) / interior.

    A stationary texture gives 1 in expectation of each energy; averaging-smoothed overlaps
    < 1. A per-sample ratio of two noisy energies is biased upwards (Jensen) when a sample
    has few regions: aggregate with :func:`ratio_ci` over :func:`hf_energies` instead.
    """
    num, den = hf_energies(spectra, cutoff, which)
    return num / den


# -- whitened fidelity to the true distribution --------------------------------------------
def gaussian_kl_to_unit(var: np.ndarray) -> np.ndarray:
    """KL( N(0, v) || N(0, 1) ) = 0.5 (v - 1 - ln v), elementwise."""
    var = np.asarray(var, dtype=np.float64)
    return 0.5 * (var - 1.0 - np.log(var))


def _marginal_factors(model, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per class eigen-factors of the temporal covariance restricted to ``size`` frames.

    Returns ``(basis (n_class, P, P), eig (n_class, P))`` with modes sorted slow -> fast
    (decreasing eigenvalue).
    """
    kt = model.temporal_cov[:, :size, :size]
    eig, basis = torch.linalg.eigh(kt)
    eig, basis = eig.flip(-1).clamp_min(1e-12), basis.flip(-1)
    return basis, eig


def whitened_band_variances(model, windows: torch.Tensor, class_weights: torch.Tensor,
                            bands: int = 4, min_eigenvalue: float = 1.0, chunk: int = 8
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Whiten probe windows by their most likely component's exact marginal covariance.

    ``windows``: ``(N, C, P, F)`` (time on -2, ``P <= model.window``); ``class_weights``:
    ``(N, num_classes)`` restricting the candidate components (the prompt's class).
    Returns ``(band_sq (N, bands), components (N,))``: the mean squared whitened coefficient
    per temporal band (the counted directions sorted by temporal mode, slow -> fast, split
    into ``bands`` groups of equal size), and the chosen component per window.

    Only directions whose eigenvalue is at least ``min_eigenvalue`` are counted: a finite-step
    sampler ends at a non-zero noise level and shrinks every direction far below it (the
    posterior mean's gain ``lam / (lam + sigma^2)``), whatever the merge rule, so counting
    those would measure the scheduler, not the seams. The ``one window`` row of
    ``safa evaluate`` shows what the sampler gives without any seam. ``chunk`` windows at
    a time bound memory.
    """
    n, c, p, f = windows.shape
    basis, eig_t = _marginal_factors(model, p)
    comp_class = model.component_class
    lam = model.chanfreq_eig[:, :, None] * eig_t[comp_class][:, None, :]   # (K, CF, P)
    logdet = torch.log(lam).sum((-1, -2))
    # Per component, the counted directions split into `bands` groups of equal size by
    # temporal mode (slow -> fast), so no band is empty or a handful of directions.
    band_of = torch.full(lam.shape, -1, dtype=torch.long)
    for k in range(lam.shape[0]):
        kept = torch.nonzero(lam[k] >= min_eigenvalue)                    # (m, 2): (cf, mode)
        if kept.shape[0] < bands:
            continue  # too few resolved directions: this component's windows give NaN
        order = torch.argsort(kept[:, 1], stable=True)
        groups = torch.div(torch.arange(kept.shape[0]) * bands, kept.shape[0], rounding_mode="floor")
        band_of[k, kept[order, 0], kept[order, 1]] = groups
    band_sq, comps = [], []
    for r in range(0, n, chunk):
        x = windows[r:r + chunk].to(torch.float64).permute(0, 1, 3, 2).reshape(-1, c * f, p)
        z = torch.matmul(x[:, None], basis[None])[:, comp_class]          # (b, K, CF, P)
        y = torch.matmul(model.chanfreq_basis.transpose(-1, -2)[None], z)
        w2 = y ** 2 / lam[None]
        ll = -0.5 * (w2.sum((-1, -2)) + logdet[None]) + model.component_logprior(class_weights[r:r + chunk])
        comp = ll.argmax(-1)
        w2 = w2[torch.arange(x.shape[0]), comp].reshape(x.shape[0], -1)   # (b, CF*P)
        bo = band_of[comp].reshape(x.shape[0], -1)
        band_sq.append(_band_means(w2, bo, bands))
        comps.append(comp)
    return torch.cat(band_sq), torch.cat(comps)


def _band_means(w2: torch.Tensor, band: torch.Tensor, bands: int) -> torch.Tensor:
    """``(b, bands)``: per row, the mean of the whitened squares ``w2`` ``(b, M)`` over the
    coefficients in each band (``band`` ``(b, M)``, each coefficient's band); NaN for an empty band."""
    per_band = []
    for k in range(bands):
        sel = (band == k).to(w2.dtype)
        cnt = sel.sum(-1)
        per_band.append(torch.where(cnt > 0, (w2 * sel).sum(-1) / cnt.clamp_min(1), torch.full_like(cnt, float("nan"))))
    return torch.stack(per_band, -1)


def most_likely_components(model, windows: torch.Tensor, class_weights: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """``(N,)`` most likely component of full model windows (exact likelihood): ``(N, C, window, F)``
    for the 1-D model, ``(N, C, window, window)`` tiles for the 2-D one."""
    out = []
    for r in range(0, windows.shape[0], chunk):
        ll = model.log_likelihoods(windows[r:r + chunk].to(torch.float64))
        out.append((ll + model.component_logprior(class_weights[r:r + chunk].to(torch.float64))).argmax(-1))
    return torch.cat(out)


@dataclass
class ProbeFidelity:
    """Per-sample whitened variances by probe kind. ``seam`` / ``interior`` / ``wrap``:
    ``(B, bands)`` (``wrap`` only for loop layouts: the wrap seam alone); ``seam_each``:
    ``(seams, B, bands)``, every seam's probe on its own, in :func:`seam_probe_columns` order."""

    seam: np.ndarray
    interior: np.ndarray
    wrap: Optional[np.ndarray]
    probe: int
    seam_each: Optional[np.ndarray] = None

    def kl(self, which: str) -> np.ndarray:
        """Per-sample Gaussian KL to N(0, 1), averaged over the bands that have directions."""
        return np.nanmean(gaussian_kl_to_unit(getattr(self, which)), axis=-1)

    def wrap_excess(self) -> np.ndarray:
        """Per sample: the wrap seam's KL minus the mean KL of the other seams, each probe on its own.

        A KL of a variance estimated from one probe is biased upwards by that estimate's noise
        (``KL ~ (v - 1)^2 / 4``), more than the pooled ``seam`` column's, so the wrap seam is
        compared with single inner seams: the same estimator, the bias cancels (0 = the wrap
        seam is like any other seam).
        """
        if self.wrap is None or self.seam_each is None or self.seam_each.shape[0] < 2:
            raise ValueError("wrap_excess needs a loop layout with at least two seams")
        each = np.nanmean(gaussian_kl_to_unit(self.seam_each), axis=-1)  # (seams, B)
        return each[-1] - each[:-1].mean(0)


def probe_fidelity(model, latent: torch.Tensor, layout: ViewLayout, class_weights: torch.Tensor,
                   probe: Optional[int] = None, bands: int = 4, min_eigenvalue: float = 1.0) -> ProbeFidelity:
    """Whitened variances of seam-straddling vs interior probe windows of long latents.

    ``latent``: ``(B, C, L, F)`` in the texture model's layout; ``class_weights``:
    ``(B, num_classes)`` (the prompt of each sample). ``probe`` defaults to
    ``min(2 o, middle length, window)``: a seam probe holds the whole overlap and ``o / 2``
    columns of each neighbouring middle.
    """
    o = layout.min_overlap
    mid = min(hi - lo for lo, hi in (layout.middle(v) for v in range(layout.num_views)))
    probe = int(probe or min(2 * o, mid, layout.window))
    if probe < bands:
        raise ValueError(f"probe of {probe} columns is shorter than {bands} bands")
    b = latent.shape[0]

    def regions(cols_list: List[List[int]]) -> np.ndarray:
        wins = torch.cat([_take(latent, -2, c) for c in cols_list])  # (R*B, C, P, F), region-major
        cw = class_weights.to(torch.float64).repeat(len(cols_list), 1)
        sq, _ = whitened_band_variances(model, wins, cw, bands, min_eigenvalue)
        return sq.reshape(len(cols_list), b, bands).numpy()

    # pooled over the regions of each sample (a band empty in one region is skipped)
    seam_each = regions([c for _, c in seam_probe_columns(layout, probe)])
    interior = np.nanmean(regions([c for _, c in interior_columns(layout, probe)]), axis=0)
    wrap = seam_each[-1] if layout.loop else None
    return ProbeFidelity(np.nanmean(seam_each, axis=0), interior, wrap, probe, seam_each)


def cross_view_consistency(model, latent: torch.Tensor, layout: ViewLayout,
                           class_weights: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
    """Per sample: (all views share the most likely sub-style, fraction of views agreeing with
    the most common one). Each view is a full model window, scored by the exact likelihood."""
    b = latent.shape[0]
    views = torch.cat([_take(latent, -2, layout.columns(v)) for v in range(layout.num_views)])
    cw = class_weights.to(torch.float64).repeat(layout.num_views, 1)
    comp = most_likely_components(model, views, cw).reshape(layout.num_views, b).T  # (B, n)
    same = (comp == comp[:, :1]).all(1).numpy()
    frac = np.array([np.bincount(r.numpy()).max() / layout.num_views for r in comp])
    return same, frac


def middle_correlation(latent: torch.Tensor, layout: ViewLayout, dim: int = -2) -> np.ndarray:
    """Per sample: how much the views repeat each other, the mean over pairs of views of the
    Pearson correlation of their middles.

    Each view contributes the local columns that are in every view's middle (``[o, s)`` of a
    uniform layout: the columns SaFa's reference swap writes, read at the same local columns in
    every view); a pair's correlation is over all their elements (channels, bins, columns). For
    views that are different stretches of one stationary texture it is about 0 (their middles
    are a stride apart); a reference copied into every middle raises it towards 1.
    """
    lo = max(layout.middle(v)[0] for v in range(layout.num_views))
    hi = min(layout.middle(v)[1] for v in range(layout.num_views))
    if layout.num_views < 2 or hi - lo < 2:
        raise ValueError(f"middle_correlation needs >= 2 views with >= 2 middle columns in common, got {layout}")
    segs = torch.stack([_take(latent, dim, layout.columns(v)[lo:hi]).to(torch.float64).flatten(1)
                        for v in range(layout.num_views)], 1)                    # (B, n, D)
    segs = segs - segs.mean(-1, keepdim=True)
    segs = segs / segs.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    corr = segs @ segs.transpose(1, 2)
    i, j = torch.triu_indices(layout.num_views, layout.num_views, 1)
    return corr[:, i, j].mean(-1).numpy()


# -- generic metrics for user-supplied embeddings -------------------------------------------
def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (the FAD / FID formula).

    ``tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)`` computed through the symmetric form so the
    matrix square root is of a PSD matrix (no complex parts to discard).
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)

    def sqrtm_psd(a: np.ndarray) -> np.ndarray:
        vals, vecs = np.linalg.eigh((a + a.T) / 2)
        return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T

    r1 = sqrtm_psd(s1)
    cross = np.trace(sqrtm_psd(r1 @ s2 @ r1))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross)


def frechet_distance_from_embeddings(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two ``(N, D)`` embedding sets."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return frechet_distance(a.mean(0), np.atleast_2d(np.cov(a, rowvar=False)),
                            b.mean(0), np.atleast_2d(np.cov(b, rowvar=False)))


def class_kl(p: np.ndarray, q: np.ndarray, paired: bool = True, eps: float = 1e-12) -> float:
    """KL(p || q) between class distributions (rows sum to 1).

    ``paired``: mean over rows of KL(p_i || q_i) (AudioLDM-style, reference vs generated
    classifier outputs of the same prompt); otherwise KL between the mean distributions.
    """
    p, q = np.atleast_2d(np.asarray(p, np.float64)), np.atleast_2d(np.asarray(q, np.float64))
    if not paired:
        p, q = p.mean(0, keepdims=True), q.mean(0, keepdims=True)
    p = p / p.sum(-1, keepdims=True)
    q = q / q.sum(-1, keepdims=True)
    kl = np.where(p > 0, p * (np.log(np.clip(p, eps, None)) - np.log(np.clip(q, eps, None))), 0.0).sum(-1)
    return float(kl.mean())


def intra_similarity(segments: Sequence[Sequence[object]], embed: Callable[[object], np.ndarray]) -> np.ndarray:
    """Per output: mean pairwise cosine similarity of the embeddings of its segments.

    The paper's Intra-CLAP shape: ``segments[i]`` are the (e.g. 10 s) pieces of output
    ``i``, ``embed`` any embedding function (CLAP, a classifier's penultimate layer, ...).
    """
    out = []
    for segs in segments:
        e = np.stack([np.asarray(embed(s), np.float64).reshape(-1) for s in segs])
        if len(e) < 2:
            raise ValueError("intra_similarity needs at least two segments per output")
        e = e / np.linalg.norm(e, axis=1, keepdims=True).clip(1e-12)
        sim = e @ e.T
        iu = np.triu_indices(len(e), 1)
        out.append(sim[iu].mean())
    return np.array(out)


# -- intervals --------------------------------------------------------------------------
def mean_ci(x: Sequence[float], z: float = 1.96) -> Tuple[float, float]:
    """(mean, half-width of a normal-approximation 95% interval) over samples."""
    x = np.asarray(x, np.float64).reshape(-1)
    if x.size < 2:
        return float(x.mean()) if x.size else float("nan"), float("nan")
    return float(x.mean()), float(z * x.std(ddof=1) / math.sqrt(x.size))


def ratio_ci(num: Sequence[float], den: Sequence[float], boots: int = 2000, seed: int = 0
             ) -> Tuple[float, float, float]:
    """(sum(num) / sum(den), bootstrap 95% percentile interval resampling samples)."""
    num, den = np.asarray(num, np.float64).reshape(-1), np.asarray(den, np.float64).reshape(-1)
    est = float(num.sum() / den.sum())
    if num.size < 2:
        return est, float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, num.size, size=(boots, num.size))
    r = num[idx].sum(1) / den[idx].sum(1)
    return est, float(np.quantile(r, 0.025)), float(np.quantile(r, 0.975))


def log_ratio_ci(num: Sequence[float], den: Sequence[float], z: float = 1.96) -> Tuple[float, float, float]:
    """Geometric mean of per-sample ratios ``num / den`` with a 95% t-style interval on the log
    scale: ``exp(mean(log r) +- z sd / sqrt(n))``.

    Every sample weighs the same (a ratio of sums is dominated by the loudest samples, and its
    bootstrap interval undercovers when a few samples dominate), and the log makes the
    ratio's noise symmetric.
    """
    r = np.log(np.asarray(num, np.float64).reshape(-1) / np.asarray(den, np.float64).reshape(-1))
    m, h = mean_ci(r, z)
    return float(math.exp(m)), float(math.exp(m - h)), float(math.exp(m + h))


def paired_log_ratio_ci(a: Tuple[np.ndarray, np.ndarray], b: Tuple[np.ndarray, np.ndarray],
                        z: float = 1.96) -> Tuple[float, float, float]:
    """Geometric mean over samples of ``ratio_a / ratio_b`` (same samples: same noise, same
    prompts) with a paired 95% interval on the log scale; < 1 means ``a`` keeps less."""
    ra = np.log(np.asarray(a[0], np.float64) / np.asarray(a[1], np.float64)).reshape(-1)
    rb = np.log(np.asarray(b[0], np.float64) / np.asarray(b[1], np.float64)).reshape(-1)
    m, h = mean_ci(ra - rb, z)
    return float(math.exp(m)), float(math.exp(m - h)), float(math.exp(m + h))


def paired_ratio_difference_ci(a: Tuple[np.ndarray, np.ndarray], b: Tuple[np.ndarray, np.ndarray],
                               boots: int = 2000, seed: int = 0) -> Tuple[float, float, float]:
    """``ratio(a) - ratio(b)`` for per-sample ``(num, den)`` pairs of the *same* samples (same
    noise, same prompts), with a paired bootstrap 95% interval (samples resampled jointly)."""
    an, ad = (np.asarray(v, np.float64).reshape(-1) for v in a)
    bn, bd = (np.asarray(v, np.float64).reshape(-1) for v in b)
    est = float(an.sum() / ad.sum() - bn.sum() / bd.sum())
    idx = np.random.default_rng(seed).integers(0, an.size, size=(boots, an.size))
    r = an[idx].sum(1) / ad[idx].sum(1) - bn[idx].sum(1) / bd[idx].sum(1)
    return est, float(np.quantile(r, 0.025)), float(np.quantile(r, 0.975))


def mcnemar_p(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Exact two-sided McNemar p-value for paired binary outcomes (same samples, two methods)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    n01, n10 = int((a & ~b).sum()), int((~a & b).sum())
    n = n01 + n10
    if n == 0:
        return 1.0
    k = min(n01, n10)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return float(min(1.0, 2 * tail))


def proportion_ci(successes: int, n: int, z: float = 1.96) -> Tuple[float, float, float]:
    """(proportion, Wilson 95% lower, upper)."""
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    p = successes / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return p, max(0.0, c - h), min(1.0, c + h)


# -- 2-D grids: seams of images beyond the window both ways, against the 2-D texture model ---------
# A GridLayout is a product of two ViewLayouts, so its regions are products of the 1-D ones above:
# a *vertical seam* cell is in a column overlap and a row middle (the seam line runs down the
# image), a *horizontal seam* cell in a row overlap and a column middle, a *corner* cell in both
# overlaps (four tiles meet), an *interior* cell in both middles. On a torus the pairs (n-1, 0)
# of a looping axis are its wrap-around seams.
__all__ += ["GRID_REGION_KINDS", "grid_regions", "grid_hf_energies", "whitened_band_variances_2d",
            "GridSeamStatistics", "grid_seam_statistics"]

GRID_REGION_KINDS = ("vertical", "horizontal", "corner", "interior")


def grid_regions(layout, rows: Callable, cols: Callable) -> Dict[str, List[Tuple[bool, List[int], List[int]]]]:
    """Per region kind, ``[(wraps, row cells, col cells)]``: the products of the 1-D regions that
    ``rows(axis_layout)`` / ``cols(axis_layout)`` give for overlaps (``"overlap"``) and middles
    (``"middle"``): each a list of ``(pair or view, cells)``. ``wraps``: the region is on a looping
    axis's wrap-around seam."""
    def parts(axis, pick):
        overlaps = [(axis.loop and pair == tuple(axis.neighbour_pairs()[-1]), c) for pair, c in pick(axis)["overlap"]]
        middles = [(False, c) for _, c in pick(axis)["middle"]]
        return overlaps, middles
    r_ov, r_mid = parts(layout.rows, rows)
    c_ov, c_mid = parts(layout.cols, cols)

    def product(a, b):
        return [(wa or wb, ra, cb) for wa, ra in a for wb, cb in b]
    return {"vertical": product(r_mid, c_ov), "horizontal": product(r_ov, c_mid), "corner": product(r_ov, c_ov),
            "interior": product(r_mid, c_mid)}


def _patches(latent: torch.Tensor, regions: Sequence[Tuple[bool, List[int], List[int]]]) -> torch.Tensor:
    """``(R * B, C, P, Q)``, region-major: each region's cells of every sample."""
    return torch.cat([_take(_take(latent, -2, r), -1, c) for _, r, c in regions])


def grid_hf_energies(latent: torch.Tensor, layout, cutoff: float = HF_CUTOFF
                     ) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Per seam kind, per sample: (the seam cells' HF energy, the interior cells' HF energy), both
    across the seam: along the columns for vertical seams, the rows for horizontal ones, both
    (summed) for corners; the same axis for the interior. Regions are ``o x o`` cells (``o`` the
    smaller of the two axes' overlaps); spectra as :func:`region_spectra`'s (Hann-tapered power
    along the axis, averaged over channels, the other axis and the regions). Loop axes add
    ``wrap``: the wrap-around seams' cells (vertical and horizontal) against the interior."""
    o = min(layout.rows.min_overlap, layout.cols.min_overlap)
    if o < 4:
        raise ValueError(f"an overlap of {o} cells is too short for a spectrum (need >= 4)")
    band = np.fft.rfftfreq(o) >= cutoff

    def pick(axis):
        return {"overlap": overlap_columns(axis), "middle": interior_columns(axis, o)}
    regions = grid_regions(layout, pick, pick)
    b = latent.shape[0]

    def hf(kind_regions, dims: Sequence[int]) -> np.ndarray:
        """``(B,)`` HF energy along ``dims`` (summed), averaged over the regions."""
        if not kind_regions:
            return np.full(b, np.nan)
        x = _patches(latent, kind_regions)
        total = sum(_power(x, d).numpy()[:, band].sum(1) for d in dims)
        return total.reshape(len(kind_regions), b).mean(0)
    across = {"vertical": (-1,), "horizontal": (-2,), "corner": (-2, -1)}
    out = {kind: (hf(regions[kind], dims), hf(regions["interior"], dims)) for kind, dims in across.items()}
    # A torus's wrap regions, each across its own seam; the two kinds weighted by their region counts.
    wraps = [(k, dims) for k, dims in (([r for r in regions["vertical"] if r[0]], (-1,)),
                                       ([r for r in regions["horizontal"] if r[0]], (-2,))) if k]
    if wraps:
        total = sum(len(k) for k, _ in wraps)
        out["wrap"] = (sum(len(k) * hf(k, dims) for k, dims in wraps) / total,
                       sum(len(k) * hf(regions["interior"], dims) for k, dims in wraps) / total)
    return out


def _axis_marginal(model, axis: str, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per class, the eigen-factors of the ``axis`` covariance over ``size`` cells, slow -> fast."""
    covs = torch.stack([model.axis_cov(c, axis, size) for c in range(model.num_classes)])
    eig, basis = torch.linalg.eigh(covs)
    return basis.flip(-1), eig.flip(-1).clamp_min(1e-12)


def whitened_band_variances_2d(model, patches: torch.Tensor, class_weights: torch.Tensor, bands: int = 4,
                               min_eigenvalue: float = 1.0, chunk: int = 8) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`whitened_band_variances` for the 2-D model: probe patches ``(N, C, P, Q)`` whitened by
    their most likely component's exact marginal ``A_k (x) K_r[:P, :P] (x) K_c[:Q, :Q]`` (exact:
    both kernels are stationary). Returns ``(band_sq (N, bands), components (N,))``; the counted
    directions (eigenvalue >= ``min_eigenvalue``) are split into ``bands`` equal groups by spatial
    frequency, the sum of their row and column mode ranks (slow -> fast)."""
    n, c, p, q = patches.shape
    ur, mr = _axis_marginal(model, "rows", p)
    uc, mc = _axis_marginal(model, "cols", q)
    cls = model.component_class
    lam = model.channel_eig[:, :, None, None] * mr[cls][:, None, :, None] * mc[cls][:, None, None, :]  # (K, C, P, Q)
    logdet = torch.log(lam).sum((-1, -2, -3))
    rank = (torch.arange(p)[:, None] + torch.arange(q)[None, :]).expand(c, p, q)
    band_of = torch.full(lam.shape, -1, dtype=torch.long)
    for k in range(lam.shape[0]):
        kept = torch.nonzero(lam[k] >= min_eigenvalue)                     # (m, 3): (channel, row mode, col mode)
        if kept.shape[0] < bands:
            continue  # too few resolved directions: this component's patches give NaN
        order = torch.argsort(rank[kept[:, 0], kept[:, 1], kept[:, 2]], stable=True)
        groups = torch.div(torch.arange(kept.shape[0]) * bands, kept.shape[0], rounding_mode="floor")
        band_of[k, kept[order, 0], kept[order, 1], kept[order, 2]] = groups
    band_sq, comps = [], []
    for r in range(0, n, chunk):
        x = patches[r:r + chunk].to(torch.float64)
        z = torch.matmul(torch.matmul(ur.transpose(-1, -2)[None, :, None], x[:, None]), uc[None, :, None])
        z = z[:, cls]                                                      # (b, K, C, P, Q)
        b = z.shape[0]
        y = torch.matmul(model.channel_basis.transpose(-1, -2)[None], z.reshape(b, -1, c, p * q)).reshape(z.shape)
        w2 = y ** 2 / lam[None]
        ll = -0.5 * (w2.sum((-1, -2, -3)) + logdet[None]) + model.component_logprior(class_weights[r:r + chunk])
        comp = ll.argmax(-1)
        w2 = w2[torch.arange(b), comp].reshape(b, -1)
        bo = band_of[comp].reshape(b, -1)
        band_sq.append(_band_means(w2, bo, bands))
        comps.append(comp)
    return torch.cat(band_sq), torch.cat(comps)


@dataclass
class GridSeamStatistics:
    """Per-sample statistics of a 2-D canvas (arrays of length ``B``).

    ``hf``: :func:`grid_hf_energies`; ``kl``: per region kind (and ``wrap`` on a torus), the probes'
    whitened variances pooled over the probes of the sample, as a Gaussian KL to N(0, 1) averaged
    over bands (0 = exactly the model); ``wrap_excess``: the wrap-around seams' probe KL minus the
    other seams', each probe on its own (0 = the wrap seam is like any other; None without a loop);
    ``consistent``: every tile's most likely component is the same (exact likelihood of the tile);
    ``tile_components``: ``(B, tiles)`` those components."""

    hf: Dict[str, Tuple[np.ndarray, np.ndarray]]
    kl: Dict[str, np.ndarray]
    wrap_excess: Optional[np.ndarray]
    consistent: np.ndarray
    tile_components: np.ndarray
    probe: int


def grid_seam_statistics(model, latent: torch.Tensor, layout, class_weights: torch.Tensor, probe: Optional[int] = None,
                         bands: int = 4, min_eigenvalue: float = 1.0) -> GridSeamStatistics:
    """Seam statistics of ``(B, C, H, W)`` canvases on a :class:`~safa_kernels.GridLayout` against the
    2-D texture model (:class:`~safa.texture.model2d.TextureModel2D`); ``class_weights``: ``(B, classes)``.

    Probes are ``P x P`` cells, ``P = min(2 o, middle, window)`` over both axes (as
    :func:`probe_fidelity`): straddling a seam across it (centred on the overlap) and centred in a
    middle along it; corner probes straddle both overlaps; interior probes sit in both middles.
    """
    from safa_kernels import gather
    b = latent.shape[0]
    mid = min(hi - lo for axis in (layout.rows, layout.cols) for lo, hi in (axis.middle(v) for v in range(axis.num_views)))
    o = min(layout.rows.min_overlap, layout.cols.min_overlap)
    probe = int(probe or min(2 * o, mid, layout.rows.window, layout.cols.window))
    if probe < 2 * bands:
        raise ValueError(f"probe of {probe} cells is too small for {bands} bands (overlap {o}, middle {mid})")

    def pick(axis):
        return {"overlap": seam_probe_columns(axis, probe), "middle": interior_columns(axis, probe)}
    regions = grid_regions(layout, pick, pick)
    cw = class_weights.to(torch.float64)
    each: Dict[str, np.ndarray] = {}
    for kind, kind_regions in regions.items():
        sq, _ = whitened_band_variances_2d(model, _patches(latent, kind_regions), cw.repeat(len(kind_regions), 1),
                                           bands, min_eigenvalue)
        each[kind] = sq.reshape(len(kind_regions), b, bands).numpy()
    kl = {kind: np.nanmean(gaussian_kl_to_unit(np.nanmean(sq, axis=0)), axis=-1) for kind, sq in each.items()}
    wrap_excess = None
    seams = [(w, kind, i) for kind in ("vertical", "horizontal") for i, (w, _, _) in enumerate(regions[kind])]
    if any(w for w, _, _ in seams):
        wrapped = np.stack([each[kind][i] for w, kind, i in seams if w])
        inner = np.stack([each[kind][i] for w, kind, i in seams if not w])
        kl["wrap"] = np.nanmean(gaussian_kl_to_unit(np.nanmean(wrapped, axis=0)), axis=-1)
        single = lambda sq: np.nanmean(gaussian_kl_to_unit(sq), axis=-1).mean(0)  # noqa: E731
        wrap_excess = single(wrapped) - single(inner)
    tiles = gather(latent, layout, (-2, -1))                               # (tiles, B, C, w, w)
    n = tiles.shape[0]
    comps = most_likely_components(model, tiles.reshape(n * b, *tiles.shape[2:]), cw.repeat(n, 1)).reshape(n, b).T
    consistent = (comps == comps[:, :1]).all(1).numpy()
    return GridSeamStatistics(grid_hf_energies(latent, layout), kl, wrap_excess, consistent, comps.numpy(), probe)
