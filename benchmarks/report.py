"""The result tables of benchmarks/README.md, regenerated from benchmarks/results/*.json.

    python benchmarks/report.py              # rewrite the generated blocks (and tuning.py's table)
    python benchmarks/report.py --check      # exit 1 if any generated block is out of date
    python benchmarks/report.py --show FILE  # print every section of one results file

benchmarks/README.md holds one generated block per section (``ops``, ``steps``,
``panorama``, ``methods``, ``fullsize``, ``audio``, ``long``, ``distributed``, ``gpu_checks``) between ``<!-- BEGIN GENERATED section -->`` and
``<!-- END GENERATED section -->`` lines; everything outside the blocks is prose and stays
as written. Each block has one part per results file (machine) that holds the section,
headed by the machine, the mode, the date, the threads and the command that produced it,
so every number in a table traces back to a file and a command. The measured default
backends of ``safa_kernels/tuning.py`` (between its ``# BEGIN MEASURED`` / ``# END
MEASURED`` lines) are derived here too, from the CUDA op records.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
README = HERE / "README.md"
TUNING = ROOT / "safa_kernels" / "tuning.py"
RESULTS = HERE / "results"

KERNELS = ("cuda", "triton", "cpp")
IMPL_ORDER = ("cuda", "triton", "cpp", "cpp op", "cpp op, one view", "cpp op, interval 64", "reference", "naive")
OP_ORDER = ("gather", "stitch swap", "stitch mean", "sync_ swap", "sync_ swap+ref", "sync_ mean")
OP_FAMILY = {"gather": "gather", "stitch swap": "stitch", "stitch mean": "stitch", "sync_ swap": "sync",
             "sync_ swap+ref": "sync", "sync_ mean": "sync"}


# -- helpers -----------------------------------------------------------------------------------
def table(head: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds: float, digits: int = 3) -> str:
    return f"{seconds * 1e3:.{digits}f}"


def pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _case_key(name: str) -> Tuple[str, float]:
    """Sort audio cases by length (seconds before minutes), then the rest by name."""
    m = re.match(r"audio ([\d.]+) (s|min)$", name)
    if m:
        return ("a", float(m.group(1)) * (60 if m.group(2) == "min" else 1))
    return ("b", 0.0) if not name else ("b", float(len(name)))


def iqr(stats: Dict[str, float]) -> float:
    """The interquartile range of a recorded Stats (``iqr``; records made before the harness
    used torch.utils.benchmark hold the quartiles ``q1`` / ``q3`` instead)."""
    return stats["iqr"] if "iqr" in stats else stats["q3"] - stats["q1"]


def _spread(stats: Dict[str, float]) -> str:
    return f"{100 * iqr(stats) / stats['median']:.0f}%"


def geomean(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


# -- ops -----------------------------------------------------------------------------------------
def copy_floor(records: List[Dict[str, Any]]) -> Dict[Tuple[str, int], float]:
    """(device, bytes) -> median seconds of copy_ moving those bytes."""
    return {(r["device"], r["bytes"]): r["stats"]["median"] for r in records if r["op"] == "copy_"}


def op_rows(records: List[Dict[str, Any]]) -> Dict[Tuple[str, str, str], Dict[str, Dict[str, Any]]]:
    """(device, op, case) -> impl -> record, for the merge ops."""
    rows: Dict[Tuple[str, str, str], Dict[str, Dict[str, Any]]] = defaultdict(dict)
    for r in records:
        if r["op"] in OP_FAMILY:
            rows[r["device"], r["op"], r["case"]][r["impl"]] = r
    return rows


def share_of_copy(record: Dict[str, Any], floor: Dict[Tuple[str, int], float]) -> Optional[float]:
    """The op's time at copy_ bandwidth over its time: 1.0 = as fast as copying its bytes."""
    t = floor.get((record["device"], record["bytes"]))
    return None if t is None else t / record["stats"]["median"]


def choose_backends(records: List[Dict[str, Any]]) -> Dict[str, str]:
    """Per op family, the GPU kernel backend with the smaller geometric-mean time over every
    workload where all of them ran (CUDA records only)."""
    rows = op_rows([r for r in records if r["device"] == "cuda"])
    chosen = {}
    for family in sorted(set(OP_FAMILY.values())):
        ratios: Dict[str, List[float]] = defaultdict(list)
        for (_, op, _), impls in rows.items():
            kernels = [k for k in ("cuda", "triton") if k in impls]
            if OP_FAMILY[op] != family or len(kernels) < 1:
                continue
            best = min(impls[k]["stats"]["median"] for k in kernels)
            for k in kernels:
                ratios[k].append(impls[k]["stats"]["median"] / best)
        complete = {k: v for k, v in ratios.items() if len(v) == max(len(x) for x in ratios.values())}
        if complete:
            chosen[family] = min(complete, key=lambda k: (geomean(complete[k]), KERNELS.index(k)))
    return chosen


