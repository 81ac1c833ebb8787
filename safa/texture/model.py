"""An analytic texture "diffusion model" whose denoiser is exact.

Data model
----------
Latents are laid out like AudioLDM's: ``(B, C, T, F)`` with time on dim -2, and the model
is defined on windows of ``window`` frames only (like a real model trained on fixed clips).

* A *class* (rain, wind, surf, ...) owns one stationary temporal covariance ``K_t`` over the
  window (``window x window``, Toeplitz, built from a class kernel ``k(tau)``) and a few
  *sub-styles* (loudness / brightness variants).
* A *sub-style* ``k`` of class ``c`` is the zero-mean Gaussian ``N(0, A_k (x) K_t^c)`` over the
  window, where ``A_k`` is a ``(C F) x (C F)`` channel-frequency covariance (its spectral
  envelope).  The vectorisation order is ``(c, f)`` outer, ``t`` inner.
* The class distribution is the mixture of its sub-styles; the unconditional distribution
  is the mixture over classes (uniform class prior).

Why Kronecker: with ``A = U_a diag(nu) U_a^T`` and ``K_t = U_t diag(mu) U_t^T`` the window
covariance is diagonal in the basis ``U_a (x) U_t`` with eigenvalues ``nu_i mu_j``, so the
exact posterior mean under Gaussian noise is two small matmuls in, a per-coefficient gain,
and two matmuls out.  Sub-styles of a class share ``K_t`` so its (larger) rotation is done
once per class.

Denoiser
--------
The exact posterior expectations (epsilon, v or x_0) and the components' responsibilities are
:class:`~safa.texture.mixture.KroneckerMixture`'s, shared with the 2-D model
(:mod:`safa.texture.model2d`); this module gives its rotations and eigenvalues.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config

from .mixture import KroneckerMixture, alpha_bar_at, scheduled_alphas_cumprod

__all__ = ["TextureModel", "TextureClass", "DEFAULT_CLASSES", "MAX_WINDOW", "alpha_bar_at"]

# The exact denoiser decomposes a dense window x window temporal kernel per class: 2048 frames
# (82 s at 25 frames/s) build in seconds; 25 000 frames would need 5 GB per class.
MAX_WINDOW = 2048

# ----------------------------------------------------------------------------------------
# Class definitions: named, hand-written spectral envelopes and temporal kernels.
# Everything else (channel mixing, envelope ripple) comes from a seeded generator.
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextureClass:
    """One texture class.

    ``temporal`` is a list of kernel terms ``(kind, weight, length, period)`` with kind in
    ``exp`` (``exp(-|tau|/length)``, rough: real high-frequency detail along time), ``se``
    (``exp(-tau^2 / 2 length^2)``, smooth), ``qp`` (``exp(-|tau|/length) cos(2 pi tau /
    period)``, quasi-periodic) and ``white`` (a nugget).  Each term is a PSD kernel, so the
    weighted sum is one too.

    ``envelope`` gives the variance profile over the ``F`` latent frequency bins as a
    function of the normalised bin position ``u in [0, 1]`` (``centre``, ``width`` of a
    log-Gaussian bump plus a ``floor``); ``harmonics`` adds narrow peaks (engine hum).
    ``freq_corr`` is the correlation length across frequency bins.
    """

    name: str
    temporal: Tuple[Tuple[str, float, float, float], ...]
    centre: float
    width: float
    floor: float
    freq_corr: float
    harmonics: Tuple[float, ...] = ()


DEFAULT_CLASSES: Tuple[TextureClass, ...] = (
    TextureClass("rain", (("exp", 0.6, 1.5, 0.0), ("white", 0.4, 0.0, 0.0)),
                 centre=0.75, width=0.35, floor=0.15, freq_corr=3.0),
    TextureClass("wind", (("se", 0.75, 10.0, 0.0), ("exp", 0.25, 3.0, 0.0)),
                 centre=0.2, width=0.25, floor=0.05, freq_corr=4.0),
    TextureClass("surf", (("qp", 0.6, 60.0, 90.0), ("exp", 0.4, 4.0, 0.0)),
                 centre=0.4, width=0.5, floor=0.1, freq_corr=5.0),
    TextureClass("engine", (("qp", 0.5, 40.0, 6.0), ("exp", 0.5, 8.0, 0.0)),
                 centre=0.15, width=0.15, floor=0.05, freq_corr=1.0, harmonics=(0.1, 0.2, 0.3, 0.4)),
    TextureClass("crowd", (("exp", 0.6, 3.0, 0.0), ("se", 0.4, 15.0, 0.0)),
                 centre=0.45, width=0.2, floor=0.08, freq_corr=2.0),
    TextureClass("fire", (("white", 0.5, 0.0, 0.0), ("exp", 0.3, 1.0, 0.0), ("se", 0.2, 20.0, 0.0)),
                 centre=0.6, width=0.5, floor=0.2, freq_corr=2.5),
)

# Sub-styles: (name, loudness gain on the std, brightness tilt exponent).
DEFAULT_SUBSTYLES: Tuple[Tuple[str, float, float], ...] = (
    ("soft-dark", 0.7, -1.0),
    ("medium", 1.0, 0.0),
    ("loud-bright", 1.35, 1.0),
)


def temporal_kernel(terms: Sequence[Tuple[str, float, float, float]], lags: np.ndarray) -> np.ndarray:
    """The class's stationary temporal kernel at integer ``lags``, normalised so k(0) = 1."""
    tau = np.abs(lags.astype(np.float64))
    out = np.zeros_like(tau)
    for kind, weight, length, period in terms:
        if kind == "exp":
            out += weight * np.exp(-tau / length)
        elif kind == "se":
            out += weight * np.exp(-0.5 * (tau / length) ** 2)
        elif kind == "qp":
            out += weight * np.exp(-tau / length) * np.cos(2 * np.pi * tau / period)
        elif kind == "white":
            out += weight * (tau == 0)
        else:
            raise ValueError(f"unknown kernel term {kind!r}")
    total = sum(t[1] for t in terms)
    return out / total


