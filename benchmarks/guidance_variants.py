"""Guidance variants tried on the way to ``SaFaStats``: research code behind docs/guidance-research.md.

Every variant keeps the self-loop swap of the overlaps (Eq. 9) and changes how the views are
made to agree: what is taken from the reference window (its columns, its low frequencies, its
spectrum), or what the views share without one (their pooled spectrum). Each is a merge step
(``JointDiffusion(pipe, merge_step=...)``) run on the built-in texture model, and each row is
measured by ``safa evaluate``'s own code (:func:`safa.evaluate._row_from_latent`: the same
columns, reference rows, prompts and seeds), so the rows line up with ``safa evaluate``'s.

    python benchmarks/guidance_variants.py --scheduler DDIM --steps 200 --samples 24 \\
        --variants safa_snr:snr=0.05,swap_blocks:block=8,lowpass:cutoff=0.05:snr=0.05

Variants (``name:param=value:...``; the window is ``guide=`` (a fraction of the steps, as
SaFa) or ``snr=`` (the steps whose noisy latent's signal-to-noise ratio is at most this)):

``safa_snr``        SaFa's reference swap (Eq. 10) with the window by noise level.
``swap_blocks``     the reference swapped into the middles in blocks of ``block`` columns
                    (first block kept) instead of alternate columns.
``lowpass``         the middles take the reference's temporal low-pass below ``cutoff``
                    (cycles per column, raised-cosine roll-off to twice that), keep their own rest.
``ref_noise``       no guidance during sampling; the views' middles start from the
                    reference's initial noise (``band=all``) or its low-pass (``band=low``).
``ref_spectrum``    every view's power per (row, temporal frequency) set to the reference's
                    (``basis=rows``: per channel x bin; ``pca``: per principal component).
``consensus``       no reference: every view's power per (row, frequency) set to the mean over
                    the views (``bands=0``: every FFT bin; ``N``: N log-spaced bands);
                    ``reconcile`` = how the overlaps are made to agree again: ``tri``
                    (triangular mean), ``vp`` (variance-preserving crossfade) or ``swap``
                    (the guided views go through the self-loop swap); ``init=1`` also on the
                    initial noise.

``--json PATH`` appends every row's per-sample statistics (for ``--plot``);
``--plot PATH --json A,B`` draws the figure of the page from such files;
``--commit`` prints, step by step, how far single windows of the pipeline have settled on a
sub-style (the model's exact posterior over its components): where a guidance has to act.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from safa import metrics as M
from safa import evaluate as E
from safa.methods import SaFa, SaFaSelfLoop, SaFaStats, parse_spec_value
from safa.sampler import JointDiffusion
from safa.schedulers import step_snr
from safa.texture import make_texture_pipeline
from safa_kernels import ViewLayout, gather, stitch, sync_

Guide = Callable[[torch.Tensor, Optional[torch.Tensor], ViewLayout, int], None]


# -- building blocks ------------------------------------------------------------------------
def middles(layout: ViewLayout) -> List[Tuple[int, int]]:
    return [layout.middle(v) for v in range(layout.num_views)]


def lowpass(x: torch.Tensor, cutoff: float, dim: int) -> torch.Tensor:
    """Temporal low-pass along ``dim`` (FFT of the window): 1 below ``cutoff``, linear to 0 at 2 x ``cutoff``."""
    n = x.shape[dim]
    f = torch.fft.rfftfreq(n, dtype=torch.float64)
    h = torch.clamp((2 * cutoff - f) / cutoff, 0, 1)
    shape = [1] * x.dim()
    shape[dim] = -1
    return torch.fft.irfft(torch.fft.rfft(x.double(), dim=dim) * h.reshape(shape), n=n, dim=dim).to(x.dtype)


def band_weights(n: int, bands: int) -> torch.Tensor:
    """``(bands, n // 2 + 1)``: FFT bins grouped into log-spaced bands (hat functions; 0 = every bin its own)."""
    k = n // 2 + 1
    if bands == 0:
        return torch.eye(k, dtype=torch.float64)
    f = torch.fft.rfftfreq(n, dtype=torch.float64)
    lf = torch.log2(torch.clamp(f, min=1.0 / n))
    centres = torch.linspace(math.log2(1.0 / n), math.log2(0.5), bands, dtype=torch.float64)
    w = torch.clamp(1 - (lf[None] - centres[:, None]).abs() / (centres[1] - centres[0]), 0, 1)
    w[0, lf <= centres[0]] = 1.0
    w[-1, lf >= centres[-1]] = 1.0
    return w / w.sum(0, keepdim=True).clamp_min(1e-12)


def spectrum_match(views: torch.Tensor, target: Callable[[torch.Tensor], torch.Tensor], dim: int,
                   bands: int, basis: str, reference: Optional[torch.Tensor] = None) -> None:
    """Set every view's power per (row, frequency band) to ``target(power)``, phases kept, in place.

    ``basis="pca"`` works per principal component of the rows (pooled over the views, and the
    reference when given) instead of per row.
    """
    x = views.double().movedim(dim, -1)                       # (n, B, C, F, T)
    n, b, t = x.shape[0], x.shape[1], x.shape[-1]
    rows = x.reshape(n, b, -1, t)                              # (n, B, R, T)
    ref_rows = None if reference is None else reference.double().movedim(dim, -1).reshape(1, b, -1, t)
    if basis == "pca":
        pool = rows if ref_rows is None else torch.cat([rows, ref_rows])
        cov = torch.einsum("vbrt,vbst->brs", pool, pool) / (pool.shape[0] * t)
        _, u = torch.linalg.eigh(cov)                          # (B, R, R)
        rows = torch.einsum("brp,vbrt->vbpt", u, rows)
        if ref_rows is not None:
            ref_rows = torch.einsum("brp,vbrt->vbpt", u, ref_rows)
    w = band_weights(t, bands)
    spec = torch.fft.rfft(rows, dim=-1)
    power = torch.einsum("kf,...f->...k", w, spec.real ** 2 + spec.imag ** 2) / w.sum(-1)
    goal = target(power) if ref_rows is None else target(
        torch.einsum("kf,...f->...k", w, torch.fft.rfft(ref_rows, dim=-1).abs() ** 2) / w.sum(-1))
    log_gain = 0.5 * (torch.log(goal + 1e-12) - torch.log(power + 1e-12))
    gain = torch.exp(torch.einsum("kf,...k->...f", w, log_gain))
    out = torch.fft.irfft(spec * gain, n=t, dim=-1)
    if basis == "pca":
        out = torch.einsum("brp,vbpt->vbrt", u, out)
    views.copy_(out.reshape(x.shape).movedim(-1, dim).to(views.dtype))


def vp_crossfade(views: torch.Tensor, layout: ViewLayout, dim: int) -> None:
    """Triangular crossfade of every overlap, rescaled per row by the two inputs' correlation so that
    the blend keeps their energy (a plain weighted mean of two partly different versions loses some)."""
    w = layout.window
    for i, j in layout.neighbour_pairs():
        o = layout.pair_overlap(i)
        a = views[i].narrow(dim, w - o, o).double()
        c = views[j].narrow(dim, 0, o).double()
        q = torch.arange(o, dtype=torch.float64)
        wa = ((o - q) / (o + 1)).reshape([-1] + [1] * (-dim - 1))
        wc = 1 - wa
        rho = (a * c).sum(dim, keepdim=True) / ((a * a).sum(dim, keepdim=True)
                                                * (c * c).sum(dim, keepdim=True)).sqrt().clamp_min(1e-30)
        blend = (wa * a + wc * c) / (wa ** 2 + wc ** 2 + 2 * wa * wc * rho).clamp_min(1e-12).sqrt()
        views[i].narrow(dim, w - o, o).copy_(blend.to(views.dtype))
        views[j].narrow(dim, 0, o).copy_(blend.to(views.dtype))


# -- the variants -----------------------------------------------------------------------------
class Variant:
    """A variant: its window and what it does in the merge after the self-loop swap (``guide``) or
    instead of it (``before_swap``), or to the initial noise (``init``)."""

    def __init__(self, spec: str, params: Dict[str, Any]) -> None:
        self.spec, self.params = spec, params
        self.uses_reference = True
        self.before_swap = False
        self.reconcile = None
        self.init: Optional[Callable[[torch.Tensor, torch.Tensor, ViewLayout, int], None]] = None
        self.guide: Optional[Guide] = None

    def steps(self, scheduler: Any, num_steps: int) -> int:
        if "snr" in self.params:  # the noise-level window of SaFaStats
            return SaFaStats(snr=float(self.params["snr"])).reference_steps(num_steps, scheduler)
        return int(math.floor(float(self.params.get("guide", 0.3)) * num_steps + 0.5))


def make_variant(spec: str) -> Variant:
    name, *items = spec.split(":")
    params = {k: parse_spec_value(v) for k, _, v in (item.partition("=") for item in items)}
    var = Variant(spec, params)
    if name == "safa_snr":
        def guide(views, ref, layout, dim):
            sync_(views, layout, dim, "swap", 1, reference=ref, reference_axis=dim)
        var.guide = guide
    elif name == "swap_blocks":
        block = int(params.get("block", 8))

        def guide(views, ref, layout, dim):
            for v, (lo, hi) in enumerate(middles(layout)):
                take = torch.arange(lo, hi)[(torch.arange(hi - lo) // block) % 2 == 1]
                views[v].index_copy_(dim, take, ref.index_select(dim, take))
        var.guide = guide
    elif name == "lowpass":
        cutoff = float(params.get("cutoff", 0.05))

        def guide(views, ref, layout, dim):
            lr, lv = lowpass(ref, cutoff, dim), lowpass(views, cutoff, dim)
            for v, (lo, hi) in enumerate(middles(layout)):
                views[v].narrow(dim, lo, hi - lo).add_(lr.narrow(dim, lo, hi - lo) - lv[v].narrow(dim, lo, hi - lo))
        var.guide = guide
    elif name == "ref_noise":
        var.uses_reference = False
        band, cutoff = params.get("band", "all"), float(params.get("cutoff", 0.05))

        def init(views, ref_noise, layout, dim):
            src = ref_noise if band == "all" else None
            for v, (lo, hi) in enumerate(middles(layout)):
                seg = views[v].narrow(dim, lo, hi - lo)
                if band == "all":
                    seg.copy_(src.narrow(dim, lo, hi - lo))
                else:
                    low_ref, low_view = lowpass(ref_noise, cutoff, dim), lowpass(views[v], cutoff, dim)
                    seg.add_(low_ref.narrow(dim, lo, hi - lo) - low_view.narrow(dim, lo, hi - lo))
        var.init = init
    elif name in ("ref_spectrum", "consensus"):
        bands, basis = int(params.get("bands", 0)), str(params.get("basis", "rows"))
        var.reconcile = str(params.get("reconcile", "vp" if name == "ref_spectrum" else "tri"))
        var.before_swap = var.reconcile == "swap"
        var.uses_reference = name == "ref_spectrum"

        def guide(views, ref, layout, dim):
            if ref is None:
                spectrum_match(views, lambda p: p.mean(0, keepdim=True), dim, bands, basis)
            else:
                spectrum_match(views, lambda p: p, dim, bands, basis, reference=ref)
        var.guide = guide
        if name == "consensus" and int(params.get("init", 0)):
            var.init = lambda views, ref_noise, layout, dim: guide(views, None, layout, dim)
    else:
        raise ValueError(f"unknown variant {name!r} in {spec!r}")
    return var


def run_variant(var: Variant, pipe: Any, plan: List[Tuple[str, int]], seconds: float, steps: int,
                loop: bool, overlap: float, seed: int) -> Tuple[torch.Tensor, ViewLayout, int]:
    """The variant's long latents for every (prompt, count) of ``plan`` (seeds as ``safa evaluate``)."""
    state = {"i": 0}
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    guided = var.steps(scheduler, steps) if var.guide is not None else 0

    def merge(views, reference, layout, dim, mode, swap_interval, reference_axis):
        active = var.guide is not None and state["i"] < guided and (reference is not None or not var.uses_reference)
        if active and var.before_swap:
            var.guide(views, reference, layout, dim)
        sync_(views, layout, dim, mode, swap_interval)
        if active and not var.before_swap:
            var.guide(views, reference, layout, dim)
            if var.reconcile == "tri":
                sync_(views, layout, dim, "triangular")
            elif var.reconcile == "vp":
                vp_crossfade(views, layout, dim)
        state["i"] += 1

    jd = JointDiffusion(pipe, merge_step=merge)
    method = SaFa(guide=guided / steps) if guided and var.uses_reference else SaFaSelfLoop()
    layout = jd.layout_for(seconds=seconds, loop=loop, overlap=overlap)
    dim = jd.adapter.long_dim
    latents = []
    for k, (prompt, count) in enumerate(plan):
        state["i"] = 0
        gen = torch.Generator().manual_seed(seed + k)
        start = None
        if var.init is not None:  # draw J_T and X^0_T as the sampler would, then edit the views of J_T
            shape = jd.adapter.latent_shape(count, layout.length, None)
            j_t = jd.adapter.init_noise(shape, gen)
            ref_noise = jd.adapter.init_noise(jd.adapter.latent_shape(count, layout.window, None), gen)
            views = gather(j_t, layout, dim)
            var.init(views, ref_noise, layout, dim)
            if var.params.get("reconcile", "tri") == "vp":
                vp_crossfade(views, layout, dim)
            else:
                sync_(views, layout, dim, "triangular")
            start = stitch(views, layout, dim, "swap") / getattr(pipe.scheduler, "init_noise_sigma", 1.0)
        out = jd(prompt, seconds=seconds, method=method, loop=loop, overlap=overlap, num_inference_steps=steps,
                 guidance_scale=1.0, num_waveforms_per_prompt=count, output_type="latent", generator=gen,
                 latents=start)
        latents.append(out.latent)
    return torch.cat(latents), layout, guided


# -- reporting ----------------------------------------------------------------------------------
def _row_json(row: E.RowStats, settings: Dict[str, Any], guided: Optional[int]) -> Dict[str, Any]:
    d = {"name": row.name, "settings": {k: v for k, v in settings.items() if k != "prompts"}, "guided_steps": guided}
    for key in ("int_kl", "seam_kl", "wrap_kl", "consistent", "substyle", "repeat", "wrap_excess"):
        v = getattr(row, key)
        d[key] = None if v is None else np.asarray(v, dtype=float).tolist()
    return d


def plot(paths: List[str], out: str) -> None:
    """The page's figure: for every scheduler, each row's consistency against its interior KL (relative
    to the ``one window`` row) and against its repetition, 95% intervals."""
    from safa.plots import new_figure, save_figure
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                d = json.loads(line)
                key = f"{d['settings']['scheduler'].removesuffix('Scheduler')} {d['settings']['steps']}"
                groups.setdefault(key, []).append(d)
    fig = new_figure(13.0, 4.6 * len(groups))
    axes = fig.subplots(len(groups), 2, squeeze=False)
    for (key, rows), (ax_kl, ax_rep) in zip(sorted(groups.items()), axes):
        one = next((r for r in rows if r["name"] == "one window"), None)
        base = np.mean(one["int_kl"]) if one else 1.0
        for k, r in enumerate(r for r in rows if r["consistent"] is not None and r["name"] not in ("true",)):
            p, lo, hi = M.proportion_ci(int(np.sum(r["consistent"])), len(r["consistent"]))
            sub = np.bincount(np.asarray(r["substyle"], dtype=int), minlength=3)
            collapsed = sub.max() >= 0.9 * sub.sum()
            color = "C3" if collapsed else f"C{k % 10 if k % 10 != 3 else 9}"
            for ax, y in ((ax_kl, np.mean(r["int_kl"]) / base), (ax_rep, np.mean(r["repeat"]))):
                ax.errorbar([p], [y], xerr=[[p - lo], [hi - p]], fmt="o" if not collapsed else "x", color=color,
                            capsize=3, ms=6)
                ax.annotate(r["name"], (p, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax_kl.axhline(1.2, color="0.5", ls="--", lw=1)
        ax_kl.axvline(0.9, color="0.5", ls="--", lw=1)
        ax_kl.set_yscale("log")
        ax_kl.set_xlabel("all views consistent (fraction of samples, 95% CI)")
        ax_kl.set_ylabel("interior KL / one window's")
        ax_kl.set_title(f"{key}: consistency vs interior (x = one sub-style for >= 90% of samples)", fontsize="medium")
        ax_rep.axvline(0.9, color="0.5", ls="--", lw=1)
        ax_rep.set_xlabel("all views consistent (fraction of samples, 95% CI)")
        ax_rep.set_ylabel("repeat: correlation of the views' middles")
        ax_rep.set_title(f"{key}: consistency vs repetition", fontsize="medium")
    save_figure(fig, out)


def commit_table(pipe: Any, steps: int, prompts: List[str], windows: int, seed: int) -> str:
    """Per step: the signal-to-noise ratio and, over ``windows`` single windows per prompt sampled as the
    pipeline samples them, the mean posterior probability of the most likely sub-style and the fraction
    of windows above 0.99 (the model's exact posterior over its components at that noise level)."""
    model, sched = pipe.model, pipe.scheduler
    model.bind_scheduler(sched)
    tops: Dict[int, List[torch.Tensor]] = {}
    for k, prompt in enumerate(prompts):
        cw = model.encode_prompt([prompt] * windows)
        sched.set_timesteps(steps)
        x = torch.randn(windows, model.channels, model.window, model.freq_bins,
                        generator=torch.Generator().manual_seed(seed + k)) * sched.init_noise_sigma
        for i, t in enumerate(sched.timesteps):
            xin = sched.scale_model_input(x, t)
            tops.setdefault(i, []).append(model.responsibilities(xin.double(), cw, model.alpha_bar(t, windows))
                                          .max(-1).values)
            x = sched.step(model(xin, t, cw.float())[0], t, x).prev_sample
    lines = [f"{type(sched).__name__}, {steps} steps, {windows} windows per prompt ({','.join(prompts)})",
             "step  timestep  snr       mean max posterior  committed (> 0.99)"]
    for i in sorted(tops):
        top = torch.cat(tops[i])
        lines.append(f"{i:4d}  {int(sched.timesteps[i]):8d}  {step_snr(sched, i):.2e}  {top.mean():18.3f}  "
                     f"{(top > 0.99).double().mean():.2f}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="", help="comma-separated variant specs (see above)")
    p.add_argument("--methods", default="", help="also these safa evaluate methods (specs), e.g. safa,safa_stats")
    p.add_argument("--samples", type=int, default=24)
    p.add_argument("--seconds", type=float, default=40.0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--scheduler", default=None, help="e.g. DDIM (default: the built-in model's DPM-Solver++)")
    p.add_argument("--prompts", default="rain,wind")
    p.add_argument("--overlap", type=float, default=0.2)
    p.add_argument("--open", action="store_true", help="open layout (default: loop)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="append per-sample rows here (with --plot: files to read, comma-separated)")
    p.add_argument("--plot", default=None, help="draw the figure from --json files into this PNG and exit")
    p.add_argument("--commit", action="store_true", help="print where single windows settle on a sub-style, exit")
    args = p.parse_args(argv)
    if args.plot:
        plot([s for s in (args.json or "").split(",") if s], args.plot)
        print(f"wrote {args.plot}")
        return 0
    torch.set_num_threads(1)
    if args.commit:
        pipe = make_texture_pipeline()
        if args.scheduler:
            from safa.commands.common import set_scheduler
            set_scheduler(pipe, args.scheduler)
        pipe.set_progress_bar_config(disable=True)
        print(commit_table(pipe, args.steps, [s.strip() for s in args.prompts.split(",") if s.strip()], 8, args.seed))
        return 0
    loop = not args.open
    variants = [make_variant(s) for s in args.variants.split(",") if s.strip()]
    prompts = [s.strip() for s in args.prompts.split(",") if s.strip()]
    methods = [s for s in args.methods.split(",") if s.strip()]
    res = E.evaluate(methods, samples=args.samples, seconds=args.seconds, steps=args.steps, prompts=prompts,
                     loop=loop, overlap=args.overlap, seed=args.seed, scheduler=args.scheduler,
                     log=lambda m: print(m, file=sys.stderr))
    pipe = make_texture_pipeline()
    if args.scheduler:
        from safa.commands.common import set_scheduler
        set_scheduler(pipe, args.scheduler)
    pipe.set_progress_bar_config(disable=True)
    model = pipe.model
    plan = E.prompts_for(prompts, args.samples)
    cw = model.encode_prompt([pr for pr, c in plan for _ in range(c)])
    guided_of: Dict[str, Optional[int]] = {}
    for var in variants:
        t0 = time.perf_counter()
        latent, layout, guided = run_variant(var, pipe, plan, args.seconds, args.steps, loop, args.overlap, args.seed)
        res.rows.append(E._row_from_latent(var.spec, model, latent, layout, cw, 1.0, time.perf_counter() - t0))
        guided_of[var.spec] = guided
        print(f"{var.spec}: {time.perf_counter() - t0:.1f} s, {guided} guided steps", file=sys.stderr)
    res.notes = []
    print(E.format_table(res))
    if args.json:
        with open(args.json, "a") as f:
            for row in res.rows:
                f.write(json.dumps(_row_json(row, res.settings, guided_of.get(row.name))) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
