"""Long audio with the tiny AudioLDM: time per generated minute, peak memory, machinery share.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_audio.py [--quick] [--json out/bench_audio.json]

Three measurements (the sampler issue's), all on ``safa.testing.tiny_audioldm_pipeline``
(random weights, 25 latent frames/s, native window 10.24 s = 256 columns, DDIM, CFG 2.5),
prompt encoding included in every call, ``torch.set_num_threads(--threads)`` (default 1):

1. **Scaling with length.** For each length (default 1, 2, 5, 10 minutes) and method
   (default ``safa`` and ``multidiffusion``, all windows in one model batch; and safa with
   ``view_batch_size`` 4, ``--scaling-vbs``), calls of ``--steps`` steps with
   ``output_type="latent"``; the rounds are interleaved (round 1 of every configuration, then
   round 2, ...) after one warm-up call per configuration. **s / step** is the median interval
   between consecutive ``callback_on_step_end`` calls over all rounds (model + scheduler +
   merge of one step); **call s** is the median wall time of the whole call (prompt encoding,
   noise, ``--steps`` steps, the final stitch); **call - steps x s/step** is the part of the
   call outside the steps, and **final stitch s** the time from the last step's callback to
   the return (the stitch of the views into the long latent). Then, for ``--decode-lengths`` (default 1 and
   10 minutes, method safa), the same calls with ``output_type="np", decode="tiled"``:
   **decode s** is the median time from the last step's callback to the call's return (the
   final stitch, the tiled VAE + vocoder decode, the crop and the numpy conversion).
   A least-squares line ``s/step = a + b * minutes`` is fitted per method; its largest
   relative residual says how linear the step time is in length.
2. **Peak memory.** Each configuration (length x ``view_batch_size``, plus a decode="tiled"
   row) runs ``--mem-steps`` steps in a FRESH ``python`` subprocess that prints
   ``resource.getrusage(RUSAGE_SELF).ru_maxrss``; a baseline subprocess only imports and
   builds the pipeline. **extra MiB** = peak RSS - baseline peak RSS; **state MiB** is the
   sampler's state (views + reference windows), **latent MiB** the stitched long latent. ``view_batch_size``
   None means every window (views + reference) in one model batch.
3. **Machinery share at 60 s** (``--profile-seconds``). ``safa.profiling.profile_steps``
   (the breakdown of ``safa profile``): one warm-up call, one un-profiled call, one profiled
   call; the per-step table splits each ``safa.step`` into model / scheduler / merge /
   other. The joint-diffusion machinery of a step is merge + other. Then one whole call with
   ``decode="tiled"`` under the profiler, with the adapter's ``encode_prompts``,
   ``decode_latents`` and ``finalize`` wrapped in ``record_function`` ranges (instance
   attributes set by this script; nothing in safa is changed), splits the CALL into prompt
   encoding / steps / decoding / the rest (noise, gather, the final stitch, planning,
   numpy conversion: an upper bound on the per-call machinery).
4. **Per-call planning** (``measure_planning``): the host time of the call's gather + final
   stitch on a layout object seen for the first time vs memoised plans.

``--quick`` runs tiny sizes (0.64 s windows, a few seconds of audio, 2 steps, 1 round) so the
smoke test (``tests/test_bench_audio_smoke.py``) can run the whole script in seconds; its
numbers mean nothing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROMPT = "rain on a tin roof"
GUIDANCE = 2.5
SEED = 0


def _vbs_arg(text: str) -> Optional[int]:
    return None if text.lower() in ("none", "all") else int(text)


def _vbs_name(vbs: Optional[int]) -> str:
    return "None (all)" if vbs is None else str(vbs)


def _len_name(minutes: float) -> str:
    return f"{minutes:g} min" if minutes >= 1 else f"{minutes * 60:g} s"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


# -- 2. memory: one configuration per fresh process -----------------------------------------------
def _mem_child(spec: Dict[str, Any]) -> None:
    """Build the pipeline, run one call (unless ``seconds`` is None), print the peak RSS as JSON."""
    import torch
    torch.set_num_threads(spec["threads"])
    from safa.testing import tiny_audioldm_pipeline
    pipe = tiny_audioldm_pipeline(SEED)
    pipe.set_progress_bar_config(disable=True)
    out: Dict[str, Any] = {}
    if spec["seconds"] is not None:
        from safa import JointDiffusion
        jd = JointDiffusion(pipe)
        r = jd(PROMPT, seconds=spec["seconds"], method=spec["method"], window=spec["window"],
               num_inference_steps=spec["steps"], guidance_scale=GUIDANCE, view_batch_size=spec["vbs"],
               output_type=spec["output_type"], decode=spec["decode"],
               generator=torch.Generator().manual_seed(SEED))
        out["views"] = r.layout.num_views
        out["latent_mib"] = r.latent.numel() * r.latent.element_size() / 2**20
        n = r.layout.num_views
        windows = n + (1 if spec["method"] == "safa" and n > 1 else 0)
        out["state_mib"] = windows * r.latent.numel() // r.layout.length * r.layout.window \
            * r.latent.element_size() / 2**20
    out["maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print("BENCH_AUDIO_MEM " + json.dumps(out), flush=True)


def _run_children(specs: List[Dict[str, Any]], jobs: int) -> List[Dict[str, Any]]:
    """Run each spec in a fresh interpreter (``jobs`` at a time); their JSON results, in order."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results: List[Optional[Dict[str, Any]]] = [None] * len(specs)
    pending = list(enumerate(specs))
    running: List[Any] = []
    while pending or running:
        while pending and len(running) < jobs:
            i, spec = pending.pop(0)
            p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_mem-child", json.dumps(spec)],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            running.append((i, p))
        i, p = running.pop(0)
        stdout, stderr = p.communicate()
        lines = [ln for ln in stdout.splitlines() if ln.startswith("BENCH_AUDIO_MEM ")]
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"memory child {specs[i]} failed (rc {p.returncode}):\n{stderr[-3000:]}")
        results[i] = json.loads(lines[-1].split(" ", 1)[1])
    return [r for r in results if r is not None]


