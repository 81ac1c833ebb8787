"""The GPU kit (benchmarks/gpu.sh, benchmarks/gpu_kit.py) on a machine without a GPU.

What can be checked here: its arguments, its refusal of a torch without CUDA, the plan it
makes for a bare GPU machine (which stages run, with what, and why the others are skipped),
the offline install from a folder of wheels, and a rehearsal of its stages on CPU with
diffusers and soundfile made unimportable and no package registry reachable.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_kit  # noqa: E402

sys.path.remove(str(ROOT / "benchmarks"))
OFFLINE = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_INDEX": "1"}  # any registry lookup fails


def kit(*args: str, env: dict = None, timeout: int = 300) -> subprocess.CompletedProcess:
    # Not this test run's pytest-xdist worker variables: the kit runs pytest and the benchmarks itself.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--python", sys.executable, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(inherited, **OFFLINE, **(env or {})))


def test_gpu_sh_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu.sh")], check=True)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU refusal")
def test_a_torch_without_cuda_is_refused_with_exit_2():
    done = kit()
    assert done.returncode == 2
    assert "sees no CUDA device" in done.stderr and "--rehearse" in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--wheels", "/nonexistent/wheels"], "is not a folder"),
    (["--budget", "5"], "--budget must be in"),
    (["--only", "everything"], "invalid choice"),
    (["--python", "/nonexistent/python3"], "no Python interpreter"),
    (["--python"], "--python needs an interpreter"),
])
def test_bad_arguments_exit_2_with_one_clear_line(args, message):
    done = kit(*args)
    assert done.returncode == 2
    assert message in done.stderr


def test_a_wheel_folder_without_wheels_is_refused(tmp_path):
    done = kit("--wheels", str(tmp_path))
    assert done.returncode == 2 and "holds no .whl file" in done.stderr


def test_dry_run_lists_every_stage_and_runs_nothing(tmp_path):
    done = kit("--dry-run", "--out", str(tmp_path / "kit"))
    assert done.returncode == 0, done.stderr
    for stage in gpu_kit.STAGES:
        assert f" {stage} " in done.stdout
    assert not (tmp_path / "kit").exists()


# -- the plan on a bare GPU machine -----------------------------------------------------------------
BARE_H200 = dict(python="3.12.3", executable="/usr/bin/python3", torch="2.11.0+cu130", torch_cuda="13.0",
                 cuda_available=True, gpu="NVIDIA H200", capability="9.0", gpu_memory_gib=139.7,
                 cuda_home="/usr/local/cuda", triton="3.6.0", xdist=True, nvcc="/usr/local/cuda/bin/nvcc",
                 compute_sanitizer="/usr/local/cuda/bin/compute-sanitizer", ninja=True,
                 modules=dict(gpu_kit.WANTED, **{d: d not in ("diffusers", "soundfile") for d in gpu_kit.WANTED}))


def _args(tmp_path, **kw) -> argparse.Namespace:
    base = dict(python="/usr/bin/python3", wheels=None, budget=480.0, only=None, skip=[], rehearse=False,
                dry_run=False, out=str(tmp_path), constraints=str(tmp_path / "constraints.txt"))
    return argparse.Namespace(**dict(base, **kw))


def test_plan_for_a_bare_offline_gpu_machine(tmp_path):
    stages = {s.name: s for s in gpu_kit.plan(BARE_H200, _args(tmp_path))}
    assert not stages["wheels"].run and "diffusers, soundfile" in stages["wheels"].reason
    build = stages["build"]
    assert build.run and build.env["FORCE_CUDA"] == "1" and build.env["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert build.commands == [["/usr/bin/python3", "setup.py", "-q", "build_ext", "--inplace"]]  # no pip, no venv
    tests = stages["tests"]
    assert tests.run and "-m" in tests.commands[0] and "gpu" in tests.commands[0]
    assert "tests/kernels/test_gpu.py" in tests.commands[0] and "pipeline GPU tests skip" in tests.reason
    sanitizer = stages["sanitizer"]
    assert [c[2] for c in sanitizer.commands] == ["memcheck", "racecheck"]
    assert sanitizer.env == {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    assert all("every_path or every_grid_path" in c for c in sanitizer.commands)
    ops = stages["ops"].commands[0]
    assert ops[ops.index("--bench-devices") + 1] == "cuda" and ops[ops.index("--bench-mode") + 1] == "quick"
    assert not stages["pipeline"].run and "diffusers is not installed" in stages["pipeline"].reason
    assert stages["report"].run


def test_plan_with_wheels_installs_only_what_is_missing_offline(tmp_path):
    stages = {s.name: s for s in gpu_kit.plan(BARE_H200, _args(tmp_path, wheels="/wheels"))}
    (cmd,) = stages["wheels"].commands
    assert cmd[:6] == ["/usr/bin/python3", "-m", "pip", "install", "--no-index", "--find-links"]
    assert cmd[6] == "/wheels" and cmd[-2:] == ["diffusers", "soundfile"]
    assert f"--constraint={tmp_path / 'constraints.txt'}" in cmd  # the installed torch and triton stay
    assert stages["pipeline"].run  # planned after the install; main() plans again with what is there


def test_plan_without_nvcc_sanitizer_or_pytest(tmp_path):
    no_tools = dict(BARE_H200, nvcc=None, compute_sanitizer=None)
    stages = {s.name: s for s in gpu_kit.plan(no_tools, _args(tmp_path))}
    assert stages["build"].env["FORCE_CUDA"] == "0" and "no nvcc" in stages["build"].reason
    assert not stages["sanitizer"].run and "compute-sanitizer not found" in stages["sanitizer"].reason
    assert stages["tests"].run and stages["ops"].run  # Triton is still checked and measured
    no_pytest = dict(BARE_H200, modules=dict(BARE_H200["modules"], pytest=False))
    stages = {s.name: s for s in gpu_kit.plan(no_pytest, _args(tmp_path))}
    for name in ("tests", "sanitizer", "ops"):
        assert not stages[name].run and "is not installed (give --wheels)" in stages[name].reason


def test_only_and_skip_select_stages(tmp_path):
    stages = gpu_kit.plan(BARE_H200, _args(tmp_path, only=["tests", "report"], skip=["report"]))
    assert [s.name for s in stages if s.run] == ["tests"]


# -- the offline install from a folder of wheels -----------------------------------------------------------
def _dummy_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel of 'safa-kit-selftest' (module safa_kit_selftest)."""
    path = folder / "safa_kit_selftest-1.0-py3-none-any.whl"
    files = {"safa_kit_selftest/__init__.py": "VALUE = 42\n",
             "safa_kit_selftest-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: safa-kit-selftest\nVersion: 1.0\n",
             "safa_kit_selftest-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\n"
                                                      "Tag: py3-none-any\n"}
    record = "".join(f"{name},,\n" for name in files) + "safa_kit_selftest-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr("safa_kit_selftest-1.0.dist-info/RECORD", record)
    return path