def render_ops(section: Dict[str, Any], machine: Dict[str, Any]) -> str:
    records = section["records"]
    floor = copy_floor(records)
    rows = op_rows(records)
    out = []
    for device in sorted({k[0] for k in rows}):
        for op in OP_ORDER:
            keys = sorted((k for k in rows if k[0] == device and k[1] == op), key=lambda k: _case_key(k[2]))
            if not keys:
                continue
            impls = [i for i in IMPL_ORDER if any(i in rows[k] for k in keys)]
            kernels = [i for i in impls if i not in ("reference", "naive")]
            head = ["case", "views", "MB moved", "copy_ ms"] + [f"{i} ms (% of copy_)" for i in impls]
            head += [f"{k} vs naive" for k in kernels]
            body = []
            for key in keys:
                entry = rows[key]
                first = next(iter(entry.values()))
                t_floor = floor.get((device, first["bytes"]))
                cells = [key[2], first.get("views", "-"), f"{first['bytes'] / 1e6:.2f}",
                         ms(t_floor) if t_floor else "-"]
                for i in impls:
                    r = entry.get(i)
                    cells.append(f"{ms(r['stats']['median'])} ({pct(share_of_copy(r, floor))})" if r else "-")
                for k in kernels:
                    ok = k in entry and "naive" in entry
                    cells.append(f"{entry['naive']['stats']['median'] / entry[k]['stats']['median']:.1f}x"
                                 if ok else "-")
                body.append(cells)
            out += [f"**{op}** ({device})", "", table(head, body), ""]
    overhead = [r for r in records if r["op"] == "overhead"]
    if overhead:
        body = [[r["device"], r["impl"], "reference swap (128 rows)" if r["reference"] else "nothing to do (empty plan)",
                 f"{r['stats']['median'] * 1e6:.1f}", _spread(r['stats'])]
                for r in sorted(overhead, key=lambda r: (r["device"], r["reference"], r["impl"]))]
        out += ["**Per-call overhead**, 10 s of AudioLDM latent (one view)", "",
                table(["device", "caller (backend)", "sync_ plan", "median us", "IQR / median"], body), ""]
    out += bars(records, floor) + stitch_diagnosis(records, floor)
    chosen = choose_backends(records)
    if chosen:
        out += ["Default backend on this GPU by these numbers (written to safa_kernels/tuning.py): "
                + ", ".join(f"`{op}` -> `{b}`" for op, b in sorted(chosen.items())), ""]
    return "\n".join(out).rstrip()


def bars(records: List[Dict[str, Any]], floor: Dict[Tuple[str, int], float]) -> List[str]:
    """The targets we hold the kernels to, computed from the same records."""
    rows = op_rows(records)
    lines = []
    cpu = rows.get(("cpu", "stitch swap", "audio 10 min"), {})
    for impl in ("cpp", "cpp op"):
        if impl in cpu:
            share = share_of_copy(cpu[impl], floor)
            lines.append(f"- CPU `stitch` swap at 10 min, {impl}: {pct(share)} of copy_ "
                         f"(target >= 50%: {'met' if share is not None and share >= 0.5 else 'NOT met'})")
    for op in ("stitch swap", "sync_ swap", "sync_ swap+ref"):
        for impl in ("cuda", "triton"):
            cases = [(k[2], rows[k][impl]) for k in rows if k[0] == "cuda" and k[1] == op and impl in rows[k]
                     and _case_key(k[2])[0] == "a" and _case_key(k[2])[1] >= 60]
            if not cases:
                continue
            shares = [share_of_copy(r, floor) for _, r in cases]
            worst = min(s for s in shares if s is not None) if any(s is not None for s in shares) else None
            lines.append(f"- GPU `{op}`, {impl}, audio >= 1 min: worst {pct(worst)} of copy_ "
                         f"(target >= 80%: {'met' if worst is not None and worst >= 0.8 else 'NOT met'})")
    return (["Targets:", ""] + lines + [""]) if lines else []


# -- per-step pipeline ---------------------------------------------------------------------------
def render_steps(section: Dict[str, Any], machine: Dict[str, Any]) -> str:
    records = section["records"]
    r0 = records[0]
    cuda = bool(machine.get("gpu"))
    counts = "launches" if cuda else "ops"
    head = ["variant", "step ms (IQR/median)", "model alone ms", "step / model", "first call s",
            "profiled step ms (wall)", "model ms", "scheduler ms", "merge ms", "other ms",
            f"merge {counts}", f"other {counts}", "safa::merge_* ops"]
    body = []
    for r in records:
        s, p = r["step"], r["profile"]
        count = p["launches"] if cuda else p["ops"]
        body.append([r["variant"], f"{ms(s['median'], 2)} ({_spread(s)})",
                     ms(r["model_alone"]["median"], 2), f"{r['step_over_model']:.3f}", f"{r['first_call_s']:.1f}",
                     f"{p['step_ms']:.2f}", f"{p['ms']['model']:.2f}", f"{p['ms']['scheduler']:.2f}",
                     f"{p['ms']['merge']:.3f}", f"{p['ms']['other']:.3f}", f"{count['merge']:.0f}",
                     f"{count['other']:.0f}", f"{p['merge_ops']:.0f}"])
    return (f"{r0['views']} views of {r0['window']} columns (overlap {r0['overlap']}) + the reference window, "
            f"{r0['steps_per_call']} steps per call, {r0['rounds']} interleaved round(s); medians.\n\n"
            + table(head, body))


