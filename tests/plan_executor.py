"""The plan contract of ``safa_kernels/plan.py`` executed row by row in PyTorch.

Slow and obvious on purpose: it pins the plan semantics independently of any kernel, so
that a plan bug and a kernel bug cannot hide each other.
"""
import torch


def execute(out, src, reference, index, weight, parity):
    src = out if src is None else src
    axis_part, div, size, interval = parity
    K = weight.shape[1]
    O, I = out.shape[1], out.shape[3]
    o_idx = torch.arange(O).view(O, 1)
    i_idx = torch.arange(I).view(1, I)
    h = (o_idx // div) % size if axis_part == 1 else (i_idx // div) % size if axis_part == 2 else None
    take_ref = torch.ones(O, I, dtype=torch.bool) if h is None else ((h // interval) % 2 == 1).expand(O, I)
    Ls, Ld = src.shape[2], out.shape[2]
    values = []
    for row, w in zip(index.tolist(), weight.tolist()):  # read everything first: in-place safe
        ref_col, sources, targets = row[0], row[1:1 + K], row[1 + K:]
        own = None
        if sources[0] >= 0:
            terms = [src[s // Ls, :, s % Ls, :] for s in sources if s >= 0]
            acc = torch.float64 if out.dtype == torch.float64 else torch.float32
            copy = len(terms) == 1 and w[0] == 1.0  # one source of weight 1: a bitwise copy
            own = terms[0].clone() if copy else sum(wk * t.to(acc) for wk, t in zip(w, terms)).to(out.dtype)
        if ref_col >= 0:
            ref = reference[:, ref_col, :]
            value = torch.where(take_ref, ref, own) if own is not None else ref
            mask = take_ref if own is None else None
        else:
            value, mask = own, None
        if value is not None:
            values.append((value, mask, [t for t in targets if t >= 0]))
    for value, mask, targets in values:
        for t in targets:
            cell = out[t // Ld, :, t % Ld, :]
            cell.copy_(torch.where(mask, value, cell) if mask is not None else value)
