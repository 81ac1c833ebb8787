"""Long audio with the tiny AudioLDM: time per generated minute, peak memory, machinery share.

    python benchmarks/bench_audio.py [--mode smoke|quick|full] [--threads N] [--skip PART ...]
                                     [--lengths MIN ...] [--steps N] [--rounds N] ...

Everything runs on ``safa.testing.tiny_audioldm_pipeline`` (random weights, 25 latent
frames/s, native window 10.24 s = 256 columns, DDIM, CFG 2.5), prompt encoding included in
every call, on CPU (a GPU run of these is benchmarks/bench_steps.py's job). The mode sets
every default (smoke: toy sizes whose numbers mean nothing; quick: 1-10 minutes, 3 steps, 2
rounds; full: 4 steps, 3 rounds, more memory and decoding rows); each option overrides one. Parts:

1. **scaling**: for each length and method (``safa``, ``multidiffusion``, all windows in one
   model batch; and safa with each ``--scaling-vbs`` view_batch_size), calls of ``--steps``
   steps with ``output_type="latent"``, one warm-up call per configuration, then the
   configurations take turns for ``--rounds`` rounds. **step** = median step interval from
   step 1 on (harness.StepClock: model + scheduler + merge); **model** = the UNet's forward
   time inside those steps (harness.ModelClock), so **step / model** is the step's cost
   beyond the work of the model alone; **call** = median whole call; **call - steps** =
   call - steps x step (prompt encoding, noise, the final stitch); **final stitch** = last
   step's callback to return. Then, for ``--decode-lengths``, the same with
   ``output_type="np", decode="tiled"``: **decode** = last callback to return (final stitch,
   VAE + vocoder, crop, numpy). A least-squares line ``step = a + b * minutes`` per method,
   with its largest relative residual, says how linear the step time is in length.
2. **memory**: each configuration (length x view_batch_size, plus decode="tiled" rows) runs
   ``--mem-steps`` steps in a FRESH process that reports ``ru_maxrss``; a baseline process
   only imports and builds the pipeline. extra = peak - baseline peak.
3. **planning**: host time of the call's gather + final stitch on a layout object seen for
   the first time, then on the same object again (plans memoised).
4. **share** (at ``--profile-seconds``): ``safa.profiling.profile_steps`` (what ``safa profile``
   prints) splits each step into model / scheduler / merge / other; the machinery of a step
   is merge + other. Then one whole call with ``decode="tiled"`` under the profiler, with the
   adapter's ``encode_prompts``, ``decode_latents`` and ``finalize`` wrapped in ranges
   (instance attributes set here, nothing in safa changed), splits the call into prompt
   encoding / steps / decoding / the rest.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch

import harness
import report

PROMPT = "rain on a tin roof"
GUIDANCE = 2.5
SEED = 0
PARTS = ("scaling", "memory", "planning", "share")
SETTINGS = {
    "smoke": dict(lengths=[0.05, 0.1], methods=["safa", "multidiffusion"], scaling_vbs=[1], decode_lengths=[0.05],
                  mem_lengths=[0.05], mem_decode_lengths=[], vbs=[1], steps=2, mem_steps=1, rounds=1, window=0.64,
                  profile_seconds=3.0, mem_jobs=2),
    "quick": dict(lengths=[1, 2, 5, 10], methods=["safa", "multidiffusion"], scaling_vbs=[4], decode_lengths=[1],
                  mem_lengths=[1, 10], mem_decode_lengths=[1], vbs=[None, 4], steps=3, mem_steps=2, rounds=2,
                  window=None, profile_seconds=60.0, mem_jobs=1),
    "full": dict(lengths=[1, 2, 5, 10], methods=["safa", "multidiffusion"], scaling_vbs=[4], decode_lengths=[1, 10],
                 mem_lengths=[1, 5, 10], mem_decode_lengths=[1, 10], vbs=[None, 4, 1], steps=4, mem_steps=2, rounds=3,
                 window=None, profile_seconds=60.0, mem_jobs=1),
}


def _vbs_arg(text: str) -> Optional[int]:
    return None if text.lower() in ("none", "all") else int(text)


def _windows(views: int, method: str) -> int:
    """Windows the model evaluates per step: the views, plus the reference window for SaFa."""
    return views + (1 if method == "safa" and views > 1 else 0)


# -- 2. memory: one configuration per fresh process ------------------------------------------------
def _mem_child(spec: Dict[str, Any]) -> None:
    """Build the pipeline, run one call (unless ``seconds`` is None), print the peak RSS as JSON."""
    harness.set_threads(spec["threads"])
    from safa.testing import tiny_audioldm_pipeline
    pipe = tiny_audioldm_pipeline(SEED)
    pipe.set_progress_bar_config(disable=True)
    out: Dict[str, Any] = {}
    if spec["seconds"] is not None:
        from safa import JointDiffusion
        r = JointDiffusion(pipe)(PROMPT, seconds=spec["seconds"], method="safa", window=spec["window"],
                                 num_inference_steps=spec["steps"], guidance_scale=GUIDANCE,
                                 view_batch_size=spec["vbs"], output_type=spec["output_type"], decode=spec["decode"],
                                 generator=torch.Generator().manual_seed(SEED))
        n = r.layout.num_views
        out.update(views=n, latent_mib=r.latent.numel() * r.latent.element_size() / 2**20,
                   state_mib=_windows(n, "safa") * r.latent.numel() // r.layout.length * r.layout.window
                   * r.latent.element_size() / 2**20)
    out["maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print("BENCH_AUDIO_MEM " + json.dumps(out), flush=True)


def _run_children(specs: List[Dict[str, Any]], jobs: int) -> List[Dict[str, Any]]:
    """Run each spec in a fresh interpreter (``jobs`` at a time); their JSON results, in order."""
    results: List[Optional[Dict[str, Any]]] = [None] * len(specs)
    pending = list(enumerate(specs))
    running: List[Any] = []
    while pending or running:
        while pending and len(running) < jobs:
            i, spec = pending.pop(0)
            p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_mem-child", json.dumps(spec)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            running.append((i, p))
        i, p = running.pop(0)
        stdout, stderr = p.communicate()
        lines = [ln for ln in stdout.splitlines() if ln.startswith("BENCH_AUDIO_MEM ")]
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"memory child {specs[i]} failed (rc {p.returncode}):\n{stderr[-3000:]}")
        results[i] = json.loads(lines[-1].split(" ", 1)[1])
    return [r for r in results if r is not None]


def measure_memory(args: argparse.Namespace) -> Dict[str, Any]:
    rows = [(m, v, "latent", "full") for m in args.mem_lengths for v in args.vbs]
    rows += [(m, 4 if 4 in args.vbs else args.vbs[-1], "np", "tiled") for m in args.mem_decode_lengths]
    specs = [dict(seconds=None, threads=args.threads)]
    specs += [dict(seconds=m * 60, vbs=v, output_type=o, decode=d, window=args.window, steps=args.mem_steps,
                   threads=args.threads) for m, v, o, d in rows]
    children = _run_children(specs, args.mem_jobs)
    base_kib = children[0]["maxrss_kib"]
    records = []
    for (minutes, vbs, o, d), ch in zip(rows, children[1:]):
        windows = _windows(ch["views"], "safa")
        records.append(dict(minutes=minutes, vbs=vbs, output="latent" if o == "latent" else f"np, decode {d}",
                            windows=windows, rows_per_call=2 * min(windows, vbs or windows),
                            latent_mib=ch["latent_mib"], state_mib=ch["state_mib"], peak_mib=ch["maxrss_kib"] / 1024,
                            extra_mib=(ch["maxrss_kib"] - base_kib) / 1024))
    return dict(baseline_mib=base_kib / 1024, steps=args.mem_steps, rows=records)


# -- 1. scaling ---------------------------------------------------------------------------------------
def _timed_call(jd: Any, *, seconds: float, method: str, steps: int, window: Optional[float],
                output_type: str = "latent", decode: str = "full", vbs: Optional[int] = None) -> Dict[str, Any]:
    device = torch.device("cpu")
    read = harness.timer(device)
    with harness.ModelClock(jd.pipe.unet, device) as model_clock:
        clock = harness.StepClock(device, model_clock)
        t0 = read()
        r = jd(PROMPT, seconds=seconds, method=method, window=window, num_inference_steps=steps,
               guidance_scale=GUIDANCE, output_type=output_type, decode=decode, view_batch_size=vbs,
               generator=torch.Generator().manual_seed(SEED), callback_on_step_end=clock)
        t1 = read()
    assert len(clock.stamps) == steps, (len(clock.stamps), steps)
    n = r.layout.num_views
    return dict(call_s=t1 - t0, intervals=clock.intervals, model=clock.model, tail_s=t1 - clock.stamps[-1],
                views=n, windows=_windows(n, method))


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


def _interleaved(jd: Any, configs: List[Dict[str, Any]], args: argparse.Namespace) -> List[List[Dict[str, Any]]]:
    """One warm-up call per configuration, then ``args.rounds`` rounds of one call each."""
    for c in configs:  # plans, allocator, oneDNN primitives
        _timed_call(jd, **dict(c, steps=2))
    runs: List[List[Dict[str, Any]]] = [[] for _ in configs]
    for _ in range(args.rounds):
        for i, c in enumerate(configs):
            runs[i].append(_timed_call(jd, **dict(c, steps=args.steps)))
    return runs


def measure_scaling(jd: Any, args: argparse.Namespace) -> Dict[str, Any]:
    configs = [dict(method=m, seconds=L * 60, vbs=None, window=args.window) for L in args.lengths for m in args.methods]
    configs += [dict(method="safa", seconds=L * 60, vbs=v, window=args.window)
                for v in args.scaling_vbs for L in args.lengths]
    rows = []
    for c, rs in zip(configs, _interleaved(jd, configs, args)):
        step = harness.Stats.of([x for r in rs for x in r["intervals"]])
        model = harness.Stats.of([x for r in rs for x in r["model"]])
        call_s = statistics.median(r["call_s"] for r in rs)
        minutes = c["seconds"] / 60
        rows.append(dict(method=c["method"], vbs=c["vbs"], minutes=minutes, views=rs[0]["views"],
                         windows=rs[0]["windows"], step=step.to_dict(), model=model.to_dict(),
                         step_over_model=step.median / model.median, call_s=call_s,
                         outside_s=call_s - args.steps * step.median,
                         tail_s=statistics.median(r["tail_s"] for r in rs)))
    fits = []
    for method, vbs in dict.fromkeys((r["method"], r["vbs"]) for r in rows):
        sel = [r for r in rows if r["method"] == method and r["vbs"] == vbs]
        fit = _fit([r["minutes"] for r in sel], [r["step"]["median"] for r in sel])
        fits.append(dict(fit, method=method, vbs=vbs, first=sel[0]["minutes"], last=sel[-1]["minutes"],
                         per_min_ratio=(sel[-1]["step"]["median"] / sel[-1]["minutes"])
                         / (sel[0]["step"]["median"] / sel[0]["minutes"])))
    dconfigs = [dict(method="safa", seconds=L * 60, window=args.window, output_type="np", decode="tiled")
                for L in args.decode_lengths]
    drows = []
    for c, rs in zip(dconfigs, _interleaved(jd, dconfigs, args)):
        drows.append(dict(minutes=c["seconds"] / 60, windows=rs[0]["windows"],
                          step_s=statistics.median(x for r in rs for x in r["intervals"]),
                          decode_s=statistics.median(r["tail_s"] for r in rs),
                          call_s=statistics.median(r["call_s"] for r in rs)))
    return dict(steps=args.steps, rounds=args.rounds, latent=rows, fits=fits, decode=drows)


# -- 3. planning ------------------------------------------------------------------------------------
def measure_planning(jd: Any, args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Host time of gather + stitch on a new ``jd.layout_for(...)`` object, then on the same one."""
    from safa_kernels import gather, stitch
    read = harness.timer(torch.device("cpu"))
    rows = []
    for minutes in args.lengths:
        fresh, again = [], []
        for _ in range(args.rounds):
            layout = jd.layout_for(minutes * 60, window=args.window, method="safa")
            latent = torch.zeros(jd.adapter.latent_shape(1, layout.length))
            times = []
            for _ in range(2):
                t0 = read()
                views = gather(latent, layout, jd.adapter.long_dim)
                stitch(views, layout, jd.adapter.long_dim, "swap", 1)
                times.append(read() - t0)
            fresh.append(times[0])
            again.append(times[1])
        rows.append(dict(minutes=minutes, views=layout.num_views, fresh_s=statistics.median(fresh),
                         memoised_s=statistics.median(again)))
    return rows