# -- long audio ------------------------------------------------------------------------------------
def _length(minutes: float) -> str:
    return f"{minutes:g} min" if minutes >= 1 else f"{minutes * 60:g} s"


def _vbs(vbs: Optional[int]) -> str:
    return "all" if vbs is None else str(vbs)




def render_audio(section: Dict[str, Any], machine: Dict[str, Any]) -> str:
    out = []
    sc = section.get("scaling")
    if sc:
        out += [f"**Time per step vs length** (`output_type=\"latent\"`, {sc['steps']} steps per call, "
                f"{sc['rounds']} interleaved round(s); step and model: medians over the step intervals)", ""]
        out.append(table(
            ["method", "view_batch_size", "length", "windows", "step s (IQR/median)", "step s per gen. min",
             "model s", "step / model", "call s", "call - steps s", "final stitch s"],
            [[r["method"], _vbs(r["vbs"]), _length(r["minutes"]), r["windows"],
              f"{r['step']['median']:.3f} ({_spread(r['step'])})", f"{r['step']['median'] / r['minutes']:.3f}",
              f"{r['model']['median']:.3f}", f"{r['step_over_model']:.3f}", f"{r['call_s']:.2f}",
              f"{r['outside_s']:.3f}", f"{r['tail_s']:.3f}"] for r in sc["latent"]]))
        out.append("")
        for f in sc["fits"]:
            out.append(f"- {f['method']}, view_batch_size {_vbs(f['vbs'])}: step s per generated minute at "
                       f"{_length(f['last'])} = x{f['per_min_ratio']:.2f} of {_length(f['first'])}; least squares "
                       f"step = {f['a']:.4f} + {f['b']:.4f} x minutes, largest residual {100 * f['max_rel_residual']:.1f}%")
        if sc["decode"]:
            out += ["", "**With decoding** (safa, `output_type=\"np\"`, `decode=\"tiled\"`)", ""]
            out.append(table(["length", "windows", "step s", "decode s", "decode s per gen. min", "call s"],
                             [[_length(r["minutes"]), r["windows"], f"{r['step_s']:.3f}", f"{r['decode_s']:.2f}",
                               f"{r['decode_s'] / r['minutes']:.2f}", f"{r['call_s']:.2f}"] for r in sc["decode"]]))
        out.append("")
    mem = section.get("memory")
    if mem:
        out += [f"**Peak RSS**, one fresh process per row, safa, {mem['steps']} steps (baseline process that only "
                f"builds the pipeline: {mem['baseline_mib']:.0f} MiB; extra = peak - baseline)", ""]
        out.append(table(["length", "view_batch_size", "output", "windows", "UNet rows / call", "latent MiB",
                          "state MiB", "peak RSS MiB", "extra MiB"],
                         [[_length(r["minutes"]), _vbs(r["vbs"]), r["output"], r["windows"], r["rows_per_call"],
                           f"{r['latent_mib']:.1f}", f"{r['state_mib']:.1f}", f"{r['peak_mib']:.0f}",
                           f"{r['extra_mib']:.0f}"] for r in mem["rows"]]))
        out.append("")
    plan = section.get("planning")
    if plan:
        out += ["**Per-call planning**: gather + final stitch on a new layout object, then on the same object "
                "again (median)", ""]
        out.append(table(["length", "views", "new layout ms", "memoised ms"],
                         [[_length(r["minutes"]), r["views"], ms(r["fresh_s"], 2), ms(r["memoised_s"], 2)]
                          for r in plan]))
        out.append("")
    sh = section.get("share")
    if sh:
        med, tot = sh["median_ms"], sh["median_step_ms"]
        out += [f"**Machinery share of a step** at {sh['seconds']:g} s: safa, {sh['views']} views of {sh['window']} "
                f"columns + the reference window, reference swap in every step; medians over "
                f"{len(sh['per_step'])} profiled steps", ""]
        rows = [[c, f"{med[c]:.3f}", f"{100 * med[c] / tot:.2f}%"] for c in ("model", "scheduler", "merge", "other")]
        rows += [["merge + other (machinery)", f"{med['merge'] + med['other']:.3f}",
                  f"{100 * (med['merge'] + med['other']) / tot:.2f}%"],
                 ["step (profiled)", f"{tot:.3f}", "100%"], ["step (no profiler)", f"{sh['unprofiled_step_ms']:.3f}", ""]]
        out.append(table(["part of a step", "ms", "share"], rows))
        c = sh["call"]
        out += ["", f"Median over steps of (merge + other) / step: {sh['machinery_pct']:.2f}%. The whole call "
                f"(`decode=\"tiled\"`, under the profiler):", ""]
        out.append(table(["part of the call", "ms", "share"], [
            [name, f"{c[k]:.1f}", f"{100 * c[k] / c['call_ms']:.1f}%"] for name, k in (
                ("prompt encoding", "encode_ms"), (f"{c['num_steps']} steps: model", "model_ms"),
                (f"{c['num_steps']} steps: scheduler", "scheduler_ms"),
                (f"{c['num_steps']} steps: merge + other", "merge_other_ms"),
                ("decoding (VAE + vocoder)", "decode_ms"),
                ("rest (noise, gather, final stitch, planning, to numpy)", "rest_ms"),
                ("of which gather + final stitch ops", "gather_stitch_ms"), ("call", "call_ms"))]))
        out += ["", "Largest ops called directly in the rest (ms): "
                + ", ".join(f"`{n}` {v:.1f}" for n, v in c["rest_top_ops"])]
    return "\n".join(out).rstrip()


