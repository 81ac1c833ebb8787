"""What the op tests share: the arguments of one raw ``safa::merge_<backend>_`` call (for opcheck),
the dtypes and tolerances, and the comparison of a merge with its oracle (CPU and GPU tests).

Only torch and safa_kernels: the GPU kit runs tests/kernels/test_gpu.py on a bare machine.
"""
from __future__ import annotations

import torch

from safa_kernels import ViewLayout
from safa_kernels.canonical import canonical, parity
from safa_kernels.plan import get_plan

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# The reference averages as sum(w * x) / sum(w), the kernels as sum((w / sum(w)) * x): the
# same to a few ulps (fp64 weights make fp64 averages exact, test_float64_averages_are_exact).
TOL = {torch.float32: 1e-6, torch.float64: 1e-13, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_merged_equal(actual: torch.Tensor, expected: torch.Tensor, mode: str) -> None:
    """A swap selects values (bitwise equal); averaging modes agree to the dtype's tolerance."""
    if mode == "swap":
        assert torch.equal(actual, expected)
    else:
        tol = TOL[expected.dtype]
        torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


def op_args(mode: str, in_place: bool, with_reference: bool, device: torch.device) -> tuple:
    """``(out, src, reference, index, weight, parity)`` of a stitch (or in-place sync) on a small layout."""
    layout = ViewLayout.covering(28, 10, 4 if mode == "swap" else 6)
    g = torch.Generator().manual_seed(0)
    views = torch.randn(layout.num_views, 6, 10, 5, generator=g).to(device)
    ref = torch.randn(6, 10, 5, generator=g).to(device) if with_reference else None
    kind, parity_arg = parity([6, 10, 5], 1, 0 if with_reference else None, 1)
    index, weight, _ = get_plan(layout, "sync" if in_place else "stitch", mode, 1, kind, device)  # a strip: no runs
    src = canonical(views, 1, True)
    ref3 = None if ref is None else canonical(ref, 1, False)[0]
    if in_place:
        return (src, None, ref3, index, weight, parity_arg)
    return (canonical(torch.empty(6, layout.length, 5, device=device), 1, False), src, ref3, index, weight,
            parity_arg)
