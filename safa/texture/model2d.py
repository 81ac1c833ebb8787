"""The analytic texture model on 2-D windows (images): an exact denoiser for 2-D seams.

Data model
----------
Latents are laid out like Stable Diffusion's: ``(B, C, H, W)``, and the model is defined on
square ``window x window`` tiles only (like a real model trained at one resolution).

* A *class* (gravel, grass, waves, ...) owns two stationary kernels, one along the rows
  (height, ``K_r``) and one along the columns (width, ``K_c``), both ``window x window``
  Toeplitz matrices of the 1-D model's kernel terms (:func:`~safa.texture.model.temporal_kernel`),
  and a few *sub-styles* (dim / medium / bright colour variants).
* A *sub-style* ``k`` of class ``c`` is ``N(0, A_k (x) K_r^c (x) K_c^c)`` over the window, where
  ``A_k`` is a ``C x C`` channel covariance; vectorisation order ``(c, h, w)``.
* The class distribution is the mixture of its sub-styles; the unconditional one the mixture
  over classes (uniform).

With ``A = U_a diag(nu) U_a^T``, ``K_r = U_r diag(mu_r) U_r^T`` and ``K_c = U_c diag(mu_c) U_c^T`` the
window covariance is diagonal in ``U_a (x) U_r (x) U_c`` with eigenvalues ``nu_i mu_r_j mu_c_l``: a
window goes into the eigenbasis by three small rotations (rows and columns once per class,
channels per sub-style), so the posterior expectations and responsibilities of
:class:`~safa.texture.mixture.KroneckerMixture` (shared with the 1-D model) are exact here too.

Long canvases: a class's process over any ``height x width`` is the same Kronecker product with
the kernels over the canvas's rows and columns (stationary, so every window of it is exactly
model-distributed); on a torus the kernels are wrapped around each looping axis
(:func:`~safa.texture.model.wrapped_kernel`), drawn by FFT. :meth:`TextureModel2D.sample` draws
both: the reference of 2-D seam evaluations (``safa evaluate --task seams2d``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config

from .mixture import KroneckerMixture, scheduled_alphas_cumprod
from .model import temporal_kernel, wrapped_kernel, wrapped_kernel_error

__all__ = ["TextureModel2D", "ImageTextureClass", "IMAGE_CLASSES", "IMAGE_SUBSTYLES", "MAX_WINDOW_2D"]

# Dense factors are window x window per axis; the sampler's tiles are this size at most.
MAX_WINDOW_2D = 256

Terms = Tuple[Tuple[str, float, float, float], ...]


@dataclass(frozen=True)
class ImageTextureClass:
    """One image texture class: kernel terms along the rows (``rows``, down the height) and the
    columns (``cols``, across the width), as :class:`~safa.texture.model.TextureClass`'s
    ``temporal``, and a colour: the channels' relative standard deviations (recycled over more
    channels) and how strongly they are mixed (0: independent channels)."""

    name: str
    rows: Terms
    cols: Terms
    colour: Tuple[float, ...]
    mixing: float


IMAGE_CLASSES: Tuple[ImageTextureClass, ...] = (
    ImageTextureClass("gravel", (("exp", 0.7, 1.5, 0.0), ("white", 0.3, 0.0, 0.0)),
                      (("exp", 0.7, 1.5, 0.0), ("white", 0.3, 0.0, 0.0)), (1.0, 0.9, 0.8, 1.1), 0.5),
    ImageTextureClass("grass", (("se", 0.8, 6.0, 0.0), ("exp", 0.2, 2.0, 0.0)),  # streaks down the height
                      (("exp", 0.8, 1.0, 0.0), ("white", 0.2, 0.0, 0.0)), (0.6, 1.3, 0.7, 0.9), 0.7),
    ImageTextureClass("waves", (("qp", 0.7, 6.0, 9.0), ("exp", 0.3, 2.0, 0.0)),
                      (("se", 0.8, 8.0, 0.0), ("exp", 0.2, 3.0, 0.0)), (0.7, 0.8, 1.3, 1.0), 0.6),
    ImageTextureClass("weave", (("qp", 0.6, 6.0, 5.0), ("exp", 0.4, 2.0, 0.0)),
                      (("qp", 0.6, 6.0, 5.0), ("exp", 0.4, 2.0, 0.0)), (1.2, 1.0, 0.8, 0.7), 0.4),
    ImageTextureClass("marble", (("se", 0.6, 5.0, 0.0), ("exp", 0.4, 4.0, 0.0)),
                      (("se", 0.6, 5.0, 0.0), ("exp", 0.4, 4.0, 0.0)), (1.1, 1.1, 1.0, 0.6), 0.9),
    ImageTextureClass("clouds", (("se", 0.85, 7.0, 0.0), ("white", 0.15, 0.0, 0.0)),
                      (("se", 0.85, 10.0, 0.0), ("white", 0.15, 0.0, 0.0)), (0.9, 1.0, 1.2, 0.8), 0.8),
)

# Sub-styles: (name, gain on the std, colour tilt across the channels).
IMAGE_SUBSTYLES: Tuple[Tuple[str, float, float], ...] = (
    ("dim", 0.7, -1.0),
    ("medium", 1.0, 0.0),
    ("bright", 1.35, 1.0),
)


def _kernel_matrix(terms: Terms, size: int) -> np.ndarray:
    """The stationary kernel over ``size`` cells, with the nugget that conditions it."""
    lags = np.arange(size)[:, None] - np.arange(size)[None, :]
    return temporal_kernel(terms, lags) + 1e-4 * np.eye(size)


def _axis_factor(terms: Terms, size: int, periodic: bool) -> torch.Tensor:
    """What draws the kernel's process over ``size`` cells: a Cholesky factor on a line, the
    square root of the wrapped kernel's spectrum on a circle."""
    if periodic:
        return torch.tensor(np.sqrt(np.clip(np.fft.rfft(wrapped_kernel(terms, size)).real, 0.0, None)))
    return torch.linalg.cholesky(torch.tensor(_kernel_matrix(terms, size)))