# -- panorama ------------------------------------------------------------------------------------
def render_panorama(section: Dict[str, Any], machine: Dict[str, Any]) -> str:
    records = section["records"]
    r0, md = records[0], records[0]
    head = ["configuration", "windows", "UNet calls / step", "window evals / step", "step ms (IQR/median)",
            "model ms", "step / model", "window evals vs MD", "step speed-up vs MD (vbs 1)"]
    body = [[r["config"], r["windows"], f"{r['unet_calls_per_step']:.0f}", f"{r['window_evals_per_step']:.0f}",
             f"{ms(r['step']['median'], 1)} ({_spread(r['step'])})",
             ms(r["model"]["median"], 1), f"{r['step_over_model']:.3f}",
             f"{md['window_evals_per_step'] / r['window_evals_per_step']:.2f}x fewer",
             f"{md['step']['median'] / r['step']['median']:.2f}x"] for r in records]
    return (f"{r0['height']}x{r0['width']} px (latent {r0['height'] // 8} x {r0['width'] // 8}), tiny SD 1.x UNet, "
            f"DDIM, CFG 7.5, {r0['steps']} steps per call, {r0['rounds']} interleaved round(s); medians.\n\n"
            + table(head, body))


# -- every method side by side ---------------------------------------------------------------------
def render_methods(section: Dict[str, Any], machine: Dict[str, Any]) -> str:
    paper_seconds: Dict[str, Dict[str, float]] = section.get("paper_seconds", {})
    out: List[str] = []
    for kind in ("image", "audio"):
        records = [r for r in section["records"] if r["kind"] == kind]
        if not records:
            continue
        safa = next(r for r in records if r["method"] == "safa")
        r0 = records[0]
        pipe = "tiny SD 1.x, CFG 7.5" if kind == "image" else "tiny AudioLDM, CFG 3.5"
        head = ["method", "views", "overlap", "window evals", "denoiser calls", "time s (IQR/median)",
                "time / SaFa"] + ([f"paper {m}: time / SaFa" for m in paper_seconds] if kind == "image" else [])
        body = []
        for r in records:
            t = r["time"]
            row = [r["method"], r["views"], f"{r['overlap']:g}", f"{r['window_evals']:.0f}", r["denoiser_calls"],
                   f"{t['median']:.2f} ({_spread(t)})",
                   f"{t['median'] / safa['time']['median']:.2f}"]
            if kind == "image":
                row += [f"{paper[r['method']] / paper['safa']:.2f}" if r["method"] in paper else "-"
                        for paper in paper_seconds.values()]
            body.append(row)
        out += [f"**{kind}**: {r0['size']}, {pipe}, DDIM, {r0['steps']} steps, {r0['rounds']} interleaved "
                f"round(s), one generation per call; medians.", "", table(head, body), ""]
    return "\n".join(out).rstrip()


# -- full-size architectures -----------------------------------------------------------------------
FULLSIZE_NAMES = {"safa": "SaFa", "safa_selfloop": "SaFa*", "multidiffusion": "MD", "multidiffusion_triangular": "MD*",
                  "mad": "MAD", "syncdiffusion": "SyncDiffusion (a gradient step)",
                  "panorama vbs 1": "diffusers panorama, stride 8, view_batch_size 1",
                  "panorama vbs all": "diffusers panorama, stride 8, view_batch_size all"}


def _size(r: Dict[str, Any]) -> str:
    return f"{r['height']}x{r['width']} px" if r["kind"] == "image" else _duration(r["seconds"])


