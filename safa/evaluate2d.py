"""``safa evaluate --task seams2d``: exact 2-D seam evaluation of the grid methods.

Every grid method (SaFa, SaFa* = ``safa_selfloop``, MD = ``multidiffusion``, MD* =
``multidiffusion_triangular``, Mixture of Diffusers' Gaussian-weighted mean,
``multidiffusion_gaussian``, and SyncDiffusion with the weight-free
:func:`~safa.methods.syncdiffusion.style_distance` as its loss unless one is given; MAD is listed
not applicable: the texture model has no attention to merge) samples canvases of ``tiles x tiles`` tiles from the 2-D texture model
(:class:`~safa.texture.model2d.TextureModel2D`, whose denoiser is exact) with the same prompts,
seeds, scheduler and steps; :func:`safa.metrics.grid_seam_statistics` measures per canvas:

* ``HF v`` / ``HF h`` / ``HF c``: high-frequency energy across the seam of the vertical-seam,
  horizontal-seam and corner cells over the interior cells' (1 = as detailed as the interior,
  < 1 = smoothed): geometric mean over samples, 95% interval on the log scale;
* ``KL v`` / ``KL h`` / ``KL c`` / ``KL int``: Gaussian KL to N(0, 1) of the whitened coefficients
  of probe patches straddling vertical seams, horizontal seams, corners, and inside the tiles'
  middles (0 = exactly the model's distribution);
* ``corner-int``: the per-canvas difference of the corner and interior KLs (the seam's own
  excess; the sampler's error in the same canvas cancels);
* ``tiles agree``: fraction of canvases whose tiles all have the same most likely sub-style
  (exact likelihood of each tile); a texture is one sub-style, so 1 is right;
* on a torus (``loop=True``: both axes loop), ``HF wrap`` / ``KL wrap``: the same at the
  wrap-around seams alone, and ``wrap-seam``: their KL minus the other seams', each probe on its own
  (0 = the tiling seam is like any other seam).

Reference rows: ``true``: exact canvases of the model (one sub-style each; on a torus the
process wrapped on both axes, so its wrap seams are seams like the others); ``one window``: the
pipeline's own single tiles with the same scheduler and steps, their interior probes pooled per
sample as a method's (the sampler's own error with no seam).
"""
from __future__ import annotations

import dataclasses
import math
import textwrap
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import metrics as M
from ._checks import check_int_range
from .methods import Method, NotApplicable, SyncDiffusion, parse_method_spec
from .methods.syncdiffusion import style_distance

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["GRID_METHODS", "SEAMS2D_SETTINGS", "QUICK_SETTINGS", "Seams2DRow", "Seams2DResult", "evaluate_seams2d",
           "format_seams2d_table", "seams2d_figure", "write_seams2d_plot"]

GRID_METHODS = ("safa", "safa_selfloop", "multidiffusion", "multidiffusion_triangular", "multidiffusion_gaussian",
                "syncdiffusion", "mad")
# (scheduler, steps) of the full table: the paper's DDIM 200 and the few-step DPM-Solver++ 25.
SEAMS2D_SETTINGS: Tuple[Tuple[str, int], ...] = (("DDIM", 200), ("DPMSolverMultistep", 25))
QUICK_SETTINGS: Tuple[Tuple[str, int], ...] = (("DDIM", 20), ("DPMSolverMultistep", 10))


@dataclass
class Seams2DRow:
    """One row: a method's (or the reference's) per-canvas statistics; ``int_kl`` alone for ``one window``."""

    name: str
    stats: Optional[M.GridSeamStatistics] = None
    int_kl: Optional[np.ndarray] = None
    seconds: float = 0.0


@dataclass
class Seams2DResult:
    rows: List[Seams2DRow]
    layout: Any
    settings: Dict[str, Any]
    not_applicable: Dict[str, str] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    example: Dict[str, np.ndarray] = field(default_factory=dict)  # row -> one decoded canvas (H, W, 3) in [0, 1]
    example_prompt: str = ""


def _one_window_row(pipe, model, plan, cw, tiles: int, steps: int, guidance_scale: float, probe: int, seed: int,
                    min_eigenvalue: float) -> Seams2DRow:
    """The pipeline's own tiles, ``tiles`` per canvas; interior probes centred, pooled per sample."""
    t0 = time.perf_counter()
    singles = []
    for i, (p, c) in enumerate(plan):
        out = pipe(p, num_inference_steps=steps, guidance_scale=guidance_scale, num_images_per_prompt=c * tiles,
                   generator=torch.Generator().manual_seed(seed + 104729 + i), output_type="latent").images
        singles.append(out.cpu().reshape(c, tiles, *out.shape[1:]))
    singles = torch.cat(singles).transpose(0, 1).reshape(-1, *singles[0].shape[2:])  # tile-major
    s = (model.window - probe) // 2
    patches = singles[..., s:s + probe, s:s + probe]
    sq, _ = M.whitened_band_variances_2d(model, patches, cw.to(torch.float64).repeat(tiles, 1),
                                         min_eigenvalue=min_eigenvalue)
    sq = np.nanmean(sq.numpy().reshape(tiles, cw.shape[0], -1), axis=0)
    return Seams2DRow("one window", int_kl=np.nanmean(M.gaussian_kl_to_unit(sq), -1),
                      seconds=time.perf_counter() - t0)


