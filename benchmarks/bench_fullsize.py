"""Every method on full-size architectures (random weights): time per step, window evaluations, peak memory.

    python benchmarks/bench_fullsize.py [--mode smoke|quick|full] [--configs paper] [--resume]
                                        [--device cpu|cuda] [--threads N]
    python benchmarks/bench_fullsize.py --reestimate | --memory

The pipelines of benchmarks/fullsize.py: Stable Diffusion 2.0 base (UNet 866 M parameters,
VAE) and AudioLDM-S full v2 (UNet, VAE, HiFi-GAN), built from their published configs with
random weights (no download; the text encoders are one-layer stand-ins, they run once per
call). Random weights give the real cost of a window evaluation, not the real output.

- **image**: SD 2.0 at 512 x W px, DDIM, CFG 7.5, the paper's panorama settings (Sec. 3.2):
  SaFa and SaFa* at overlap 0.2, MD, MD*, MAD and SyncDiffusion at overlap 0.8 (SyncDiffusion
  with a mean-squared-error loss on the decoded views: no LPIPS weights here), and diffusers'
  own ``StableDiffusionPanoramaPipeline`` (window 64, stride 8: its defaults) with
  ``view_batch_size`` 1 and all views in one batch, on the same modules;
- **audio**: AudioLDM at 60 s (10 min in full mode), every method at overlap 0.2 (Sec. 3.1), CFG 3.5.

One call per configuration (``output_type="latent"``; a window evaluation takes seconds, so
configurations run once, side by side, instead of in rounds), each measured for: **step s**
= the call's time (harness clock) / steps (prompt encoding with the one-layer encoder and the
set-up are inside it), **model s** = the denoiser's forward calls inside the call
(harness.ModelClock), **window evals** (denoiser batch rows / 2 under classifier-free
guidance), and the **peak memory** of the call above the memory before it, weights excluded
(they are loaded before): on the CPU the resident set size sampled every 2 ms by a thread,
after ``malloc_trim``, and the live tensor bytes (``safa.profiling.memory.LiveTensorPeak``);
on CUDA ``max_memory_allocated`` (live tensors too), against the estimate the sampler checks
before the same call (``safa.memory.estimate_request``), which models live tensors.

Modes: ``smoke`` runs the same code on safa.testing's tiny pipelines (CI); ``quick`` the
full-size models, one thread, one step, 512x1024 px with SaFa, MD and the diffusers pipeline
(all views in one batch), and 60 s of audio with every method but SyncDiffusion; ``full``
every configuration, 512x1024 and 512x2048 px, 60 s and 10 min, 2 steps, 1 and 2 threads,
AudioLDM in fp32 and bf16. ``--configs paper`` (any mode): the side-by-side table of
benchmarks/README.md, every configuration at 512x1024 and 60 s (fp32 and bf16), one step,
one thread. ``--resume`` keeps the recorded rows and measures the missing ones;
``--reestimate`` recomputes the recorded rows' estimates with this checkout's estimate.
On CUDA (the GPU kit), quick and full mode run full mode's configurations at 512x1024,
512x2048 and the paper's 512x3200 px.

``--memory`` instead checks the adapters' working-memory estimate of the denoiser: one
no-grad UNet call per batch size, live tensor bytes and RSS against ``denoiser_memory``
(docs/long-audio.md, "Where memory goes"); and the same for the DiTs (SD3-medium, FLUX.1-dev,
Stable Audio Open) at full width, a block or two deep (``fullsize.dit_block``).
"""
from __future__ import annotations

import ctypes
import gc
import os
import sys
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

import bench_methods
import fullsize
import harness
import report

ALL_IMAGE = ("safa", "safa_selfloop", "multidiffusion", "multidiffusion_triangular", "mad", "syncdiffusion",
             "panorama vbs 1", "panorama vbs all")