# -- 1. timing ------------------------------------------------------------------------------------
def _timed_call(jd: Any, torch: Any, *, seconds: float, method: str, steps: int, window: Optional[float],
                output_type: str = "latent", decode: str = "full", vbs: Optional[int] = None) -> Dict[str, Any]:
    stamps: List[float] = []

    def on_step(_jd: Any, _i: int, _t: Any, _kw: Dict[str, Any]) -> None:
        stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    r = jd(PROMPT, seconds=seconds, method=method, window=window, num_inference_steps=steps,
           guidance_scale=GUIDANCE, output_type=output_type, decode=decode, view_batch_size=vbs,
           generator=torch.Generator().manual_seed(SEED), callback_on_step_end=on_step)
    t1 = time.perf_counter()
    assert len(stamps) == steps, (len(stamps), steps)
    n = r.layout.num_views
    return dict(call_s=t1 - t0, intervals=[b - a for a, b in zip(stamps, stamps[1:])], tail_s=t1 - stamps[-1],
                views=n, windows=n + (1 if method == "safa" and n > 1 else 0), columns=r.layout.length)


def _fit(xs: Sequence[float], ys: Sequence[float]) -> Dict[str, float]:
    """Least squares y = a + b x and the largest |residual| / y."""
    n = len(xs)
    if n < 2:
        return dict(a=float("nan"), b=float("nan"), max_rel_residual=float("nan"))
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else float("nan")
    a = my - b * mx
    return dict(a=a, b=b, max_rel_residual=max(abs(y - (a + b * x)) / y for x, y in zip(xs, ys)))