def evaluate_seams2d(methods: Sequence[str] = GRID_METHODS, samples: int = 8, tiles: int = 3, steps: int = 25,
                     scheduler: Optional[str] = None, prompts: Optional[Sequence[str]] = None, loop: bool = False,
                     overlap: float = 0.25, seed: int = 0, window: int = 32, min_eigenvalue: float = 1.0,
                     guidance_scale: float = 1.0, pipe: Any = None, device: Any = None, log: Any = None
                     ) -> Seams2DResult:
    """Run every grid method and the reference rows on ``tiles x tiles`` canvases; see the module docstring.

    ``loop``: a torus (both axes loop); ``scheduler``: a diffusers scheduler class name (default the
    pipeline's DPM-Solver++); ``window``: the tile side in cells; ``prompts``: the model's classes,
    round-robin over ``samples`` (default all). Sample ``i`` of every method starts from the same
    seed, so rows are paired on the same noise. ``device``: where the pipeline samples (default where
    it is); the noise is drawn and the statistics computed on the CPU.
    """
    from .evaluate import prompts_for, ready_pipeline
    from .sampler import JointDiffusion
    from .texture.pipeline2d import make_texture2d_pipeline
    parsed = [(spec, parse_method_spec(spec)) for spec in methods]
    if not parsed:
        raise ValueError(f"--methods needs at least one method, e.g. {','.join(GRID_METHODS)}")
    check_int_range("samples", samples, 2)
    check_int_range("tiles", tiles, 2, 16)
    if pipe is None:
        pipe = make_texture2d_pipeline(window=window)
    model = ready_pipeline(pipe, scheduler, device)
    prompts = list(prompts) if prompts else list(model.class_names)
    model.encode_prompt(prompts)  # unknown names fail before any sampling
    plan = prompts_for(prompts, samples)
    cw = model.encode_prompt([p for p, c in plan for _ in range(c)])  # sample i's class weights
    ordered = [p for p, c in plan for _ in range(c)]
    # The pictured canvas: a smooth class where there is one (seams show on smooth textures).
    shown = next((ordered.index(p) for p in ("marble", "clouds", "waves") if p in ordered), 0)
    jd = JointDiffusion(pipe)
    stride = model.window - int(round(overlap * model.window))
    side = tiles * stride if loop else model.window + (tiles - 1) * stride
    canvas = dict(width=side, height=side, loop="both" if loop else False, overlap=overlap,
                  guidance_scale=guidance_scale)
    layout = jd.layout_for(method="safa", width=side, height=side, loop=canvas["loop"], overlap=overlap)
    say = log or (lambda msg: None)
    rows: List[Seams2DRow] = []
    example: Dict[str, np.ndarray] = {}

    # Reference: exact canvases (one component each; on a torus, the process wrapped on both axes).
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed + 7919)
    true = model.sample(model.sample_components(cw, generator=gen), layout.rows.length, layout.cols.length,
                        generator=gen, periodic=loop)
    stats = M.grid_seam_statistics(model, true, layout, cw, min_eigenvalue=min_eigenvalue)
    rows.append(Seams2DRow("true", stats, seconds=time.perf_counter() - t0))
    example["true"] = _decoded(pipe, true[shown:shown + 1])
    rows.append(_one_window_row(pipe, model, plan, cw, layout.num_views, steps, guidance_scale, stats.probe, seed,
                                min_eigenvalue))
    say(f"reference rows done ({rows[-1].seconds:.1f} s for the single tiles)")

    not_applicable: Dict[str, str] = {}
    notes: List[str] = []
    for spec, method in parsed:
        why = _not_applicable(method, jd.adapter)
        if why is not None:
            not_applicable[spec] = why
            say(f"{spec}: not applicable ({why})")
            continue
        if isinstance(method, SyncDiffusion) and method.loss is None:
            method = dataclasses.replace(method, loss=style_distance)
            notes.append(f"{spec}: loss style_distance (colour mean and spread at 1-8 cell scales; weight-free: "
                         f"LPIPS is for natural images and needs VGG weights this machine lacks)")
        t0 = time.perf_counter()
        latents = []
        for i, (p, c) in enumerate(plan):
            out = jd(p, method=method, num_inference_steps=steps, num_images_per_prompt=c, output_type="latent",
                     generator=torch.Generator().manual_seed(seed + i), **canvas)
            latents.append(out.latent.cpu())
        latent = torch.cat(latents)
        elapsed = time.perf_counter() - t0
        rows.append(Seams2DRow(spec, M.grid_seam_statistics(model, latent, layout, cw, min_eigenvalue=min_eigenvalue),
                               seconds=elapsed))
        example[spec] = _decoded(pipe, latent[shown:shown + 1])
        say(f"{spec}: {elapsed:.1f} s")

    settings = dict(samples=samples, tiles=tiles, side=side, steps=steps, scheduler=type(pipe.scheduler).__name__,
                    guidance_scale=guidance_scale,
                    prompts=prompts, loop=loop, overlap=overlap, overlap_cells=layout.cols.overlap, seed=seed,
                    window=model.window, min_eigenvalue=min_eigenvalue, probe=rows[0].stats.probe,
                    layout=jd.describe_layout(layout),
                    wrapped_error=model.periodic_error(side, side) if loop else 0.0)
    return Seams2DResult(rows, layout, settings, not_applicable, example=example, example_prompt=ordered[shown],
                         notes=notes)