def wrapped_kernel(terms: Sequence[Tuple[str, float, float, float]], length: int) -> np.ndarray:
    """The kernel of ``terms`` wrapped around a circle of ``length`` frames (lags ``0 .. length - 1``):
    ``sum_m k(tau + m * length)``, with the samplers' nugget; terms are added until they are below 1e-15."""
    lags = np.arange(length)
    wrapped = temporal_kernel(terms, lags)
    m = 1
    while True:
        more = temporal_kernel(terms, lags + m * length) + temporal_kernel(terms, lags - m * length)
        wrapped = wrapped + more
        if np.abs(more).max() < 1e-15:
            break
        m += 1
    wrapped[0] += 1e-4
    return wrapped


def wrapped_kernel_error(terms: Sequence[Tuple[str, float, float, float]], length: int, window: int) -> float:
    """Largest difference, over lags within a window, between the kernel wrapped around ``length``
    frames and the kernel itself (both with the nugget): how far a window of the circle's process
    is from the model's."""
    w = min(window, length)
    lags = np.arange(w)
    return float(np.abs(wrapped_kernel(terms, length)[:w] - temporal_kernel(terms, lags) - 1e-4 * (lags == 0)).max())


class TextureModel(KroneckerMixture):
    """Mixture-of-Kronecker-Gaussians texture prior with an exact denoiser.

    Call it like a UNet: ``model(sample, timestep, class_weights) -> model output`` where
    ``sample`` is ``(B, C, window, F)`` (already scaled by the scheduler's
    ``scale_model_input``, i.e. the variance-preserving ``x_t``), ``timestep`` a scalar or a
    ``(B,)`` tensor, and ``class_weights`` a ``(B, num_classes)`` probability vector (one-hot
    for a class prompt, the class prior for the empty prompt).  The output is epsilon,
    v or x_0 according to :meth:`set_schedule`.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, channels: int = 8, freq_bins: int = 16, window: int = 256, seed: int = 0,
                 class_names: Optional[List[str]] = None, frame_rate: float = 25.0,
                 num_train_timesteps: int = 1000, beta_start: float = 0.0015, beta_end: float = 0.0195,
                 prediction_type: str = "epsilon") -> None:
        super().__init__()
        by_name = {c.name: c for c in DEFAULT_CLASSES}
        names = list(class_names) if class_names else [c.name for c in DEFAULT_CLASSES]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"unknown texture classes {unknown}; known: {sorted(by_name)}")
        if isinstance(window, bool) or not isinstance(window, int) or not 2 <= window <= MAX_WINDOW:
            raise ValueError(f"window must be an int of latent frames in [2, {MAX_WINDOW}] for the built-in model, "
                             f"got {window!r}")
        self.classes: List[TextureClass] = [by_name[n] for n in names]
        self.substyles = list(DEFAULT_SUBSTYLES)
        self.channels, self.freq_bins, self.window = channels, freq_bins, window
        gen = np.random.default_rng(seed)
        cf = channels * freq_bins

        # Temporal factors, one per class; eigendecomposed once (float64, then stored).
        lags = np.arange(window)[:, None] - np.arange(window)[None, :]
        kt, ut, mut = [], [], []
        for cls in self.classes:
            k = temporal_kernel(cls.temporal, lags) + 1e-4 * np.eye(window)  # nugget: conditioning
            mu, u = np.linalg.eigh(k)
            kt.append(k), ut.append(u), mut.append(np.clip(mu, 1e-8, None))

        # Channel-frequency factors, one per (class, sub-style).
        ua, nua, aa, comp_class = [], [], [], []
        fpos = (np.arange(freq_bins) + 0.5) / freq_bins
        for ci, cls in enumerate(self.classes):
            # Channel mixing: a seeded random correlation matrix (the "VAE" channel mixing).
            g = gen.standard_normal((channels, channels + 2))
            kc = g @ g.T
            d = np.sqrt(np.diag(kc))
            kc = kc / d[:, None] / d[None, :]
            kf = np.exp(-np.abs(fpos[:, None] - fpos[None, :]) * freq_bins / cls.freq_corr)
            env = cls.floor + np.exp(-0.5 * ((fpos - cls.centre) / cls.width) ** 2)
            for h in cls.harmonics:
                env = env + 1.5 * np.exp(-0.5 * ((fpos - h) / 0.02) ** 2)
            env = env * np.exp(0.15 * gen.standard_normal(freq_bins))  # seeded ripple
            env = env / env.mean()
            for _, gain, tilt in self.substyles:
                v = gain ** 2 * env * np.exp(tilt * 1.2 * (fpos - 0.5))  # brightness tilt
                sd = np.sqrt(np.tile(v, channels))  # (c, f) order, f inner
                a = sd[:, None] * np.kron(kc, kf) * sd[None, :] + 1e-4 * np.eye(cf)
                nu, u = np.linalg.eigh(a)
                ua.append(u), nua.append(np.clip(nu, 1e-8, None)), aa.append(a)
                comp_class.append(ci)

        n_sub = len(self.substyles)
        self.register_buffer("temporal_cov", torch.tensor(np.stack(kt)), persistent=False)
        self.register_buffer("temporal_basis", torch.tensor(np.stack(ut)), persistent=False)
        self.register_buffer("temporal_eig", torch.tensor(np.stack(mut)), persistent=False)
        self.register_buffer("chanfreq_cov", torch.tensor(np.stack(aa)), persistent=False)
        self.register_buffer("chanfreq_basis", torch.tensor(np.stack(ua)), persistent=False)
        self.register_buffer("chanfreq_eig", torch.tensor(np.stack(nua)), persistent=False)
        self.register_buffer("component_class", torch.tensor(comp_class, dtype=torch.long), persistent=False)
        self.register_buffer("substyle_logprior",
                             torch.full((len(comp_class),), -math.log(n_sub), dtype=torch.float64), persistent=False)
        self.register_buffer("alphas_cumprod", scheduled_alphas_cumprod(num_train_timesteps, beta_start, beta_end),
                             persistent=False)
        self.prediction_type = prediction_type
        self._cast_cache: Dict[torch.dtype, Tuple[torch.Tensor, ...]] = {}

    # -- core linear algebra ----------------------------------------------------------
    def _factors(self, dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, ...]:
        key = (dtype, device)
        if key not in self._cast_cache:
            self._cast_cache[key] = (self.temporal_basis.to(device, dtype), self.chanfreq_basis.to(device, dtype))
        return self._cast_cache[key]

    def _to_matrix(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, T, F)`` -> ``(B, C*F, T)``: rows in ``(c, f)`` order, time last."""
        b, c, t, f = x.shape
        if (c, t, f) != (self.channels, self.window, self.freq_bins):
            raise ValueError(f"texture model expects windows of shape (B, {self.channels}, {self.window}, "
                             f"{self.freq_bins}) (time on dim -2), got {tuple(x.shape)}")
        return x.permute(0, 1, 3, 2).reshape(b, c * f, t)

    def _from_matrix(self, m: torch.Tensor) -> torch.Tensor:
        b = m.shape[0]
        return m.reshape(b, self.channels, self.freq_bins, self.window).permute(0, 1, 3, 2)

    def _eig(self, comps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(K', CF, T)`` eigenvalues of the window covariance of components ``comps`` (float64)."""
        comps = torch.arange(self.num_components) if comps is None else comps
        return self.chanfreq_eig[comps, :, None] * self.temporal_eig[self.component_class[comps]][:, None, :]

    def _rotate_in(self, x: torch.Tensor, comps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, C, T, F)`` -> ``(B, K', CF, T)`` coefficients in the eigenbases of ``comps``."""
        comps = torch.arange(self.num_components) if comps is None else comps
        ut, ua = self._factors(x.dtype, x.device)
        classes, local = torch.unique(self.component_class[comps], return_inverse=True)
        m = self._to_matrix(x)
        z = torch.matmul(m[:, None], ut[classes][None])              # (B, classes, CF, T): shared per class
        return torch.matmul(ua[comps].transpose(-1, -2)[None], z[:, local])

    def _rotate_out(self, coef: torch.Tensor, comps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, K', CF, T)`` coefficients of ``comps`` -> ``(B, C, T, F)``, summed over components."""
        comps = torch.arange(self.num_components) if comps is None else comps
        ut, ua = self._factors(coef.dtype, coef.device)
        classes, local = torch.unique(self.component_class[comps], return_inverse=True)
        b, _, cf, t = coef.shape
        z = torch.matmul(ua[comps][None], coef)                       # (B, K', CF, T)
        per_class = torch.zeros(b, classes.numel(), cf, t, dtype=coef.dtype, device=coef.device)
        per_class.index_add_(1, local.to(coef.device), z)             # one temporal rotation per class
        return self._from_matrix(torch.matmul(per_class, ut[classes].transpose(-1, -2)[None]).sum(1))

    # -- exact sampling from the model --------------------------------------------------
    def component_cov(self, k: int) -> torch.Tensor:
        """Dense ``(C F T) x (C F T)`` covariance of component ``k`` in ``(c, f, t)`` order (tests)."""
        return torch.kron(self.chanfreq_cov[k], self.temporal_cov[self.component_class[k]])

    def sample(self, components: torch.Tensor, length: Optional[int] = None,
               generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32,
               periodic: bool = False) -> torch.Tensor:
        """Exact samples ``(B, C, length, F)`` of the given components.

        ``length = window`` samples the model itself. A longer length samples the stationary
        Gaussian process with the same kernel over ``length`` frames, so every window of it
        is distributed exactly as the component: a *true long texture* used as the
        reference row of the evaluation (one sub-style throughout).

        ``periodic=True`` samples the process on a circle of ``length`` frames instead (a true
        *loop*: frame ``length - 1`` is followed by frame 0 as any frame by the next), the
        reference for loop layouts; a line's two ends are independent, which the wrap seam of
        a loop must not be. Its temporal covariance is the kernel wrapped around the circle,
        ``sum_m k(tau + m * length)``: a window then differs from the model's by the wrapped
        terms (:meth:`periodic_error`), negligible once the kernel has decayed over
        ``length - window`` frames. Drawn by FFT, so any length is cheap.
        """
        length = self.window if length is None else int(length)
        comps = torch.as_tensor(components).reshape(-1)
        out = torch.empty(comps.numel(), self.channels, length, self.freq_bins, dtype=torch.float64)
        lags = np.arange(length)[:, None] - np.arange(length)[None, :]
        temporal: Dict[int, torch.Tensor] = {}  # per class: Cholesky factor, or circulant spectrum's root
        for i, k in enumerate(comps.tolist()):
            c = int(self.component_class[k])
            if c not in temporal:
                if periodic:
                    spectrum = np.fft.rfft(self._wrapped_kernel(c, length)).real
                    temporal[c] = torch.tensor(np.sqrt(np.clip(spectrum, 0.0, None)))
                else:
                    kt = temporal_kernel(self.classes[c].temporal, lags) + 1e-4 * np.eye(length)
                    temporal[c] = torch.linalg.cholesky(torch.tensor(kt))
            la = torch.linalg.cholesky(self.chanfreq_cov[k])
            e = torch.randn(self.channels * self.freq_bins, length, generator=generator, dtype=torch.float64)
            if periodic:  # circular convolution with the kernel's square root: covariance circulant
                e = torch.fft.irfft(torch.fft.rfft(e, dim=-1) * temporal[c], n=length, dim=-1)
                m = la @ e
            else:
                m = la @ e @ temporal[c].T
            out[i] = m.reshape(self.channels, self.freq_bins, length).permute(0, 2, 1)
        return out.to(dtype)

    # -- the exact continuation of a given prefix (safa.known's truth) -----------------------
    def _temporal(self, c: int, length: int) -> torch.Tensor:
        """Class ``c``'s temporal covariance over ``length`` frames (any length), with the nugget."""
        lags = np.arange(length)[:, None] - np.arange(length)[None, :]
        return torch.tensor(temporal_kernel(self.classes[c].temporal, lags) + 1e-4 * np.eye(length))

    def substyle_posterior(self, prefix: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` exact posterior of the components given ``prefix`` ``(B, C, P, F)`` (any ``P``).

        Component ``k`` makes the prefix ``N(0, A_k (x) K_c[:P, :P])``: its log-likelihood in the
        Kronecker eigenbasis plus the log prior of ``class_weights`` ``(B, num_classes)``, normalised.
        """
        b, c, p, f = prefix.shape
        x = prefix.to(torch.float64).permute(0, 1, 3, 2).reshape(b, c * f, p)
        logprior = self.component_logprior(class_weights)
        ll = torch.full((b, self.num_components), -math.inf, dtype=torch.float64)
        for ci in range(self.num_classes):
            comps = torch.nonzero(self.component_class == ci).reshape(-1)
            if not torch.isfinite(logprior[:, comps]).any():
                continue  # a class the prompt excludes
            eig_t, basis_t = torch.linalg.eigh(self._temporal(ci, p))
            z = x @ basis_t                                                      # (B, CF, P)
            for k in comps.tolist():
                y = self.chanfreq_basis[k].T @ z
                lam = self.chanfreq_eig[k][:, None] * eig_t[None, :]
                ll[:, k] = -0.5 * ((y ** 2 / lam).sum((-1, -2)) + torch.log(lam).sum()
                                   + c * f * p * math.log(2 * math.pi))
        return torch.softmax(ll + logprior, dim=-1)

    def sample_conditional(self, prefix: torch.Tensor, class_weights: torch.Tensor, length: int,
                           generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Exact continuations ``(B, C, length, F)`` of ``prefix`` ``(B, C, P, F)``, and their components.

        The model is a mixture of stationary Gaussian processes, so the continuation is exact in
        two stages: a component drawn from :meth:`substyle_posterior` given the prefix, then the
        Gaussian conditional of frames ``P .. length - 1`` given the prefix under it (the channel-
        frequency factor ``A_k`` factors out of a Kronecker covariance): mean
        ``X K_pp^-1 K_pf``, covariance ``A_k (x) (K_ff - K_fp K_pp^-1 K_pf)``. The first ``P``
        frames of the result are the prefix itself. Dense in time: ``length`` up to
        ``4 * MAX_WINDOW`` frames.
        """
        b, c, p, f = prefix.shape
        if not p < length <= 4 * MAX_WINDOW:
            raise ValueError(f"length must be in ({p}, {4 * MAX_WINDOW}] frames (after the prefix's {p}), "
                             f"got {length}")
        post = self.substyle_posterior(prefix, class_weights)
        comps = torch.multinomial(post, 1, generator=generator).reshape(-1)
        x = prefix.to(torch.float64).permute(0, 1, 3, 2).reshape(b, c * f, p)
        out = torch.empty(b, c * f, length, dtype=torch.float64)
        out[..., :p] = x
        for i, k in enumerate(comps.tolist()):
            kt = self._temporal(int(self.component_class[k]), length)
            chol_pp = torch.linalg.cholesky(kt[:p, :p])
            gain = torch.cholesky_solve(kt[:p, p:], chol_pp)                     # K_pp^-1 K_pf
            schur = kt[p:, p:] - kt[p:, :p] @ gain
            chol_f = torch.linalg.cholesky(0.5 * (schur + schur.T))
            e = torch.randn(c * f, length - p, generator=generator, dtype=torch.float64)
            out[i, :, p:] = x[i] @ gain + torch.linalg.cholesky(self.chanfreq_cov[k]) @ e @ chol_f.T
        return out.reshape(b, c, f, length).permute(0, 1, 3, 2).to(dtype), comps

    def _wrapped_kernel(self, c: int, length: int) -> np.ndarray:
        """Class ``c``'s kernel wrapped around a circle of ``length`` frames (:func:`wrapped_kernel`)."""
        return wrapped_kernel(self.classes[c].temporal, length)

    def periodic_error(self, length: int) -> float:
        """Largest difference, over classes and lags within a window, between the covariance of a
        window of the ``periodic`` process on ``length`` frames and the model's (``k(0) = 1``)."""
        return max(wrapped_kernel_error(cls.temporal, length, self.window) for cls in self.classes)
