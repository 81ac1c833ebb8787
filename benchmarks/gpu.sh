#!/usr/bin/env bash
# One call on a CUDA machine: set up a venv with a CUDA torch, build the CUDA extension, run
# the GPU tests, run the op and pipeline benchmarks, append rows to benchmarks/RESULTS.md and
# print a short table last. Aimed at < 8 minutes on one H100 (most of it is the install and
# the nvcc build; every stage has its own time limit).
#
#   bash benchmarks/gpu.sh
#
# Env: VENV (default .venv-gpu), TORCH_SPEC (default torch==<the version pinned in the
# Makefile>: PyPI's Linux x86_64 torch wheels are CUDA builds and pull a matching triton),
# TORCH_CUDA_ARCH_LIST (default: the card's compute capability from nvidia-smi),
# CUDA_HOME / nvcc (needed for the CUDA backend; without it only Triton is benchmarked).
# Exit status: non-zero if the install, the tests or the benchmark failed.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
stage() { echo; echo "== gpu.sh [$(( $(date +%s) - START )) s] $*"; }
die() { echo "gpu.sh: $*" >&2; exit 1; }

command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this script is for a machine with an NVIDIA GPU"
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader || die "nvidia-smi failed"

VENV="${VENV:-.venv-gpu}"
PY="$VENV/bin/python"
PINNED="$(sed -n 's/^TORCH *?= *//p' Makefile | head -1)"
TORCH_SPEC="${TORCH_SPEC:-${PINNED:-torch}}"

stage "venv $VENV with $TORCH_SPEC"
[[ -x "$PY" ]] || python3 -m venv "$VENV" || die "cannot create $VENV"
timeout 300 "$PY" -m pip install -q --upgrade pip setuptools wheel ninja || die "pip bootstrap failed"
timeout 400 "$PY" -m pip install -q "$TORCH_SPEC" || die "installing $TORCH_SPEC failed"
# requirements-dev.txt pins the CPU machine's triton; on CUDA the torch wheel pins its own.
grep -v '^triton' requirements-dev.txt > "$VENV/requirements-gpu.txt"
timeout 300 "$PY" -m pip install -q -r "$VENV/requirements-gpu.txt" || die "installing test requirements failed"
"$PY" -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda); sys.exit(0 if torch.cuda.is_available() else 1)' \
  || die "this torch does not see a GPU (a CPU wheel? set TORCH_SPEC, e.g. with --index-url)"

stage "build safa_kernels._C with CUDA"
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' ')"
fi
export TORCH_CUDA_ARCH_LIST
CUDA_BUILT=0
if command -v nvcc >/dev/null || [[ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]; then
  export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}"
  if FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-8}" timeout 420 "$PY" -m pip install -q --no-build-isolation -e .; then
    CUDA_BUILT=1
  else
    echo "gpu.sh: the CUDA build failed; continuing with the Triton backend only" >&2
  fi
else
  echo "gpu.sh: no nvcc (set CUDA_HOME): building without the CUDA kernel; Triton only" >&2
fi
if [[ $CUDA_BUILT = 0 ]]; then
  # FORCE_CUDA=0: with a CUDA torch and a CUDA_HOME (or /usr/local/cuda) setup.py would
  # otherwise attempt the CUDA build again, fail the same way, and end the run here.
  FORCE_CUDA=0 timeout 300 "$PY" -m pip install -q --no-build-isolation -e . || die "even the CPU-only build failed"
fi
"$PY" -c 'import safa_kernels as sk; print("GPU backends:", sk.available_backends("cuda"))'

stage "GPU tests (Triton and CUDA backends against the reference; no host syncs in the step loop)"
TESTS_OK=1
timeout 300 "$PY" -m pytest -q -m gpu tests/test_perf_tooling.py || TESTS_OK=0
timeout 240 "$PY" -m pytest -q "tests/test_triton_backend.py::TestCUDA" || TESTS_OK=0

stage "benchmarks"
BENCH_OK=1
rm -f "$VENV/table.txt"
timeout 420 "$PY" benchmarks/gpu_bench.py --command "bash benchmarks/gpu.sh" --table "$VENV/table.txt" || BENCH_OK=0

stage "done: tests $([[ $TESTS_OK = 1 ]] && echo passed || echo FAILED), CUDA extension $([[ $CUDA_BUILT = 1 ]] && echo built || echo 'NOT built'), benchmark $([[ $BENCH_OK = 1 ]] && echo ok || echo FAILED); rows in benchmarks/RESULTS.md"
[[ -f "$VENV/table.txt" ]] && { echo; cat "$VENV/table.txt"; }  # the short table, last
[[ $TESTS_OK = 1 && $BENCH_OK = 1 ]]
