"""``TexturePipeline``: the built-in texture model as a diffusers pipeline.

It holds a diffusers scheduler and the :class:`~safa.texture.model.TextureModel` (in the
place of a UNet) and samples one window the way diffusers' AudioLDM pipeline does (same
noise initialisation, classifier-free guidance batching and scheduler calls), so the
joint-diffusion sampler with one view reproduces it.  Any DDPM-family scheduler works
(DDIM, DDPM, PNDM, Euler, Heun, DPM-Solver, UniPC, ...); the model reads the scheduler's
``alphas_cumprod`` and ``prediction_type`` on every call, so swapping ``pipe.scheduler``
is enough.
"""
from __future__ import annotations

import inspect
import json
import os
from typing import Any, List, Optional, Union

import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler
from diffusers.pipelines.pipeline_utils import AudioPipelineOutput

from .decoder import TextureDecoder
from .model import MAX_WINDOW, TextureModel

__all__ = ["TexturePipeline", "make_texture_pipeline", "window_frames"]


class AnalyticPipeline:
    """What the built-in analytic pipelines (1-D and 2-D) share: ``save_pretrained`` of configs
    only (the model is its config, no weights: the model's, of class ``model_class``, and the
    scheduler's), the denoiser call, and sampling one window as diffusers' pipelines do."""

    model_class: Any = None

    def save_pretrained(self, save_directory: Union[str, os.PathLike], **_: Any) -> None:
        os.makedirs(save_directory, exist_ok=True)
        self.model.save_config(os.path.join(save_directory, "model"))
        self.scheduler.save_config(os.path.join(save_directory, "scheduler"))
        with open(os.path.join(save_directory, "model_index.json"), "w") as f:
            json.dump({"_class_name": type(self).__name__, "model": ["safa.texture", self.model_class.__name__],
                       "scheduler": ["diffusers", type(self.scheduler).__name__]}, f, indent=2)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **_: Any) -> Any:
        import diffusers
        path = str(pretrained_model_name_or_path)
        with open(os.path.join(path, "model_index.json")) as f:
            index = json.load(f)
        model = cls.model_class.from_config(cls.model_class.load_config(os.path.join(path, "model")))
        sched_cls = getattr(diffusers, index["scheduler"][1])
        scheduler = sched_cls.from_config(sched_cls.load_config(os.path.join(path, "scheduler")))
        return cls(model, scheduler)

    def denoise(self, sample: torch.Tensor, t: Union[int, float, torch.Tensor], class_weights: torch.Tensor) -> torch.Tensor:
        """The model output the current scheduler expects (the UNet call of a real pipeline)."""
        self.model.bind_scheduler(self.scheduler)
        return self.model(sample, t, class_weights)[0]

    def sample_window(self, prompts: List[str], window_shape: tuple, num_inference_steps: int,
                      guidance_scale: float, negative_prompt: Optional[str], generator: Optional[torch.Generator],
                      latents: Optional[torch.Tensor], eta: float) -> torch.Tensor:
        """One window per prompt, sampled as diffusers' pipelines do (noise initialisation,
        classifier-free guidance as one ``[uncond; cond]`` batch, the scheduler's calls): the
        latents ``(len(prompts), *window_shape)``."""
        from diffusers.utils.torch_utils import randn_tensor
        device = self._execution_device
        cfg = guidance_scale > 1.0
        cond = self.encode_prompt(prompts).to(device)
        if cfg:
            neg = self.encode_prompt([negative_prompt or ""] * len(prompts)).to(device)
            cond = torch.cat([neg, cond])
        if latents is None:
            latents = randn_tensor((len(prompts), *window_shape), generator=generator, device=device, dtype=self.dtype)
        latents = latents.to(device, self.dtype) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        params = set(inspect.signature(self.scheduler.step).parameters)
        extra = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in params}
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([latents] * 2) if cfg else latents
            model_in = self.scheduler.scale_model_input(model_in, t)
            out = self.denoise(model_in, t, cond)
            if cfg:
                uncond, text = out.chunk(2)
                out = uncond + guidance_scale * (text - uncond)
            latents = self.scheduler.step(out, t, latents, **extra).prev_sample
        return latents


