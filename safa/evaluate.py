"""``safa evaluate``: exact seam-fidelity evaluation of the joint-diffusion methods.

Every method samples long latents from the built-in texture model (whose denoiser is exact
and differentiable, so the true distribution of every window is known and SyncDiffusion's
gradients exist) with the same prompts, seeds, scheduler and steps; a method that cannot run
on it is listed as not applicable (MAD: the model has no attention to merge); :mod:`safa.metrics` then measures, per long sample:

* ``HF ovl/int``: high-frequency energy along time of the overlap regions over that of the
  interior segments (paper Fig. 2b; 1 = stationary, < 1 = overlaps smoothed): geometric
  mean over samples, interval on the log scale;
* ``seam KL`` / ``int KL``: Gaussian KL to N(0, 1) of the whitened coefficients of probe
  windows straddling the seams / inside the views (0 = exactly the model's distribution);
* ``seam-int``: the per-sample difference of the two KLs (the seam's excess over the
  sampler's own error in the same sample);
* ``seam v_hf``: whitened variance of the fastest temporal band of the seam probes
  (< 1 smoothing, > 1 excess noise);
* ``consistent``: fraction of samples whose views all have the same most likely sub-style;
* ``sub-styles``: how many samples (their first view) ended in each sub-style of the model
  (soft-dark / medium / loud-bright): a method can be "consistent" by pushing every sample
  into one sub-style, which this shows;
* ``repeat``: the mean correlation between the middles of different views
  (:func:`safa.metrics.middle_correlation`; about 0 for a texture that does not repeat);
* for loop layouts, ``wrap HF`` / ``wrap KL``: the same at the wrap-around seam alone, and
  ``wrap-seam``: the wrap seam's KL minus the mean KL of the other seams, each probe on its
  own (the same estimator: ``wrap KL`` is one probe against the pooled ``seam KL``, which
  biases it upwards), 0 = the wrap seam is like any other.

Reference rows: ``true``: exact long samples of the model (one sub-style throughout, a
stationary Gaussian process: every window is exactly model-distributed, and consistency is
1 by construction; for loop layouts the process is drawn on a circle, so its wrap seam is a
seam like the others); ``one window``: the pipeline's own single-window samples with the
same scheduler and steps (what the sampler gives with no seam at all), as many windows per
sample as the layout has views, their interior probes pooled per sample as a method's are,
so its ``int KL`` is the same estimator as the methods'.
Intervals are 95%: normal approximation over samples, Wilson for proportions.
:func:`format_summary` is the short table a listener reads (the demo prints it);
:func:`format_table` has every column. The command line is :mod:`safa.commands.evaluate`.

``--methods`` takes shorthands of :data:`safa.methods.METHODS`, each optionally with
parameters of its method object: ``safa:guide=0.6,safa_stats:snr=0.05:strength=0.5``.
"""
from __future__ import annotations

import copy
import math
import textwrap
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import metrics as M
from ._checks import check_int_range
from .methods import METHODS, NotApplicable, parse_method_spec

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["evaluate", "EvalResult", "format_table", "format_summary", "evaluation_figure", "write_plot",
           "ALL_METHODS", "parse_method_spec", "evaluate_continuation", "format_continuation_table", "ContinueResult"]

ALL_METHODS = tuple(METHODS)


@dataclass
class RowStats:
    """Per-sample statistics of one row (arrays of length ``samples``; None where not defined)."""

    name: str
    hf: Optional[Tuple[np.ndarray, np.ndarray]] = None       # per-sample (overlap, interior) HF energy
    wrap_hf: Optional[Tuple[np.ndarray, np.ndarray]] = None  # per-sample (wrap seam, interior) HF energy
    seam_kl: Optional[np.ndarray] = None
    int_kl: Optional[np.ndarray] = None
    wrap_kl: Optional[np.ndarray] = None
    seam_bands: Optional[np.ndarray] = None
    int_bands: Optional[np.ndarray] = None
    consistent: Optional[np.ndarray] = None
    substyle: Optional[np.ndarray] = None   # per sample: sub-style index of its first view
    repeat: Optional[np.ndarray] = None     # per sample: correlation of the views' middles
    wrap_excess: Optional[np.ndarray] = None
    spectrum_overlap: Optional[np.ndarray] = None
    spectrum_interior: Optional[np.ndarray] = None
    seconds: float = 0.0


@dataclass
class EvalResult:
    rows: List[RowStats]
    freqs: np.ndarray
    layout: Any
    settings: Dict[str, Any]
    notes: List[str] = field(default_factory=list)
    not_applicable: Dict[str, str] = field(default_factory=dict)  # method -> why it cannot run on the model


