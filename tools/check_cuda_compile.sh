#!/usr/bin/env bash
# Compile-only check of the CUDA sources, so CUDA code cannot rot on GPU-less machines:
#  1. every csrc/**/*.cu with nvcc for sm_90 (these include no torch headers);
#  2. the ATen glue csrc/cuda/*.cpp with the host compiler against the installed torch's
#     headers (syntax only), when a Python with torch is found. A CPU-only torch wheel ships
#     the CUDA headers but not the build-generated c10/cuda/impl/cuda_cmake_macros.h; an
#     equivalent one-line stand-in is provided for the check.
# Exits non-zero on any failure. Env: CUDA_HOME (default /usr/local/cuda), NVCC (default
# $CUDA_HOME/bin/nvcc, else nvcc on PATH), PYTHON (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
if [[ -z "${NVCC:-}" ]]; then
  if [[ -x "$CUDA_HOME/bin/nvcc" ]]; then NVCC="$CUDA_HOME/bin/nvcc"; else NVCC="$(command -v nvcc || true)"; fi
fi
if [[ -z "$NVCC" || ! -x "$NVCC" ]]; then
  echo "check_cuda_compile: nvcc not found (set NVCC or CUDA_HOME)" >&2
  exit 1
fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

status=0
mapfile -t CU_FILES < <(find csrc -name '*.cu' | sort)
if [[ ${#CU_FILES[@]} -eq 0 ]]; then
  echo "check_cuda_compile: no .cu files under csrc/" >&2
  exit 1
fi
for f in "${CU_FILES[@]}"; do
  if "$NVCC" -c -std=c++17 -O3 -fmad=false -arch=sm_90 -Werror all-warnings -o "$TMP/$(basename "$f").o" "$f"; then
    echo "ok    nvcc sm_90  $f"
  else
    echo "FAIL  nvcc sm_90  $f" >&2
    status=1
  fi
done

PYTHON="${PYTHON:-.venv/bin/python}"
if TORCH_INCLUDE="$("$PYTHON" -c 'import torch.utils.cpp_extension as c; print(" ".join(c.include_paths()))' 2>/dev/null)"; then
  PY_INCLUDE="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  mkdir -p "$TMP/stub/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$TMP/stub/c10/cuda/impl/cuda_cmake_macros.h"
  includes=()
  for d in $TORCH_INCLUDE; do includes+=("-I$d"); done
  for f in $(find csrc/cuda -name '*.cpp' | sort); do
    if "${CXX:-g++}" -std=c++20 -fsyntax-only -DSAFA_WITH_CUDA=1 -I"$TMP/stub" "${includes[@]}" \
        -I"$CUDA_HOME/include" -I"$PY_INCLUDE" "$f"; then
      echo "ok    c++ glue    $f"
    else
      echo "FAIL  c++ glue    $f" >&2
      status=1
    fi
  done
else
  echo "skip  c++ glue    (no torch importable by $PYTHON)"
fi
exit $status
