"""Reverse-mode autograd of the functional ops (``torch.library.register_autograd``).

Every op is linear, so its backward is its adjoint op and saves no tensor: the backward of
``gather`` is ``gather_adjoint`` and of ``stitch`` is ``stitch_adjoint`` (views) and
``reference_adjoint`` (reference); the backward of an adjoint is the op again
(``stitch_adjoint``'s with a zero reference, ``reference_adjoint``'s with zero views). So
gradients of any order run on the same kernels (docs/kernels.md, section 5).
"""
from __future__ import annotations

import torch

from .execute import zeros
from .layout import layout_from_geometry
from .library import LIB

__all__: list = []  # importing this module registers the formulas


def _keep_arguments(ctx, inputs, output):
    ctx.arguments = inputs[1:]  # all but the one tensor


def _keep_stitch_arguments(ctx, inputs, output):
    ctx.arguments = inputs[2:]  # all but views and reference
    ctx.has_reference = inputs[1] is not None


def _gather_backward(ctx, grad):
    return torch.ops.safa.gather_adjoint.default(grad, *ctx.arguments), None, None, None


def _gather_adjoint_backward(ctx, grad):
    return torch.ops.safa.gather.default(grad, *ctx.arguments), None, None, None


def _stitch_backward(ctx, grad):
    layout, dim, mode, swap_interval, reference_axis, backend = ctx.arguments
    views_grad = reference_grad = None
    if ctx.needs_input_grad[0]:
        views_grad = torch.ops.safa.stitch_adjoint.default(grad, *ctx.arguments)
    if ctx.has_reference and ctx.needs_input_grad[1]:
        reference_grad = torch.ops.safa.reference_adjoint.default(grad, layout, dim, swap_interval, reference_axis,
                                                                  backend)
    return views_grad, reference_grad, None, None, None, None, None, None


def _stitch_adjoint_backward(ctx, grad):
    # (latent -> views)^T is the stitch of views, with zero in place of a reference.
    layout, dim, mode, swap_interval, reference_axis, backend = ctx.arguments
    zero = None if reference_axis is None else zeros(grad, grad.shape[1:])
    return (torch.ops.safa.stitch.default(grad, zero, layout, dim, mode, swap_interval, reference_axis, backend),
            None, None, None, None, None, None)


def _reference_adjoint_backward(ctx, grad):
    # (latent -> reference)^T is the stitch of zero views with this reference.
    layout, dim, swap_interval, reference_axis, backend = ctx.arguments
    zero = zeros(grad, [layout_from_geometry(layout).num_views] + list(grad.shape))
    return (torch.ops.safa.stitch.default(zero, grad, layout, dim, "mean", swap_interval, reference_axis, backend),
            None, None, None, None, None)


for _name, _setup, _backward in [
        ("gather", _keep_arguments, _gather_backward),
        ("gather_adjoint", _keep_arguments, _gather_adjoint_backward),
        ("stitch", _keep_stitch_arguments, _stitch_backward),
        ("stitch_adjoint", _keep_arguments, _stitch_adjoint_backward),
        ("reference_adjoint", _keep_arguments, _reference_adjoint_backward)]:
    torch.library.register_autograd(f"safa::{_name}", _backward, setup_context=_setup, lib=LIB)