def _substyles(model, windows: torch.Tensor, cw: torch.Tensor) -> np.ndarray:
    """Per window ``(N, C, window, F)``: the index of its most likely component's sub-style."""
    return (M.most_likely_components(model, windows, cw) % len(model.substyles)).numpy()


def _row_from_latent(name: str, model, latent: torch.Tensor, layout, cw: torch.Tensor,
                     min_eigenvalue: float, seconds: float) -> RowStats:
    spectra = M.region_spectra(latent, layout)
    fid = M.probe_fidelity(model, latent, layout, cw, min_eigenvalue=min_eigenvalue)
    same, _ = M.cross_view_consistency(model, latent, layout, cw)
    row = RowStats(name, hf=M.hf_energies(spectra), seam_kl=fid.kl("seam"), int_kl=fid.kl("interior"),
                   seam_bands=fid.seam, int_bands=fid.interior, consistent=same,
                   substyle=_substyles(model, M._take(latent, -2, layout.columns(0)), cw),
                   repeat=M.middle_correlation(latent, layout),
                   spectrum_overlap=spectra.overlap.mean(0), spectrum_interior=spectra.interior.mean(0),
                   seconds=seconds)
    if layout.loop:
        row.wrap_hf = M.hf_energies(spectra, which="wrap")
        row.wrap_kl = fid.kl("wrap")
        row.wrap_excess = fid.wrap_excess()
    return row


def ready_pipeline(pipe: Any, scheduler: Optional[str], device: Any) -> Any:
    """Set up a built-in analytic pipeline for an evaluation (its scheduler, device, no progress
    bars); return the model the statistics use: on the CPU (exact model, whitening), a CPU copy
    when the pipeline samples elsewhere."""
    if scheduler is not None:
        from .schedulers import set_scheduler
        set_scheduler(pipe, scheduler)
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe.model if pipe.model.device.type == "cpu" else copy.deepcopy(pipe.model).cpu()


