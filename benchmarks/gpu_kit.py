"""The GPU kit: verify every CUDA and Triton path of safa on this machine in one call (``bash benchmarks/gpu.sh``).

    bash benchmarks/gpu.sh [--python PY] [--wheels DIR] [--budget SECONDS] [--only STAGE ...]
                           [--skip STAGE ...] [--dry-run] [--rehearse]

Made for a bare, offline GPU machine: it uses the Python it is given (``python3``, or
``--python`` / ``$PYTHON``) as it is, with the torch (CUDA build) and Triton already there:
no virtual environment, no download, nothing installed unless ``--wheels DIR`` names a
folder of wheels (``pip install --no-index --find-links DIR`` of whichever of diffusers,
transformers, pytest, hypothesis, soundfile, scipy is missing, with the
installed torch and triton pinned). Stages, each with its own time limit inside
``--budget`` (default 480 s):

- ``wheels``: the install above (only with ``--wheels``);
- ``build``: ``setup.py build_ext --inplace`` with that torch: the CPU and CUDA kernels for
  this GPU's architecture (``TORCH_CUDA_ARCH_LIST``); without nvcc, or if the CUDA build
  fails, the CPU-only build, so that Triton is still checked (a failed CUDA build fails the kit);
- ``tests``: ``pytest -m gpu`` over tests/kernels/test_gpu.py (every backend against the reference in
  every dtype, opcheck, torch.compile with inductor, CUDA graphs under sync debug mode
  "error", one launch per call), the Triton CUDA tests, and, with diffusers, the pipeline
  GPU tests (no host sync in the step loop, eager and CUDA graphs; one launch per step);
- ``sanitizer``: compute-sanitizer memcheck and racecheck over the small-size kernel tests
  (``test_every_path_matches_the_reference``, and ``test_every_grid_path_matches_the_reference``
  for the grids' runs), with PyTorch's caching allocator off so that
  an out-of-bounds access is one;
- ``ops``: the op microbenchmarks on CUDA against device-to-device copy_ bandwidth
  (benchmarks/bench_ops.py, quick mode);
- ``pipeline``: with diffusers, the per-step profile of a tiny AudioLDM eager / compile /
  CUDA graphs (benchmarks/bench_steps.py), then every method and diffusers' panorama pipeline
  on the full-size random-weight SD 2.0 and AudioLDM (benchmarks/bench_fullsize.py: up to
  512x3200 px and 10 min on CUDA);
- ``report``: the kit's own results (stages, test counts, skips and why, sanitizer output)
  as the ``gpu_checks`` section, then benchmarks/report.py: the README tables and the
  measured default backend of safa_kernels/tuning.py.

Results land in ``benchmarks/results/<gpu-name>.json``. Whatever cannot run (no
diffusers, no nvcc, no compute-sanitizer, a budget spent) is skipped and named, and the
summary printed last lists every stage. ``--dry-run`` prints what was found and what would
run; ``--rehearse`` runs the stages that work without a GPU on CPU, at smoke sizes, into
out/gpu-kit-rehearsal (a check of the kit itself). Exit status: 0 when every stage that ran
passed, 1 when one failed, 2 for bad arguments or a machine the kit cannot use.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STAGES = ("wheels", "build", "tests", "sanitizer", "ops", "pipeline", "report")
# Distribution name -> module it provides; what --wheels may install when missing.
WANTED = {"diffusers": "diffusers", "transformers": "transformers", "pytest": "pytest",
          "hypothesis": "hypothesis", "soundfile": "soundfile",
          "scipy": "scipy"}
LIMITS = {"wheels": 120, "build": 300, "tests": 240, "sanitizer": 150, "ops": 150, "pipeline": 400, "report": 60}
REPORT_RESERVE = 20  # seconds of the budget kept for the report stage
TEST_FILES = ["tests/kernels/test_gpu.py", "tests/kernels/test_triton_backend.py::TestCUDA", "tests/cli/test_perf_tooling.py"]
SANITIZED = ["tests/kernels/test_gpu.py", "-k", "every_path or every_grid_path"]  # strips' rows and grids' runs

PROBE = r"""
import importlib, json, sys
def importable(module):
    try:
        importlib.import_module(module)
        return True
    except Exception:  # absent, or present but broken: either way not usable
        return False
facts = {"python": sys.version.split()[0], "executable": sys.executable, "modules": {}}
for dist, module in json.loads(sys.argv[1]).items():
    facts["modules"][dist] = importable(module)