def _not_applicable(method: Method, adapter: Any) -> Optional[str]:
    """Why ``method`` cannot run on the texture model's grids (None: it can)."""
    if method.grid_refusal is not None:
        return f"no grid form ({method.grid_refusal})"
    try:
        method.check_pipeline(adapter)
    except NotApplicable as exc:  # MAD: the texture model has no attention to merge
        return str(exc)
    return None


def _decoded(pipe, latent: torch.Tensor) -> np.ndarray:
    """One canvas as the pipeline decodes it: ``(H, W, 3)`` in [0, 1]."""
    with torch.no_grad():
        return (pipe.decode(latent.float()) / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()


# -- reporting ----------------------------------------------------------------------------------
def _kl(x: Optional[np.ndarray]) -> str:
    if x is None:
        return "-"
    m, h = M.mean_ci(np.asarray(x) * 1e3)
    return f"{m:.1f}" if math.isnan(h) else f"{m:.1f}±{h:.1f}"


def _hf(pair: Optional[Tuple[np.ndarray, np.ndarray]]) -> str:
    if pair is None:
        return "-"
    m, lo, hi = M.log_ratio_ci(*pair)
    return f"{m:.3f} [{lo:.3f},{hi:.3f}]"


def _agree(x: Optional[np.ndarray]) -> str:
    if x is None:
        return "-"
    p, lo, hi = M.proportion_ci(int(np.sum(x)), len(x))
    return f"{p:.2f} [{lo:.2f},{hi:.2f}]"


def settings_line(res: Seams2DResult) -> str:
    s = res.settings
    guidance = "" if s.get("guidance_scale", 1.0) == 1.0 else f"guidance {s['guidance_scale']:g}, "
    return (f"2-D seams vs the exact 2-D texture model: {s['samples']} canvases/row of {s['side']} x {s['side']} cells "
            f"({'torus' if s['loop'] else 'open'}; {s['layout']}), {s['steps']} steps {s['scheduler']}, {guidance}"
            f"probes {s['probe']} x {s['probe']}, prompts {','.join(s['prompts'])}, seeds from {s['seed']}")


def format_seams2d_table(res: Seams2DResult) -> str:
    """The table (text): settings line, one row per method and reference, the columns' key."""
    loop = bool(res.settings["loop"])
    head = ["method", "HF v", "HF h", "HF c", "KL v", "KL h", "KL c", "KL int", "corner-int", "tiles agree"]
    if loop:
        head += ["HF wrap", "KL wrap", "wrap-seam"]
    table = []
    for r in res.rows:
        st = r.stats
        if st is None:
            table.append([r.name, "-", "-", "-", "-", "-", "-", _kl(r.int_kl), "-", "-"] + (["-"] * 3 if loop else []))
            continue
        cells = [r.name, _hf(st.hf["vertical"]), _hf(st.hf["horizontal"]), _hf(st.hf["corner"]),
                 _kl(st.kl["vertical"]), _kl(st.kl["horizontal"]), _kl(st.kl["corner"]), _kl(st.kl["interior"]),
                 _kl(st.kl["corner"] - st.kl["interior"]), _agree(st.consistent)]
        if loop:
            cells += [_hf(st.hf.get("wrap")), _kl(st.kl.get("wrap")), _kl(st.wrap_excess)]
        table.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *table)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [settings_line(res), fmt.format(*head), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*c).rstrip() for c in table]
    lines += [f"{name}: not applicable: {why}" for name, why in res.not_applicable.items()]
    lines += [f"note: {note}" for note in res.notes]
    lines.append(textwrap.fill(
        "HF: seam cells' / interior cells' high-frequency energy across the seam (v: vertical seams, h: horizontal, "
        "c: corners; 1 = as the interior, < 1 = smoothed; geometric mean [95% interval]); KL x1e3: whitened probe "
        "patches to the exact model (0 = exact), mean ± 95% interval over canvases; corner-int: paired corner minus "
        "interior KL; tiles agree: canvases whose tiles share one sub-style (Wilson interval)"
        + ("; wrap: the torus's wrap-around seams; wrap-seam: their KL minus the other seams', one probe each"
           if loop else "") + ".", 110))
    if res.settings.get("wrapped_error", 0.0) > 1e-4:
        lines.append(f"note: a window of the torus 'true' canvas differs from the model's by up to "
                     f"{res.settings['wrapped_error']:.2g} in covariance (k(0) = 1): the wrapped kernels' tails.")
    return "\n".join(lines)