def prompts_for(prompts: Sequence[str], samples: int) -> List[Tuple[str, int]]:
    """Round-robin ``samples`` over ``prompts``: ``[(prompt, count)]`` with counts > 0."""
    counts = [samples // len(prompts) + (i < samples % len(prompts)) for i in range(len(prompts))]
    return [(p, c) for p, c in zip(prompts, counts) if c > 0]


def evaluate(methods: Sequence[str] = ALL_METHODS, samples: int = 8, seconds: float = 40.0, steps: int = 25,
             prompts: Optional[Sequence[str]] = None, loop: bool = False, overlap: float = 0.2,
             guidance_scale: float = 1.0, seed: int = 0, window: Optional[float] = None,
             min_eigenvalue: float = 1.0, pipe: Any = None, log: Any = None,
             scheduler: Optional[str] = None, device: Any = None) -> EvalResult:
    """Run every method and the reference rows; see the module docstring for the columns.

    ``methods``: shorthands with optional parameters (:func:`parse_method_spec`); each row is
    named by its spec. ``scheduler``: a diffusers scheduler class name for the built-in
    pipeline (default its DPM-Solver++), e.g. ``"DDIM"``. ``device``: where the pipeline
    samples (default where it is); the statistics are computed on the CPU, and the noise is
    drawn on the CPU, so a seed gives the same samples on every device up to rounding.
    """
    from .sampler import JointDiffusion
    from .texture import make_texture_pipeline, window_frames
    parsed = [(spec, parse_method_spec(spec)) for spec in methods]  # a bad spec fails before any sampling
    if not parsed:
        raise ValueError(f"--methods needs at least one method, e.g. safa,multidiffusion (from {', '.join(METHODS)})")
    check_int_range("samples", samples, 2)  # the intervals need two samples per row
    if pipe is None:
        pipe = make_texture_pipeline() if window is None else make_texture_pipeline(window_frames=window_frames(window))
    model = ready_pipeline(pipe, scheduler, device)
    prompts = list(prompts) if prompts else list(model.class_names)
    model.encode_prompt(prompts)  # unknown prompt names fail here, before any sampling
    plan = prompts_for(prompts, samples)
    cw = model.encode_prompt([p for p, c in plan for _ in range(c)])
    jd = JointDiffusion(pipe)
    # Every sample's latent is held at once (the 'true' row, then each method's samples): checked
    # as one batch before any work (and before the layout is built), as a call checks itself.
    jd.estimate_memory(seconds=seconds, loop=loop, overlap=overlap, guidance_scale=guidance_scale,
                       batch_size=len(cw), output_type="latent", check=True)
    layout = jd.layout_for(seconds=seconds, method="safa", loop=loop, overlap=overlap)
    if layout.num_views < 2:
        raise ValueError(f"--seconds {seconds:g} fits in one window ({layout.window} latent frames): the evaluation "
                         f"measures seams, so it needs at least two views: a longer --seconds")
    rows: List[RowStats] = []

    def say(msg: str) -> None:
        if log is not None:
            log(msg)

    # Reference: exact long samples (one component each, stationary GP over the layout; on a
    # circle for a loop, whose wrap seam must be a seam like the others).
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed + 7919)
    comps = model.sample_components(cw, generator=gen)
    true = model.sample(comps, layout.length, generator=gen, periodic=loop)
    rows.append(_row_from_latent("true", model, true, layout, cw, min_eigenvalue, time.perf_counter() - t0))
    wrapped_error = model.periodic_error(layout.length) if loop else 0.0

    # One window through the pipeline itself: the sampler's own error with no seam. As many
    # windows per sample as the layout has views, pooled like a method's interior probes.
    t0 = time.perf_counter()
    n = layout.num_views
    singles = []
    for i, (p, c) in enumerate(plan):
        singles.append(pipe(p, num_inference_steps=steps, guidance_scale=guidance_scale,
                            num_waveforms_per_prompt=c * n, generator=torch.Generator().manual_seed(seed + 104729 + i),
                            output_type="latent").audios.cpu().reshape(c, n, model.channels, model.window, model.freq_bins))
    singles = torch.cat(singles).transpose(0, 1).reshape(n * samples, model.channels, model.window,
                                                         model.freq_bins)  # window-major, like the views
    probe = min(2 * layout.overlap, min(hi - lo for lo, hi in (layout.middle(v) for v in range(n))))
    start = (model.window - probe) // 2
    sq, _ = M.whitened_band_variances(model, singles[:, :, start:start + probe],
                                      cw.to(torch.float64).repeat(n, 1), min_eigenvalue=min_eigenvalue)
    sq = np.nanmean(sq.numpy().reshape(n, samples, -1), axis=0)
    rows.append(RowStats("one window", int_kl=np.nanmean(M.gaussian_kl_to_unit(sq), -1), int_bands=sq,
                         substyle=_substyles(model, singles[:samples], cw), seconds=time.perf_counter() - t0))
    say(f"reference rows done ({rows[-1].seconds:.1f} s for the single windows)")

    not_applicable: Dict[str, str] = {}
    for spec, method in parsed:
        try:
            method.check_pipeline(jd.adapter)
        except NotApplicable as exc:  # e.g. MAD: the texture model has no attention to merge
            not_applicable[spec] = str(exc)
            say(f"{spec}: not applicable ({exc})")
            continue
        t0 = time.perf_counter()
        latents = []
        for i, (p, c) in enumerate(plan):
            out = jd(p, seconds=seconds, method=method, loop=loop, overlap=overlap, num_inference_steps=steps,
                     guidance_scale=guidance_scale, num_waveforms_per_prompt=c, output_type="latent",
                     generator=torch.Generator().manual_seed(seed + i))
            latents.append(out.latent.cpu())
        latent = torch.cat(latents)
        elapsed = time.perf_counter() - t0
        rows.append(_row_from_latent(spec, model, latent, out.layout, cw, min_eigenvalue, elapsed))
        say(f"{spec}: {elapsed:.1f} s")

    freqs = np.fft.rfftfreq(layout.overlap)
    settings = dict(samples=samples, seconds=seconds, steps=steps, prompts=prompts, loop=loop, overlap=overlap,
                    guidance_scale=guidance_scale, seed=seed, window=layout.window, layout=jd.describe_layout(layout),
                    frames_per_second=jd.adapter.frames_per_second,
                    scheduler=type(pipe.scheduler).__name__, min_eigenvalue=min_eigenvalue,
                    substyles=[name for name, _, _ in model.substyles], wrapped_error=wrapped_error)
    result = EvalResult(rows, freqs, layout, settings, not_applicable=not_applicable)
    result.notes = _notes(result)
    return result


# -- reporting ----------------------------------------------------------------------------
def _fmt(x: Optional[np.ndarray], scale: float = 1.0, digits: int = 3) -> str:
    if x is None:
        return "-"
    m, h = M.mean_ci(np.asarray(x) * scale)
    if math.isnan(h):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f}±{h:.{digits}f}"


def _fmt_prop(x: Optional[np.ndarray]) -> str:
    if x is None:
        return "-"
    p, lo, hi = M.proportion_ci(int(np.sum(x)), len(x))
    return f"{p:.2f} [{lo:.2f},{hi:.2f}]"


def _fmt_ratio(x: Optional[Tuple[np.ndarray, np.ndarray]]) -> str:
    if x is None:
        return "-"
    m, lo, hi = M.log_ratio_ci(*x)
    return f"{m:.3f} [{lo:.3f},{hi:.3f}]"


def _ci(x: Tuple[np.ndarray, np.ndarray]) -> Tuple[float, float, float]:
    return M.log_ratio_ci(*x)


