"""Triton backend: the plan executor of ``plan.py`` as one Triton kernel, op ``safa::merge_triton_``.

Registered for the CUDA dispatch key, and for CPU as well when ``TRITON_INTERPRET=1`` is
set before this module is imported (Triton's interpreter then runs the kernel on CPU
tensors; that is how the backend is tested on machines without a GPU).

Import is cheap: only ``importlib.util.find_spec("triton")`` runs here. Triton itself is
imported and the kernel defined on the first call (``import triton`` costs ~0.3 s, which
``import safa_kernels`` should not pay when the backend is never used).

Kernel design. One program instance per ``BLOCK`` elements of the flattened
``(outer, row, inner)`` space, inner fastest, then plan row, then outer: for the
AudioLDM layout ``(B, 8, T, 16)`` (long axis -2, inner 16) and the image layout
``(B, 4, H, W)`` (long axis -1, inner 1) neighbouring lanes then touch neighbouring
memory. Each lane reads its row's plan entries (``K`` sources, ``T`` targets, both
constexpr, unrolled with ``tl.static_range``), reads all its sources, and only then writes
its targets; rows write disjoint cells and a lane's reads and writes are of the same
``(outer, column, inner)`` element, so the in-place ``sync`` is race-free. A grid's plan
has runs (a row stands for ``rows`` x ``count`` cells: ``count`` cells ``step`` apart on each of
``rows`` canvas rows, each operand with its own row stride): its space is then
``(outer, row, lane, inner)`` with ``RUN_LANES`` lanes per row, and lane ``l`` merges the
run's cells ``l, l + RUN_LANES, ...`` (numbered canvas row by canvas row) in turn.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import List, Optional

import torch

from .library import DTYPES
from ._memory import INTERNAL_OVERLAP, PARTIAL_OVERLAP, has_internal_overlap, shares_memory

__all__ = ["AVAILABLE", "INTERPRET", "merge_"]

OP_NAME = "safa::merge_triton_"

# Read once: Triton decides interpreter vs compiler at kernel definition from the same variable.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["triton"] is None (import blocked)
        return False


AVAILABLE = _triton_installed()

# GPU launch shape: 1024 elements over 4 warps is 8 elements per thread, enough in-flight
# loads to saturate bandwidth for a gather-style kernel without many tiny programs.
GPU_BLOCK = 1024
GPU_WARPS = 4
# No FMA contraction: the weighted sum then rounds like the CPU backends (x * w, then +);
# the kernel is memory-bound, so fusing buys nothing. Explicit, as Triton 3.9 warns when unset.
LAUNCH_OPTIONS = {"num_warps": GPU_WARPS, "enable_fp_fusion": False}
# The interpreter pays ~2 ms per program instance and vectorises within one with numpy, so
# it gets few, large programs (capped so one program's temporaries stay small).
INTERPRET_MAX_BLOCK = 1 << 16

# Lanes per row of a grid's plan (rows with runs): lane l merges the run's cells l, l + lanes,
# ...; a run spans up to a tile's width, so neighbouring lanes read neighbouring cells.
RUN_LANES = 32
_INT32_MAX = 2**31 - 1
_kernel = None  # the @triton.jit function, built on first use
merge_cells = larger = None  # its @jit helpers, also built on first use (globals: see _define_helpers)


def _define_helpers(triton, tl) -> None:
    """The @jit functions the kernel calls, as globals of this module: Triton resolves a called
    @jit function among the caller's globals."""
    global merge_cells, larger

    @triton.jit
    def larger(a, b):
        # The combine of the builtin tl.reduce: tl.max is itself a @jit function of
        # triton.language, which a test compiling this kernel under the interpreter cannot lower.
        return tl.maximum(a, b)

    @triton.jit
    def merge_cells(out_ptr, src_base, ref_ptr, row, wrow, o64, i, i64, src_shift, out_shift, ref_shift, live,
                    Ls, Ld,
                    os0, os1, os2, os3, ss0, ss1, ss2, ss3, rs0, rs1, rs2, xs1, ws1,
                    par_div, par_size, par_interval,
                    K: tl.constexpr, T: tl.constexpr, HAS_REF: tl.constexpr, AXIS_PART: tl.constexpr,
                    ACC: tl.constexpr):
        """The cells ``*_shift`` positions into each lane's row in each operand (0 without runs), where ``live``."""
        if HAS_REF:
            ref_col = tl.load(row, mask=live, other=-1).to(tl.int64)
            take = ref_col >= 0
            ref_col = ref_col + ref_shift
            if AXIS_PART == 1:
                h = (o64 // par_div) % par_size
                take = take & ((h // par_interval) % 2 == 1)
            elif AXIS_PART == 2:
                h = (i // par_div) % par_size
                take = take & ((h // par_interval) % 2 == 1)
        else:
            take = ref_shift < 0  # all False

        s0 = tl.load(row + xs1, mask=live, other=-1).to(tl.int64)
        has_src = s0 >= 0
        s0 = s0 + src_shift
        # Where the reference wins the source is not needed: skip its bytes.
        x0 = tl.load(src_base + (s0 // Ls) * ss0 + o64 * ss1 + (s0 % Ls) * ss2 + i64 * ss3,
                     mask=has_src & (take == 0))
        # float64 weights rounded once to the accumulation type (plan.py): float32 weights for
        # float32/16/bf16, exact ones for float64.
        w0 = tl.load(wrow, mask=has_src, other=1.0).to(ACC)
        acc = x0.to(ACC) * w0
        weighted = has_src & (w0 != 1.0)  # one source of another weight: an adjoint plan's scatter
        for k in tl.static_range(1, K):
            sk = tl.load(row + (1 + k) * xs1, mask=live, other=-1).to(tl.int64)
            vk = has_src & (sk >= 0) & (take == 0)
            sk = sk + src_shift
            # Masked load, not 0 * x: a padding slot may point nowhere, and x may be inf/nan.
            xk = tl.load(src_base + (sk // Ls) * ss0 + o64 * ss1 + (sk % Ls) * ss2 + i64 * ss3,
                         mask=vk, other=0.0)
            wk = tl.load(wrow + k * ws1, mask=vk, other=0.0).to(ACC)
            acc = tl.where(vk, acc + xk.to(ACC) * wk, acc)
            weighted = weighted | vk
        # A row with one live source of weight 1 is a pure copy (bitwise, -0.0 and nan payloads
        # included).
        value = tl.where(weighted, acc.to(x0.dtype), x0)
        write = live & has_src
        if HAS_REF:
            rv = tl.load(ref_ptr + o64 * rs0 + ref_col * rs1 + i64 * rs2, mask=live & take)
            value = tl.where(take, rv, value)
            write = live & (has_src | take)
        value = value.to(out_ptr.dtype.element_ty)
        for t in tl.static_range(T):
            tt = tl.load(row + (1 + K + t) * xs1, mask=write, other=-1).to(tl.int64)
            written = write & (tt >= 0)
            tt = tt + out_shift
            tl.store(out_ptr + (tt // Ld) * os0 + o64 * os1 + (tt % Ld) * os2 + i64 * os3, value, mask=written)


def _build_kernel():
    global _kernel
    if _kernel is not None:
        return _kernel
    try:
        import triton
        import triton.language as tl
    except Exception as exc:  # find_spec saw a package that does not import (broken install)
        raise RuntimeError(f"safa_kernels: the 'triton' backend needs an importable triton: {exc}") from exc

    _define_helpers(triton, tl)

    @triton.jit
    def merge_kernel(out_ptr, src_ptr, ref_ptr, index_ptr, weight_ptr, runs_ptr,
                     N, P, I, Ls, Ld,
                     os0, os1, os2, os3,
                     ss0, ss1, ss2, ss3,
                     rs0, rs1, rs2,
                     xs0, xs1, ws0, ws1,
                     par_div, par_size, par_interval,
                     K: tl.constexpr, T: tl.constexpr,
                     IN_PLACE: tl.constexpr, HAS_REF: tl.constexpr, AXIS_PART: tl.constexpr,
                     HAS_RUNS: tl.constexpr, LANES: tl.constexpr,
                     ACC: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        if WIDE:  # the flattened element count does not fit int32
            offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        else:
            offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        i = offs % I
        rest = offs // I
        lane = rest % LANES
        rest = rest // LANES
        r = rest % P
        o = rest // P
        # Address arithmetic in int64 always: view * stride overflows int32 long before N does.
        i64 = i.to(tl.int64)
        o64 = o.to(tl.int64)
        row = index_ptr + r.to(tl.int64) * xs0
        wrow = weight_ptr + r.to(tl.int64) * ws0
        if IN_PLACE:
            src_base = out_ptr
        else:
            src_base = src_ptr
        if HAS_RUNS:  # lane l of a row merges its run's cells l, l + LANES, ...
            run = runs_ptr + r.to(tl.int64) * 6  # plan.RUN_COLUMNS
            count = tl.load(run, mask=mask, other=1)
            step = tl.load(run + 1, mask=mask, other=0).to(tl.int64)
            cells = count * tl.load(run + 2, mask=mask, other=0)
            src_row = tl.load(run + 3, mask=mask, other=0).to(tl.int64)
            out_row = tl.load(run + 4, mask=mask, other=0).to(tl.int64)
            ref_row = tl.load(run + 5, mask=mask, other=0).to(tl.int64)
            rounds = tl.reduce((cells + LANES - 1) // LANES, 0, larger)
            for k in range(0, rounds):
                m = lane + k * LANES
                band = (m // count).to(tl.int64)
                j = (m % count).to(tl.int64) * step
                merge_cells(out_ptr, src_base, ref_ptr, row, wrow, o64, i, i64, j + band * src_row,
                            j + band * out_row, j + band * ref_row, mask & (m < cells), Ls, Ld,
                            os0, os1, os2, os3, ss0, ss1, ss2, ss3, rs0, rs1, rs2, xs1, ws1,
                            par_div, par_size, par_interval, K, T, HAS_REF, AXIS_PART, ACC)
        else:
            merge_cells(out_ptr, src_base, ref_ptr, row, wrow, o64, i, i64, i64 * 0, i64 * 0, i64 * 0, mask,
                        Ls, Ld,
                        os0, os1, os2, os3, ss0, ss1, ss2, ss3, rs0, rs1, rs2, xs1, ws1,
                        par_div, par_size, par_interval, K, T, HAS_REF, AXIS_PART, ACC)

    _kernel = (merge_kernel, tl)
    return _kernel


def _check(out: torch.Tensor, src: Optional[torch.Tensor], reference: Optional[torch.Tensor],
           index: torch.Tensor, weight: torch.Tensor, parity: List[int], runs: Optional[torch.Tensor]) -> None:
    def fail(msg: str):
        raise RuntimeError(f"safa::merge_triton_: {msg}")

    if out.dim() != 4:
        fail(f"out must be 4-D (views, outer, long, inner), got shape {tuple(out.shape)}")
    if out.dtype not in DTYPES:
        fail(f"unsupported dtype {out.dtype}")
    for name, x, nd in (("src", src, 4), ("reference", reference, 3)):
        if x is None:
            continue
        if x.dim() != nd:
            fail(f"{name} must be {nd}-D, got shape {tuple(x.shape)}")
        if x.dtype != out.dtype or x.device != out.device:
            fail(f"{name} must match out's dtype and device ({out.dtype}, {out.device}), got ({x.dtype}, {x.device})")
        outer, inner = (x.shape[1], x.shape[3]) if nd == 4 else (x.shape[0], x.shape[2])
        if (outer, inner) != (out.shape[1], out.shape[3]):
            fail(f"{name} shape {tuple(x.shape)} does not match out's outer/inner sizes {tuple(out.shape)}")
    if index.dim() != 2 or index.dtype != torch.int32:
        fail(f"index must be int32 (P, 1 + K + T), got {index.dtype} {tuple(index.shape)}")
    if weight.dim() != 2 or weight.dtype != torch.float64:
        fail(f"weight must be float64 (P, K), got {weight.dtype} {tuple(weight.shape)}")
    if weight.shape[0] != index.shape[0] or weight.shape[1] < 1 or index.shape[1] < weight.shape[1] + 2:
        fail(f"index {tuple(index.shape)} and weight {tuple(weight.shape)} do not form a plan with K, T >= 1")
    if index.device != out.device or weight.device != out.device:
        fail("index and weight must be on out's device")
    if runs is not None and (runs.dtype != torch.int32 or tuple(runs.shape) != (index.shape[0], 6)
                             or not runs.is_contiguous() or runs.device != out.device):
        fail(f"runs must be a contiguous int32 (P, 6) = ({index.shape[0]}, 6) tensor on out's device, "
             f"got {runs.dtype} {tuple(runs.shape)} on {runs.device}")
    if len(parity) != 4 or parity[0] not in (0, 1, 2) or (parity[0] and min(parity[1:]) < 1):
        fail(f"parity must be [axis_part in 0..2, div >= 1, size >= 1, swap_interval >= 1], got {list(parity)}")
    if has_internal_overlap(out):
        fail(f"out: {INTERNAL_OVERLAP}")
    for name, x in (("src", src), ("reference", reference)):
        if x is not None and shares_memory(out, x):
            fail(f"out and {name}: {PARTIAL_OVERLAP}")


def _block(n: int) -> int:
    if INTERPRET:
        return min(max(16, 1 << (n - 1).bit_length()), INTERPRET_MAX_BLOCK)
    return GPU_BLOCK


def merge_(out: torch.Tensor, src: Optional[torch.Tensor], reference: Optional[torch.Tensor],
           index: torch.Tensor, weight: torch.Tensor, parity: List[int], runs: Optional[torch.Tensor] = None, *,
           wide: Optional[bool] = None) -> None:
    """Execute the plan ``(index, weight, runs)`` (see ``plan.py``) writing into ``out``.

    ``wide`` forces (True) or forbids (False) int64 element numbering; by default it is
    used exactly when the flattened element count does not fit int32 (tests force it).
    """
    _check(out, src, reference, index, weight, parity, runs)
    torch.autograd.graph.increment_version(out)  # as PyTorch's in-place ops do (see merge_checks.h)
    P, K = weight.shape
    T = index.shape[1] - 1 - K
    _, O, Ld, I = out.shape
    lanes = RUN_LANES if runs is not None else 1
    n = O * P * lanes * I
    if n == 0:
        return
    source = out if src is None else src
    if source.numel() == 0 and reference is None:  # no view to read from: a valid plan then writes nothing
        return
    kernel, tl = _build_kernel()
    block = _block(n)
    grid = ((n + block - 1) // block,)
    if wide is None:
        wide = n + block > _INT32_MAX  # the last program's lanes run up to grid * block
    ref = reference if reference is not None else out  # placeholder pointer, never read
    rstr = reference.stride() if reference is not None else (0, 0, 0)
    axis_part, div, size, interval = (int(v) for v in parity)
    acc = tl.float64 if out.dtype == torch.float64 else tl.float32
    kwargs = {} if INTERPRET else LAUNCH_OPTIONS
    # Triton launches on the current device's stream: make that out's device.
    with torch.cuda.device(out.device) if out.device.type == "cuda" else contextlib.nullcontext():
        kernel[grid](out, source, ref, index, weight, runs if runs is not None else index,
                     n, P, I, max(source.shape[2], 1), max(Ld, 1),  # never a zero divisor, even masked
                     *out.stride(), *source.stride(), *rstr,
                     *index.stride(), *weight.stride(),
                     div, size, interval,
                     K=K, T=T, IN_PLACE=src is None, HAS_REF=reference is not None,
                     AXIS_PART=axis_part if reference is not None else 0,
                     HAS_RUNS=runs is not None, LANES=lanes,
                     ACC=acc, WIDE=bool(wide), BLOCK=block, **kwargs)


def _merge_impl(out, src, reference, index, weight, parity, runs=None) -> None:
    merge_(out, src, reference, index, weight, parity, runs)


if AVAILABLE:
    _device_types = ("cuda", "cpu") if INTERPRET else ("cuda",)
    torch.library.impl(OP_NAME, _device_types, _merge_impl)
