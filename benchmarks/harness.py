"""The one timing helper of every benchmark here: modes, threads, timing, statistics, the machine, results.

- **Mode** (``SAFA_BENCH_MODE`` or ``--mode``): ``smoke`` (tiny sizes, a few rounds: CI
  runs it so a broken benchmark fails there), ``quick`` (``make bench``) or ``full``
  (``make bench-full``). :func:`budget` gives a mode's warm-up calls and rounds.
- **Threads**: :func:`set_threads` sets torch's intra-op threads explicitly (``SAFA_BENCH_THREADS``,
  default 1: on a shared 2-core machine an OpenMP region waits for a descheduled thread,
  and the measurement becomes one of the scheduler) and returns the number for the record.
- **Timing**: :func:`timer` is the clock (CUDA: synchronised wall time; CPU with one
  thread: the process's CPU time); :func:`time_calls` does the mode's warm-up calls, then
  ``torch.utils.benchmark.Timer.blocked_autorange`` with that clock: torch picks the calls
  per block and runs blocks for the mode's ``min_run_time``. The op benchmarks
  (bench_ops.py, through conftest.py's ``op_timer``) time every op this way.
  :class:`StepClock` timestamps the denoising steps of a pipeline call; :class:`ModelClock`
  times the denoiser's forward calls inside them, for the ratio of a step to the work of
  the model alone.
- **Statistics**: :class:`Stats` (median, interquartile range, min/max, blocks), all in
  seconds per call, read from a ``torch.utils.benchmark.Measurement`` (:meth:`Stats.of` wraps
  a pipeline benchmark's own samples, e.g. step intervals, in one).
- **Machine and results**: :func:`describe_machine`, :func:`machine_id`, and :func:`record`,
  which writes one section (``ops``, ``audio``, ...) of ``benchmarks/results/<machine>.json``
  (``SAFA_BENCH_RESULTS`` overrides the folder; smoke runs go to out/bench-smoke) whole or
  not at all. ``benchmarks/report.py``
  turns those files into the tables of benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch.utils.benchmark import Measurement, Timer
from torch.utils.benchmark.utils.common import TaskSpec

MODES = ("smoke", "quick", "full")
HERE = Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "results"


# -- mode and threads ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Budget:
    """How long to measure: warm-up calls, then timed blocks for at least ``min_run_time``
    seconds (``Timer.blocked_autorange``; torch sizes the blocks)."""

    warmup: int
    min_run_time: float


BUDGETS = {"smoke": Budget(warmup=1, min_run_time=0.002),
           "quick": Budget(warmup=3, min_run_time=0.2),
           "full": Budget(warmup=10, min_run_time=1.0)}


def mode() -> str:
    """The benchmark mode of this process (``SAFA_BENCH_MODE``, default ``quick``)."""
    value = os.environ.get("SAFA_BENCH_MODE", "quick")
    if value not in MODES:
        raise ValueError(f"SAFA_BENCH_MODE must be one of {MODES}, got {value!r}")
    return value


def set_mode(value: str) -> str:
    if value not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {value!r}")
    os.environ["SAFA_BENCH_MODE"] = value
    return value


def budget(for_mode: Optional[str] = None) -> Budget:
    return BUDGETS[for_mode or mode()]


def set_threads(threads: Optional[int] = None) -> int:
    """Set torch's intra-op threads (argument, else ``SAFA_BENCH_THREADS``, else 1); return it."""
    n = threads if threads is not None else int(os.environ.get("SAFA_BENCH_THREADS", "1"))
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    os.environ["SAFA_BENCH_THREADS"] = str(n)  # child processes use the same
    return n