def _notes(res: EvalResult) -> List[str]:
    """What the measurements say about the paper's claims (computed, never asserted)."""
    by = {r.name: r for r in res.rows}
    notes = []
    for avg in ("multidiffusion", "multidiffusion_triangular"):
        if avg in by:
            m, lo, hi = _ci(by[avg].hf)
            n = len(by[avg].hf[0])
            verdict = ("lower than the interior: averaging smooths the overlaps (paper's claim holds)" if hi < 1 else
                       "higher than the interior: the paper's smoothing claim does not hold here" if lo > 1 else
                       f"not significantly lower than the interior at 95% with {n} samples per row (the interval "
                       f"holds 1; more --samples narrow it)")
            notes.append(f"{avg}: overlap HF energy {m:.3f} [{lo:.3f}, {hi:.3f}] x interior, {verdict}.")
    for sw in ("safa", "safa_selfloop"):
        if sw in by:
            m, lo, hi = _ci(by[sw].hf)
            verdict = ("consistent with 1: swap preserves HF energy (paper's claim holds)" if lo <= 1 <= hi else
                       ("below 1: swap also loses HF energy (contradicts the paper's claim)" if hi < 1 else
                        "above 1: swap adds HF energy beyond the texture's own"))
            notes.append(f"{sw}: overlap HF energy {m:.3f} [{lo:.3f}, {hi:.3f}] x interior, {verdict}.")
    for avg in ("multidiffusion", "multidiffusion_triangular"):
        for sw in ("safa_selfloop", "safa"):
            if avg in by and sw in by:
                d, lo, hi = M.paired_log_ratio_ci(by[avg].hf, by[sw].hf)
                v = ("averaging keeps less HF energy than swap" if hi < 1 else
                     "averaging keeps MORE HF energy than swap" if lo > 1 else "no significant difference")
                notes.append(f"HF ratio {avg} / {sw} = {d:.3f} [{lo:.3f}, {hi:.3f}] (paired, same noise): {v}.")
                break
    if "safa" in by and "safa_selfloop" in by:
        a, b = by["safa"].consistent, by["safa_selfloop"].consistent
        p = M.mcnemar_p(a, b)
        if p < 0.05:
            v = ("reference guidance raises cross-view consistency (paper's claim holds)" if a.mean() > b.mean() else
                 "reference guidance LOWERS cross-view consistency (contradicts the paper's claim)")
        else:
            v = "no significant effect of reference guidance at this sample size"
        notes.append(f"consistency safa {a.mean():.2f} vs safa_selfloop {b.mean():.2f} (same noise; exact McNemar "
                     f"p = {p:.3g}): {v}.")
    if "safa_selfloop" in by:  # what a guidance costs the interior: paired with the unguided sampler
        base = by["safa_selfloop"].int_kl
        for row in res.rows:
            guided = row.name.split(":")[0] in ("safa", "safa_stats")
            if not guided or row.int_kl is None or base is None or len(row.int_kl) != len(base):
                continue
            d, h = M.mean_ci((np.asarray(row.int_kl) - np.asarray(base)) * 1e3)
            v = ("the guidance costs interior fidelity" if d - h > 0 else
                 "the guidance improves the interior" if d + h < 0 else "no significant interior cost")
            notes.append(f"interior KL {row.name} - safa_selfloop = {d:.2f} ± {h:.2f} x1e-3 (paired, same noise): {v}.")
    notes.append("'true' rows are exact long samples (one sub-style each), so their consistency is 1 by "
                 "construction; KL counts whitened directions with eigenvalue >= "
                 f"{res.settings['min_eigenvalue']} (finer ones are below any finite-step sampler's last noise level).")
    if res.settings.get("wrapped_error", 0.0) > 1e-3:
        notes.append(f"the loop is short for the model's kernels: a window of the periodic 'true' texture differs "
                     f"from the model's by up to {res.settings['wrapped_error']:.3g} in temporal covariance "
                     f"(k(0) = 1), so the 'true' row is not exact here.")
    return notes


def _settings_line(res: EvalResult) -> str:
    s = res.settings
    return (f"seam fidelity vs the exact texture model: {s['samples']} samples/row, {s['seconds']:g} s "
            f"{'loop' if s['loop'] else 'open'}, {s['layout']}, {s['steps']} steps {s['scheduler']}, "
            f"guidance {s['guidance_scale']:g}, prompts {','.join(s['prompts'])}, seeds from {s['seed']}")