ALL_AUDIO = ("safa", "safa_selfloop", "multidiffusion", "multidiffusion_triangular", "mad", "syncdiffusion")
# audio_dtypes: AudioLDM runs in each (bf16 against fp32); SD 2.0 in fp32 only (a full-size bf16
# UNet on a CPU without bf16 matrix units is the slowest configuration of all).
SETTINGS = {
    "smoke": dict(kind="tiny", threads=(1,), steps=1, widths=(1024,), seconds=(24.0,), image=ALL_IMAGE,
                  audio=ALL_AUDIO, audio_dtypes=("fp32", "bf16")),
    "quick": dict(kind="full", threads=(1,), steps=1, widths=(1024,), seconds=(60.0,),
                  image=("safa", "multidiffusion", "panorama vbs all"), audio=ALL_AUDIO[:5], audio_dtypes=("fp32",)),
    "full": dict(kind="full", threads=(1, 2), steps=2, widths=(1024, 2048), seconds=(60.0, 600.0), image=ALL_IMAGE,
                 audio=ALL_AUDIO, audio_dtypes=("fp32", "bf16")),
    # --configs paper: the side-by-side table of benchmarks/README.md in one process: every
    # configuration at 512x1024 and 60 s, one step, one thread (about an hour of CPU here).
    # SyncDiffusion last: its gradient through the UNet and the VAE decoder is the largest peak.
    "paper": dict(kind="full", threads=(1,), steps=1, widths=(1024,), seconds=(60.0,),
                  image=tuple(n for n in ALL_IMAGE if n != "syncdiffusion") + ("syncdiffusion",),
                  audio=ALL_AUDIO, audio_dtypes=("fp32", "bf16")),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODELS = {"image": "Stable Diffusion 2.0 base (stabilityai/stable-diffusion-2-base)",
          "audio": "AudioLDM-S full v2 (cvssp/audioldm-s-full-v2)"}
PROMPTS = {"image": "a photo of the dolomites", "audio": "rain on a tin roof"}
GUIDANCE = {"image": 7.5, "audio": 3.5}


class PeakMemory:
    """Peak memory of a block above its start: CUDA allocator statistics, else RSS sampled by a thread."""

    def __init__(self, device: torch.device, interval: float = 0.002) -> None:
        self.device, self.interval, self.peak = device, interval, 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._rss() - self.start)

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        try:  # hand freed heap back first, so that reuse of memory kept from earlier calls is not missed
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.start = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss() - self.start)


def _overlap(kind: str, name: str) -> float:
    return 0.8 if kind == "image" and not name.startswith("safa") else 0.2


def _method(name: str, kind: str) -> Any:
    """The method of a configuration. SyncDiffusion takes its gradient steps in every step
    (``steps=1.0``) so that its step is the one measured; a generation has them in its first 20%."""
    from safa import SyncDiffusion, get_method
    if name == "syncdiffusion":
        return SyncDiffusion(steps=1.0, **({"loss": bench_methods._image_mse} if kind == "image" else {}))
    return get_method(name)


def estimate(jd: Any, kind: str, name: str, size: Dict[str, Any], steps: int) -> int:
    """The peak of the estimate the sampler checks before configuration ``name``'s call
    (``safa.memory.estimate_request`` of the same request: output_type="latent", ``steps``
    steps; weights not counted)."""
    from safa import memory, request
    call = request.build_request(jd.adapter, overlap=_overlap(kind, name), method=_method(name, kind),
                                 guidance_scale=GUIDANCE[kind], num_inference_steps=steps, output_type="latent",
                                 check_paths=False, **size)
    return memory.estimate_request(jd.adapter, jd.pipe.scheduler, call).peak


def configurations(kind: str, pipe: Any, size: Dict[str, Any], steps: int, names: Sequence[str],
                   device: torch.device) -> List[Dict[str, Any]]:
    """(name, views, run, estimate) per configuration; run() makes one call."""
    from safa import JointDiffusion
    jd = JointDiffusion(pipe)
    common = dict(num_inference_steps=steps, guidance_scale=GUIDANCE[kind], output_type="latent")
    configs = []
    for name in names:
        if name.startswith("panorama"):
            from diffusers import StableDiffusionPanoramaPipeline
            pano = StableDiffusionPanoramaPipeline(**pipe.components)
            pano.set_progress_bar_config(disable=True)
            views = len(pano.get_views(size["height"], size["width"]))
            vbs = 1 if name.endswith("1") else views

            def run(pano: Any = pano, vbs: int = vbs) -> None:
                pano(PROMPTS[kind], view_batch_size=vbs, generator=torch.Generator(device).manual_seed(0), **size,
                     **common)
            configs.append(dict(name=name, method=None, overlap=1 - 8 / 64, views=views, run=run, estimate=None))
            continue
        method = _method(name, kind)
        layout = jd.layout_for(seconds=size.get("seconds"), width=size.get("width"), overlap=_overlap(kind, name),
                               method=method)

        def run(method: Any = method, overlap: float = _overlap(kind, name)) -> None:
            jd(PROMPTS[kind], method=method, overlap=overlap, generator=torch.Generator(device).manual_seed(0),
               **size, **common)
        configs.append(dict(name=name, method=name, overlap=_overlap(kind, name), views=layout.num_views, run=run,
                            estimate=estimate(jd, kind, name, size, steps)))
    return configs


