"""Arguments of one raw ``safa::merge_<backend>_`` call (for opcheck), shared by the CPU and GPU tests.

Only torch and safa_kernels: the GPU kit runs tests/test_gpu.py on a bare machine.
"""
from __future__ import annotations

import torch

from safa_kernels import ViewLayout
from safa_kernels.canonical import canonical, parity
from safa_kernels.plan import get_plan


def op_args(mode: str, in_place: bool, with_reference: bool, device: torch.device) -> tuple:
    """``(out, src, reference, index, weight, parity)`` of a stitch (or in-place sync) on a small layout."""
    layout = ViewLayout.covering(28, 10, 4 if mode == "swap" else 6)
    g = torch.Generator().manual_seed(0)
    views = torch.randn(layout.num_views, 6, 10, 5, generator=g).to(device)
    ref = torch.randn(6, 10, 5, generator=g).to(device) if with_reference else None
    kind, parity_arg = parity([6, 10, 5], 1, 0 if with_reference else None, 1)
    index, weight = get_plan(layout, "sync" if in_place else "stitch", mode, 1, kind, device)
    src = canonical(views, 1, True)
    ref3 = None if ref is None else canonical(ref, 1, False)[0]
    if in_place:
        return (src, None, ref3, index, weight, parity_arg)
    return (canonical(torch.empty(6, layout.length, 5, device=device), 1, False), src, ref3, index, weight,
            parity_arg)