def _colour_along(e: torch.Tensor, factor: torch.Tensor, dim: int, periodic: bool) -> torch.Tensor:
    """White noise ``e`` coloured along ``dim`` by :func:`_axis_factor`'s ``factor``."""
    if periodic:  # circular convolution with the kernel's square root: covariance circulant
        n = e.shape[dim]
        return torch.fft.irfft(torch.fft.rfft(e, dim=dim) * factor.reshape((-1,) + (1,) * (-dim - 1)), n=n, dim=dim)
    return torch.movedim(torch.tensordot(factor, torch.movedim(e, dim, 0), dims=([1], [0])), 0, dim)


class TextureModel2D(KroneckerMixture):
    """Mixture of ``A_k (x) K_r (x) K_c`` Gaussians on square tiles, with an exact denoiser.

    Call it like a UNet: ``model(sample, timestep, class_weights) -> model output`` with
    ``sample`` ``(B, C, window, window)`` (the scheduler-scaled ``x_t``), ``timestep`` a scalar or
    ``(B,)``, ``class_weights`` ``(B, num_classes)``; the output is epsilon, v or x_0 as
    :meth:`set_schedule` says. The default schedule is Stable Diffusion's (scaled-linear betas
    0.00085 to 0.012).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, channels: int = 4, window: int = 32, seed: int = 0, class_names: Optional[List[str]] = None,
                 num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 prediction_type: str = "epsilon") -> None:
        super().__init__()
        by_name = {c.name: c for c in IMAGE_CLASSES}
        names = list(class_names) if class_names else [c.name for c in IMAGE_CLASSES]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"unknown image texture classes {unknown}; known: {sorted(by_name)}")
        if isinstance(window, bool) or not isinstance(window, int) or not 2 <= window <= MAX_WINDOW_2D:
            raise ValueError(f"window must be an int of latent cells in [2, {MAX_WINDOW_2D}], got {window!r}")
        if isinstance(channels, bool) or not isinstance(channels, int) or not 1 <= channels <= 64:
            raise ValueError(f"channels must be an int in [1, 64], got {channels!r}")
        self.classes: List[ImageTextureClass] = [by_name[n] for n in names]
        self.substyles = list(IMAGE_SUBSTYLES)
        self.channels, self.window = channels, window
        gen = np.random.default_rng(seed)

        # Row and column factors, one pair per class, eigendecomposed once in float64.
        axes: Dict[str, Tuple[list, list, list]] = {"rows": ([], [], []), "cols": ([], [], [])}
        for cls in self.classes:
            for axis, (covs, bases, eigs) in axes.items():
                k = _kernel_matrix(getattr(cls, axis), window)
                mu, u = np.linalg.eigh(k)
                covs.append(k), bases.append(u), eigs.append(np.clip(mu, 1e-8, None))
        # Channel factors, one per (class, sub-style).
        chan, chan_basis, chan_eig, comp_class = [], [], [], []
        cpos = (np.arange(channels) + 0.5) / channels
        for ci, cls in enumerate(self.classes):
            g = gen.standard_normal((channels, channels + 2))
            corr = g @ g.T
            d = np.sqrt(np.diag(corr))
            corr = cls.mixing * corr / d[:, None] / d[None, :] + (1 - cls.mixing) * np.eye(channels)
            colour = np.resize(np.asarray(cls.colour, dtype=np.float64), channels)
            for _, gain, tilt in self.substyles:
                sd = gain * colour * np.exp(0.6 * tilt * (cpos - 0.5))
                a = sd[:, None] * corr * sd[None, :] + 1e-4 * np.eye(channels)
                nu, u = np.linalg.eigh(a)
                chan.append(a), chan_basis.append(u), chan_eig.append(np.clip(nu, 1e-8, None))
                comp_class.append(ci)

        for axis, (covs, bases, eigs) in axes.items():
            self.register_buffer(f"{axis[:-1]}_cov", torch.tensor(np.stack(covs)), persistent=False)
            self.register_buffer(f"{axis[:-1]}_basis", torch.tensor(np.stack(bases)), persistent=False)
            self.register_buffer(f"{axis[:-1]}_eig", torch.tensor(np.stack(eigs)), persistent=False)
        self.register_buffer("channel_cov", torch.tensor(np.stack(chan)), persistent=False)
        self.register_buffer("channel_basis", torch.tensor(np.stack(chan_basis)), persistent=False)
        self.register_buffer("channel_eig", torch.tensor(np.stack(chan_eig)), persistent=False)
        self.register_buffer("component_class", torch.tensor(comp_class, dtype=torch.long), persistent=False)
        self.register_buffer("substyle_logprior", torch.full((len(comp_class),), -math.log(len(self.substyles)),
                                                             dtype=torch.float64), persistent=False)
        self.register_buffer("alphas_cumprod", scheduled_alphas_cumprod(num_train_timesteps, beta_start, beta_end),
                             persistent=False)
        self.prediction_type = prediction_type
        self._cast_cache: Dict[Tuple[torch.dtype, torch.device], Tuple[torch.Tensor, ...]] = {}

    # -- the three rotations ------------------------------------------------------------------
    def _factors(self, dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, ...]:
        key = (dtype, device)
        if key not in self._cast_cache:
            self._cast_cache[key] = tuple(b.to(device, dtype) for b in (self.row_basis, self.col_basis,
                                                                        self.channel_basis))
        return self._cast_cache[key]

    def _check_window(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.channels, self.window, self.window):
            raise ValueError(f"the 2-D texture model expects tiles of shape (B, {self.channels}, {self.window}, "
                             f"{self.window}), got {tuple(x.shape)}")

    def _eig(self, comps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(K', C, H, W)`` eigenvalues ``nu_i mu_r_j mu_c_l`` of components ``comps`` (float64)."""
        comps = torch.arange(self.num_components) if comps is None else comps
        cls = self.component_class[comps]
        return (self.channel_eig[comps][:, :, None, None] * self.row_eig[cls][:, None, :, None]
                * self.col_eig[cls][:, None, None, :])

    def _rotate_in(self, x: torch.Tensor, comps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, K', C, H, W)`` coefficients in the eigenbases of ``comps``."""
        self._check_window(x)
        comps = torch.arange(self.num_components) if comps is None else comps
        ur, uc, ua = self._factors(x.dtype, x.device)
        classes, local = torch.unique(self.component_class[comps], return_inverse=True)
        # Rows and columns once per class (U_r^T X U_c per channel), then channels per component.
        z = torch.matmul(torch.matmul(ur[classes].transpose(-1, -2)[None, :, None], x[:, None]),
                         uc[classes][None, :, None])                              # (B, classes, C, H, W)
        b, _, c, h, w = z.shape
        y = torch.matmul(ua[comps].transpose(-1, -2)[None], z[:, local].reshape(b, -1, c, h * w))
        return y.reshape(b, -1, c, h, w)

    def _rotate_out(self, coef: torch.Tensor, comps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, K', C, H, W)`` coefficients of ``comps`` -> ``(B, C, H, W)``, summed over components."""
        comps = torch.arange(self.num_components) if comps is None else comps
        ur, uc, ua = self._factors(coef.dtype, coef.device)
        classes, local = torch.unique(self.component_class[comps], return_inverse=True)
        b, k, c, h, w = coef.shape
        z = torch.matmul(ua[comps][None], coef.reshape(b, k, c, h * w)).reshape(b, k, c, h, w)
        per_class = torch.zeros(b, classes.numel(), c, h, w, dtype=coef.dtype, device=coef.device)
        per_class.index_add_(1, local.to(coef.device), z)                        # rows and columns once per class
        out = torch.matmul(torch.matmul(ur[classes][None, :, None], per_class),
                           uc[classes].transpose(-1, -2)[None, :, None])
        return out.sum(1)

    # -- exact sampling and the reference statistics ----------------------------------------------
    def component_cov(self, k: int) -> torch.Tensor:
        """Dense ``(C H W) x (C H W)`` covariance of component ``k`` in ``(c, h, w)`` order (tests)."""
        c = int(self.component_class[k])
        return torch.kron(self.channel_cov[k], torch.kron(self.row_cov[c], self.col_cov[c]))

    def axis_cov(self, c: int, axis: str, size: int) -> torch.Tensor:
        """Class ``c``'s covariance along ``axis`` (``"rows"`` or ``"cols"``) over ``size`` cells, with
        the nugget: a probe's marginal (any ``size``: the kernel is stationary)."""
        return torch.tensor(_kernel_matrix(getattr(self.classes[c], axis), size))

    def sample(self, components: torch.Tensor, height: Optional[int] = None, width: Optional[int] = None,
               generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32,
               periodic: Union[bool, Tuple[bool, bool]] = False) -> torch.Tensor:
        """Exact samples ``(B, C, height, width)`` of the given components (default: one window).

        A larger canvas samples the stationary process with the same kernels, so every window of
        it is distributed exactly as the component (one sub-style throughout): a *true long
        texture*. ``periodic`` (a bool for both axes, or ``(rows, cols)``) samples that axis on a
        circle instead (a cylinder, or a torus with both): the wrapped kernel, whose window differs
        from the model's by :meth:`periodic_error`.
        """
        height = self.window if height is None else int(height)
        width = self.window if width is None else int(width)
        loop_rows, loop_cols = (periodic, periodic) if isinstance(periodic, bool) else tuple(periodic)
        comps = torch.as_tensor(components).reshape(-1)
        out = torch.empty(comps.numel(), self.channels, height, width, dtype=torch.float64)
        factors: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        for i, k in enumerate(comps.tolist()):
            c = int(self.component_class[k])
            if c not in factors:
                factors[c] = (_axis_factor(self.classes[c].rows, height, loop_rows),
                              _axis_factor(self.classes[c].cols, width, loop_cols))
            e = torch.randn(self.channels, height, width, generator=generator, dtype=torch.float64)
            e = _colour_along(e, factors[c][0], -2, loop_rows)
            e = _colour_along(e, factors[c][1], -1, loop_cols)
            out[i] = _colour_along(e, torch.linalg.cholesky(self.channel_cov[k]), -3, False)
        return out.to(dtype)

    def periodic_error(self, height: int, width: int) -> float:
        """Largest difference, over classes, axes and lags within a window, between the kernels of
        a window of the torus ``height x width`` and the model's (``k(0) = 1``)."""
        return max(max(wrapped_kernel_error(cls.rows, height, self.window),
                       wrapped_kernel_error(cls.cols, width, self.window)) for cls in self.classes)