def measure_one(config: Dict[str, Any], denoiser: torch.nn.Module, device: torch.device, steps: int) -> Dict[str, Any]:
    """One call of ``config``: time, model time, window evaluations, and its peak memory above the
    memory before it, twice on the CPU: live tensor bytes (``live_bytes``: what the estimate
    models, and what CUDA's allocator peak is) and resident set size (``peak_bytes``: the live
    bytes plus the freed heap glibc keeps). The weights are loaded before, so neither counts them."""
    from safa.profiling.memory import LiveTensorPeak
    clock = harness.timer(device)
    live = LiveTensorPeak() if device.type == "cpu" else None
    with PeakMemory(device) as memory, harness.ModelClock(denoiser, device) as model_clock:
        if live is not None:
            live.__enter__()
        t0 = clock()
        try:
            config["run"]()
        finally:
            if live is not None:
                live.__exit__(None, None, None)
        seconds = clock() - t0
        model_s = model_clock.take()
    live_bytes = live.peak if live is not None else memory.peak
    record = {k: v for k, v in config.items() if k != "run"}
    record.update(steps=steps, call_s=seconds, step_s=seconds / steps, model_s=model_s,
                  denoiser_calls=model_clock.calls, window_evals=model_clock.rows / 2,
                  peak_bytes=memory.peak, live_bytes=live_bytes, estimate_bytes=config["estimate"])
    print(f"  {config['name']:<28} step {record['step_s']:.2f} s, model {model_s:.2f} s, "
          f"{record['window_evals']:g} window evals, peak +{memory.peak / 2**20:.0f} MiB (live {live_bytes / 2**20:.0f})"
          + (f", estimate {config['estimate'] / 2**20:.0f} MiB" if config["estimate"] else ""), flush=True)
    return record


def _sizes(kind: str, st: Dict[str, Any]) -> List[Dict[str, Any]]:
    return ([dict(height=512, width=w) for w in st["widths"]] if kind == "image"
            else [dict(seconds=s) for s in st["seconds"]])


def _key(record: Dict[str, Any]) -> tuple:
    return (record["kind"], record.get("dtype", "fp32"), record["threads"], record.get("width"),
            record.get("seconds"), record["name"])


def measure(device: torch.device, st: Dict[str, Any], threads_given: Optional[int],
            keep: Callable[[List[Dict[str, Any]]], Any], done: Sequence[Dict[str, Any]] = ()) -> List[Dict[str, Any]]:
    """Every configuration of the settings ``st``; ``keep(records)`` after each one, so that a
    run cut short (a full-size step takes minutes on a CPU) leaves the rows it measured.
    ``done``: rows measured already (``--resume``), kept and not measured again."""
    thread_counts = (threads_given,) if threads_given else st["threads"]
    records: List[Dict[str, Any]] = list(done)
    measured = {_key(r) for r in done}
    # AudioLDM in fp32 first (every method in a few minutes of CPU), then SD 2.0 (about 20 s a
    # window), then AudioLDM in bf16 (a CPU's slowest dtype), so a run cut short loses the least.
    builders: Dict[str, Callable[[str], Any]] = {"audio": fullsize.audioldm_pipeline, "image": fullsize.sd2_pipeline}
    jobs = [("audio", "fp32"), ("image", "fp32")] + [("audio", d) for d in st["audio_dtypes"] if d != "fp32"]
    for kind, dtype in jobs:  # one full-size model in memory at a time
        pipe = builders[kind](st["kind"]).to(device=device, dtype=DTYPES[dtype])
        params = fullsize.parameters(pipe.unet)
        for threads in thread_counts:
            harness.set_threads(threads)
            for size in _sizes(kind, st):
                print(f"fullsize: {kind}, {size}, {dtype}, {threads} thread(s)", flush=True)
                names = [n for n in st[kind] if (kind, dtype, threads, size.get("width"), size.get("seconds"), n)
                         not in measured]
                for config in configurations(kind, pipe, size, st["steps"], names, device):
                    records.append(dict(measure_one(config, pipe.unet, device, st["steps"]), kind=kind,
                                        model=MODELS[kind], weights=st["kind"], unet_parameters=params,
                                        dtype=dtype, threads=threads, clock=harness.clock_name(device), **size))
                    keep(records)
        del pipe
        gc.collect()
    return records