@pytest.mark.slow
def test_wheels_stage_installs_from_the_folder_without_a_registry(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _dummy_wheel(wheels)
    facts = dict(BARE_H200, torch=__import__("torch").__version__, triton=None,
                 modules=dict(BARE_H200["modules"], **{"safa-kit-selftest": False}))
    args = _args(tmp_path, python=sys.executable, wheels=str(wheels))
    stage = gpu_kit.plan(facts, args)[0]
    assert stage.run and stage.commands[0][-1] == "safa-kit-selftest"
    Path(args.constraints).write_text(f"torch=={facts['torch']}\n")
    env = dict(os.environ, **OFFLINE)
    try:
        gpu_kit.run_stage(stage, args, deadline=__import__("time").monotonic() + 120, base_env=env)
        assert stage.status == "passed", stage.notes
        assert gpu_kit.probe(sys.executable, {"safa-kit-selftest": "safa_kit_selftest"})["modules"] == \
            {"safa-kit-selftest": True}
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "safa-kit-selftest"], env=env)


# -- a rehearsal: the stages that run without a GPU, offline, without diffusers -----------------------------
@pytest.mark.slow
def test_rehearsal_without_diffusers_soundfile_or_registry(tmp_path):
    blocked = tmp_path / "site"
    blocked.mkdir()
    # What a bare GPU machine lacks: these imports fail in every process the kit starts.
    (blocked / "sitecustomize.py").write_text("import sys\nfor name in ('diffusers', 'soundfile'):\n"
                                              "    sys.modules[name] = None\n")
    env = {"PYTHONPATH": os.pathsep.join([str(blocked), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    done = kit("--rehearse", "--skip", "build", "--out", str(tmp_path / "kit"), env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = done.stdout[done.stdout.index("== gpu kit: done"):]
    assert "pipeline  skipped" in summary and "diffusers is not installed" in summary
    assert "tests     passed" in summary and "ops       passed" in summary and "report    passed" in summary
    (results,) = [p for p in (tmp_path / "kit").glob("*.json") if p.name != "gpu-checks.json"]
    data = json.loads(results.read_text())
    checks = data["benchmarks"]["gpu_checks"]
    assert checks["facts"]["modules"]["diffusers"] is False and checks["facts"]["modules"]["soundfile"] is False
    assert {r["name"]: r["status"] for r in checks["records"] if r["ran"]}["ops"] == "passed"
    assert data["benchmarks"]["ops"]["mode"] == "smoke" and data["benchmarks"]["ops"]["records"]
    # the 2-D grid cases, every op beside copy_ of its bytes (on a GPU with the cuda and triton backends)
    grid_ops = {r["op"] for r in data["benchmarks"]["ops"]["records"] if r.get("case", "").startswith("grid")}
    assert grid_ops >= {"gather", "stitch swap", "stitch mean", "sync_ swap", "sync_ swap+ref", "sync_ mean", "copy_"}


def test_the_ops_stage_measures_the_grid_ops_with_both_gpu_backends(monkeypatch):
    """What the ops stage runs on a GPU (bench_ops.py, quick mode, --bench-devices cuda): the SD grid
    beside the strips, gather, stitch and sync_ each on the cuda and triton kernels."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_ops
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    monkeypatch.setattr(bench_ops, "MODE", "quick")
    monkeypatch.setattr(bench_ops.sk, "available_backends", lambda device: ["cuda", "triton", "reference"])
    cuda = bench_ops.torch.device("cuda")
    grids = [c for c in bench_ops.cases(cuda) if isinstance(c, bench_ops.GridCase)]
    assert [c.name for c in grids] == ["grid SD 2048x2048 px"]
    for op, *_ in bench_ops.OPS:
        assert {"cuda", "triton"} <= set(bench_ops.impls(cuda, op, grid=True)), op
