"""What safa reads from a diffusers scheduler without stepping it.

The sampler steps every scheduler through its own ``step``; the methods that look inside a
step (SyncDiffusion's gradient, SaFaStats' statistics, the guidance window by noise level)
need the scheduler's noise levels at step ``i`` instead, for the three families diffusers has:

- EDM (``precondition_outputs``; Stable Audio's cosine DPM-Solver): ``x_t = x0 + sigma eps``;
- flow matching (``scale_noise``, no ``alphas_cumprod``; SD3): ``x_t = (1 - s) x0 + s eps``; with
  ``invert_sigmas`` (LongCat-AudioDiT, Mochi) the scheduler's sigmas count up from noise, its ``s`` is
  the weight of ``x0`` and the model predicts ``x0 - eps``: read through :func:`_flow_noise`;
- the DDPM family (``alphas_cumprod``: DDIM, DDPM, PNDM, Euler, DPM-Solver, UniPC, ...):
  ``x_t = sqrt(a) x0 + sqrt(1 - a) eps`` in the model's variance-preserving units.
"""
from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["scale_model_input", "x0_family", "predict_x0", "step_snr", "shift_clean_prediction", "set_scheduler"]


def scale_model_input(scheduler: Any, sample: torch.Tensor, t: Any) -> torch.Tensor:
    # Flow-matching schedulers have no scale_model_input: their model input is the sample.
    scale = getattr(scheduler, "scale_model_input", None)
    return scale(sample, t) if scale is not None else sample


def _per_step_sigma(scheduler: Any) -> bool:
    sigmas = getattr(scheduler, "sigmas", None)
    return isinstance(sigmas, torch.Tensor) and sigmas.numel() == len(scheduler.timesteps) + 1


def _flow_noise(scheduler: Any, i: int) -> float:
    """The noise weight ``s`` of ``x_t = (1 - s) x0 + s eps`` at step ``i`` of a flow-matching scheduler."""
    sigma = float(scheduler.sigmas[i])
    return 1.0 - sigma if scheduler.config.get("invert_sigmas", False) else sigma


def _flow_sign(scheduler: Any) -> float:
    """+1 where the model predicts ``eps - x0`` (SD3), -1 under ``invert_sigmas`` (it predicts ``x0 - eps``)."""
    return -1.0 if scheduler.config.get("invert_sigmas", False) else 1.0


def x0_family(scheduler: Any) -> str:
    """How :func:`predict_x0` reads ``scheduler``: ``"edm"``, ``"flow"`` or ``"ddpm"`` (else ``ValueError``)."""
    per_step_sigma = _per_step_sigma(scheduler)
    if per_step_sigma and hasattr(scheduler, "precondition_outputs"):
        return "edm"
    if getattr(scheduler, "alphas_cumprod", None) is not None:
        return "ddpm"
    if per_step_sigma and hasattr(scheduler, "scale_noise"):
        return "flow"
    raise ValueError(f"safa computes x0 from the scheduler's noise levels and does not know "
                     f"{type(scheduler).__name__}: use a DDPM-family (DDIM, DPM-Solver, Euler, ...), "
                     f"flow-matching or EDM scheduler")


def _alpha_bar(scheduler: Any, i: int) -> float:
    """The DDPM family's ``alpha_bar`` at step ``i``: from the per-step sigma where the scheduler keeps one
    (Euler, Heun, DPM-Solver, UniPC), else from ``alphas_cumprod`` at the step's integer timestep."""
    if _per_step_sigma(scheduler):
        return 1.0 / (1.0 + float(scheduler.sigmas[i]) ** 2)
    t = float(scheduler.timesteps[i])
    if t != int(t):
        raise ValueError(f"{type(scheduler).__name__} gives a fractional timestep {t} and no sigma per step, "
                         f"so the noise level cannot be read from its alphas_cumprod")
    return float(scheduler.alphas_cumprod[int(t)])


def step_snr(scheduler: Any, i: int) -> float:
    """Signal-to-noise ratio of the noisy latent at step ``i`` (after ``set_timesteps``), per unit data variance.

    The DDPM family's ``x_t = sqrt(a) x0 + sqrt(1 - a) eps`` gives ``a / (1 - a)``; flow matching's
    ``(1 - s) x0 + s eps`` gives ``((1 - s) / s)^2``; EDM's ``x0 + sigma eps`` gives ``1 / sigma^2``.
    It grows along the trajectory whatever the scheduler and the number of steps, so a window of
    the trajectory defined by it is the same for 25 and 200 steps.
    """
    family = x0_family(scheduler)
    if family == "ddpm":
        a = _alpha_bar(scheduler, i)
        return a / (1.0 - a) if a < 1.0 else math.inf
    s = _flow_noise(scheduler, i) if family == "flow" else float(scheduler.sigmas[i])
    if s == 0.0:
        return math.inf
    return ((1.0 - s) / s) ** 2 if family == "flow" else 1.0 / s ** 2