def reestimate(path: Any) -> None:
    """Recompute ``estimate_bytes`` of the recorded fullsize rows with the estimate of this
    checkout (the estimate is arithmetic on the request: no call is made), keeping the measurements."""
    import json
    from safa import JointDiffusion
    data = json.loads(path.read_text())
    records = data["benchmarks"]["fullsize"]["records"]
    builders = {"audio": fullsize.audioldm_pipeline, "image": fullsize.sd2_pipeline}
    for key in sorted({(r["kind"], r["weights"], r.get("dtype", "fp32")) for r in records}):
        kind, weights, dtype = key
        jd = JointDiffusion(builders[kind](weights).to(dtype=DTYPES[dtype]))
        for r in records:
            if (r["kind"], r["weights"], r.get("dtype", "fp32")) == key and r["method"]:
                size = {k: r[k] for k in ("height", "width", "seconds") if k in r}
                r["estimate_bytes"] = estimate(jd, kind, r["name"], size, r["steps"])
                print(f"  {kind} {dtype} {r['name']}: estimate {r['estimate_bytes'] / 2**20:.0f} MiB, "
                      f"live {r.get('live_bytes', 0) / 2**20:.0f} MiB", flush=True)
        del jd
        gc.collect()
    harness.write_json(path, data)


# -- the denoiser's working memory against the adapters' estimate (--memory) -------------------------
MEMORY_POINTS = {"audio": (1, 16), "image": (1, 2)}  # batch rows of one denoiser call (16: 8 views under CFG)


def measure_denoiser_memory(kind: str, rows_list: Sequence[int] = ()) -> List[Dict[str, Any]]:
    """One no-grad denoiser call of the full-size ``kind`` model ("audio": AudioLDM-S at its 256x16
    window, "image": SD 2.0 at 64x64) per batch size: the peak of live tensor bytes
    (safa.profiling.memory.LiveTensorPeak) and of RSS above the start, beside the adapter's
    ``denoiser_memory`` estimate. One model in memory at a time; SD 2.0 at 2 rows takes a minute."""
    from safa.adapters import get_adapter
    from safa.profiling.memory import LiveTensorPeak
    pipe = (fullsize.audioldm_pipeline if kind == "audio" else fullsize.sd2_pipeline)("full")
    adapter = get_adapter(pipe)
    window = adapter.latent_shape(1, adapter.native_window(), None) if kind == "audio" else \
        adapter.latent_shape(1, adapter.native_window())
    unet = pipe.unet
    out = []
    for rows in rows_list or MEMORY_POINTS[kind]:
        x = torch.randn((rows,) + tuple(window[1:]))
        cond = (dict(encoder_hidden_states=None, class_labels=torch.randn(rows, 512)) if kind == "audio"
                else dict(encoder_hidden_states=torch.randn(rows, 77, unet.config.cross_attention_dim)))
        with torch.no_grad(), PeakMemory(torch.device("cpu")) as rss, LiveTensorPeak() as live:
            unet(x, torch.tensor(500), **cond)
        estimate = adapter.denoiser_memory(rows, False, tuple(window))
        out.append(dict(kind=kind, model=MODELS[kind], rows=rows, window=list(window), live_bytes=live.peak,
                        rss_bytes=rss.peak, estimate_bytes=estimate))
        print(f"  {kind} {rows} rows: live peak {live.peak / 2**20:.0f} MiB, RSS peak +{rss.peak / 2**20:.0f} MiB, "
              f"estimate {estimate / 2**20:.0f} MiB ({estimate / live.peak:.2f}x live, "
              f"{estimate / rss.peak:.2f}x RSS)", flush=True)
    del pipe, unet
    gc.collect()
    return out


# One window per DiT: SD3 / Flux at 512 x 512 px (64 x 64 latent), Stable Audio at its 1024 frames.
DIT_WINDOWS = {"sd3": (1, 16, 64, 64), "flux": (1, 16, 64, 64), "stable-audio": (1, 64, 1024)}


