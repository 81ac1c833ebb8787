// CUDA executor of a merge plan (the contract is in safa_kernels/plan.py). Pure CUDA,
// no torch headers: compiles with plain nvcc (tools/check_cuda_compile.sh).
//
// One thread per (outer o, plan row r, inner i), with i fastest, then r, then o, so a warp
// reads and writes consecutive addresses both for AudioLDM latents (long axis dim -2,
// I = 16: a warp covers 2 rows x 16 inner elements) and for image latents (long axis
// dim -1, I = 1: a warp covers 32 consecutive columns). Every thread reads all its sources
// before writing its targets, and rows write disjoint cells, so in-place sync is race-free.
// A grid's plan has runs (a row stands for `rows` x `count` cells: `count` cells `step` apart
// on each of `rows` canvas rows, each operand with its own row stride): there each (o, r, i)
// gets `run_lanes` threads, the lane after i, and lane l merges the run's cells l,
// l + run_lanes, ... (numbered canvas row by canvas row); so a warp walks consecutive cells
// of one run (an image latent's inner is 1) rather than 32 runs at once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "merge_kernel.h"

namespace safa {
namespace cuda {
namespace {

// Half and bfloat16 accumulate in float, float64 in double; the plan's float64 weights are
// rounded once to this type (float32 weights for every dtype but float64, plan.py).
template <typename T> struct Accumulate { using type = float; };
template <> struct Accumulate<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(typename Accumulate<T>::type x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Offset of flat plan position `pos` (view pos / long_size, column pos % long_size) at (o, i).
template <typename Index>
__device__ __forceinline__ int64_t cell(const int64_t* stride, int64_t long_size, Index pos, Index o, Index i) {
  return static_cast<int64_t>(pos / long_size) * stride[0] + static_cast<int64_t>(pos % long_size) * stride[2] +
         static_cast<int64_t>(o) * stride[1] + static_cast<int64_t>(i) * stride[3];
}

__device__ __forceinline__ bool takes_reference(const int64_t* parity, int64_t o, int64_t i) {
  if (parity[0] == 0) return true;
  const int64_t x = parity[0] == 1 ? o : i;
  return ((x / parity[1]) % parity[2] / parity[3]) % 2 == 1;
}

// The cell `*_shift` positions into row r's run in each operand (0 without runs), at (o, i):
// read every source, then write.
template <typename T, typename Index>
__device__ __forceinline__ void merge_cell(const MergeArgs& a, const int32_t* entry, Index r, Index o, Index i,
                                           int64_t src_shift, int64_t out_shift, int64_t ref_shift) {
  using Acc = typename Accumulate<T>::type;
  T* out = static_cast<T*>(a.out);
  const T* src = static_cast<const T*>(a.src);
  const T* ref = static_cast<const T*>(a.ref);
  const int32_t* sources = entry + 1;
  const int64_t ref_col = entry[0] >= 0 ? entry[0] + ref_shift : -1;

  T value;
  if (ref != nullptr && ref_col >= 0 && ref_col < a.ref_window && takes_reference(a.parity, o, i)) {
    value = ref[o * a.ref_stride[0] + ref_col * a.ref_stride[1] + i * a.ref_stride[2]];
  } else {
    // Positions are checked against the operand sizes so that a malformed plan cannot
    // write out of bounds (the host does not inspect device-resident plans: no sync).
    const double* weight = a.weight + static_cast<int64_t>(r) * a.num_sources;
    int64_t count = 0, first = -1;
    for (int64_t k = 0; k < a.num_sources; ++k) {
      if (sources[k] >= 0 && sources[k] + src_shift < a.src_cells) {
        if (count++ == 0) first = k;
      }
    }
    if (count == 0) return;  // nothing to write: the cells keep their values
    if (count == 1 && static_cast<Acc>(weight[first]) == Acc(1)) {
      value = src[cell<int64_t>(a.src_stride, a.src_long, sources[first] + src_shift, o, i)];  // a copy, bitwise
    } else {
      Acc acc = 0;
      for (int64_t k = 0; k < a.num_sources; ++k) {
        const int64_t pos = sources[k] < 0 ? -1 : sources[k] + src_shift;
        if (pos < 0 || pos >= a.src_cells) continue;
        acc += static_cast<Acc>(weight[k]) *
               to_acc(src[cell<int64_t>(a.src_stride, a.src_long, pos, o, i)]);
      }
      value = from_acc<T>(acc);
    }
  }
  const int32_t* targets = sources + a.num_sources;
  for (int64_t t = 0; t < a.num_targets; ++t) {
    const int64_t pos = targets[t] < 0 ? -1 : targets[t] + out_shift;
    if (pos >= 0 && pos < a.out_cells) out[cell<int64_t>(a.out_stride, a.out_long, pos, o, i)] = value;
  }
}

// `Index` is the type of the flattened thread index: 32-bit when the grid fits, because
// 64-bit division is several times slower on the GPU.
template <typename T, typename Index>
__global__ void merge_kernel(const MergeArgs a) {
  const Index inner = static_cast<Index>(a.inner), rows = static_cast<Index>(a.rows);
  const Index lanes = static_cast<Index>(a.run_lanes);
  const Index total = static_cast<Index>(a.outer) * rows * lanes * inner;
  const int64_t width = 1 + a.num_sources + a.num_targets;
  for (Index tid = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x; tid < total;
       tid += static_cast<Index>(gridDim.x) * blockDim.x) {
    const Index i = tid % inner;
    Index rest = tid / inner;
    const Index lane = rest % lanes;
    rest /= lanes;
    const Index r = rest % rows;
    const Index o = rest / rows;
    const int32_t* entry = a.index + static_cast<int64_t>(r) * width;
    if (a.runs == nullptr) {
      merge_cell<T, Index>(a, entry, r, o, i, 0, 0, 0);
      continue;
    }
    const int32_t* run = a.runs + kRunColumns * static_cast<int64_t>(r);
    const int64_t count = run[0], step = run[1], cells = count * run[2];
    for (int64_t m = lane; m < cells; m += lanes) {
      const int64_t band = m / count, shift = (m % count) * step;
      merge_cell<T, Index>(a, entry, r, o, i, shift + band * run[3], shift + band * run[4], shift + band * run[5]);
    }
  }
}

template <typename T>
cudaError_t launch_typed(const MergeArgs& a, cudaStream_t stream) {
  const int64_t total = a.outer * a.rows * a.run_lanes * a.inner;
  if (total == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  // Grid-stride loop: a bounded grid still covers any size.
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8);
  if (total + static_cast<int64_t>(grid) * kThreads < (int64_t{1} << 31)) {
    merge_kernel<T, uint32_t><<<grid, kThreads, 0, stream>>>(a);
  } else {
    merge_kernel<T, int64_t><<<grid, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_merge(MergeDType dtype, const MergeArgs& args, cudaStream_t stream) {
  switch (dtype) {
    case MergeDType::kFloat32: return launch_typed<float>(args, stream);
    case MergeDType::kFloat64: return launch_typed<double>(args, stream);
    case MergeDType::kFloat16: return launch_typed<__half>(args, stream);
    case MergeDType::kBFloat16: return launch_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace safa
