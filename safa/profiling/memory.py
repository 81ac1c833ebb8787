"""Measuring memory: the peak of live tensor bytes in a block of code, on any device.

:class:`LiveTensorPeak` counts every tensor storage the block's ops create (a
``TorchDispatchMode``), from its creation to the death of its last tensor, and keeps the
largest sum: on the CPU what ``torch.cuda.max_memory_allocated`` reports on CUDA (PyTorch
has no CPU allocator statistics). It is what :mod:`safa.memory`'s estimates of working
memory are checked against (tests/sampler/test_memory_rules.py, benchmarks/bench_fullsize.py
``--memory``). Tensors created before the block and kept by it are not counted, nor are
views of them made inside it (a crop of a positional-embedding buffer costs no memory).
"""
from __future__ import annotations

import weakref
from typing import Any, Dict, List, Optional

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["LiveTensorPeak"]


class LiveTensorPeak(TorchDispatchMode):
    """``with LiveTensorPeak() as m: ...``; then ``m.peak``: the most bytes alive at once in
    storages created inside the block (views share their base's storage and count once)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._storages: Dict[int, List[int]] = {}  # storage key -> [bytes, tensors alive]

    def storage_key(self, t: torch.Tensor) -> Optional[int]:
        """The key of ``t``'s storage, or None for a tensor that holds no memory (meta)."""
        return None if t.is_meta else t.untyped_storage().data_ptr()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        # Storages the op's inputs already had: an output on one of them that is not counted
        # yet is a view (or an in-place result) of a tensor made before the block.
        inputs = {self.storage_key(a) for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            key = self.storage_key(t) if isinstance(t, torch.Tensor) else None
            if key is None:
                continue
            size = t.untyped_storage().nbytes()
            if not size:
                continue
            entry = self._storages.get(key)
            if entry is None:
                if key in inputs:
                    continue
                entry = self._storages[key] = [size, 0]
                self.live += size
                self.peak = max(self.peak, self.live)
            entry[1] += 1
            weakref.finalize(t, self._release, key)
        return out

    def _release(self, key: int) -> None:
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[key]