# The canvases pictured beside the first open and the first torus result (PNG size stays small).
PICTURED = ("true", "safa", "multidiffusion", "multidiffusion_gaussian")


def seams2d_figure(results: Sequence[Seams2DResult]) -> "Figure":
    """One row of panels per result: HF kept across each seam kind, seam minus interior KL; beside the
    first open and the first torus result, one decoded canvas of :data:`PICTURED` rows with its
    tile boundaries."""
    from .plots import new_figure
    kinds = ("vertical", "horizontal", "corner", "wrap")
    fig = new_figure(16.0, 4.6 * len(results))
    grid = fig.add_gridspec(len(results), 3, width_ratios=[1.0, 1.0, 1.6])
    pictured = {next((i for i, r in enumerate(results) if bool(r.settings["loop"]) == loop), -1) for loop in (False, True)}
    for i, res in enumerate(results):
        rows = [r for r in res.rows if r.stats is not None]
        hf_ax, kl_ax = fig.add_subplot(grid[i, 0]), fig.add_subplot(grid[i, 1])
        for ax, value in ((hf_ax, 1.0), (kl_ax, 0.0)):
            ax.axhline(value, color="0.5", lw=1.0, ls="--")
        for j, kind in enumerate(k for k in kinds if k in rows[0].stats.hf):
            for x, r in enumerate(rows):
                m, lo, hi = M.log_ratio_ci(*r.stats.hf[kind])
                hf_ax.errorbar([x + 0.18 * j], [m], yerr=[[m - lo], [hi - m]], fmt="os^D"[j], color=f"C{j}",
                               capsize=3, label=kind if x == 0 else None)
                d, h = M.mean_ci((r.stats.kl[kind] - r.stats.kl["interior"]) * 1e3)
                kl_ax.errorbar([x + 0.18 * j], [d], yerr=[[h], [h]], fmt="os^D"[j], color=f"C{j}", capsize=3,
                               label=kind if x == 0 else None)
        for ax in (hf_ax, kl_ax):
            ax.set_xticks(range(len(rows)), [r.name for r in rows], rotation=25, ha="right", fontsize="small")
            ax.legend(fontsize="x-small")
        hf_ax.set_ylabel("HF energy, seam / interior")
        kl_ax.set_ylabel("seam KL − interior KL (x1e3)")
        s = res.settings
        hf_ax.set_title(f"{s['scheduler']} {s['steps']} steps, {'torus' if s['loop'] else 'open'}", fontsize="medium")
        kl_ax.set_title("seam excess over the interior (paired)", fontsize="medium")
        if i in pictured:
            _canvases(fig, grid[i, 2], res)
    return fig


def _canvases(fig, cell, res: Seams2DResult) -> None:
    """One decoded canvas per row, with the tile boundaries dashed."""
    names = [n for n in res.example if n in PICTURED] or list(res.example)[:4]
    sub = cell.subgridspec(2, math.ceil(len(names) / 2))
    for k, name in enumerate(names):
        ax = fig.add_subplot(sub[k % 2, k // 2])
        ax.imshow(res.example[name], interpolation="nearest")
        for axis, line in ((res.layout.rows, ax.axhline), (res.layout.cols, ax.axvline)):
            for v in range(axis.num_views):
                for edge in (axis.starts[v], axis.starts[v] + axis.window):
                    line(edge % axis.length - 0.5, color="white", lw=0.6, ls=":", alpha=0.6)
        ax.set_title(f"{name} ({res.example_prompt})", fontsize="x-small")
        ax.set_xticks([]), ax.set_yticks([])


def write_seams2d_plot(results: Sequence[Seams2DResult], path: str) -> None:
    """:func:`seams2d_figure` written as PNG to ``path``, atomically (72 dpi: the canvases are noise-like
    textures, which PNG compresses poorly)."""
    from .plots import save_figure
    save_figure(seams2d_figure(results), path, dpi=72)