def measure_scaling(jd: Any, torch: Any, args: argparse.Namespace) -> Dict[str, Any]:
    # (method, minutes, view_batch_size): every method with all windows in one batch, and
    # safa with each --scaling-vbs value.
    configs = [(m, L, None) for L in args.lengths for m in args.methods]
    configs += [("safa", L, v) for v in args.scaling_vbs for L in args.lengths]
    for method, minutes, vbs in configs:  # warm-up: plans, allocator, oneDNN primitives
        _timed_call(jd, torch, seconds=minutes * 60, method=method, steps=2, window=args.window, vbs=vbs)
    runs: Dict[Any, List[Dict[str, Any]]] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for c in configs:
            runs[c].append(_timed_call(jd, torch, seconds=c[1] * 60, method=c[0], steps=args.steps,
                                       window=args.window, vbs=c[2]))
    rows = []
    for (method, minutes, vbs), rs in runs.items():
        step_s = statistics.median(x for r in rs for x in r["intervals"])
        call_s = statistics.median(r["call_s"] for r in rs)
        rows.append(dict(method=method, vbs=vbs, minutes=minutes, views=rs[0]["views"], windows=rs[0]["windows"],
                         columns=rs[0]["columns"], step_s=step_s, step_s_per_min=step_s / minutes,
                         ms_per_window_step=1e3 * step_s / rs[0]["windows"], call_s=call_s,
                         call_s_per_min=call_s / minutes, outside_s=call_s - args.steps * step_s,
                         tail_s=statistics.median(r["tail_s"] for r in rs),
                         samples=sum(len(r["intervals"]) for r in rs)))
    fits = {}
    for method, vbs in dict.fromkeys((r["method"], r["vbs"]) for r in rows):
        sel = [r for r in rows if r["method"] == method and r["vbs"] == vbs]
        f = _fit([r["minutes"] for r in sel], [r["step_s"] for r in sel])
        f["per_window_ratio"] = sel[-1]["ms_per_window_step"] / sel[0]["ms_per_window_step"]
        f["per_min_ratio"] = sel[-1]["step_s_per_min"] / sel[0]["step_s_per_min"]
        f["first"], f["last"] = sel[0]["minutes"], sel[-1]["minutes"]
        fits[f"{method}, view_batch_size {_vbs_name(vbs)}"] = f
    # with decoding
    dconfigs = list(args.decode_lengths)
    for minutes in dconfigs:
        _timed_call(jd, torch, seconds=minutes * 60, method="safa", steps=2, window=args.window,
                    output_type="np", decode="tiled")
    druns: Dict[float, List[Dict[str, Any]]] = {m: [] for m in dconfigs}
    for _ in range(args.rounds):
        for minutes in dconfigs:
            druns[minutes].append(_timed_call(jd, torch, seconds=minutes * 60, method="safa", steps=args.steps,
                                              window=args.window, output_type="np", decode="tiled"))
    drows = []
    for minutes, rs in druns.items():
        call_s = statistics.median(r["call_s"] for r in rs)
        decode_s = statistics.median(r["tail_s"] for r in rs)
        drows.append(dict(minutes=minutes, windows=rs[0]["windows"],
                          step_s=statistics.median(x for r in rs for x in r["intervals"]),
                          decode_s=decode_s, decode_s_per_min=decode_s / minutes, call_s=call_s,
                          call_s_per_min=call_s / minutes))
    return dict(latent=rows, fits=fits, decode=drows)