def argument_parser(description: str, device: bool = True) -> argparse.ArgumentParser:
    """A benchmark script's parser with the options all of them take: --mode, --threads, --device."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=MODES, default=None, help="default: SAFA_BENCH_MODE, else quick")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default SAFA_BENCH_THREADS, else 1)")
    if device:
        p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return p


def configure(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Tuple[str, int, torch.device]:
    """Apply --mode and --threads; return (mode, threads, device), with a usage error for a
    CUDA device torch does not see."""
    run_mode = set_mode(args.mode) if args.mode else mode()
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    threads = set_threads(args.threads)
    name = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device must be cpu or cuda, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    return run_mode, threads, device


# -- statistics ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Stats:
    """Seconds per call over the timed blocks (``rounds`` of them), from a torch Measurement."""

    median: float
    iqr: float
    min: float
    max: float
    rounds: int

    @classmethod
    def from_measurement(cls, m: Measurement) -> "Stats":
        return cls(m.median, m.iqr, min(m.times), max(m.times), len(m.times))

    @classmethod
    def of(cls, samples: Sequence[float], calls_per_sample: int = 1, label: str = "samples") -> "Stats":
        """Statistics of durations measured by a benchmark itself (step intervals, whole calls),
        each covering ``calls_per_sample`` calls."""
        if not samples:
            raise ValueError("no samples to summarise")
        task = TaskSpec(stmt=label, setup="", num_threads=torch.get_num_threads())
        return cls.from_measurement(Measurement(number_per_run=calls_per_sample, raw_times=list(samples),
                                                task_spec=task))

    @property
    def spread(self) -> float:
        """Interquartile range over the median."""
        return self.iqr / self.median if self.median else float("nan")

    def to_dict(self) -> Dict[str, float]:
        return dataclasses.asdict(self)


# -- timing ----------------------------------------------------------------------------------
def timer(device: torch.device) -> Callable[[], float]:
    """The clock of every measurement on ``device``.

    CUDA: wall time (``perf_counter``) read after a synchronisation, so a span between two
    readings covers the device work queued in it. CPU with one torch thread: the process's
    CPU time (user + system, ``process_time``), which on a shared machine leaves out the time
    the scheduler gives to other jobs (on the 2-core development VM, wall-time medians of the
    same op moved by 2x with the load, CPU-time medians by a few percent). CPU with more
    threads: wall time (CPU time would add the threads up)."""
    if device.type == "cuda":
        def read() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return read
    return time.process_time if torch.get_num_threads() == 1 else time.perf_counter


def clock_name(device: torch.device) -> str:
    """What :func:`timer` measures, for the records."""
    if device.type == "cuda":
        return "wall time, device synchronised"
    return "process CPU time" if torch.get_num_threads() == 1 else "wall time"


def time_calls(fn: Callable[[], Any], device: torch.device, plan: Optional[Budget] = None,
               clock: Optional[Callable[[], float]] = None) -> Tuple[Stats, int]:
    """Warm-up calls, then ``Timer.blocked_autorange`` over ``fn`` with the harness clock.

    Returns the statistics per call and the calls per block torch chose (a sub-millisecond
    op is timed over many calls per block, so the clock's own cost does not count).
    ``clock`` replaces :func:`timer` (tests)."""
    plan = plan or budget()
    for _ in range(plan.warmup):
        fn()
    # num_threads: Timer would otherwise run the statement with one torch thread.
    t = Timer(stmt="fn()", globals={"fn": fn}, timer=clock or timer(device), num_threads=torch.get_num_threads())
    m = t.blocked_autorange(min_run_time=plan.min_run_time)
    return Stats.from_measurement(m), m.number_per_run


class ModelClock:
    """Times every forward call of ``module`` (the denoiser) with hooks; nothing is patched.

    On CUDA each call is bracketed by CUDA events (no synchronisation inside the step), read
    when :meth:`take` is called after a synchronisation; on CPU by :func:`timer`. Use it
    on eager modules only: a compiled module or a CUDA-graph replay does not run the hooks.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.device, self._read = device, timer(device)
        self.calls = self.rows = 0  # forward calls and batch rows (of the first input), in all
        self._open: List[Any] = []
        self._done: List[Any] = []
        self._handles = [module.register_forward_pre_hook(self._start, with_kwargs=True),
                         module.register_forward_hook(self._stop)]

    def _stamp(self) -> Any:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return self._read()

    def _start(self, _module: Any, args: Any, kwargs: Any) -> None:
        sample = args[0] if args else kwargs.get("sample")
        self.calls += 1
        self.rows += int(sample.shape[0]) if isinstance(sample, torch.Tensor) else 0
        self._open.append(self._stamp())

    def _stop(self, *_: Any) -> None:
        self._done.append((self._open.pop(), self._stamp()))

    def take(self) -> float:
        """Seconds of forward calls since the last take (the device must be synchronised)."""
        if self.device.type == "cuda":
            total = sum(a.elapsed_time(b) for a, b in self._done) / 1e3
        else:
            total = sum(b - a for a, b in self._done)
        self._done.clear()
        return total

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def __enter__(self) -> "ModelClock":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


class StepClock:
    """``callback_on_step_end`` that timestamps each step (after a device synchronisation).

    ``intervals`` are the step durations from step 1 on (step 0's interval would include the
    call's set-up); with a :class:`ModelClock`, ``model`` holds the denoiser seconds inside
    each of those intervals. ``returns_kwargs``: for diffusers pipelines, which expect the
    callback's keyword dict back.
    """

    def __init__(self, device: torch.device, model: Optional[ModelClock] = None, returns_kwargs: bool = False) -> None:
        self.device, self.model_clock, self.returns_kwargs = device, model, returns_kwargs
        self._read = timer(device)
        self.stamps: List[float] = []
        self.model: List[float] = []

    def __call__(self, *args: Any) -> Any:
        self.stamps.append(self._read())
        if self.model_clock is not None:
            seconds = self.model_clock.take()
            if len(self.stamps) > 1:
                self.model.append(seconds)
        # diffusers pipelines expect the callback kwargs back (returns_kwargs=True); for
        # JointDiffusion a returned dict would replace the state with itself: return None.
        return args[-1] if self.returns_kwargs else None

    @property
    def intervals(self) -> List[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


# -- the machine -----------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def machine_id(device: torch.device) -> str:
    """The results file's name: the GPU (``nvidia-h200``) or the CPU and its count (``...-2cpu``)."""
    if device.type == "cuda":
        return _slug(torch.cuda.get_device_name(device))
    return f"{_slug(_cpu_model())}-{os.cpu_count()}cpu"


def describe_machine(device: torch.device) -> Dict[str, Any]:
    info: Dict[str, Any] = {"id": machine_id(device), "cpu": _cpu_model(), "logical_cpus": os.cpu_count(),
                            "python": platform.python_version(), "torch": torch.__version__,
                            "platform": platform.platform(terse=True)}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    return info


def _loadavg() -> Optional[List[float]]:
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return None


def run_conditions(threads: int, device: torch.device) -> Dict[str, Any]:
    """What a section records about the run: mode, threads, date, load, the command."""
    command = os.environ.get("SAFA_BENCH_COMMAND")
    if not command:
        argv = [os.path.relpath(a) if os.path.exists(a) else a for a in sys.argv]
        if argv and os.path.basename(argv[0]) == "__main__.py":  # python -m package
            argv[0] = "-m " + os.path.basename(os.path.dirname(sys.argv[0]))
        command = " ".join(["python"] + argv)
    return {"mode": mode(), "threads": threads, "clock": clock_name(device),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_average": _loadavg(), "command": command}


# -- results ---------------------------------------------------------------------------------
def results_dir() -> Path:
    """``SAFA_BENCH_RESULTS``, else benchmarks/results; smoke runs (whose numbers mean nothing)
    go to out/bench-smoke instead, so CI never touches the recorded results."""
    if os.environ.get("SAFA_BENCH_RESULTS"):
        return Path(os.environ["SAFA_BENCH_RESULTS"])
    return HERE.parent / "out" / "bench-smoke" if mode() == "smoke" else DEFAULT_RESULTS


def results_path(device: torch.device) -> Path:
    return results_dir() / f"{machine_id(device)}.json"


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically: a reader sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def record(section: str, device: torch.device, records: Iterable[Dict[str, Any]], threads: int,
           **extra: Any) -> Path:
    """Replace ``section`` of this machine's results file with ``records`` and the run's conditions."""
    path = results_path(device)
    data = json.loads(path.read_text()) if path.exists() else {"benchmarks": {}}
    data["machine"] = describe_machine(device)
    data["benchmarks"][section] = dict(run_conditions(threads, device), records=list(records), **extra)
    write_json(path, data)
    return path
