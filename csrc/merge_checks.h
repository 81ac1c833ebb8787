// Argument checks shared by the CPU and CUDA glue of `safa::merge_<backend>_`: one place
// for the error messages a caller of the raw op sees (each names the offending argument).
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <optional>

namespace safa {

// The operands of one merge call, with `src` and `reference` undefined when absent.
struct MergeOperands {
  at::Tensor src, reference, runs;
};

inline void check_operand(const char* op, const char* name, const at::Tensor& t, int64_t dims,
                          const at::Tensor& out) {
  TORCH_CHECK(t.dim() == dims, op, ": ", name, " must be ", dims, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == out.scalar_type(), op, ": ", name, " must have out's dtype ", out.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == out.device(), op, ": ", name, " must be on out's device ", out.device(), ", got ",
              t.device());
}

// Checks everything but the index values (the CPU checks those itself, see merge_cpu.cpp;
// a device-resident plan cannot be inspected without a host sync).
inline MergeOperands check_merge_args(const char* op, at::DeviceType device, const at::Tensor& out,
                                      const std::optional<at::Tensor>& src_opt,
                                      const std::optional<at::Tensor>& reference_opt, const at::Tensor& index,
                                      const at::Tensor& weight, at::IntArrayRef parity,
                                      const std::optional<at::Tensor>& runs_opt) {
  const at::ScalarType dtype = out.scalar_type();
  TORCH_CHECK(out.dim() == 4, op, ": out must be 4-D (views, outer, long, inner), got shape ", out.sizes());
  TORCH_CHECK(out.device().type() == device, op, ": out must be a ", at::DeviceTypeName(device),
              " tensor, got ", out.device());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": out must be float32, float64, float16 or bfloat16, got ", dtype);
  MergeOperands operands;
  if (src_opt.has_value() && src_opt->defined()) {
    operands.src = *src_opt;
    check_operand(op, "src", operands.src, 4, out);
    TORCH_CHECK(operands.src.size(1) == out.size(1) && operands.src.size(3) == out.size(3), op,
                ": src (S, O, Ls, I) must share out's outer and inner sizes (", out.size(1), ", ", out.size(3),
                "), got shape ", operands.src.sizes());
  }
  if (reference_opt.has_value() && reference_opt->defined()) {
    operands.reference = *reference_opt;
    check_operand(op, "reference", operands.reference, 3, out);
    TORCH_CHECK(operands.reference.size(0) == out.size(1) && operands.reference.size(2) == out.size(3), op,
                ": reference (O, window, I) must share out's outer and inner sizes (", out.size(1), ", ",
                out.size(3), "), got shape ", operands.reference.sizes());
  }
  TORCH_CHECK(index.scalar_type() == at::kInt, op, ": index must be int32, got ", index.scalar_type());
  TORCH_CHECK(weight.scalar_type() == at::kDouble, op, ": weight must be float64, got ", weight.scalar_type());
  TORCH_CHECK(index.device() == out.device() && weight.device() == out.device(), op,
              ": index and weight must be on out's device ", out.device(), ", got ", index.device(), " and ",
              weight.device());
  TORCH_CHECK(index.dim() == 2 && weight.dim() == 2, op,
              ": index (P, 1+K+T) and weight (P, K) must be 2-D, got shapes ", index.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(index.is_contiguous() && weight.is_contiguous(), op, ": index and weight must be contiguous");
  const int64_t P = index.size(0), K = weight.size(1);
  TORCH_CHECK(weight.size(0) == P, op, ": weight must have one row per index row (", P, "), got ", weight.size(0));
  TORCH_CHECK(K >= 1 && index.size(1) >= 1 + K, op, ": index must have 1 + K + T columns for weight's K = ", K,
              " (K >= 1), got ", index.size(1));
  if (runs_opt.has_value() && runs_opt->defined()) {  // a grid's plan: plan.RUN_COLUMNS per row
    operands.runs = *runs_opt;
    TORCH_CHECK(operands.runs.scalar_type() == at::kInt && operands.runs.dim() == 2 && operands.runs.size(0) == P &&
                    operands.runs.size(1) == 6 && operands.runs.is_contiguous(),
                op, ": runs must be a contiguous int32 (P, 6) = (", P, ", 6) tensor, got ", operands.runs.scalar_type(),
                " ", operands.runs.sizes());
    TORCH_CHECK(operands.runs.device() == out.device(), op, ": runs must be on out's device ", out.device(), ", got ",
                operands.runs.device());
  }
  TORCH_CHECK(parity.size() == 4, op, ": parity must be [axis_part, div, size, swap_interval], got ",
              parity.size(), " values");
  TORCH_CHECK(parity[0] >= 0 && parity[0] <= 2, op, ": parity[0] (axis_part) must be 0, 1 or 2, got ", parity[0]);
  TORCH_CHECK(parity[1] >= 1 && parity[2] >= 1 && parity[3] >= 1, op,
              ": parity div, size and swap_interval must be >= 1, got ", parity);
  // PyTorch's own tests for written-to memory (those decidable from strides alone; the
  // public sync_ decides every case, safa_kernels/_memory.py).
  at::assert_no_internal_overlap(out);
  if (operands.src.defined()) at::assert_no_overlap(out, operands.src);
  if (operands.reference.defined()) at::assert_no_overlap(out, operands.reference);
  return operands;
}

// An in-place op bumps its target's version counter, as PyTorch's do: autograd then refuses
// a backward through a tensor that a merge overwrote after it was saved. Called after the
// checks, before any write.
inline void mark_written(const at::Tensor& out) { out.unsafeGetTensorImpl()->bump_version(); }

}  // namespace safa
