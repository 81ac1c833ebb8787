"""SyncDiffusion (Lee et al., NeurIPS 2023): per-view gradient steps towards an anchor view.

At step ``i`` of the first ``round(steps * T)`` steps, before the model call
(:class:`SyncDiffusionHooks`, the sampler's 6.0):

1. the anchor view (the middle one by default) goes through the model with classifier-free
   guidance, without gradients; its clean prediction ``x0`` is decoded once;
2. for every other view, one at a time: its noisy latent ``x_t`` becomes a leaf with a
   gradient, goes through the model with guidance, ``x0`` is computed by hand from the
   scheduler's noise levels (:func:`predict_x0`: never ``scheduler.step``, which multistep
   and stochastic schedulers would advance), decoded, compared with the anchor's decoding by
   the loss, and ``x_t <- x_t - weight * decay**i * d loss / d x_t``. The graph is freed
   before the next view.

Then the sampler's usual step runs on the updated views, and the overlaps are averaged.
As in the authors' code the anchor is not updated (their code also back-propagates through
the anchor and discards the result; we skip that work).

Losses take the decoded outputs of a view and of the anchor and return a scalar (per-item
values are summed, so each batch item gets its own loss's gradient): LPIPS (VGG) for images
when the ``lpips`` package and torchvision's VGG16 weights are available locally
(:func:`lpips_loss`), and :func:`spectral_distance`, weight-free, for audio.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable, List, Sequence

import torch
import torch.nn.functional as F

from .adapters import Adapter, Conditions
from .methods import MethodContext, MethodHooks, leading_steps

__all__ = ["x0_family", "predict_x0", "step_snr", "shift_clean_prediction", "spectral_distance", "lpips_loss", "default_loss", "SyncDiffusionHooks"]

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# -- x0 without scheduler.step ---------------------------------------------------------------
def _per_step_sigma(scheduler: Any) -> bool:
    sigmas = getattr(scheduler, "sigmas", None)
    return isinstance(sigmas, torch.Tensor) and sigmas.numel() == len(scheduler.timesteps) + 1


def x0_family(scheduler: Any) -> str:
    """How :func:`predict_x0` reads ``scheduler``: ``"edm"``, ``"flow"`` or ``"ddpm"`` (else ``ValueError``)."""
    per_step_sigma = _per_step_sigma(scheduler)
    if per_step_sigma and hasattr(scheduler, "precondition_outputs"):
        return "edm"
    if getattr(scheduler, "alphas_cumprod", None) is not None:
        return "ddpm"
    if per_step_sigma and hasattr(scheduler, "scale_noise"):
        return "flow"
    raise ValueError(f"SyncDiffusion computes x0 from the scheduler's noise levels and does not know "
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
    s = float(scheduler.sigmas[i])
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
        weight = 1.0 - float(scheduler.sigmas[i]) if family == "flow" else 1.0
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
      and the model predicts ``eps - x0``, so ``x0 = x_t - s * v`` with ``s = sigmas[i]``;
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
        return sample - float(scheduler.sigmas[i]) * model_output
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
        raise ValueError(f"SyncDiffusion: unsupported prediction_type {prediction!r} of {type(scheduler).__name__}")
    if clip and scheduler.config.get("clip_sample", False):  # DDIM / DDPM clip their x0 (SD pipelines turn it off)
        r = float(scheduler.config.get("clip_sample_range", 1.0))
        x0 = x0.clamp(-r, r)
    return x0


# -- losses -------------------------------------------------------------------------------------
def _log_spectrograms(x: torch.Tensor, scales: Sequence[int]) -> List[torch.Tensor]:
    """``(B, time, bins)`` log-magnitude spectrograms of ``x`` at several time resolutions.

    ``x`` is a mel spectrogram ``(B, 1, frames, mels)`` (natural-log magnitudes, the AudioLDM
    family's and the texture model's first decoding stage), pooled over 1, 2, 4, ... frames;
    or a waveform ``(B, channels, samples)``, whose channel mean is analysed by STFTs of
    256, 512, 1024, ... points (Stable Audio).
    """
    if x.ndim == 4:
        mel = x[:, 0].float()
        return [F.avg_pool1d(mel.transpose(1, 2), s, s).transpose(1, 2) if s > 1 else mel
                for s in scales if s <= mel.shape[1]]
    if x.ndim == 3:
        wave = x.float().mean(1)
        out = []
        for s in scales:
            n_fft = 256 * s
            if n_fft > wave.shape[-1]:
                continue
            window = torch.hann_window(n_fft, device=wave.device)
            spec = torch.stft(wave, n_fft, n_fft // 4, window=window, return_complex=True)
            out.append(torch.log(spec.abs() + 1e-5).transpose(1, 2))
        return out
    raise ValueError(f"spectral_distance takes mel spectrograms (B, 1, frames, mels) or waveforms "
                     f"(B, channels, samples), got shape {tuple(x.shape)}")


def spectral_distance(a: torch.Tensor, b: torch.Tensor, scales: Sequence[int] = (1, 2, 4, 8)) -> torch.Tensor:
    """Multi-resolution log-mel distance between two batches of decoded audio; a scalar, weight-free.

    At every resolution (:func:`_log_spectrograms`): the mean over time of every frequency
    bin's log magnitude (the spectral envelope: timbre, level) and its standard deviation over
    time (how much the band moves at that time scale), compared by mean absolute difference
    over bins; summed over resolutions and batch items. Statistics over time rather than a
    frame-by-frame difference: the views sit at other times than the anchor, and the aim is the
    same sound, not the same events.
    """
    if a.shape != b.shape:
        raise ValueError(f"spectral_distance needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    total = a.new_zeros((), dtype=torch.float32)
    for sa, sb in zip(_log_spectrograms(a, scales), _log_spectrograms(b, scales)):
        mean_gap = (sa.mean(1) - sb.mean(1)).abs().mean(-1)
        spread_gap = (sa.std(1) - sb.std(1)).abs().mean(-1) if sa.shape[1] > 1 else 0.0
        total = total + (mean_gap + spread_gap).sum()
    return total


def _vgg16_weights_file() -> str:
    """Where torchvision keeps the ImageNet VGG16 weights that LPIPS(net='vgg') loads."""
    from torchvision.models import VGG16_Weights
    url = VGG16_Weights.IMAGENET1K_V1.url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


_HOW = ("or pass SyncDiffusion(loss=f) with any differentiable f(a, b) -> scalar on images in [0, 1] "
        "(e.g. lambda a, b: ((a - b) ** 2).mean(), which is not perceptual)")


@functools.lru_cache(maxsize=4)
def _lpips_model(device: torch.device) -> Any:
    import lpips
    model = lpips.LPIPS(net="vgg", verbose=False).eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def lpips_loss(device: torch.device) -> Loss:
    """LPIPS (VGG) as the authors use it, on images in ``[0, 1]``; a clear error when it cannot load offline.

    The ``lpips`` wheel ships its linear heads; the VGG16 backbone is torchvision's ImageNet
    checkpoint, which torchvision downloads on first use into the torch hub cache. Without it
    (a machine with no model hub) this raises a ``ValueError`` saying what to provide.
    """
    try:
        import lpips  # noqa: F401
        path = _vgg16_weights_file()
    except ImportError:
        raise ValueError("SyncDiffusion's default image loss is LPIPS (VGG) from the `lpips` package, which "
                         "needs `lpips` and `torchvision` installed (pip install lpips) and torchvision's "
                         f"VGG16 ImageNet weights in the torch hub cache; {_HOW}") from None
    if not os.path.isfile(path):
        raise ValueError(f"SyncDiffusion's default image loss is LPIPS (VGG), and torchvision's VGG16 ImageNet "
                         f"weights are not in the torch hub cache ({path}; this machine cannot download them): "
                         f"copy that file there from a machine where torchvision has downloaded it, {_HOW}")
    model = _lpips_model(torch.device(device))
    return lambda a, b: model(a * 2 - 1, b * 2 - 1).sum()  # LPIPS takes [-1, 1]


def default_loss(adapter: Adapter) -> Loss:
    """LPIPS (VGG) for image pipelines, :func:`spectral_distance` for audio."""
    return lpips_loss(adapter.device) if adapter.kind == "image" else spectral_distance


# -- the hooks ------------------------------------------------------------------------------------
class SyncDiffusionHooks(MethodHooks):
    """SyncDiffusion for one call: the gradient steps of the first steps, before each model call."""

    def __init__(self, method: Any, context: MethodContext) -> None:
        from .sampler import _scale_model_input
        step = context.step
        n = step.layout.num_views
        anchor = n // 2 if method.anchor is None else method.anchor
        if not 0 <= anchor < n:
            raise ValueError(f"anchor must be in [0, {n - 1}] for this layout of {n} views, got {anchor}")
        self.context, self.anchor = context, anchor
        self.weight, self.decay = float(method.weight), float(method.decay)
        self.sync_steps = leading_steps(method.steps, len(context.scheduler_timesteps)) if n > 1 else 0
        self.loss: Loss = method.loss if method.loss is not None else (
            default_loss(context.adapter) if self.sync_steps else spectral_distance)
        self._scale_model_input = _scale_model_input
        batch = int(context.window_shape[0])
        self.conditions: List[Conditions] = [step.conditions.take(step.view_rows[v * batch:(v + 1) * batch])
                                             for v in range(n)]
        if self.sync_steps:  # an unknown scheduler fails here, before any step
            x0_family(context.scheduler)

    def decoded_x0(self, v: int, x_t: torch.Tensor, i: int) -> torch.Tensor:
        """View ``v``'s guided clean prediction at step ``i``, decoded (images in ``[0, 1]``; audio: mel / waveform)."""
        ctx = self.context
        model_input = self._scale_model_input(ctx.scheduler, x_t, ctx.scheduler_timesteps[i])
        out = ctx.adapter.predict(model_input, ctx.step.timesteps[i], self.conditions[v], ctx.step.guidance_scale)
        x0 = predict_x0(ctx.scheduler, i, x_t, model_input, out)
        decoded = ctx.adapter.decode_latents(x0)
        return ctx.adapter.finalize(decoded) if ctx.adapter.kind == "image" else decoded

    def gradient(self, v: int, x_t: torch.Tensor, i: int, target: torch.Tensor) -> torch.Tensor:
        """``d loss(decoded_x0(v, x_t, i), target) / d x_t``; the graph is freed on return."""
        leaf = x_t.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            loss = self.loss(self.decoded_x0(v, leaf, i), target)
            if loss.numel() != 1:
                loss = loss.sum()
            (grad,) = torch.autograd.grad(loss, leaf)
        return grad

    def before_model(self, i: int, views: torch.Tensor) -> None:
        if i >= self.sync_steps:
            return
        with torch.no_grad():
            target = self.decoded_x0(self.anchor, views[self.anchor], i)
        step_size = self.weight * self.decay ** i
        for v in range(views.shape[0]):
            if v != self.anchor:
                views[v].sub_(self.gradient(v, views[v], i, target), alpha=step_size)