def _mib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def fullsize_table(records: List[Dict[str, Any]], paper: Dict[str, float]) -> List[str]:
    """One (model, size, threads) group: a row per configuration, ratios to SaFa's step."""
    by_name = {r["name"]: r for r in records}
    safa = by_name.get("safa")
    head = ["configuration", "overlap", "views", "window evals / step", "step s", "model s", "not the model",
            "step / SaFa", "paper / SaFa", "peak RSS MiB", "live MiB", "estimate MiB", "estimate / live"]
    body = []
    for r in records:
        steps = r["steps"]
        ratio = f"{r['step_s'] / safa['step_s']:.2f}" if safa else "-"
        paper_ratio = f"{paper[r['name']] / paper['safa']:.2f}" if r["kind"] == "image" and r["name"] in paper else "-"
        est = r.get("estimate_bytes")
        live = r.get("live_bytes", r["peak_bytes"])  # CUDA: the allocator's peak is the live peak
        body.append([FULLSIZE_NAMES.get(r["name"], r["name"]), f"{r['overlap']:.3g}", r["views"],
                     f"{r['window_evals'] / steps:g}", f"{r['step_s']:.2f}", f"{r['model_s'] / steps:.2f}",
                     f"{100 * (1 - r['model_s'] / r['call_s']):.1f}%", ratio, paper_ratio, _mib(r["peak_bytes"]),
                     _mib(live), _mib(est), f"{est / live:.2f}" if est and live > 0 else "-"])
    lines = [table(head, body), ""]
    sync, md = by_name.get("syncdiffusion"), by_name.get("multidiffusion")
    if sync and md and safa and r["kind"] == "image":
        mixed = 0.2 * sync["step_s"] + 0.8 * md["step_s"]
        lines += [f"- SyncDiffusion over a generation (gradient steps in its first 20%, MD steps after): "
                  f"0.2 x {sync['step_s']:.1f} + 0.8 x {md['step_s']:.1f} = {mixed:.1f} s per step on average, "
                  f"{mixed / safa['step_s']:.2f}x SaFa (paper: {paper['syncdiffusion'] / paper['safa']:.2f}x).", ""]
    return lines


def render_fullsize(section: Dict[str, Any], machine: Dict[str, Any]) -> str:
    paper: Dict[str, float] = section.get("paper_seconds", {})
    groups: Dict[Tuple[str, str, str, int], List[Dict[str, Any]]] = defaultdict(list)
    for r in section["records"]:
        groups[r["kind"], _size(r), r.get("dtype", "fp32"), r["threads"]].append(r)
    out = []
    for (kind, size, dtype, threads), records in sorted(groups.items(),
                                                        key=lambda g: (g[0][0] != "image", g[0][3], g[0][2] != "fp32")):
        r0 = records[0]
        weights = "full-size, random weights" if r0["weights"] == "full" else "tiny stand-ins (smoke)"
        out += [f"**{r0['model']}**, {size}, {weights} (denoiser {r0['unet_parameters'] / 1e6:.0f} M parameters), "
                f"{dtype}, CFG, DDIM, {r0['steps']} step(s) per call, one call per configuration, {threads} thread(s), "
                f"clock: {r0['clock']}", "", *fullsize_table(records, paper)]
    if paper:
        out.append("paper / SaFa: the paper's Tab. 3 times (SD 2.0, 512x3200, A100, whole generations) over its SaFa: "
                   + ", ".join(f"{name} {paper[m]:g} s" for m, name in (("safa", "SaFa"), ("multidiffusion", "MD"),
                                                                         ("mad", "MAD"), ("syncdiffusion", "SyncDiffusion"))
                               if m in paper) + ".")
    return "\n".join(out).rstrip()


# -- hours of audio ------------------------------------------------------------------------------
def _duration(seconds: float) -> str:
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g} {unit}"
    return f"{seconds:g} s"


def render_long(section: Dict[str, Any], machine: Dict[str, Any]) -> str:
    out = []
    rows = section["records"]
    if rows:
        one = next(r for r in rows if r["one_window"])
        baseline = one["peak_bytes"] - one["estimate_bytes"]  # imports, the model, the plotting libraries
        out += [f"**`safa generate`**, built-in model, `--steps {section['steps']}`, otherwise the defaults; "
                f"a fresh process per row, peak RSS from `os.wait4`. Baseline = the one-window run's peak less its "
                f"own estimate: {baseline / 2**20:.0f} MiB; estimate = `jd.estimate_memory(seconds, "
                "output_path=...)` (what the call adds to the loaded process) and its ratio to peak - baseline.", ""]
        body = []
        for r in rows:
            above = r["peak_bytes"] - baseline
            length = _duration(r["seconds"]) + (" (one window)" if r["one_window"] else "")
            body.append([length, f"{r['peak_bytes'] / 2**20:.0f}", f"{above / 2**20:.0f}",
                         f"{r['estimate_bytes'] / 2**20:.0f} ({r['estimate_bytes'] / above:.2f}x)",
                         f"{r['wall_s']:.1f}", f"{r['steps_s']:.1f}", f"{r['decode_s']:.1f}",
                         f"{r['decode_s'] / r['seconds'] * 3600:.0f}", f"{r['wav_bytes'] / 2**20:.0f}"])
        out.append(table(["length", "peak RSS MiB", "above baseline MiB", "estimate MiB", "wall s", "steps s",
                          "decode + write s", "decode s per audio hour", "WAV MiB"], body))
        out.append("")
    decode = section.get("decode")
    if decode:
        out += ["**Whole vs one-window tiles** (`decode_full` / `decode_tiled` on the same random latent; median "
                "of 3 calls; peak RSS above the warmed-up process; a fresh process per cell)", ""]
        out.append(table(["decoder", "windows", "whole s", "tiled s", "whole / tiled", "whole MiB", "tiled MiB"],
                         [[r["decoder"], r["windows"], f"{r['whole_s']:.2f}", f"{r['tiled_s']:.2f}",
                           f"{r['whole_s'] / r['tiled_s']:.2f}", f"{r['whole_peak_bytes'] / 2**20:.0f}",
                           f"{r['tiled_peak_bytes'] / 2**20:.0f}"] for r in decode]))
    return "\n".join(out).rstrip()


