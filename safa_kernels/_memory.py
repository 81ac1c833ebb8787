"""Memory-overlap tests for the tensors a merge writes, exact where PyTorch's are not.

PyTorch's in-place ops refuse a written-to tensor in which two elements share a memory
location, but only where that is cheap to see (a zero stride); ``as_strided`` aliasing
passes their test ("too hard") and is then written with a race. A merge with such a
target returns garbage, so these tests decide every case: the usual tensors (dense, or
disjoint by their strides) in a few metadata reads, the rest by listing element offsets.

The messages are PyTorch's own, so code that handles PyTorch's errors handles ours.
"""
from __future__ import annotations

import torch

__all__ = ["INTERNAL_OVERLAP", "PARTIAL_OVERLAP", "has_internal_overlap", "shares_memory"]

INTERNAL_OVERLAP = ("unsupported operation: more than one element of the written-to tensor refers to a single "
                    "memory location. Please clone() the tensor before performing the operation.")
PARTIAL_OVERLAP = ("unsupported operation: some elements of the input tensor and the written-to tensor refer to a "
                   "single memory location. Please clone() the tensor before performing the operation.")

# torch._debug_has_internal_overlap answers with ATen's MemOverlap: NO means non-overlapping
# and dense (every element of its memory span is one of its elements), YES a zero stride.
_NO, _YES = 0, 1


def _element_offsets(x: torch.Tensor) -> torch.Tensor:
    """Every element's offset from ``x.data_ptr()``, in elements (int64, on the CPU)."""
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(x.shape, x.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride
    return offsets.flatten()


def _bytes(x: torch.Tensor, start: int) -> torch.Tensor:
    """Every byte of every element of ``x``, as offsets from address ``start``."""
    size = x.element_size()
    first = _element_offsets(x) * size + (x.data_ptr() - start)
    return (first.unsqueeze(-1) + torch.arange(size, dtype=torch.int64)).flatten()


def has_internal_overlap(x: torch.Tensor) -> bool:
    """Whether two elements of ``x`` share a memory location."""
    if x.is_contiguous() or x.numel() <= 1:
        return False
    status = torch._debug_has_internal_overlap(x)
    if status in (_NO, _YES):
        return status == _YES
    # Sufficient for no overlap: in increasing stride order, each stride exceeds the largest
    # offset the smaller ones reach (true of any permutation or slicing of a dense tensor).
    reach = 0
    for stride, size in sorted((st, n) for n, st in zip(x.shape, x.stride()) if n > 1):
        if stride <= reach:
            offsets = _element_offsets(x)
            return offsets.unique().numel() < offsets.numel()
        reach += stride * (size - 1)
    return False


def _byte_span(x: torch.Tensor):
    """The addresses ``[start, end)`` from the first byte of ``x`` to past its last."""
    start = x.data_ptr()
    if x.is_contiguous():  # the usual case, without a Python loop over the dims
        return start, start + x.numel() * x.element_size()
    if x.numel() == 0:
        return start, start
    extent = sum((n - 1) * st for n, st in zip(x.shape, x.stride()))
    return start, start + (extent + 1) * x.element_size()


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether an element of ``a`` and an element of ``b`` share a memory location."""
    a_start, a_end = _byte_span(a)
    b_start, b_end = _byte_span(b)
    if a_end <= b_start or b_end <= a_start:  # disjoint spans (always so for distinct storages)
        return False
    if torch._debug_has_internal_overlap(a) == _NO and torch._debug_has_internal_overlap(b) == _NO:
        return True  # each covers its whole span
    return bool(torch.isin(_bytes(a, a_start), _bytes(b, a_start)).any())