facts["xdist"] = importable("xdist")
try:
    import torch
    facts["torch"] = torch.__version__
    facts["torch_cuda"] = torch.version.cuda
    facts["cuda_available"] = torch.cuda.is_available()
    if facts["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        facts.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1))
    from torch.utils import cpp_extension
    facts["cuda_home"] = cpp_extension.CUDA_HOME
except Exception as exc:
    facts["torch_error"] = f"{type(exc).__name__}: {exc}"
try:
    import triton
    facts["triton"] = triton.__version__
except Exception:
    facts["triton"] = None
print("GPU_KIT_FACTS " + json.dumps(facts))
"""


@dataclass
class Stage:
    name: str
    run: bool
    reason: str = ""
    commands: List[List[str]] = field(default_factory=list)
    env: Dict[str, str] = field(default_factory=dict)
    status: str = "skipped"
    seconds: float = 0.0
    notes: List[str] = field(default_factory=list)


def probe(python: str, wanted: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """What ``python`` has: torch and its CUDA, the GPU, triton, which modules of ``wanted``
    (default WANTED) import."""
    done = subprocess.run([python, "-c", PROBE, json.dumps(wanted or WANTED)], capture_output=True, text=True,
                          timeout=300)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("GPU_KIT_FACTS ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{python} could not run the probe: {done.stderr.strip()[-500:]}")
    facts = json.loads(lines[-1].split(" ", 1)[1])
    facts["nvcc"] = find_tool("nvcc", facts.get("cuda_home"))
    facts["compute_sanitizer"] = find_tool("compute-sanitizer", facts.get("cuda_home"))
    facts["ninja"] = shutil.which("ninja") is not None
    return facts


def find_tool(name: str, cuda_home: Optional[str]) -> Optional[str]:
    for home in (cuda_home, os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", name), os.X_OK):
            return os.path.join(home, "bin", name)
    return shutil.which(name)


def plan(facts: Dict[str, Any], args: argparse.Namespace) -> List[Stage]:
    """Which stages run, with what, and why the others do not."""
    py = args.python
    mods = facts["modules"]
    cuda = bool(facts.get("cuda_available"))
    device = "cuda" if cuda and not args.rehearse else "cpu"
    mode = "smoke" if args.rehearse else "quick"
    stages: Dict[str, Stage] = {}

    missing = [d for d, ok in mods.items() if not ok]
    if not args.wheels:
        stages["wheels"] = Stage("wheels", False, "no --wheels DIR: nothing is installed"
                                 + (f" (missing: {', '.join(missing)})" if missing else ""))
    elif not missing:
        stages["wheels"] = Stage("wheels", False, "everything --wheels could install is already there")
    else:
        pins = [f"torch=={facts['torch']}"] + ([f"triton=={facts['triton']}"] if facts.get("triton") else [])
        stages["wheels"] = Stage("wheels", True, f"install {', '.join(missing)} from {args.wheels}", [
            [py, "-m", "pip", "install", "--no-index", "--find-links", args.wheels]
            + [f"--constraint={args.constraints}"] + missing], notes=[f"pinned: {', '.join(pins)}"])
        # Planned as if the install works; main() plans again after it with what is really there.
        mods = dict(mods, **{d: True for d in missing})

    build_env = {"MAX_JOBS": str(min(os.cpu_count() or 4, 16))}
    if device == "cuda" and facts.get("nvcc"):
        build_env.update(FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=facts["capability"],
                         CUDA_HOME=str(Path(facts["nvcc"]).parent.parent))
        stages["build"] = Stage("build", True, f"CPU + CUDA kernels for sm_{facts['capability'].replace('.', '')} "
                                f"with {facts['nvcc']}", [[py, "setup.py", "-q", "build_ext", "--inplace"]], build_env)
    else:
        why = ("no CUDA device" if device == "cpu" else
               "no nvcc found (set CUDA_HOME): the cuda backend is skipped, Triton is checked")
        build_env["FORCE_CUDA"] = "0"
        stages["build"] = Stage("build", True, f"CPU kernel only ({why})",
                                [[py, "setup.py", "-q", "build_ext", "--inplace"]], build_env)

    if not mods["pytest"]:
        stages["tests"] = Stage("tests", False, "pytest is not installed (give --wheels)")
    else:
        cmd = [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "gpu",
               f"--junitxml={args.out}/gpu-tests.xml"] + TEST_FILES
        if facts.get("xdist") and device == "cuda":
            cmd += ["-n", "4"]  # Triton compiles each specialisation on the CPU: 4 at a time
        note = "" if mods["diffusers"] else "; without diffusers the pipeline GPU tests skip"
        stages["tests"] = Stage("tests", True, "the GPU tests" + note, [cmd])

    if args.rehearse or device != "cuda":
        stages["sanitizer"] = Stage("sanitizer", False, "no CUDA device" + (" (rehearsal)" if args.rehearse else ""))
    elif not facts.get("compute_sanitizer"):
        stages["sanitizer"] = Stage("sanitizer", False, "compute-sanitizer not found (set CUDA_HOME)")
    elif not mods["pytest"]:
        stages["sanitizer"] = Stage("sanitizer", False, "pytest is not installed (give --wheels)")
    else:
        tool = facts["compute_sanitizer"]
        base = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider"] + SANITIZED
        stages["sanitizer"] = Stage(
            "sanitizer", True, "memcheck and racecheck over the small-size kernel tests",
            # --report-api-errors no: CUDA API calls that fail on purpose inside torch (capability
            # probes) are not memory errors; a failed launch of ours fails its test anyway.
            [[tool, "--tool", t, "--error-exitcode", "3", "--print-limit", "20", "--report-api-errors", "no"] + base
             for t in ("memcheck", "racecheck")],
            {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})

    if not mods["pytest"]:
        stages["ops"] = Stage("ops", False, "pytest is not installed (give --wheels)")
    else:
        stages["ops"] = Stage("ops", True, f"op microbenchmarks on {device} ({mode} mode) vs copy_",
                              [[py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/bench_ops.py",
                                "--bench-mode", mode, "--bench-devices", device]])

    if not mods["diffusers"] or not mods["transformers"]:
        stages["pipeline"] = Stage("pipeline", False, "diffusers is not installed: no pipeline benchmarks "
                                   "(give --wheels with diffusers to run them)")
    else:
        stages["pipeline"] = Stage("pipeline", True, f"per-step profile of the tiny AudioLDM, then every method on "
                                   f"full-size SD 2.0 / AudioLDM (512x3200 px, 10 min) on {device}",
                                   [[py, "benchmarks/bench_steps.py", "--mode", mode, "--device", device],
                                    [py, "benchmarks/bench_fullsize.py", "--mode", mode, "--device", device]])

    stages["report"] = Stage("report", True, "gpu_checks section, then README tables and tuning.py"
                             if not args.rehearse else "gpu_checks section (printed; README untouched)")
    for name, stage in stages.items():
        if stage.run and ((args.only and name not in args.only) or name in args.skip):
            stage.run, stage.reason = False, "not selected (--only / --skip)"
    return [stages[name] for name in STAGES]


def run_stage(stage: Stage, args: argparse.Namespace, deadline: float, base_env: Dict[str, str]) -> None:
    env = dict(base_env, **stage.env)
    started = time.monotonic()
    stage.status = "passed"
    for cmd in stage.commands:
        left = min(LIMITS[stage.name] - (time.monotonic() - started),
                   deadline - time.monotonic() - (REPORT_RESERVE if stage.name != "report" else 0))
        if left < 5:
            stage.status = "FAILED"
            stage.notes.append("out of time (budget)")
            break
        print(f"\n== gpu kit [{stage.name}] {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        rc, tail = _run(cmd, env, left)
        if rc is None:
            stage.status = "FAILED"
            stage.notes.append(f"timed out after {left:.0f} s: {cmd[0] if cmd[0] != args.python else cmd[1]} ...")
            break
        if rc != 0:
            stage.status = "FAILED"
            stage.notes.append(f"exit {rc}: {' '.join(cmd[:4])} ...")
            stage.notes += [ln for ln in tail if "ERROR SUMMARY" in ln or "FAILED" in ln][-5:]
            if stage.name != "sanitizer":
                break
        elif stage.name == "sanitizer":
            stage.notes += [f"{cmd[2]}: {ln.strip()}" for ln in tail if "ERROR SUMMARY" in ln][-1:]
    stage.seconds = time.monotonic() - started


def _run(cmd: List[str], env: Dict[str, str], timeout: float):
    """Run ``cmd`` with its output streamed through; (exit code, or None when it ran out of
    time and was killed with its children; its last lines)."""
    tail: List[str] = []
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line.rstrip())
            del tail[:-200]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc: Optional[int] = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = None
    reader.join(timeout=10)
    return rc, list(tail)


def build_fallback(stage: Stage, args: argparse.Namespace, deadline: float, env: Dict[str, str]) -> None:
    """A failed CUDA build: build the CPU kernel alone, so Triton is still checked (the stage stays failed)."""
    if stage.status == "passed" or stage.env.get("FORCE_CUDA") != "1":
        return
    retry = Stage("build", True, "", stage.commands, dict(stage.env, FORCE_CUDA="0"))
    run_stage(retry, args, deadline, env)
    stage.notes.append("CUDA build failed; CPU-only build " + ("succeeded: Triton is still checked"
                                                              if retry.status == "passed" else "failed too"))
    stage.seconds += retry.seconds


def test_counts(path: Path) -> Dict[str, Any]:
    """Passed / failed / skipped counts and the skip reasons of a JUnit XML file."""
    counts = dict(passed=0, failed=0, skipped=0, skip_reasons={})
    if not path.exists():
        return counts
    for case in ET.parse(path).getroot().iter("testcase"):
        skipped = case.find("skipped")
        if skipped is not None:
            counts["skipped"] += 1
            reason = (skipped.get("message") or "").replace("Skipped: ", "")
            counts["skip_reasons"][reason] = counts["skip_reasons"].get(reason, 0) + 1
        elif case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
        else:
            counts["passed"] += 1
    return counts


def record_checks(stages: List[Stage], facts: Dict[str, Any], args: argparse.Namespace, env: Dict[str, str]) -> None:
    """The kit's own results as the gpu_checks section (in a child: it needs torch and the built package)."""
    summary = dict(facts=facts, stages=[dict(name=s.name, ran=s.run, status=s.status, seconds=round(s.seconds, 1),
                                             reason=s.reason, notes=s.notes) for s in stages],
                   tests=test_counts(Path(args.out) / "gpu-tests.xml"))
    path = Path(args.out) / "gpu-checks.json"
    path.write_text(json.dumps(summary))
    code = ("import json, sys, torch, harness, report\n"
            "summary = json.load(open(sys.argv[1]))\n"
            "device = torch.device(sys.argv[2])\n"
            "out = harness.record('gpu_checks', device, summary['stages'], torch.get_num_threads(),"
            " tests=summary['tests'], facts=summary['facts'])\n"
            "print(report.render_file_section('gpu_checks', out))\n")
    device = "cuda" if facts.get("cuda_available") and not args.rehearse else "cpu"
    done = subprocess.run([args.python, "-c", code, str(path), device], cwd=HERE, env=env)
    if done.returncode != 0:
        raise RuntimeError("writing the gpu_checks section failed")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bash benchmarks/gpu.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", default=os.environ.get("PYTHON", "python3"),
                   help="the interpreter whose torch is checked (default: $PYTHON, else python3)")
    p.add_argument("--wheels", metavar="DIR", default=None,
                   help="a folder of wheels to install what is missing from (pip --no-index --find-links DIR)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole kit (default 480)")
    p.add_argument("--only", nargs="+", choices=STAGES, default=None, help="run only these stages")
    p.add_argument("--skip", nargs="+", choices=STAGES, default=[], help="leave these stages out")
    p.add_argument("--out", default=None, help="folder for the kit's logs (default out/gpu-kit)")
    p.add_argument("--dry-run", action="store_true", help="print what was found and what would run; run nothing")
    p.add_argument("--rehearse", action="store_true",
                   help="no GPU needed: run the CPU-capable stages at smoke sizes, results to out/gpu-kit-rehearsal")
    args = p.parse_args(argv)
    python = shutil.which(args.python)
    if python is None:
        p.error(f"--python: no interpreter {args.python!r}")
    args.python = os.path.abspath(python)
    if args.wheels is not None:
        wheels = Path(args.wheels)
        if not wheels.is_dir():
            p.error(f"--wheels: {args.wheels} is not a folder")
        if not any(wheels.glob("*.whl")):
            p.error(f"--wheels: {args.wheels} holds no .whl file")
        args.wheels = str(wheels.resolve())
    if not 60 <= args.budget <= 3600:
        p.error(f"--budget must be in [60, 3600] seconds, got {args.budget:g}")
    args.out = str(Path(args.out or ROOT / "out" / ("gpu-kit-rehearsal" if args.rehearse else "gpu-kit")).resolve())
    args.constraints = str(Path(args.out) / "constraints.txt")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    started = time.monotonic()
    deadline = started + args.budget
    try:
        facts = probe(args.python)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        print(f"gpu.sh: {exc}", file=sys.stderr)
        return 2
    if "torch_error" in facts:
        print(f"gpu.sh: {args.python} cannot import torch ({facts['torch_error']})", file=sys.stderr)
        return 2
    print(f"gpu kit: {facts['executable']} (Python {facts['python']}), torch {facts['torch']} "
          f"(CUDA {facts['torch_cuda']}), triton {facts.get('triton') or 'none'}; "
          f"GPU {facts.get('gpu', 'none')}; nvcc {facts['nvcc'] or 'none'}; "
          f"compute-sanitizer {facts['compute_sanitizer'] or 'none'}; "
          + ", ".join(f"{d} {'yes' if ok else 'NO'}" for d, ok in facts["modules"].items()))
    if not facts.get("cuda_available") and not (args.dry_run or args.rehearse):
        print(f"gpu.sh: torch {facts['torch']} at {facts['executable']} sees no CUDA device "
              f"({'a CPU-only build' if not facts.get('torch_cuda') else 'no GPU or no driver'}); this kit needs one. "
              "--dry-run shows what it would do; --rehearse checks the kit itself on CPU.", file=sys.stderr)
        return 2
    if args.dry_run and not facts.get("cuda_available") and not args.rehearse:
        print("gpu.sh: no CUDA device here: a real run stops at this point (exit 2); the plan of --rehearse:")
        args = parse_args(list(sys.argv[1:] if argv is None else argv) + ["--rehearse"])
    stages = plan(facts, args)
    for s in stages:
        print(f"  {'run ' if s.run else 'skip'} {s.name:<9} {s.reason}")
    if args.dry_run:
        for s in stages:
            for cmd in s.commands if s.run else []:
                env = " ".join(f"{k}={v}" for k, v in s.env.items())
                print(f"    {s.name}: {env + ' ' if env else ''}{' '.join(shlex.quote(c) for c in cmd)}")
        return 0
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in os.environ.get(
        "PYTHONPATH", "").split(os.pathsep) if p]), PYTHONUNBUFFERED="1",
        SAFA_BENCH_COMMAND="bash benchmarks/gpu.sh" + (" --rehearse" if args.rehearse else ""),
        SAFA_BENCH_MODE="smoke" if args.rehearse else "quick")
    if args.rehearse:
        env["SAFA_BENCH_RESULTS"] = args.out
    Path(args.constraints).write_text(f"torch=={facts['torch']}\n"
                                      + (f"triton=={facts['triton']}\n" if facts.get("triton") else ""))
    if stages[0].run:  # wheels first; then plan the rest with what is installed now
        run_stage(stages[0], args, deadline, env)
        facts = dict(facts, modules=probe(args.python)["modules"])
        done = stages[0]
        stages = [done] + [s for s in plan(facts, argparse.Namespace(**dict(vars(args), wheels=None)))
                           if s.name != "wheels"]
        for s in stages[1:]:
            print(f"  {'run ' if s.run else 'skip'} {s.name:<9} {s.reason}")
    for stage in stages[1:]:
        if not stage.run:
            continue
        if stage.name == "report":
            stage.status = "passed"
            t0 = time.monotonic()
            try:
                record_checks(stages, facts, args, env)
                if not args.rehearse:
                    rc, _ = _run([args.python, "benchmarks/report.py"], env, 60)
                    if rc != 0:
                        raise RuntimeError("benchmarks/report.py failed")
            except RuntimeError as exc:
                stage.status, stage.notes = "FAILED", [str(exc)]
            stage.seconds = time.monotonic() - t0
            continue
        run_stage(stage, args, deadline, env)
        if stage.name == "build":
            build_fallback(stage, args, deadline, env)
    failed = [s for s in stages if s.run and s.status != "passed"]
    print(f"\n== gpu kit: done in {time.monotonic() - started:.0f} s "
          f"({'all stages that ran passed' if not failed else 'FAILED: ' + ', '.join(s.name for s in failed)})")
    for s in stages:
        state = s.status if s.run else "skipped"
        print(f"   {s.name:<9} {state:<8} {s.seconds:6.0f} s  {s.reason}" + "".join(f"\n{'':<31}{n}" for n in s.notes))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