def measure_planning(jd: Any, torch: Any, args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Host cost of the call's gather + final stitch on a layout object seen for the first time.

    Each ``JointDiffusion`` call plans a new ``ViewLayout``; plans are memoised per layout
    object, so an op on a layout object seen for the first time builds its plan on the host
    (a Python loop over columns). Timed here on the sampler's own layout: ``gather`` then
    ``stitch`` (swap, as method safa) on a fresh ``jd.layout_for(...)`` object, then the same
    two ops again on that object (plans memoised). Median of ``--rounds``.
    """
    from safa_kernels import gather, stitch
    rows = []
    for minutes in args.lengths:
        fresh, again = [], []
        for _ in range(args.rounds):
            layout = jd.layout_for(minutes * 60, window=args.window, method="safa")
            latent = torch.zeros(jd.adapter.latent_shape(1, layout.length))
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                views = gather(latent, layout, jd.adapter.long_dim)
                stitch(views, layout, jd.adapter.long_dim, "swap", 1)
                times.append(time.perf_counter() - t0)
            fresh.append(times[0])
            again.append(times[1])
        rows.append(dict(minutes=minutes, views=layout.num_views, fresh_ms=1e3 * statistics.median(fresh),
                         memoised_ms=1e3 * statistics.median(again)))
    return rows


# -- 3. machinery share ---------------------------------------------------------------------------
def measure_share(jd: Any, torch: Any, args: argparse.Namespace) -> Dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile, record_function

    from safa import profiling

    kwargs = dict(prompt=PROMPT, seconds=args.profile_seconds, method="safa", num_inference_steps=args.steps,
                  guide=1.0, guidance_scale=GUIDANCE, window=args.window)
    res = profiling.profile_steps(jd, kwargs, label="safa_kernels", warmup_steps=1, trace=None)
    med = {c: res.median("ms", c) for c in profiling.CATEGORIES}
    total = res.median_total_ms
    per_step = [dict(step=s.step, total_ms=s.total_ms, **{f"{c}_ms": s.ms[c] for c in profiling.CATEGORIES},
                     machinery_pct=100 * (s.ms["merge"] + s.ms["other"]) / s.total_ms) for s in res.steps]
    machinery_pct = statistics.median(p["machinery_pct"] for p in per_step)

    # The whole call, with prompt encoding and decoding as ranges of their own.
    adapter = jd.adapter
    originals = {}
    for name in ("encode_prompts", "decode_latents", "finalize"):
        fn = getattr(adapter, name)
        originals[name] = fn
        label = "bench.encode" if name == "encode_prompts" else "bench.decode"

        def wrapped(*a: Any, _fn: Any = fn, _label: str = label, **k: Any) -> Any:
            with record_function(_label):
                return _fn(*a, **k)
        setattr(adapter, name, wrapped)
    try:
        call = dict(kwargs, output_type="np", decode="tiled", generator=torch.Generator().manual_seed(SEED))
        jd(**call)  # warm the decode path
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function("bench.call"):
                jd(**call)
    finally:
        for name in originals:
            delattr(adapter, name)  # back to the class's bound method
    events = prof.events()

    def top(name: str) -> float:  # ms of outermost ranges called `name`
        total_us = 0.0
        for e in events:
            if e.name != name:
                continue
            p = e.cpu_parent
            while p is not None and p.name != name:
                p = p.cpu_parent
            if p is None:
                total_us += e.time_range.elapsed_us()
        return total_us / 1e3

    steps = profiling.analyse(events)
    call_ms = top("bench.call")
    encode_ms, decode_ms = top("bench.encode"), top("bench.decode")
    steps_ms = sum(s.total_ms for s in steps)
    in_steps = {c: sum(s.ms[c] for s in steps) for c in profiling.CATEGORIES}
    outside_merges_ms = sum(e.time_range.elapsed_us() for e in events if e.name.startswith("safa::merge_")
                            and not _under(e, "safa.step")) / 1e3
    rest_ms = call_ms - encode_ms - decode_ms - steps_ms
    # What the rest is made of: the ops called directly in the call (outside the ranges).
    call_events = [e for e in events if e.name == "bench.call"]
    rest_ops: Dict[str, float] = {}
    for e in (call_events[0].cpu_children if call_events else []):
        if not e.name.startswith(("bench.", "safa.")):
            rest_ops[e.name] = rest_ops.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e3
    rest_top = sorted(rest_ops.items(), key=lambda kv: -kv[1])[:6]
    call_row = dict(call_ms=call_ms, encode_ms=encode_ms, steps_ms=steps_ms, decode_ms=decode_ms,
                    rest_ms=rest_ms, rest_top_ops=rest_top, gather_stitch_ms=outside_merges_ms, num_steps=len(steps),
                    model_ms=in_steps["model"], scheduler_ms=in_steps["scheduler"],
                    merge_other_ms=in_steps["merge"] + in_steps["other"],
                    machinery_pct_of_call=100 * (in_steps["merge"] + in_steps["other"] + rest_ms) / call_ms)
    layout = jd.layout_for(args.profile_seconds, window=args.window, method="safa")
    return dict(seconds=args.profile_seconds, views=layout.num_views, window=layout.window, overlap=layout.overlap,
                median_ms=med, median_total_ms=total, unprofiled_ms=res.median_unprofiled_ms,
                machinery_pct=machinery_pct, per_step=per_step, call=call_row)


def _under(e: Any, name: str) -> bool:
    p = e.cpu_parent
    while p is not None:
        if p.name == name:
            return True
        p = p.cpu_parent
    return False


# -- printing ---------------------------------------------------------------------------------------
def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def report(res: Dict[str, Any], args: argparse.Namespace) -> str:
    out = [f"## bench_audio ({'quick' if args.quick else 'full'})", "",
           f"{res['machine']}; torch {res['torch']}, {args.threads} thread(s); {res['date']}; "
           f"load average {res['load_start']} at start, {res['load_end']} at end; total {res['wall_s']:.0f} s", ""]
    if "scaling" in res:
        sc = res["scaling"]
        out += [f"### Scaling with length: output_type=\"latent\", {args.steps} steps, {args.rounds} rounds "
                f"(median of {sc['latent'][0]['samples']} step intervals)", ""]
        out.append(_table(
            ["method", "view_batch_size", "length", "views", "windows", "s / step", "ms / window-step",
             "s / step per gen. min",
             "call s", "call s per gen. min", "call - steps x s/step", "final stitch s"],
            [[r["method"], _vbs_name(r["vbs"]), _len_name(r["minutes"]), r["views"], r["windows"], f"{r['step_s']:.3f}",
              f"{r['ms_per_window_step']:.1f}", f"{r['step_s_per_min']:.3f}", f"{r['call_s']:.2f}",
              f"{r['call_s_per_min']:.2f}", f"{r['outside_s']:.3f}", f"{r['tail_s']:.3f}"] for r in sc["latent"]]))
        out.append("")
        for m, f in sc["fits"].items():
            out.append(f"- {m}: {_len_name(f['last'])} vs {_len_name(f['first'])}: s/step per generated minute "
                       f"x{f['per_min_ratio']:.2f}, ms per window-step x{f['per_window_ratio']:.2f}; "
                       f"least squares s/step = {f['a']:.4f} + {f['b']:.4f} * minutes, "
                       f"largest residual {100 * f['max_rel_residual']:.1f}%")
        out += ["", f"### With decoding: safa, output_type=\"np\", decode=\"tiled\", {args.steps} steps", ""]
        out.append(_table(
            ["length", "windows", "s / step", "decode s", "decode s per gen. min", "call s", "call s per gen. min"],
            [[_len_name(r["minutes"]), r["windows"], f"{r['step_s']:.3f}", f"{r['decode_s']:.2f}",
              f"{r['decode_s_per_min']:.2f}", f"{r['call_s']:.2f}", f"{r['call_s_per_min']:.2f}"]
             for r in sc["decode"]]))
        out.append("")
    if "memory" in res:
        mem = res["memory"]
        out += [f"### Peak RSS, fresh process per row, safa, {args.mem_steps} steps "
                f"(baseline: import + build the pipeline = {mem['baseline_mib']:.0f} MiB)", ""]
        out.append(_table(
            ["length", "view_batch_size", "output", "windows", "UNet rows / call", "latent MiB", "state MiB",
             "peak RSS MiB",
             "extra MiB"],
            [[_len_name(r["minutes"]), _vbs_name(r["vbs"]), r["output"], r["windows"], r["rows_per_call"],
              f"{r['latent_mib']:.1f}", f"{r['state_mib']:.1f}", f"{r['peak_mib']:.0f}", f"{r['extra_mib']:.0f}"]
             for r in mem["rows"]]))
        out.append("")
    if "planning" in res:
        out += [f"### Per-call planning: gather + final stitch on a new layout object vs the same object again "
                f"(median of {args.rounds})", ""]
        out.append(_table(["length", "views", "new layout ms", "memoised ms"],
                          [[_len_name(r["minutes"]), r["views"], f"{r['fresh_ms']:.1f}", f"{r['memoised_ms']:.2f}"]
                           for r in res["planning"]]))
        out.append("")
    if "share" in res:
        sh = res["share"]
        med, tot = sh["median_ms"], sh["median_total_ms"]
        out += [f"### Machinery share of a step: safa at {sh['seconds']:g} s ({sh['views']} views of "
                f"{sh['window']} columns, overlap {sh['overlap']}, + reference, reference swap every step), "
                f"{args.steps} profiled steps", ""]
        rows = [[c, f"{med[c]:.3f}", f"{100 * med[c] / tot:.2f}%"] for c in ("model", "scheduler", "merge", "other")]
        rows.append(["merge + other (machinery)", f"{med['merge'] + med['other']:.3f}",
                     f"{100 * (med['merge'] + med['other']) / tot:.2f}%"])
        rows.append(["step (profiled)", f"{tot:.3f}", "100%"])
        rows.append(["step (no profiler)", f"{sh['unprofiled_ms']:.3f}", ""])
        out.append(_table(["part of a step (median)", "ms", "share"], rows))
        per_step_pcts = ", ".join("%.2f%%" % p["machinery_pct"] for p in sh["per_step"])
        out += ["", f"- machinery share per step, median over steps: {sh['machinery_pct']:.2f}% "
                f"(per step: {per_step_pcts})", ""]
        c = sh["call"]
        out += [f"### The whole call at {sh['seconds']:g} s (decode=\"tiled\", under the profiler)", ""]
        out.append(_table(
            ["part of the call", "ms", "share"],
            [[name, f"{c[k]:.1f}", f"{100 * c[k] / c['call_ms']:.1f}%"] for name, k in (
                ("prompt encoding", "encode_ms"), (f"{c['num_steps']} steps: model", "model_ms"),
                (f"{c['num_steps']} steps: scheduler", "scheduler_ms"),
                (f"{c['num_steps']} steps: merge + other", "merge_other_ms"),
                ("decoding (VAE + vocoder)", "decode_ms"),
                ("rest (noise, gather, stitch, planning, to numpy)", "rest_ms"),
                ("  of which gather + final stitch ops", "gather_stitch_ms"), ("call", "call_ms"))]))
        out += ["", f"- machinery of the call (merge + other in the steps + the rest): "
                f"{c['machinery_pct_of_call']:.2f}% of the call",
                "- largest ops of the rest (ms): " + ", ".join(f"{n} {ms:.1f}" for n, ms in c["rest_top_ops"]), ""]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_mem-child"]:
        _mem_child(json.loads(argv[1]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes for the smoke test (numbers mean nothing)")
    ap.add_argument("--lengths", type=float, nargs="+", default=None, help="minutes (default 1 2 5 10)")
    ap.add_argument("--methods", nargs="+", default=None, help="default safa multidiffusion")
    ap.add_argument("--decode-lengths", type=float, nargs="*", default=None, help="minutes (default 1 10)")
    ap.add_argument("--mem-lengths", type=float, nargs="*", default=None, help="minutes (default 1 10)")
    ap.add_argument("--mem-decode-lengths", type=float, nargs="*", default=None,
                    help="minutes of the decode='tiled' memory rows (default 1 10)")
    ap.add_argument("--vbs", type=_vbs_arg, nargs="+", default=None,
                    help="view_batch_size values for the memory rows ('none' = all windows; default none 4 1)")
    ap.add_argument("--scaling-vbs", type=_vbs_arg, nargs="*", default=None,
                    help="extra safa rows of the scaling table with these view_batch_size values (default 4)")
    ap.add_argument("--steps", type=int, default=None, help="steps per timed call (default 4)")
    ap.add_argument("--mem-steps", type=int, default=None, help="steps per memory child (default 2)")
    ap.add_argument("--rounds", type=int, default=None, help="timed calls per configuration (default 3)")
    ap.add_argument("--window", type=float, default=None, help="window in seconds (default: native 10.24 s)")
    ap.add_argument("--profile-seconds", type=float, default=None, help="length of the share profile (default 60)")
    ap.add_argument("--mem-jobs", type=int, default=None, help="memory children at a time (default 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--skip", nargs="*", default=[], choices=("scaling", "memory", "planning", "share"))
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    quick = dict(lengths=[0.05, 0.1], methods=["safa", "multidiffusion"], decode_lengths=[0.05], mem_lengths=[0.05],
                 mem_decode_lengths=[], scaling_vbs=[1],
                 vbs=[1], steps=2, mem_steps=1, rounds=1, window=0.64, profile_seconds=3.0, mem_jobs=2)
    full = dict(lengths=[1, 2, 5, 10], methods=["safa", "multidiffusion"], decode_lengths=[1, 10],
                mem_lengths=[1, 5, 10], mem_decode_lengths=[1, 10], scaling_vbs=[4], vbs=[None, 4, 1],
                steps=4, mem_steps=2, rounds=3, window=None,
                profile_seconds=60.0, mem_jobs=1)
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.steps < 2:
        ap.error("--steps must be >= 2 (a step time is an interval between steps)")

    t_start = time.perf_counter()
    load_start = _loadavg()
    res: Dict[str, Any] = {"args": {k: v for k, v in vars(args).items()}}

    mem_thread = None
    mem_out: Dict[str, Any] = {}
    if "memory" not in args.skip:
        specs = [dict(seconds=None, threads=args.threads)]
        mem_rows = []
        for minutes in args.mem_lengths:
            for vbs in args.vbs:
                mem_rows.append((minutes, vbs, "latent", "full"))
        for minutes in args.mem_decode_lengths:  # decoding too, bounded by the tile
            mem_rows.append((minutes, 4 if 4 in args.vbs else args.vbs[-1], "np", "tiled"))
        specs += [dict(seconds=m * 60, vbs=v, output_type=o, decode=d, method="safa", window=args.window,
                       steps=args.mem_steps, threads=args.threads) for m, v, o, d in mem_rows]
        # Full runs: the children run before this process imports torch, so no timing runs
        # beside them. --quick overlaps them with the rest (its numbers mean nothing anyway).
        def run_children() -> None:
            mem_out["children"] = _run_children(specs, args.mem_jobs)
        if args.quick:
            import threading
            mem_thread = threading.Thread(target=run_children)
            mem_thread.start()
        else:
            run_children()

    import torch
    torch.set_num_threads(args.threads)
    from safa import JointDiffusion
    from safa.testing import tiny_audioldm_pipeline
    pipe = tiny_audioldm_pipeline(SEED)
    pipe.set_progress_bar_config(disable=True)
    jd = JointDiffusion(pipe)
    if "scaling" not in args.skip:
        res["scaling"] = measure_scaling(jd, torch, args)
    if "planning" not in args.skip:
        res["planning"] = measure_planning(jd, torch, args)
    if "share" not in args.skip:
        res["share"] = measure_share(jd, torch, args)

    if "memory" not in args.skip:
        if mem_thread is not None:
            mem_thread.join()
        if "children" not in mem_out:
            raise RuntimeError("the memory children did not finish (see the error above)")
        children = mem_out["children"]
        base_kib = children[0]["maxrss_kib"]
        rows = []
        for (minutes, vbs, o, d), ch in zip(mem_rows, children[1:]):
            windows = ch["views"] + (1 if ch["views"] > 1 else 0)
            rows.append(dict(minutes=minutes, vbs=vbs, output="latent" if o == "latent" else f"np, decode {d}",
                             windows=windows, rows_per_call=2 * min(windows, vbs or windows),
                             latent_mib=ch["latent_mib"], state_mib=ch["state_mib"], peak_mib=ch["maxrss_kib"] / 1024,
                             extra_mib=(ch["maxrss_kib"] - base_kib) / 1024))
        res["memory"] = dict(baseline_mib=base_kib / 1024, rows=rows)

    res.update(machine=f"{_cpu_model()}, {os.cpu_count()} CPUs", torch=torch.__version__,
               date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               load_start=load_start, load_end=_loadavg(), wall_s=time.perf_counter() - t_start)
    print(report(res, args))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