class TexturePipeline(AnalyticPipeline, DiffusionPipeline):
    """Diffusers-style pipeline around the analytic texture model.

    >>> pipe = make_texture_pipeline()                        # doctest: +SKIP
    >>> audio = pipe("rain", num_inference_steps=30).audios   # (1, 163840) at 16 kHz  # doctest: +SKIP
    """

    model_cpu_offload_seq = "model"
    model_class = TextureModel

    def __init__(self, model: TextureModel, scheduler: Any) -> None:
        super().__init__()
        self.register_modules(model=model, scheduler=scheduler)
        self.decoder = TextureDecoder(channels=model.channels, freq_bins=model.freq_bins, seed=model.config.seed)

    # -- what the adapter reads -------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return self.decoder.sample_rate

    @property
    def frames_per_second(self) -> float:
        return self.decoder.frames_per_second

    @property
    def dtype(self) -> torch.dtype:  # the latents' dtype; the model computes in it
        return torch.float32

    def encode_prompt(self, prompt: Union[str, List[str]]) -> torch.Tensor:
        """``(B, num_classes)`` float32 class weights (see :meth:`TextureModel.encode_prompt`)."""
        return self.model.encode_prompt(prompt).to(torch.float32)

    # -- sampling one window ----------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: Union[str, List[str]] = "", num_inference_steps: int = 50,
                 guidance_scale: float = 1.0, negative_prompt: Optional[str] = None,
                 num_waveforms_per_prompt: int = 1, generator: Optional[torch.Generator] = None,
                 latents: Optional[torch.Tensor] = None, eta: float = 0.0, output_type: str = "np",
                 return_dict: bool = True):
        """Sample ``window`` frames per waveform; ``output_type`` in ``np``, ``pt``, ``latent``."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_waveforms_per_prompt)]
        latents = self.sample_window(prompts, (self.model.channels, self.model.window, self.model.freq_bins),
                                     num_inference_steps, guidance_scale, negative_prompt, generator, latents, eta)
        if output_type == "latent":
            audio = latents
        else:
            audio = self.decoder(latents)
            if output_type == "np":
                audio = audio.numpy()
            elif output_type != "pt":
                raise ValueError(f"output_type must be 'np', 'pt' or 'latent', got {output_type!r}")
        if not return_dict:
            return (audio,)
        return AudioPipelineOutput(audios=audio)

    # -- the encoder: the user's audio into the model's latent (safa.known) ------------------
    @torch.no_grad()
    def encode_audio(self, waveform: torch.Tensor) -> torch.Tensor:
        """``(B, samples)`` at ``sample_rate`` (a whole number of latent frames) -> ``(B, C, T, F)``.

        The decoder's least-squares inverse: its soft limiter undone, the STFT magnitude's log
        mapped to log-mel by the pseudo-inverse of the decoder's mel -> linear interpolation, its
        offset and gain removed, frequency by the pseudo-inverse of its bilinear upsampling and time
        by averaging its ``time_scale`` frames, then the minimum-norm latent whose channel mix is
        that (the decoder sums the channels, so the other channel directions are unobservable:
        decoding the result reproduces the clip's log-mel envelope, not its phase).
        """
        d = self.decoder
        b, samples = waveform.shape
        frames = samples // d.hop
        x = torch.atanh(waveform.float().clamp(-0.999, 0.999))
        spec = torch.stft(x, d.n_fft, d.hop, window=d.window, return_complex=True)[..., :frames]
        log_lin = torch.log(spec.abs().clamp_min(1e-6))                              # (B, K, Tm)
        k = d.n_fft // 2 + 1
        interp = torch.zeros(k, d.n_mels)                                            # lin = interp @ mel
        interp[torch.arange(k), d._lo] = 1 - d._frac
        interp[torch.arange(k), d._lo + 1] += d._frac
        log_mel = torch.einsum("mk,bkt->btm", torch.linalg.pinv(interp), log_lin)
        u_up = (log_mel - d.mel_offset) / d.log_gain                                 # (B, Tm, M)
        eye = torch.eye(d.freq_bins)[:, None, None]                                  # F basis rows
        up_f = torch.nn.functional.interpolate(eye, size=(1, d.n_mels), mode="bilinear",
                                               align_corners=False)[:, 0, 0].T       # (M, F)
        u = torch.einsum("fm,btm->btf", torch.linalg.pinv(up_f), u_up)
        u = u.reshape(b, frames // d.time_scale, d.time_scale, d.freq_bins).mean(dim=2)
        w = d.channel_weights
        return (w[None, :, None, None] * u[:, None] / (w * w).sum()).to(self.dtype)


def window_frames(seconds: float) -> int:
    """The built-in model's window for ``seconds``: a whole number of its latent frames from 2 to
    :data:`~safa.texture.model.MAX_WINDOW`, or ValueError."""
    fps = TextureDecoder().frames_per_second  # the pipeline's decoder, at its defaults
    frames = float(seconds) * fps
    if not seconds > 0 or abs(frames - round(frames)) > 1e-6 or round(frames) < 2:
        raise ValueError(f"window {seconds:g} s is not a whole number (>= 2) of the built-in model's latent frames "
                         f"({1000 / fps:g} ms each)")
    if round(frames) > MAX_WINDOW:
        raise ValueError(f"window {seconds:g} s is longer than the built-in model allows: at most "
                         f"{MAX_WINDOW / fps:g} s ({MAX_WINDOW} latent frames; its exact denoiser is dense in the window)")
    return int(round(frames))


def make_texture_pipeline(seed: int = 0, window_frames: int = 256, channels: int = 8, freq_bins: int = 16,
                          prediction_type: str = "epsilon", scheduler: Optional[Any] = None) -> TexturePipeline:
    """The default built-in pipeline: AudioLDM-shaped latents, DPM-Solver++(2M) on the model's schedule.

    ``window_frames``: the window the model is defined on, in latent frames (25 per second;
    256 frames = 10.24 s). A window in seconds, as ``JointDiffusion(window=...)`` and the CLI's
    ``--window`` take it: ``make_texture_pipeline(window_frames=window_frames(seconds))``.

    The betas (scaled-linear, 0.0015 to 0.0195, 1000 steps) are AudioLDM's, so schedulers
    configured for AudioLDM behave the same here. DPM-Solver++ rather than AudioLDM's DDIM
    because the demo runs few steps: with the exact denoiser, 25 DPM-Solver steps reproduce
    the model's variance in its well-resolved directions (eigenvalue >= 1) to about 3%, where
    25 DDIM steps lose about 11% (measured with ``safa.metrics.whitened_band_variances``).
    """
    if isinstance(window_frames, bool) or not isinstance(window_frames, int) or not 2 <= window_frames <= MAX_WINDOW:
        raise ValueError(f"window_frames must be an int of latent frames in [2, {MAX_WINDOW}] for the built-in model "
                         f"(a window in seconds: window_frames=window_frames(seconds)), got {window_frames!r}")
    model = TextureModel(channels=channels, freq_bins=freq_bins, window=window_frames, seed=seed,
                         prediction_type=prediction_type)
    if scheduler is None:
        scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195,
                                                beta_schedule="scaled_linear", prediction_type=prediction_type)
        # The texture latents are not bounded to [-1, 1]: a scheduler made from this config
        # (``safa generate --scheduler DDIM``) must not clip its x0 prediction, DDIM's default.
        scheduler.register_to_config(clip_sample=False)
    return TexturePipeline(model, scheduler)