def format_summary(res: EvalResult, width: int = 100) -> str:
    """The few columns a listener reads, with plain names and the notes, wrapped to ``width`` characters.

    ``HF kept in overlaps``: the overlaps' high-frequency energy over the interior's (1 = as
    detailed as the interior, < 1 = smoothed); ``seam error``: KL of the seam regions to the
    model (0 = exact, x1e3); ``views agree``: fraction of samples whose views share one
    sub-style; for loops, ``loop seam``: the wrap-around seam's KL minus the other seams'.
    :func:`format_table` has every column.
    """
    loop = bool(res.settings["loop"])
    head = ["method", "HF kept in overlaps", "seam error x1e3", "views agree"] + (["loop seam x1e3"] if loop else [])
    table = []
    for r in res.rows:
        cells = [r.name, _fmt_ratio(r.hf), _fmt(r.seam_kl, 1e3, 1), _fmt_prop(r.consistent)]
        cells += [_fmt(r.wrap_excess, 1e3, 1)] if loop else []
        if any(c != "-" for c in cells[1:]):  # 'one window' has no seams: nothing of it is shown here
            table.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *table)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    wrap = lambda text, indent="": textwrap.fill(text, width, subsequent_indent=indent)  # noqa: E731
    lines = [wrap(_settings_line(res)), fmt.format(*head), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*c).rstrip() for c in table]
    lines += [wrap(f"{name}: not applicable: {why}") for name, why in res.not_applicable.items()]
    lines.append(wrap("HF kept in overlaps: overlap / interior high-frequency energy (1 = as detailed as the "
                      "interior, < 1 = smoothed); seam error: KL of the seams to the exact model (0 = exact); "
                      "views agree: samples whose views share one sub-style"
                      + ("; loop seam: the wrap seam's KL minus the other seams' (0 = like any seam)" if loop else "")
                      + "; mean or geometric mean with 95% intervals. Every column: safa evaluate."))
    lines += [wrap(f"note: {n}", "  ") for n in res.notes]
    return "\n".join(lines)


def _fmt_counts(x: Optional[np.ndarray], kinds: int) -> str:
    if x is None:
        return "-"
    return "/".join(str(int(np.sum(np.asarray(x) == k))) for k in range(kinds))


def format_table(res: EvalResult) -> str:
    """The table (text), with settings and notes."""
    loop = bool(res.settings["loop"])
    kinds = len(res.settings.get("substyles", ())) or 3
    head = ["method", "HF ovl/int", "seam KL x1e3", "int KL x1e3", "seam-int x1e3", "seam v_hf", "int v_hf",
            "consistent", "sub-styles", "repeat"]
    if loop:
        head[2:2] = ["wrap HF"]
        head.insert(5, "wrap KL x1e3")
        head.insert(7, "wrap-seam x1e3")
    lines = []
    table = []
    for r in res.rows:
        paired = None if r.seam_kl is None or r.int_kl is None else r.seam_kl - r.int_kl
        cells = [r.name, _fmt_ratio(r.hf), _fmt(r.seam_kl, 1e3, 2), _fmt(r.int_kl, 1e3, 2), _fmt(paired, 1e3, 2),
                 _fmt(None if r.seam_bands is None else r.seam_bands[:, -1]),
                 _fmt(None if r.int_bands is None else r.int_bands[:, -1]), _fmt_prop(r.consistent),
                 _fmt_counts(r.substyle, kinds), _fmt(r.repeat, 1.0, 2)]
        if loop:
            cells[2:2] = [_fmt_ratio(r.wrap_hf)]
            cells.insert(5, _fmt(r.wrap_kl, 1e3, 2))
            cells.insert(7, _fmt(r.wrap_excess, 1e3, 2))
        table.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *table)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines.append(_settings_line(res))
    lines.append(fmt.format(*head))
    lines.append(fmt.format(*["-" * w for w in widths]))
    lines += [fmt.format(*c) for c in table]
    lines += [f"{name}: not applicable: {why}" for name, why in res.not_applicable.items()]
    lines.append("mean ± 95% CI over samples (HF: geometric mean of per-sample ratios, interval on the log "
                 "scale; Wilson interval for 'consistent'); seam-int = per-sample paired "
                 "difference of the KLs (the seam's own excess, sampler error cancelled); v_hf = whitened variance "
                 "of the fastest temporal band (1 = exact); sub-styles = samples per sub-style ("
                 + "/".join(res.settings.get("substyles", ())) + "); repeat = correlation of the views' middles"
                 + ("; wrap-seam = the wrap seam's KL minus the other seams', one probe each" if loop else "") + ".")
    lines += [f"note: {n}" for n in res.notes]
    return "\n".join(lines)