# -- distributed generation ------------------------------------------------------------------------
DISTRIBUTED_FLOPS = {"audio_unet": "AudioLDM-S UNet, one 10.24 s window, CFG (batch 2)",
                     "sd_unet": "SD 1.x UNet, one 64 x 64 window, CFG (batch 2)",
                     "audio_decode": "AudioLDM VAE decoder + HiFi-GAN, one window",
                     "sd_decode": "SD VAE decoder, one window"}


def render_distributed(section: Dict[str, Any], machine: Dict[str, Any]) -> str:
    meas, flops, p = section["measured"], section["flops"], section["measured"]["parts"]
    out = [f"**Measured**: 2 processes x 1 thread vs 1 process x 1 thread (gloo), tiny AudioLDM, "
           f"{meas['seconds']:g} s, {meas['views']} views, {meas['steps']} steps, SaFa, `view_batch_size=1`; "
           f"{meas['rounds']} interleaved round(s) after a warm-up; s / step on rank 0", ""]
    out.append(table(["", "s / step (median of rounds)", "rounds"], [
        ["1 process", f"{meas['one_step_s']:.4f}", ", ".join(f"{x:.4f}" for x in meas["one_rounds"])],
        [f"2 processes (views {' + '.join(map(str, meas['blocks']))}, reference on rank 1)",
         f"{meas['two_step_s']:.4f}", ", ".join(f"{x:.4f}" for x in meas["two_rounds"])],
        ["**speed-up**", f"**{meas['speedup']:.2f}x**", ""]]))
    cap = meas["parallel_capacity"]
    out += ["", f"CPU time per step (every thread): 1 process {meas['one_cpu_step_s']:.4f} s; 2 processes, the busier "
            f"rank's per step (critical path) {meas['two_cpu_critical_step_s']:.4f} s: **{meas['cpu_speedup']:.2f}x** "
            "if each process had a core of its own. Parallelism available to the two processes (2 x a fixed matmul "
            f"load's time alone / its time on both at once; 2.0 = two free cores): {cap[0]:.2f} before the rounds, "
            f"{cap[1]:.2f} after.", "",
            f"Parts (rank 0 alone): model {p['window_s'] * 1e3:.2f} ms per window, whole-batch scheduler step "
            f"{p['scheduler_s'] * 1e3:.3f} ms, merge {p['merge_s'] * 1e3:.3f} ms. One step's exchange on its own "
            "(time, bytes sent, checked against the counted exchange sets):", ""]
    for rank, ex in meas["exchange"].items():
        out.append(f"- {rank}: unguided {ex['unguided'][0] * 1e3:.3f} ms / {ex['unguided'][1]:.0f} B, "
                   f"guided {ex['guided'][0] * 1e3:.3f} ms / {ex['guided'][1]:.0f} B")
    out += ["", f"Predicted 2-process step from these parts (the model of the last table): "
            f"{meas['predicted_two_step_s']:.4f} s (measured {meas['two_step_s']:.4f} s).", "",
            "**FLOPs per window** (counted: `torch.utils.flop_counter`, full-size random-weight architectures on "
            "the meta device)", ""]
    out.append(table(["", "TFLOP"], [[label, f"{flops[key]:.3f}"] for key, label in DISTRIBUTED_FLOPS.items()]))
    out += ["", "**Modelled**: speed-up on 2 / 4 / 8 GPUs (counted views, blocks, bytes and FLOPs; the hardware "
            "figures below are assumed, not measured)", ""]
    published = section["distrifusion"]
    out.append(table(
        ["workload", "views", "GPUs", "largest block", "KB sent / step / rank (counted)", "ms / window",
         "step ms", "comm % of step", "replicated scheduler + merge %", "speed-up, loop", "+ decode on rank 0",
         "+ tiled decode shared", "comm % if communication took 10x longer", "DistriFusion (SDXL, published)"],
        [[r["workload"], r["views"], r["gpus"], r["largest_block"], f"{r['bytes_per_step_rank'] / 1e3:.1f}",
          f"{r['window_ms']:.2f}", f"{r['step_ms']:.1f}", f"{r['comm_pct']:.3f}", f"{r['replicated_pct']:.3f}",
          f"{r['speedup']:.2f}x", f"{r['speedup_with_decode']:.2f}x", f"{r['speedup_with_shared_decode']:.2f}x",
          f"{r['comm_pct_if_10x_slower']:.2f}", f"{published[str(r['gpus'])]}x"] for r in section["modelled"]]))
    out += ["", "Assumed (not measured): " + "; ".join(f"{k} = {v}" for k, v in section["assumed"].items())]
    return "\n".join(out).rstrip()


