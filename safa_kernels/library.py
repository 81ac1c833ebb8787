"""The ``safa`` torch.library: every op's schema, the supported dtypes and the fake kernels.

Everything else registers against this module and it imports nothing of the package but
the geometry (``layout.py``), so there is no order to get wrong and no circle: the C++ and
CUDA kernels (``_extension.py``, from ``csrc/`` with ``TORCH_LIBRARY_IMPL``), the Triton
kernel (``triton_merge.py``), the functional ops' implementations (``execute.py``) and
their autograd formulas (``autograd.py``).

Two layers of ops:

- Plan executors. Each kernel backend ``b`` is one op, ``safa::merge_<b>_``, all from one
  schema: run a plan of ``plan.py`` into ``out``, in place. Raw machinery, not
  differentiable.
- Functional ops ``safa::gather`` and ``safa::stitch``, and their adjoints
  ``safa::gather_adjoint``, ``safa::stitch_adjoint`` and ``safa::reference_adjoint``: each
  allocates its output and runs one plan executor (the ``backend`` argument).

We use ``torch.library.Library.define`` + ``register_fake`` rather than
``torch.library.custom_op``: the latter wraps every call in a Python layer that a C++
kernel does not need (benchmarks/README.md measures it).
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from .layout import AnyLayout, layout_from_geometry

__all__ = ["LIB", "MODES", "KERNEL_BACKENDS", "BACKENDS", "DTYPES", "MERGE_SCHEMA", "FUNCTIONAL_SCHEMAS",
           "merge_op", "op_layout", "stitch_layout", "long_axis_shape", "axis_weights", "GAUSSIAN_VARIANCE"]

MODES = ("swap", "mean", "triangular", "gaussian")
KERNEL_BACKENDS = ("cpp", "cuda", "triton")
BACKENDS = ("reference",) + KERNEL_BACKENDS
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

LIB = torch.library.Library("safa", "DEF")

# Mixture of Diffusers' tile weights (albarji/mixture-of-diffusers, `_gaussian_weights` of its
# tiling pipeline): per axis a Gaussian of the position relative to the window, variance 0.01,
# i.e. a standard deviation of 0.1 * window columns. Its normalising constant cancels in the
# weighted mean. (Its code centres the column axis at (window - 1) / 2 and the row axis at
# window / 2; we centre both on the tile, at (window - 1) / 2, so the weights are symmetric.)
GAUSSIAN_VARIANCE = 0.01


def axis_weights(mode: str, window: int) -> List[float]:
    """The unnormalised weight of each local column ``k`` of a window, per averaging ``mode``
    (docs/kernels.md, section 2; a grid multiplies its two axes' weights, section 8)."""
    if mode == "mean":
        return [1.0] * window
    if mode == "triangular":  # MD*
        return [float(min(k + 1, window - k)) for k in range(window)]
    if mode == "gaussian":
        centre = (window - 1) / 2
        return [math.exp(-((k - centre) / window) ** 2 / (2 * GAUSSIAN_VARIANCE)) for k in range(window)]
    raise ValueError(f"mode must be an averaging mode ('mean', 'triangular', 'gaussian'), got {mode!r}")

# One schema for every kernel backend. `src` is None for an in-place sync (sources are read
# from `out`); tensors are canonical 4-D (views, outer, long axis, inner); `index` int32 and
# `weight` float64 are a plan of plan.py; `parity` the runtime reference parity; `runs` int32
# (P, 6) the plan.RUN_COLUMNS of each row of a grid's plan (None: every row one cell).
MERGE_SCHEMA = ("(Tensor(a!) out, Tensor? src, Tensor? reference, Tensor index, Tensor weight, "
                "int[] parity, Tensor? runs=None) -> ()")


def _merge_fake(out, src, reference, index, weight, parity, runs=None) -> None:  # mutates `out`, returns nothing
    return None


for _backend in KERNEL_BACKENDS:
    LIB.define(f"merge_{_backend}_" + MERGE_SCHEMA)
    torch.library.register_fake(f"safa::merge_{_backend}_", _merge_fake, lib=LIB)


def merge_op(backend: str):
    """The plan executor of a kernel backend, ``torch.ops.safa.merge_<backend>_.default``."""
    return getattr(torch.ops.safa, f"merge_{backend}_").default


# The functional ops. `layout` is `ViewLayout.geometry` (length, window, overlap, loop, then
# the starts of a layout that is not uniform), `dim` the long axis of the latent
# (non-negative), `backend` the plan executor; `reference_axis` is None exactly when there is
# no reference.
FUNCTIONAL_SCHEMAS = {
    "gather": "(Tensor latent, int[] layout, int dim, str backend) -> Tensor",
    "gather_adjoint": "(Tensor views, int[] layout, int dim, str backend) -> Tensor",
    "stitch": ("(Tensor views, Tensor? reference, int[] layout, int dim, str mode, int swap_interval, "
               "int? reference_axis, str backend) -> Tensor"),
    "stitch_adjoint": ("(Tensor latent, int[] layout, int dim, str mode, int swap_interval, int? reference_axis, "
                       "str backend) -> Tensor"),
    "reference_adjoint": ("(Tensor latent, int[] layout, int dim, int swap_interval, int reference_axis, "
                          "str backend) -> Tensor"),
}
for _name, _schema in FUNCTIONAL_SCHEMAS.items():
    LIB.define(_name + _schema)


def long_axis_shape(shape, dim: int, size: int) -> list:
    """``shape`` with ``size`` on axis ``dim``."""
    shape = list(shape)
    shape[dim] = size
    return shape


def op_layout(op: str, geometry, backend: str, name: str, x: torch.Tensor, lead: bool, dim: int,
              mode: str = "mean", swap_interval: int = 1, reference_axis: Optional[int] = None) -> AnyLayout:
    """The layout of a functional op's call, once its arguments are checked: a clear error
    for a direct caller, not a plan that runs past the tensors. A grid's tensors arrive with its
    two axes merged into one at ``dim`` (``canvas_cells`` / ``view_cells`` long)."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"safa::{op}: backend must be one of {KERNEL_BACKENDS}, got {backend!r}")
    layout = layout_from_geometry(geometry)
    ndim = x.ndim - int(lead)
    if not 0 <= dim < ndim:
        raise ValueError(f"safa::{op}: dim must be in [0, {ndim - 1}] for {name} of shape {tuple(x.shape)}, got {dim}")
    columns = layout.view_cells if op in ("gather_adjoint", "stitch") else layout.canvas_cells
    if x.shape[dim + lead] != columns or (lead and x.shape[0] != layout.num_views):
        views = f"{layout.num_views} views on dim 0 and " if lead else ""
        raise ValueError(f"safa::{op}: {name} must have {views}{columns} columns on the long axis (dim {dim + lead}), "
                         f"got shape {tuple(x.shape)}")
    if mode not in MODES or (mode == "swap" and not layout.swappable):
        raise ValueError(f"safa::{op}: mode must be one of {MODES} ('swap' needs overlap <= window / 2), got {mode!r}")
    if swap_interval < 1:
        raise ValueError(f"safa::{op}: swap_interval must be >= 1, got {swap_interval}")
    if reference_axis is not None and not 0 <= reference_axis < ndim:
        raise ValueError(f"safa::{op}: reference_axis must be in [0, {ndim - 1}], got {reference_axis}")
    return layout


def stitch_layout(views, reference, layout, dim, mode, swap_interval, reference_axis, backend) -> AnyLayout:
    """:func:`op_layout` of ``safa::stitch``, which also takes a reference."""
    layout = op_layout("stitch", layout, backend, "views", views, True, dim, mode, swap_interval, reference_axis)
    if (reference is None) != (reference_axis is None):
        raise ValueError("safa::stitch: reference and reference_axis must be given together")
    if reference is not None and tuple(reference.shape) != tuple(views.shape[1:]):
        raise ValueError(f"safa::stitch: reference must have one view's shape {tuple(views.shape[1:])}, "
                         f"got {tuple(reference.shape)}")
    return layout


# Fake kernels: the output's shape and dtype from the checked arguments (the implementations,
# execute.py, check and allocate the same way).
def _gather_fake(latent, layout, dim, backend):
    layout = op_layout("gather", layout, backend, "latent", latent, False, dim)
    return latent.new_empty([layout.num_views] + long_axis_shape(latent.shape, dim, layout.view_cells))


def _gather_adjoint_fake(views, layout, dim, backend):
    layout = op_layout("gather_adjoint", layout, backend, "views", views, True, dim)
    return views.new_empty(long_axis_shape(views.shape[1:], dim, layout.canvas_cells))


def _stitch_fake(views, reference, layout, dim, mode, swap_interval, reference_axis, backend):
    layout = stitch_layout(views, reference, layout, dim, mode, swap_interval, reference_axis, backend)
    return views.new_empty(long_axis_shape(views.shape[1:], dim, layout.canvas_cells))


def _stitch_adjoint_fake(latent, layout, dim, mode, swap_interval, reference_axis, backend):
    layout = op_layout("stitch_adjoint", layout, backend, "latent", latent, False, dim, mode, swap_interval,
                       reference_axis)
    return latent.new_zeros([layout.num_views] + long_axis_shape(latent.shape, dim, layout.view_cells))


def _reference_adjoint_fake(latent, layout, dim, swap_interval, reference_axis, backend):
    layout = op_layout("reference_adjoint", layout, backend, "latent", latent, False, dim,
                       swap_interval=swap_interval, reference_axis=reference_axis)
    return latent.new_zeros(long_axis_shape(latent.shape, dim, layout.view_cells))


for _name, _fake in [("gather", _gather_fake), ("gather_adjoint", _gather_adjoint_fake), ("stitch", _stitch_fake),
                     ("stitch_adjoint", _stitch_adjoint_fake), ("reference_adjoint", _reference_adjoint_fake)]:
    torch.library.register_fake(f"safa::{_name}", _fake, lib=LIB)
