"""What the 1-D and 2-D analytic texture models share: a class-conditional mixture of zero-mean
Kronecker Gaussians whose posterior expectations are exact.

A subclass lays its window out as a stack of small factors (channel-frequency x time for
:class:`~safa.texture.model.TextureModel`, channels x rows x columns for
:class:`~safa.texture.model2d.TextureModel2D`) and provides three things: :meth:`_rotate_in` (a
window into the eigenbasis of each component's covariance, one small rotation per factor),
:meth:`_rotate_out` (back, summed over components) and :meth:`_eig` (the covariance's
eigenvalues in that basis, products of the factors'). Everything else lives here, once:
prompts to class weights, the noise schedule, the components' log-likelihoods and the exact
denoiser.

With ``x_t = a x_0 + b eps`` (``a = sqrt(alpha_bar)``, ``b = sqrt(1 - alpha_bar)``) and ``y`` a
coefficient in a component's eigenbasis with eigenvalue ``lam``:

    E[x_0 | y]  = a lam / (a^2 lam + b^2) * y
    E[eps | y]  = b / (a^2 lam + b^2) * y            (stable as b -> 0, no division by b)
    E[v | y]    = a b (1 - lam) / (a^2 lam + b^2) * y (v = a eps - b x_0)

and components are mixed by their exact posterior responsibilities
``softmax_k(log pi_k + log N(x_t; 0, a^2 Sigma_k + b^2 I))`` computed in log space. Because
every output is linear in ``x_t`` given the responsibilities, the mixture of the per-component
expectations is the exact posterior expectation.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin

__all__ = ["KroneckerMixture", "alpha_bar_at", "scheduled_alphas_cumprod"]


def alpha_bar_at(alphas_cumprod: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """``alpha_bar`` at (possibly fractional) timesteps, as diffusers' schedules mean them.

    Integer timesteps index ``alphas_cumprod``. Fractional ones (Euler/Heun with Karras or
    exponential sigmas) come from ``_sigma_to_t``, which interpolates ``t`` linearly in
    ``log sigma`` between neighbouring integers; we invert exactly that.
    """
    ac = alphas_cumprod.to(torch.float64)
    t = timestep.to(torch.float64).clamp(0, ac.numel() - 1)
    lo = t.floor().long()
    hi = torch.clamp(lo + 1, max=ac.numel() - 1)
    frac = t - lo.to(torch.float64)
    if bool((frac == 0).all()):
        return ac[lo]
    log_sigma = 0.5 * (torch.log1p(-ac) - torch.log(ac))
    ls = (1 - frac) * log_sigma[lo] + frac * log_sigma[hi]
    sigma2 = torch.exp(2 * ls)
    return 1.0 / (1.0 + sigma2)


def scheduled_alphas_cumprod(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """The scaled-linear schedule's ``alphas_cumprod`` (float64), the models' default until a
    scheduler is bound."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def _trailing(ndim: int) -> Tuple[int, ...]:
    """The dims of one component's coefficients in a ``(B, K', ...)`` tensor of ``ndim`` factor
    axes, last first (``(-1, -2)`` for two)."""
    return tuple(range(-1, -ndim - 1, -1))