# -- the GPU kit's checks ----------------------------------------------------------------------------
def render_gpu_checks(section: Dict[str, Any], machine: Dict[str, Any]) -> str:
    facts, tests = section["facts"], section["tests"]
    out = [f"Found: Python {facts['python']}, torch {facts['torch']} (CUDA {facts['torch_cuda']}), "
           f"triton {facts.get('triton') or 'none'}, nvcc {'yes' if facts.get('nvcc') else 'NO'}, "
           f"compute-sanitizer {'yes' if facts.get('compute_sanitizer') else 'NO'}; "
           + ", ".join(f"{d} {'yes' if ok else 'NO'}" for d, ok in sorted(facts["modules"].items())) + ".", ""]
    body = [[r["name"], r["status"] if r["ran"] else "skipped", f"{r['seconds']:.0f}",
             "; ".join([r["reason"]] + r["notes"]).replace("|", "/")] for r in section["records"]]
    out += [table(["stage", "result", "s", "what / why"], body), ""]
    out.append(f"GPU tests: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped.")
    for reason, n in sorted(tests["skip_reasons"].items()):
        out.append(f"- skipped {n}: {reason}")
    return "\n".join(out).rstrip()


def stitch_diagnosis(records: List[Dict[str, Any]], floor: Dict[Tuple[str, int], float]) -> List[str]:
    """Where CPU stitch swap's time goes, per length: the raw op, the same lone-column jobs
    reading one view (no interleaving), and no lone columns at all (swap_interval 64)."""
    rows = op_rows(records)
    lines = []
    for key in sorted((k for k in rows if k[:2] == ("cpu", "stitch swap")), key=lambda k: _case_key(k[2])):
        entry = rows[key]
        if not all(v in entry for v in ("cpp op", "cpp op, one view", "cpp op, interval 64")):
            continue
        s = {v: share_of_copy(entry[v], floor) for v in ("cpp op", "cpp op, one view", "cpp op, interval 64")}
        lines.append(f"- {key[2]}: raw op {pct(s['cpp op'])} of copy_; the same lone-column jobs reading one view "
                     f"{pct(s['cpp op, one view'])}; no lone columns (interval 64) {pct(s['cpp op, interval 64'])}")
    return (["Where CPU `stitch` swap's time goes (swap_interval 1):", ""] + lines + [""]) if lines else []


