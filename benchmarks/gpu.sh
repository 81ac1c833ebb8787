#!/usr/bin/env bash
# The GPU kit: build safa's kernels and verify every CUDA and Triton path on this machine in one
# call, offline, with the Python that is already here (no venv, no downloads):
#
#   bash benchmarks/gpu.sh [--python PY] [--wheels DIR] [--budget SECONDS] [--only STAGE ...]
#                          [--skip STAGE ...] [--dry-run] [--rehearse] [-h]
#
# PY (default: $PYTHON, else python3) must have a CUDA build of torch; Triton and pytest
# are used when present; --wheels DIR installs what is missing from a folder
# of wheels (nothing is installed otherwise). Stages: wheels, build, tests, sanitizer, ops,
# pipeline, report; see benchmarks/gpu_kit.py (or --help) for what each does and needs.
# Results: benchmarks/results/<gpu-name>.json and the tables of benchmarks/README.md.
# Exit status: 0 all stages that ran passed, 1 one failed, 2 bad arguments or no usable GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
for ((i = 1; i <= $#; i++)); do
  case "${!i}" in
    --python) j=$((i + 1)); [[ $j -le $# ]] || { echo "gpu.sh: --python needs an interpreter" >&2; exit 2; }; PY="${!j}" ;;
    --python=*) PY="${!i#--python=}" ;;
  esac
done
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "gpu.sh: no Python interpreter '$PY' (give --python PY or set PYTHON)" >&2
  exit 2
fi
exec "$PY" benchmarks/gpu_kit.py --python "$PY" "$@"
