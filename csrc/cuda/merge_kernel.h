// Interface between the ATen glue (merge_cuda.cpp) and the pure-CUDA plan executor
// (merge_kernel.cu). Plain C++: no torch and no CUDA device types, so each side compiles
// with its own compiler.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace safa {
namespace cuda {

enum class MergeDType { kFloat32, kFloat64, kFloat16, kBFloat16 };

// A grid plan's runs row: count, step, rows, src_row_stride, out_row_stride, ref_row_stride.
constexpr int64_t kRunColumns = 6;

// One `safa::merge_cuda_` call: canonical 4-D operands, element strides (see plan.py).
struct MergeArgs {
  void* out;            // (D, O, Ld, I)
  const void* src;      // (S, O, Ls, I); equal to `out` for an in-place sync
  const void* ref;      // (O, window, I) or nullptr
  const int32_t* index; // (P, 1 + K + T), contiguous
  const double* weight; // (P, K), contiguous, float64
  const int32_t* runs;  // (P, kRunColumns) per row (a grid's plan: plan.RUN_COLUMNS), or nullptr: every row one cell
  int64_t run_lanes;    // threads per (outer, row, inner) stepping through a run: 1 without runs
  int64_t rows, outer, inner, num_sources, num_targets;  // P, O, I, K, T
  int64_t out_cells, src_cells, ref_window;  // D * Ld and S * Ls (valid flat positions), window
  int64_t out_long, src_long;                // Ld, Ls
  int64_t out_stride[4], src_stride[4], ref_stride[3];
  int64_t parity[4];  // axis_part, div, size, swap_interval
};

// Enqueues the merge on `stream` (one kernel launch, no host synchronisation). Returns
// the launch status; a no-op (cudaSuccess) when there is nothing to do.
cudaError_t launch_merge(MergeDType dtype, const MergeArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace safa
