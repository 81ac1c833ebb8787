// ATen glue of the CUDA plan executor: checks, current stream and device, dtype mapping,
// then one launch of merge_kernel.cu. Registers `safa::merge_cuda_` for CUDA tensors.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../merge_checks.h"
#include "merge_kernel.h"

namespace safa {
namespace {

constexpr int64_t kRunLanes = 32;

cuda::MergeDType merge_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return cuda::MergeDType::kFloat32;
    case at::kDouble: return cuda::MergeDType::kFloat64;
    case at::kHalf: return cuda::MergeDType::kFloat16;
    case at::kBFloat16: return cuda::MergeDType::kBFloat16;
    default: TORCH_CHECK(false, "merge_cuda_: unsupported dtype ", dtype);
  }
}

void copy_strides(int64_t* to, const at::Tensor& t) {
  for (int64_t d = 0; d < t.dim(); ++d) to[d] = t.stride(d);
}

void merge_cuda(const at::Tensor& out, const std::optional<at::Tensor>& src_opt,
                const std::optional<at::Tensor>& reference_opt, const at::Tensor& index, const at::Tensor& weight,
                at::IntArrayRef parity, const std::optional<at::Tensor>& runs_opt) {
  const MergeOperands operands =
      check_merge_args("merge_cuda_", at::kCUDA, out, src_opt, reference_opt, index, weight, parity, runs_opt);
  const at::Tensor& src = operands.src.defined() ? operands.src : out;  // in-place: read from out
  const at::Tensor& reference = operands.reference;
  TORCH_CHECK(src.device() == out.device() && (!reference.defined() || reference.device() == out.device()),
              "merge_cuda_: all tensors must be on one device");

  cuda::MergeArgs args{};
  args.out = out.data_ptr();
  args.src = src.data_ptr();
  args.ref = reference.defined() ? reference.data_ptr() : nullptr;
  args.index = index.data_ptr<int32_t>();
  args.weight = weight.data_ptr<double>();
  // A grid's run rows get a warp's worth of threads each (merge_kernel.cu): a run spans up
  // to a tile's width, and the lanes then read consecutive cells of it.
  args.runs = operands.runs.defined() ? operands.runs.data_ptr<int32_t>() : nullptr;
  args.run_lanes = operands.runs.defined() ? kRunLanes : 1;
  args.rows = index.size(0);
  args.outer = out.size(1);
  args.inner = out.size(3);
  args.num_sources = weight.size(1);
  args.num_targets = index.size(1) - 1 - weight.size(1);
  args.out_cells = out.size(0) * out.size(2);
  args.src_cells = src.size(0) * src.size(2);
  args.ref_window = reference.defined() ? reference.size(1) : 0;
  args.out_long = out.size(2);
  args.src_long = src.size(2);
  copy_strides(args.out_stride, out);
  copy_strides(args.src_stride, src);
  if (reference.defined()) copy_strides(args.ref_stride, reference);
  for (int d = 0; d < 4; ++d) args.parity[d] = parity[d];
  mark_written(out);
  if (args.rows == 0 || args.outer == 0 || args.inner == 0) return;

  const c10::cuda::CUDAGuard device_guard(out.device());
  const cudaError_t status = cuda::launch_merge(merge_dtype(out.scalar_type()), args,
                                                c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess, "merge_cuda_: kernel launch failed: ", cudaGetErrorString(status));
}

}  // namespace
}  // namespace safa

TORCH_LIBRARY_IMPL(safa, CUDA, m) { m.impl("merge_cuda_", &safa::merge_cuda); }