# -- the README and tuning.py ---------------------------------------------------------------------
def render_vae(section: Dict[str, Any], machine: Dict[str, Any]) -> str:
    """bench_vae.py: fidelity of the tiled decodes against the whole decode, then their cost."""
    rows = section["records"]
    out = ["| VAE | decode | tile | image | max abs diff (/255) | clamped | PSNR (dB) | colour shift (/255) |",
           "|---|---|---:|---|---:|---:|---:|---:|"]
    for r in (r for r in rows if r["part"] == "fidelity"):
        out.append(f"| {r['vae']} | {r['method']} | {r['tile_px']} px | {r['width']} x {r['height']} | "
                   f"{r['max_abs']:.3g} | {r['max_abs_clamped']:.3g} | {r['psnr_db']:.1f} | {r['colour_shift']:.3g} |")
    out += ["", "| VAE | decode | image | tile | peak tensor memory | estimate | peak RSS (over start) | disk | time | how |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]

    def mib(v: Any) -> str:
        return f"{v / 2 ** 20:.0f} MiB" if v else "-"
    for r in (r for r in rows if r["part"] == "cost"):
        rss = f"{mib(r['peak_rss_bytes'])} (+{mib(r['peak_rss_bytes'] - r['base_rss_bytes'])})" \
            if r.get("peak_rss_bytes") else "-"
        seconds = f"{r['seconds']:.3g} s" if r.get("seconds") is not None else "-"
        how = "meta-device allocation trace" if r.get("trace") == "meta" else "measured"
        out.append(f"| {r['vae']} | {r['method']} | {r['side_px']}² | {r['tile_px']} px | {mib(r['peak_bytes'])} | "
                   f"{mib(r.get('estimate_bytes'))} | {rss} | {mib(r.get('disk_bytes'))} | {seconds} | {how} |")
    return "\n".join(out)


RENDERERS: Dict[str, Callable[[Dict[str, Any], Dict[str, Any]], str]] = {"ops": render_ops, "audio": render_audio,
                                                                         "panorama": render_panorama,
                                                                         "steps": render_steps,
                                                                         "methods": render_methods,
                                                                         "fullsize": render_fullsize,
                                                                         "long": render_long,
                                                                         "distributed": render_distributed,
                                                                         "vae": render_vae,
                                                                         "gpu_checks": render_gpu_checks}
SECTION_TITLES = {"ops": "op microbenchmarks", "audio": "long audio", "panorama": "panorama",
                  "methods": "every method", "fullsize": "full-size architecture", "long": "hours of audio", "distributed": "distributed",
                  "steps": "per-step pipeline", "gpu_checks": "GPU checks", "vae": "tiled VAE decode"}


def load_results(folder: Path = RESULTS) -> List[Tuple[Path, Dict[str, Any]]]:
    return [(p, json.loads(p.read_text())) for p in sorted(folder.glob("*.json"))]


def describe(machine: Dict[str, Any]) -> str:
    if machine.get("gpu"):
        hw = f"{machine['gpu']} ({machine['gpu_memory_gib']} GiB, compute capability {machine['capability']}, CUDA {machine['cuda']}), host CPU {machine['cpu']}"
    else:
        hw = f"{machine['cpu']}, {machine['logical_cpus']} logical CPUs"
    return f"{hw}; Python {machine['python']}, torch {machine['torch']}, triton {machine.get('triton') or 'none'}"


def render_section(name: str, path: Path, data: Dict[str, Any]) -> str:
    section = data["benchmarks"][name]
    load = section.get("load_average")
    head = (f"#### {data['machine']['id']} (`{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}`)\n\n"
            f"{describe(data['machine'])}. Mode `{section['mode']}`, {section['threads']} CPU thread(s), "
            f"clock: {section.get('clock', 'wall time')}, {section['date']}"
            + (f", load average {load[0]:.1f}" if load else "") + ".\n"
            f"Command: `{section['command']}`\n")
    return head + "\n" + RENDERERS[name](section, data["machine"])


def render_file_section(name: str, path: Path) -> str:
    """One section of one results file, as in the README (what a benchmark prints when done)."""
    return render_section(name, path.resolve(), json.loads(path.read_text()))


def generated_block(name: str, results: List[Tuple[Path, Dict[str, Any]]]) -> str:
    parts = [render_section(name, p, d) for p, d in results if name in d.get("benchmarks", {})]
    if not parts:
        return f"_No {SECTION_TITLES[name]} results recorded yet._"
    return "\n\n".join(parts)


def begin_marker(name: str) -> str:
    return f"<!-- BEGIN GENERATED {name}: python benchmarks/report.py -->"


def end_marker(name: str) -> str:
    return f"<!-- END GENERATED {name} -->"


def rewrite_readme(text: str, results: List[Tuple[Path, Dict[str, Any]]]) -> str:
    for name in RENDERERS:
        begin, end = begin_marker(name), end_marker(name)
        if begin not in text:
            continue
        a, b = text.index(begin) + len(begin), text.index(end)
        text = text[:a] + "\n" + generated_block(name, results) + "\n" + text[b:]
    return text


def measured_table(results: List[Tuple[Path, Dict[str, Any]]]) -> Dict[str, Dict[str, str]]:
    table_: Dict[str, Dict[str, str]] = {}
    for path, data in results:
        machine, ops = data["machine"], data.get("benchmarks", {}).get("ops")
        if not machine.get("gpu") or not ops:
            continue
        chosen = choose_backends(ops["records"])
        if chosen:
            table_[machine["gpu"]] = dict(capability=machine["capability"], **chosen)
    return table_


def rewrite_tuning(text: str, results: List[Tuple[Path, Dict[str, Any]]]) -> str:
    begin, end = "# BEGIN MEASURED", "# END MEASURED"
    a = text.index("\n", text.index(begin)) + 1
    b = text.index(end)
    measured = measured_table(results)
    body = "MEASURED: Dict[str, Dict[str, str]] = " + (json.dumps(measured, indent=4, sort_keys=True)
                                                       if measured else "{}")
    return text[:a] + body + "\n" + text[b:]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if README.md or tuning.py is out of date")
    p.add_argument("--show", metavar="FILE", help="print every section of one results file and exit")
    p.add_argument("--results", default=str(RESULTS), help="folder of results files (default benchmarks/results)")
    args = p.parse_args(argv)
    if args.show:
        path = Path(args.show)
        data = json.loads(path.read_text())
        for name in RENDERERS:
            if name in data.get("benchmarks", {}):
                print(render_section(name, path.resolve(), data) + "\n")
        return 0
    results = load_results(Path(args.results))
    stale = []
    for path, rewrite in ((README, rewrite_readme), (TUNING, rewrite_tuning)):
        old = path.read_text()
        new = rewrite(old, results)
        if new != old:
            stale.append(path)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print("out of date (run python benchmarks/report.py): " + ", ".join(str(p.relative_to(ROOT)) for p in stale),
              file=sys.stderr)
        return 1
    if not args.check:
        print("updated: " + (", ".join(str(p.relative_to(ROOT)) for p in stale) or "nothing (already up to date)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
