"""Forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp``) of the public ops.

The kernels know nothing of tangents, and the ops are linear, so an output's tangent is the
op applied to the inputs' tangents (zero for an input without one): ``ops.py`` runs the op
twice, on the primals and on the tangents, and pairs the results with :func:`dual`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.autograd.forward_ad as _forward_ad

from .execute import zeros

__all__ = ["active", "split", "dual"]

dual = _forward_ad.make_dual


def active() -> bool:
    """Whether a dual level is open: checked first, so outside one the ops pay one module read."""
    return _forward_ad._current_level >= 0


def split(*tensors: Optional[torch.Tensor]) -> Tuple[Sequence[Optional[torch.Tensor]],
                                                    Optional[Sequence[Optional[torch.Tensor]]]]:
    """(primals, tangents) of ``tensors``; tangents is None when none of them has one."""
    unpacked = [None if t is None else _forward_ad.unpack_dual(t) for t in tensors]
    if all(u is None or u.tangent is None for u in unpacked):
        return tensors, None
    primals = [None if u is None else u.primal for u in unpacked]
    tangents = [None if u is None else (u.tangent if u.tangent is not None else zeros(u.primal, u.primal.shape))
                for u in unpacked]
    return primals, tangents