# -- 4. machinery share -------------------------------------------------------------------------------
def _under(e: Any, name: str) -> bool:
    p = e.cpu_parent
    while p is not None:
        if p.name == name:
            return True
        p = p.cpu_parent
    return False


def measure_share(jd: Any, args: argparse.Namespace) -> Dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile, record_function

    from safa import profiling

    kwargs = dict(prompt=PROMPT, seconds=args.profile_seconds, method="safa", num_inference_steps=args.steps,
                  guide=1.0, guidance_scale=GUIDANCE, window=args.window)
    res = profiling.profile_steps(jd, kwargs, label="safa_kernels", warmup_steps=1, trace=None)
    per_step = [dict(step=s.step, total_ms=s.total_ms, ms=dict(s.ms),
                     machinery_pct=100 * (s.ms["merge"] + s.ms["other"]) / s.total_ms) for s in res.steps]

    # The whole call, with prompt encoding and decoding as ranges of their own.
    adapter = jd.adapter
    wrapped_names = ("encode_prompts", "decode_latents", "finalize")
    for name in wrapped_names:
        label = "bench.encode" if name == "encode_prompts" else "bench.decode"

        def wrapped(*a: Any, _fn: Any = getattr(adapter, name), _label: str = label, **k: Any) -> Any:
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
        for name in wrapped_names:
            delattr(adapter, name)  # back to the class's bound method
    events = prof.events()

    def top(name: str) -> float:  # ms of outermost ranges called `name`
        return sum(e.time_range.elapsed_us() for e in events if e.name == name and not _under(e, name)) / 1e3

    steps = profiling.analyse(events)
    call_ms, encode_ms, decode_ms = top("bench.call"), top("bench.encode"), top("bench.decode")
    steps_ms = sum(s.total_ms for s in steps)
    in_steps = {c: sum(s.ms[c] for s in steps) for c in profiling.CATEGORIES}
    rest_ms = call_ms - encode_ms - decode_ms - steps_ms
    gather_stitch_ms = sum(e.time_range.elapsed_us() for e in events if e.name.startswith("safa::merge_")
                           and not _under(e, "safa.step")) / 1e3
    call_events = [e for e in events if e.name == "bench.call"]
    rest_ops: Dict[str, float] = {}
    for e in (call_events[0].cpu_children if call_events else []):
        if not e.name.startswith(("bench.", "safa.")):
            rest_ops[e.name] = rest_ops.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e3
    layout = jd.layout_for(args.profile_seconds, window=args.window, method="safa")
    return dict(seconds=args.profile_seconds, views=layout.num_views, window=layout.window, overlap=layout.overlap,
                median_ms={c: res.median("ms", c) for c in profiling.CATEGORIES},
                median_step_ms=res.median_total_ms, unprofiled_step_ms=res.median_unprofiled_ms,
                machinery_pct=statistics.median(p["machinery_pct"] for p in per_step), per_step=per_step,
                call=dict(call_ms=call_ms, encode_ms=encode_ms, decode_ms=decode_ms, steps_ms=steps_ms,
                          num_steps=len(steps), model_ms=in_steps["model"], scheduler_ms=in_steps["scheduler"],
                          merge_other_ms=in_steps["merge"] + in_steps["other"], rest_ms=rest_ms,
                          gather_stitch_ms=gather_stitch_ms,
                          rest_top_ops=sorted(rest_ops.items(), key=lambda kv: -kv[1])[:6]))