def _dit_inputs(kind: str, pipe: Any, rows: int) -> Dict[str, Any]:
    """Random inputs of one DiT call with the full-size conditioning widths (the tiny pipeline's
    text encoders do not have them)."""
    cfg, window = pipe.transformer.config, DIT_WINDOWS[kind]
    if kind == "sd3":
        text = int(getattr(pipe, "tokenizer_max_length", 77)) + 256  # CLIP + the pipeline's T5 default
        return dict(hidden_states=torch.randn((rows,) + window[1:]),
                    encoder_hidden_states=torch.randn(rows, text, cfg.joint_attention_dim),
                    pooled_projections=torch.randn(rows, cfg.pooled_projection_dim), timestep=torch.full((rows,), 500.0))
    if kind == "flux":
        tokens, text = (window[-2] // 2) * (window[-1] // 2), 512
        return dict(hidden_states=torch.randn(rows, tokens, cfg.in_channels),
                    encoder_hidden_states=torch.randn(rows, text, cfg.joint_attention_dim),
                    pooled_projections=torch.randn(rows, cfg.pooled_projection_dim), timestep=torch.full((rows,), 0.5),
                    img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3), guidance=torch.full((rows,), 3.5))
    return dict(hidden_states=torch.randn((rows,) + window[1:]), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(rows, 130, cfg.cross_attention_dim),
                global_hidden_states=torch.randn(rows, 1, cfg.global_states_input_dim))


def measure_dit_memory(kind: str, rows_list: Sequence[int] = (1, 2)) -> List[Dict[str, Any]]:
    """``measure_denoiser_memory`` for a DiT: its no-grad call on :data:`DIT_WINDOWS` per batch size."""
    from safa.adapters import get_adapter
    from safa.profiling.memory import LiveTensorPeak
    pipe = fullsize.dit_block(kind)
    adapter, out = get_adapter(pipe), []
    for rows in rows_list:
        inputs = _dit_inputs(kind, pipe, rows)
        with torch.no_grad(), LiveTensorPeak() as live:
            pipe.transformer(**inputs)
        estimate = adapter.denoiser_memory(rows, False, DIT_WINDOWS[kind])
        out.append(dict(kind=kind, rows=rows, window=list(DIT_WINDOWS[kind]), live_bytes=live.peak,
                        estimate_bytes=estimate))
        print(f"  {kind} {rows} rows: live peak {live.peak / 2**20:.0f} MiB, estimate {estimate / 2**20:.0f} MiB "
              f"({estimate / live.peak:.2f}x live)", flush=True)
    del pipe
    gc.collect()
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--memory" in argv:  # the memory check alone: python benchmarks/bench_fullsize.py --memory
        harness.set_threads(1)
        for kind in ("audio", "image"):
            measure_denoiser_memory(kind)
        for kind in DIT_WINDOWS:
            measure_dit_memory(kind)
        return 0
    p = harness.argument_parser(__doc__)
    p.add_argument("--configs", choices=("paper",), default=None,
                   help="paper: the side-by-side table (every configuration at 512x1024 and 60 s, fp32 and bf16 "
                        "audio, one step, one thread) whatever the mode")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows of this machine's recorded fullsize section and measure only the missing ones")
    p.add_argument("--reestimate", action="store_true",
                   help="recompute the recorded rows' memory estimates with this checkout's estimate, then exit")
    args = p.parse_args(argv)
    # One thread count when given (--threads, or run.py's SAFA_BENCH_THREADS), else the mode's.
    given = args.threads or int(os.environ.get("SAFA_BENCH_THREADS") or 0) or None
    mode, threads, device = harness.configure(args, p)
    path = harness.results_path(device)
    if args.reestimate:
        reestimate(path)
        print(report.render_file_section("fullsize", path))
        return 0
    st = SETTINGS[args.configs or mode]
    if device.type == "cuda" and mode != "smoke":  # the GPU kit: the paper's 512x3200 beside the CPU sizes
        st = dict(SETTINGS[args.configs or "full"], widths=(1024, 2048, 3200), threads=(1,))

    def keep(records: List[Dict[str, Any]]) -> Any:
        return harness.record("fullsize", device, records, threads, configs=args.configs or mode,
                              paper_seconds=bench_methods.PAPER_SECONDS["SD 2.0"])
    done = []
    if args.resume and path.exists():
        import json
        done = json.loads(path.read_text())["benchmarks"].get("fullsize", {}).get("records", [])
    measure(device, st, given, keep, done)
    print(report.render_file_section("fullsize", path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