class KroneckerMixture(ModelMixin, ConfigMixin):
    """Base of the analytic texture models: prompts, schedule, likelihoods, the exact denoiser.

    A subclass sets, in its ``__init__``: ``classes`` (objects with a ``name``), ``substyles``
    (``(name, ...)`` tuples), the buffers ``component_class`` (``(K,)`` long: each component's
    class) and ``substyle_logprior`` (``(K,)`` float64), ``alphas_cumprod`` and
    ``prediction_type``; and implements :meth:`_rotate_in`, :meth:`_rotate_out`, :meth:`_eig`.
    """

    # -- names and conditions ---------------------------------------------------------
    @property
    def class_names(self) -> List[str]:
        return [c.name for c in self.classes]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_components(self) -> int:
        return int(self.component_class.numel())

    def class_prior(self) -> torch.Tensor:
        """The unconditional class distribution (uniform)."""
        return torch.full((self.num_classes,), 1.0 / self.num_classes, dtype=torch.float64)

    def encode_prompt(self, prompt: Union[str, Sequence[str]]) -> torch.Tensor:
        """Prompt(s) -> ``(B, num_classes)`` class weights. ``""`` is the unconditional prior.

        A prompt names a class (case and surrounding space ignored); anything else is a
        ``ValueError`` listing the classes, because silently falling back to the
        unconditional model would hide typos.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        rows = []
        for p in prompts:
            key = (p or "").strip().lower()
            if not key:
                rows.append(self.class_prior())
                continue
            if key not in self.class_names:
                raise ValueError(f"unknown texture prompt {p!r}; the built-in texture model knows: "
                                 f"{', '.join(self.class_names)} (or '' for the unconditional mixture)")
            row = torch.zeros(self.num_classes, dtype=torch.float64)
            row[self.class_names.index(key)] = 1.0
            rows.append(row)
        return torch.stack(rows)

    def component_logprior(self, class_weights: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` log prior of each component given ``(B, num_classes)`` class weights."""
        cw = class_weights.to(torch.float64)
        return torch.log(cw[:, self.component_class]) + self.substyle_logprior

    def sample_components(self, class_weights: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draw a component index per row of ``(B, num_classes)`` class weights."""
        p = torch.exp(self.component_logprior(class_weights))
        return torch.multinomial(p, 1, generator=generator).reshape(-1)

    # -- schedule ---------------------------------------------------------------------
    def set_schedule(self, alphas_cumprod: torch.Tensor, prediction_type: str) -> None:
        """Bind the scheduler's noise schedule and prediction type (what a UNet was trained for)."""
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {prediction_type!r}")
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().clone()
        self.prediction_type = prediction_type

    def bind_scheduler(self, scheduler) -> None:
        """Take ``alphas_cumprod`` and ``prediction_type`` from a diffusers scheduler."""
        ac = getattr(scheduler, "alphas_cumprod", None)
        if ac is None:
            # ValueError: the CLI reports it as a one-line user error (a --scheduler choice).
            raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod: the texture model's "
                             "denoiser needs a variance-preserving (DDPM-family) scheduler such as DDIM, "
                             "DPMSolverMultistep, EulerDiscrete or UniPCMultistep")
        self.set_schedule(ac, scheduler.config.prediction_type)

    # -- what a subclass provides ---------------------------------------------------------
    def _eig(self, comps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(K', ...)`` eigenvalues of the window covariance of components ``comps`` (float64)."""
        raise NotImplementedError

    def _rotate_in(self, x: torch.Tensor, comps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A batch of windows -> ``(B, K', ...)`` coefficients in the eigenbases of ``comps``."""
        raise NotImplementedError

    def _rotate_out(self, coef: torch.Tensor, comps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, K', ...)`` coefficients of ``comps`` -> windows, summed over components."""
        raise NotImplementedError

    # -- likelihoods ------------------------------------------------------------------
    def _noisy_stats(self, alpha_bar: torch.Tensor, comps: torch.Tensor, dtype: torch.dtype
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per distinct ``alpha_bar``: inverse variances ``(U, K', ...)`` in ``dtype``, log-dets
        ``(U, K')`` in float64, and the row -> distinct index map.  Rows of a sampler batch
        share their timestep, so this is computed once per step, not once per row."""
        uniq, inv = torch.unique(alpha_bar.to(torch.float64), return_inverse=True)
        eig = self._eig(comps)
        shape = (-1,) + (1,) * eig.dim()
        var = uniq.reshape(shape) * eig[None] + (1 - uniq).reshape(shape)
        return (1.0 / var).to(dtype), torch.log(var).sum(_trailing(eig.dim() - 1)), inv

    def log_likelihoods(self, x: torch.Tensor, alpha_bar: Union[float, torch.Tensor] = 1.0,
                        coef: Optional[torch.Tensor] = None, comps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, K')`` log densities of ``x`` under each component of ``N(0, a^2 Sigma_k + b^2 I)``.

        With ``alpha_bar = 1`` this is the clean model's component log-likelihood.
        """
        comps = torch.arange(self.num_components) if comps is None else comps
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        if coef is None:
            coef = self._rotate_in(x, comps)
        inv_var, logdet, row = self._noisy_stats(ab, comps, coef.dtype)
        # Squares and products in the working dtype, the sum over every coefficient in float64.
        quad = (coef * coef * inv_var[row]).sum(_trailing(coef.dim() - 2), dtype=torch.float64)
        d = math.prod(coef.shape[2:])
        return -0.5 * (quad + logdet[row] + d * math.log(2 * math.pi))

    def responsibilities(self, x: torch.Tensor, class_weights: torch.Tensor,
                         alpha_bar: Union[float, torch.Tensor] = 1.0) -> torch.Tensor:
        """``(B, K)`` posterior component probabilities (log-sum-exp stable)."""
        ll = self.log_likelihoods(x, alpha_bar) + self.component_logprior(class_weights).to(x.device)
        return torch.softmax(ll, dim=-1)

    # -- the denoiser -----------------------------------------------------------------
    def alpha_bar(self, timestep: Union[int, float, torch.Tensor], batch: int) -> torch.Tensor:
        t = torch.as_tensor(timestep).reshape(-1).to(torch.float64)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"timestep has {t.numel()} entries for a batch of {batch}")
        return alpha_bar_at(self.alphas_cumprod, t)

    def denoise(self, x_t: torch.Tensor, alpha_bar: torch.Tensor, class_weights: torch.Tensor,
                output: str = "epsilon") -> torch.Tensor:
        """Exact posterior expectation of ``output`` (epsilon, v_prediction or sample).

        ``x_t`` is a batch of windows, ``alpha_bar`` ``(B,)`` and ``class_weights``
        ``(B, num_classes)``.  Rows are grouped by which components have non-zero prior
        (a class prompt needs only its own sub-styles), so a conditional row costs a
        fraction of an unconditional one.
        """
        if output not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported output {output!r}")
        ab_all = alpha_bar.to(torch.float64).reshape(-1).expand(x_t.shape[0])
        logprior = self.component_logprior(class_weights.to(torch.float64).cpu())
        support = torch.isfinite(logprior)
        out = torch.empty_like(x_t)
        patterns, group = torch.unique(support, dim=0, return_inverse=True)
        for g in range(patterns.shape[0]):
            rows = torch.nonzero(group == g).reshape(-1)
            comps = torch.nonzero(patterns[g]).reshape(-1)
            x, ab = x_t[rows.to(x_t.device)], ab_all[rows]
            coef = self._rotate_in(x, comps)
            ll = self.log_likelihoods(x, ab, coef=coef, comps=comps) + logprior[rows][:, comps].to(x.device)
            resp = torch.softmax(ll, dim=-1)                          # (b, K'), float64
            # A responsibility below 1e-20 changes nothing at float64 precision, but its
            # products would be float32 denormals (a 10-100x slowdown in the matmuls); drop
            # it, and skip components that no row of the group needs any more.
            resp = torch.where(resp < 1e-20, torch.zeros_like(resp), resp)
            keep = torch.nonzero(resp.amax(0) > 0).reshape(-1)
            comps, coef, resp = comps[keep], coef[:, keep.to(coef.device)], resp[:, keep]
            uniq, row = torch.unique(ab, return_inverse=True)
            lam = self._eig(comps)[None]
            u = uniq.reshape((-1,) + (1,) * (lam.dim() - 1))
            denom = u * lam + (1 - u)
            if output == "epsilon":
                gain = (1 - u).sqrt() / denom
            elif output == "v_prediction":
                gain = (u * (1 - u)).sqrt() * (1 - lam) / denom
            else:
                gain = u.sqrt() * lam / denom
            gain = gain.to(x.dtype)[row] * resp.to(x.dtype).reshape(resp.shape + (1,) * (lam.dim() - 2))
            out[rows.to(x_t.device)] = self._rotate_out(coef * gain, comps)
        return out

    def forward(self, sample: torch.Tensor, timestep: Union[int, float, torch.Tensor],
                class_weights: torch.Tensor, return_dict: bool = False):
        """UNet-shaped call: the scheduler-scaled ``x_t`` in, the scheduler's target out."""
        cw = class_weights
        if cw.dim() == 1:
            cw = cw[None].expand(sample.shape[0], -1)
        out = self.denoise(sample, self.alpha_bar(timestep, sample.shape[0]), cw, self.prediction_type)
        return (out,) if not return_dict else {"sample": out}