# -- plot ---------------------------------------------------------------------------------------
def evaluation_figure(res: EvalResult) -> "Figure":
    """The evaluation as a Figure (nothing written); two panels.

    Left, the paper's Fig. 2b as a ratio: for every row, the log-amplitude of the overlap
    regions' spectrum along time minus that of the interior segments, per temporal-frequency
    band (each row against its own interior, so a sampler's overall level cancels; 0 = the
    overlaps are as detailed as the interior), in Hz when the settings hold the latent's
    frames per second (as :func:`evaluate` records them). Right, the HF energy ratio of the
    table with its 95% interval (and the wrap seam's for loop layouts).
    """
    from .plots import new_figure
    fig = new_figure(14.0, 5.0)
    curves_ax, hf_ax = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[1.4, 1.0]))
    colors = {}
    for r in res.rows:
        colors[r.name] = "black" if r.name == "true" else f"C{len(colors) % 10}"

    # Temporal frequencies in Hz when the latent frame rate is known (cycles per second of audio).
    fps = res.settings.get("frames_per_second")
    scale, unit = (fps, "Hz") if fps else (1.0, "cycles per latent frame")
    curves_ax.axvspan(M.HF_CUTOFF * scale, 0.5 * scale, color="0.92", lw=0,
                      label=f"HF band (>= {M.HF_CUTOFF * scale:g} {unit})")
    curves_ax.axhline(0.0, color="0.5", lw=1.0, ls="--", label="interior (reference)")
    for r in res.rows:
        if r.spectrum_overlap is None:
            continue
        ratio = np.maximum(r.spectrum_overlap, 1e-30) / np.maximum(r.spectrum_interior, 1e-30)
        curves_ax.plot(res.freqs * scale, 0.5 * np.log10(ratio), marker="o", ms=3, lw=1.5, color=colors[r.name],
                       label=r.name)
    curves_ax.set_xlim(0.0, 0.5 * scale)
    curves_ax.set_xlabel(f"temporal frequency of the latent ({unit})")
    curves_ax.set_ylabel("log10 amplitude, overlap − interior")
    curves_ax.set_title("Relative log-amplitude of the overlaps (paper Fig. 2b)", fontsize="medium")
    curves_ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside: curves stay visible

    hf_ax.axhline(1.0, color="0.5", lw=1.0, ls="--")
    rows = [r for r in res.rows if r.hf is not None]
    for x, r in enumerate(rows):
        for offset, pair, marker, label in ((0.0, r.hf, "o", "overlaps"), (0.2, r.wrap_hf, "s", "wrap seam")):
            if pair is None:
                continue
            m, lo, hi = _ci(pair)
            hf_ax.errorbar([x + offset], [m], yerr=[[m - lo], [hi - m]], fmt=marker, color=colors[r.name],
                           mfc="white" if label == "wrap seam" else colors[r.name], capsize=4,
                           label=label if x == 0 else None)
    hf_ax.set_xticks(range(len(rows)), [r.name for r in rows], rotation=20, ha="right")
    hf_ax.set_xlim(-0.5, len(rows) - 0.3)
    hf_ax.set_ylabel("HF energy, overlap / interior (95% CI)")
    hf_ax.set_title("High-frequency energy kept in the overlaps (1 = as the interior)", fontsize="medium")
    if any(r.wrap_hf is not None for r in rows):
        hf_ax.legend(fontsize="small")
    fig.suptitle("\n".join(textwrap.wrap(_settings_line(res), 160)), fontsize="medium")
    return fig


def write_plot(res: EvalResult, path: str) -> None:
    """:func:`evaluation_figure` written as PNG to ``path``, atomically."""
    from .plots import save_figure
    save_figure(evaluation_figure(res), path)


# -- the user's own audio: continuation against the exact conditional (safa.known) -----------------
CONTINUE_ROWS = ("true", "one window", "crossfade", "multidiffusion", "safa", "safa, own X^0",
                 "multidiffusion + resample", "safa + resample")


@dataclass
class ContinueResult:
    """Per row, per sample: junction and interior KL, sub-style agreement and repetition."""

    settings: Dict[str, Any]
    rows: Dict[str, Dict[str, List[float]]] = field(default_factory=dict)


def _probe_kl(model, latent: torch.Tensor, starts: Sequence[int], size: int, cw: torch.Tensor,
              min_eigenvalue: float) -> Tuple[float, List[int]]:
    """Mean over ``starts`` of the probes' Gaussian KL to the model (summed over bands), and their components."""
    windows = torch.cat([latent[:, :, s:s + size] for s in starts])
    band_sq, comps = M.whitened_band_variances(model, windows, cw.expand(windows.shape[0], -1),
                                               min_eigenvalue=min_eigenvalue)
    kl = M.gaussian_kl_to_unit(band_sq.mean(0).numpy()).sum()
    return float(kl), comps.tolist()