def shift_clean_prediction(scheduler: Any, i: int, sample: torch.Tensor, model_input: torch.Tensor,
                           model_output: torch.Tensor, delta: torch.Tensor) -> None:
    """Move the clean prediction of step ``i`` by ``delta`` and keep its noise prediction, in place.

    ``sample`` (the scheduler's ``x_t``) becomes ``x_t + c delta``, where ``c`` is the weight of the
    clean latent in ``x_t`` at step ``i`` (``sqrt(a)`` in the model's variance-preserving units,
    divided by the factor ``scale_model_input`` applies; ``1 - s`` for flow matching; 1 for EDM),
    and ``model_output`` changes by what makes :func:`predict_x0` of the new pair ``x0 + delta``:
    nothing for an epsilon-predicting model, ``-sqrt(1 - a) delta`` for v-prediction, ``delta`` for
    x0-prediction, ``-delta`` for flow matching. The scheduler's step then moves as if the model had
    predicted ``x0 + delta`` with the same noise. ``model_input`` is only read (the scale factor).
    """
    family = x0_family(scheduler)
    if family == "ddpm":
        num = float((model_input.double() * sample.double()).sum())
        den = float((sample.double() ** 2).sum())
        scale_in = num / den if den > 0 else 1.0  # scale_model_input is a scalar multiple of the sample
        weight = math.sqrt(_alpha_bar(scheduler, i)) / scale_in
    else:
        scale_in = 1.0 if family == "flow" else None
        weight = 1.0 - _flow_noise(scheduler, i) if family == "flow" else 1.0
    # predict_x0 is affine in (sample, model_input, model_output): read its two coefficients on scalars.
    probe = torch.zeros(1, dtype=torch.float64, device=sample.device)
    one = torch.ones_like(probe)
    if scale_in is None:  # EDM: precondition_outputs reads the sample only
        from_sample = float(predict_x0(scheduler, i, one, probe, probe, clip=False))
    else:
        from_sample = float(predict_x0(scheduler, i, one, one * scale_in, probe, clip=False))
    from_output = float(predict_x0(scheduler, i, probe, probe, one, clip=False))
    sample.add_(delta, alpha=weight)
    residual = 1.0 - from_sample * weight  # 0 for epsilon prediction: x0 moved with the sample alone
    if abs(residual) > 1e-6:
        model_output.add_(delta, alpha=residual / from_output)


def predict_x0(scheduler: Any, i: int, sample: torch.Tensor, model_input: torch.Tensor,
               model_output: torch.Tensor, clip: bool = True) -> torch.Tensor:
    """The clean latent ``x0`` that the model output at step ``i`` predicts, differentiable in all inputs.

    ``sample`` is the scheduler's ``x_t``, ``model_input`` its ``scale_model_input``, and
    ``model_output`` the guided model output. Three families of schedulers (:func:`x0_family`):

    - EDM (``precondition_outputs``, e.g. Stable Audio's cosine DPM-Solver): the scheduler's
      own output preconditioning at ``sigmas[i]``;
    - flow matching (``scale_noise``, no ``alphas_cumprod``; SD3): ``x_t = (1 - s) x0 + s eps``
      and the model predicts ``eps - x0``, so ``x0 = x_t - s * v`` with ``s = sigmas[i]``
      (``invert_sigmas``: ``s = 1 - sigmas[i]`` and ``v = x0 - eps``, so ``x0 = x_t + s * v``);
    - the DDPM family (``alphas_cumprod``): the model input is the variance-preserving
      ``sqrt(a) x0 + sqrt(1 - a) eps`` (Euler-type schedulers scale their ``x0 + sigma eps``
      sample down to it), with ``a = 1 / (1 + sigmas[i]^2)`` when the scheduler keeps one
      sigma per timestep (Euler, Heun, DPM-Solver, UniPC) and ``alphas_cumprod[t]`` otherwise
      (DDIM, DDPM, PNDM); then ``prediction_type`` says how to solve for ``x0``, and
      ``clip_sample`` clips it as DDIM's own step does (unless ``clip=False``).
    """
    family = x0_family(scheduler)
    if family == "edm":
        return scheduler.precondition_outputs(sample, model_output, scheduler.sigmas[i].to(sample.device))
    if family == "flow":
        return sample - _flow_sign(scheduler) * _flow_noise(scheduler, i) * model_output
    alpha_bar = _alpha_bar(scheduler, i)
    a, s = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        x0 = (model_input - s * model_output) / a
    elif prediction == "v_prediction":
        x0 = a * model_input - s * model_output
    elif prediction == "sample":
        x0 = model_output
    else:
        raise ValueError(f"unsupported prediction_type {prediction!r} of {type(scheduler).__name__}")
    if clip and scheduler.config.get("clip_sample", False):  # DDIM / DDPM clip their x0 (SD pipelines turn it off)
        r = float(scheduler.config.get("clip_sample_range", 1.0))
        x0 = x0.clamp(-r, r)
    return x0


def set_scheduler(pipe: Any, name: str) -> None:
    """Replace ``pipe.scheduler`` by the diffusers scheduler ``name`` (``DDIM`` or ``DDIMScheduler``), same config."""
    import diffusers
    wanted = name.lower().removesuffix("scheduler")
    choices = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and n != "SchedulerMixin"
                     and isinstance(getattr(diffusers, n, None), type))
    for cls_name in choices:
        if cls_name.lower().removesuffix("scheduler") == wanted:
            pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config)
            return
    raise ValueError(f"unknown scheduler {name!r}; choose one of: "
                   + ", ".join(c.removesuffix("Scheduler") for c in choices))