# -- command line ------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = harness.argument_parser(__doc__, device=False)
    ap.add_argument("--lengths", type=float, nargs="+", default=None, help="minutes of the scaling table")
    ap.add_argument("--methods", nargs="+", default=None, help="default safa multidiffusion")
    ap.add_argument("--scaling-vbs", type=_vbs_arg, nargs="*", default=None,
                    help="extra safa scaling rows with these view_batch_size values")
    ap.add_argument("--decode-lengths", type=float, nargs="*", default=None, help="minutes of the decode rows")
    ap.add_argument("--mem-lengths", type=float, nargs="*", default=None, help="minutes of the memory rows")
    ap.add_argument("--mem-decode-lengths", type=float, nargs="*", default=None,
                    help="minutes of the decode='tiled' memory rows")
    ap.add_argument("--vbs", type=_vbs_arg, nargs="+", default=None,
                    help="view_batch_size values of the memory rows ('none' = all windows)")
    ap.add_argument("--steps", type=int, default=None, help="steps per timed call")
    ap.add_argument("--mem-steps", type=int, default=None, help="steps per memory child")
    ap.add_argument("--rounds", type=int, default=None, help="timed calls per configuration")
    ap.add_argument("--window", type=float, default=None, help="window in seconds (default: native 10.24 s)")
    ap.add_argument("--profile-seconds", type=float, default=None, help="length of the share profile")
    ap.add_argument("--mem-jobs", type=int, default=None, help="memory children at a time")
    ap.add_argument("--skip", nargs="*", default=[], choices=PARTS)
    args = ap.parse_args(argv)
    args.mode, args.threads, _ = harness.configure(args, ap)
    for key, value in SETTINGS[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 2:
        ap.error("--steps must be >= 2 (a step time is an interval between steps)")
    if args.rounds < 1 or args.mem_jobs < 1:
        ap.error("--rounds and --mem-jobs must be >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_mem-child"]:
        _mem_child(json.loads(argv[1]))
        return 0
    args = parse_args(argv)
    result: Dict[str, Any] = {}
    if "memory" not in args.skip:  # first: no timing runs beside the children
        result["memory"] = measure_memory(args)
    from safa import JointDiffusion
    from safa.testing import tiny_audioldm_pipeline
    pipe = tiny_audioldm_pipeline(SEED)
    pipe.set_progress_bar_config(disable=True)
    jd = JointDiffusion(pipe)
    if "scaling" not in args.skip:
        result["scaling"] = measure_scaling(jd, args)
    if "planning" not in args.skip:
        result["planning"] = measure_planning(jd, args)
    if "share" not in args.skip:
        result["share"] = measure_share(jd, args)
    path = harness.record("audio", torch.device("cpu"), [], args.threads, **result)
    print(report.render_file_section("audio", path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