def _crossfaded(prefix: torch.Tensor, generated: torch.Tensor, fade: int) -> torch.Tensor:
    """What users do today: the clip, then an independent generation, a linear crossfade of ``fade`` frames."""
    p = prefix.shape[-2]
    ramp = torch.linspace(0, 1, fade + 2, dtype=prefix.dtype)[1:-1][:, None]
    joined = torch.cat([prefix, generated[:, :, fade:]], dim=-2)
    joined[:, :, p - fade:p] = prefix[:, :, p - fade:] * (1 - ramp) + generated[:, :, :fade] * ramp
    return joined


def evaluate_continuation(prompts: Sequence[str] = ("rain", "wind", "surf"), samples: int = 2,
                          clip_seconds: float = 10.0, seconds: float = 40.0, steps: int = 25,
                          scheduler: Optional[str] = None, seed: int = 0, probe: int = 32,
                          min_eigenvalue: float = 1.0, rows: Sequence[str] = CONTINUE_ROWS, resample_steps: int = 3,
                          resample_until: float = 0.5, guide: Optional[float] = None,
                          log: Optional[Any] = None) -> ContinueResult:
    """Continue a clip drawn from the model with each row; measure against the exact conditional.

    Per sample: a clip of ``clip_seconds`` drawn exactly from a component of the prompt's class,
    its exact posterior (:meth:`TextureModel.substyle_posterior`), then each row continues it to
    ``seconds``: ``true`` (:meth:`TextureModel.sample_conditional`), ``crossfade`` (an independent
    generation crossfaded 1 s after the clip), ``multidiffusion`` / ``safa`` with the clip as known
    latent columns (``audio_latents``; SaFa's reference window holds the clip), and ``safa, own
    X^0`` (the reference its own noise, as without a clip), ``... + resample`` with RePaint's
    resampling (``resample_steps`` runs of the first ``resample_until`` of the steps), and ``one
    window`` (the plain pipeline, one view, continuing the clip's last half window within one window:
    the one-window sampler's own error; its interior probes lie in the generated half, fewer than
    the other rows'). ``rows`` picks rows (``true`` always runs up to ``4 * MAX_WINDOW`` frames, the exact
    conditional's dense limit; beyond it the rows are measured against the model alone).
    ``guide``: SaFa's guidance window (default the method's). Every row draws the same noise.
    Columns: the junction probes' KL (``probe`` frames centred
    on the clip's end), the interior probes' KL (non-overlapping probes from one window after the
    clip), the fraction whose interior sub-style is the posterior's choice where it is confident
    (>= 0.9), and the correlation of the clip with what follows it (repetition).
    """
    from .sampler import JointDiffusion
    from .schedulers import set_scheduler
    from .texture import make_texture_pipeline
    from .texture.model import MAX_WINDOW
    pipe = make_texture_pipeline()
    if scheduler:
        set_scheduler(pipe, scheduler)
    model, jd = pipe.model, JointDiffusion(pipe)
    fps = pipe.frames_per_second
    p, n, window = round(clip_seconds * fps), round(seconds * fps), model.window
    unknown = [r for r in rows if r not in CONTINUE_ROWS]
    if unknown:
        raise ValueError(f"rows: unknown {unknown}; choose from {', '.join(CONTINUE_ROWS)}")
    # The exact continuation is dense in time: beyond its length (a 10-minute run) the rows are measured
    # against the model alone (the posterior is exact at any length).
    exact = n <= 4 * MAX_WINDOW
    rows = ["true"] * exact + [r for r in CONTINUE_ROWS if r in rows and r != "true"]
    res = ContinueResult(dict(prompts=list(prompts), samples=samples, clip_seconds=clip_seconds, seconds=seconds,
                              steps=steps, scheduler=type(pipe.scheduler).__name__, probe=probe,
                              resample_steps=resample_steps, resample_until=resample_until, guide=guide))
    for row in rows:
        res.rows[row] = {"junction": [], "interior": [], "agree": [], "repeat": []}
    interior = list(range(p + window, n - probe + 1, probe))
    one_window_probes = list(range(p, p + window - window // 2 - probe + 1, probe))  # its generated half
    model_window_shape = tuple(jd.adapter.latent_shape(1, window))
    for prompt in prompts:
        cw = model.encode_prompt([prompt]).double()
        for s in range(samples):
            g = torch.Generator().manual_seed(seed + 1000 * s + sum(map(ord, prompt)))
            comp = model.sample_components(cw, g)
            prefix = model.sample(comp, length=p, generator=g)
            post = model.substyle_posterior(prefix, cw)[0]
            outs = {"true": model.sample_conditional(prefix, cw, n, generator=g)[0]} if exact else {}
            # Every row draws its noise from the same seed (common random numbers: the rows differ
            # by method, not by the generator's position after the rows before them).
            call_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))

            def kw() -> Dict[str, Any]:
                return dict(num_inference_steps=steps, output_type="latent",
                            generator=torch.Generator().manual_seed(call_seed))
            outs.update(_continuation_rows(jd, prompt, prefix, rows, kw, n, seconds, model_window_shape, call_seed,
                                           resample_steps, resample_until, guide))
            for row, latent in outs.items():
                stats = res.rows[row]
                stats["junction"].append(_probe_kl(model, latent, [p - probe // 2], probe, cw, min_eigenvalue)[0])
                kl, comps = _probe_kl(model, latent, one_window_probes if row == "one window" else interior, probe,
                                      cw, min_eigenvalue)
                stats["interior"].append(kl)
                if float(post.max()) >= 0.9:
                    stats["agree"].append(float(max(set(comps), key=comps.count) == int(post.argmax())))
                a, b = latent[:, :, :p].flatten(), latent[:, :, p:2 * p].flatten()
                m = min(a.numel(), b.numel())
                stats["repeat"].append(float(torch.corrcoef(torch.stack([a[-m:], b[:m]]).double())[0, 1]))
            if log:
                log(f"{prompt} sample {s + 1}/{samples}: posterior sub-style {int(post.argmax())} "
                    f"({float(post.max()):.2f})")
    return res


def _continuation_rows(jd: Any, prompt: str, prefix: torch.Tensor, rows: Sequence[str],
                       kw: Callable[[], Dict[str, Any]], n: int, seconds: float,
                       model_window_shape: Tuple[int, ...], call_seed: int, resample_steps: int,
                       resample_until: float, guide: Optional[float]) -> Dict[str, torch.Tensor]:
    """The generated rows of one sample of :func:`evaluate_continuation`: ``(1, C, n, F)`` latents, the
    clip ``prefix`` first (the ``one window`` row: the clip's first half window, then one window)."""
    fps, p, window = jd.adapter.frames_per_second, prefix.shape[-2], jd.adapter.native_window()
    outs: Dict[str, torch.Tensor] = {}
    safa = {} if guide is None else {"guide": guide}
    if "one window" in rows:  # the plain pipeline (one view) continuing the clip's last half window
        half = window // 2
        last = jd(prompt, seconds=window / fps, audio_latents=prefix[:, :, p - half:], **kw()).latent
        outs["one window"] = torch.cat([prefix[:, :, :p - half], last], dim=-2)
    if "crossfade" in rows:
        fade = min(round(fps), p // 2)
        free = jd(prompt, seconds=(n - p + fade) / fps, **kw()).latent
        outs["crossfade"] = _crossfaded(prefix, free, fade)[:, :, :n]
    for method in ("multidiffusion", "safa"):
        extra = safa if method == "safa" else {}
        if method in rows:
            outs[method] = jd(prompt, seconds=seconds, method=method, audio_latents=prefix, **extra,
                              **kw()).latent[:, :, :n]
        if f"{method} + resample" in rows:
            outs[f"{method} + resample"] = jd(prompt, seconds=seconds, method=method, audio_latents=prefix,
                                              resample_steps=resample_steps, resample_until=resample_until,
                                              **extra, **kw()).latent[:, :, :n]
    if "safa, own X^0" in rows:
        # SaFa with its reference X^0 its own noise, as without a clip (given reference_latents,
        # X^0 does not hold the clip): what the clip in X^0 adds.
        own = jd.adapter.init_noise(model_window_shape, torch.Generator().manual_seed(call_seed + 1))
        outs["safa, own X^0"] = jd(prompt, seconds=seconds, method="safa", audio_latents=prefix,
                                  reference_latents=own, **safa, **kw()).latent[:, :, :n]
    return outs


def format_continuation_table(res: ContinueResult) -> str:
    """The continuation table: mean [95% interval] over samples per column."""
    st = res.settings
    lines = [f"continue a {st['clip_seconds']:g} s clip to {st['seconds']:g} s, {st['steps']} steps "
             f"{st['scheduler']}, prompts {','.join(st['prompts'])}, {st['samples']} samples each, probes of "
             f"{st['probe']} frames; resample: {st['resample_steps']} runs of the first {st['resample_until']:g} "
             f"of the steps" + ("" if st.get("guide") is None else f"; safa guide {st['guide']:g}"),
             f"{'row':<26}{'junction KL':>22}{'interior KL':>22} {'sub-style agrees':>20} {'repeat corr':>20}"]
    for row, stats in res.rows.items():
        cells = []
        for key in ("junction", "interior", "agree", "repeat"):
            x = stats[key]
            if not x:
                cells.append("n/a")
                continue
            mean, half = M.mean_ci(x)
            cells.append(f"{mean:.3f} [{mean - half:.3f}, {mean + half:.3f}]")
        lines.append(f"{row:<26}{cells[0]:>22}{cells[1]:>22} {cells[2]:>20} {cells[3]:>20}")
    return "\n".join(lines)
