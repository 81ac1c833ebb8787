"""``TexturePipeline2D``: the 2-D analytic texture model as a diffusers image pipeline.

It holds a diffusers scheduler and :class:`~safa.texture.model2d.TextureModel2D` (in the place of
a UNet) and samples one ``window x window`` tile the way diffusers' Stable Diffusion pipeline does
(same noise initialisation, classifier-free guidance batching and scheduler calls), so the
joint-diffusion sampler with one view reproduces it bitwise. Decoding is a fixed linear map of
the latent's channels to RGB, one pixel per latent cell (``vae_scale_factor = 1``): a decoded
image shows the latent itself, seams included, and a tiled decode is exact.

The sampler adapter is :mod:`safa.adapters.texture2d`; :func:`make_texture2d_pipeline` builds one.
"""
from __future__ import annotations

from typing import Any, List, Optional, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from .model2d import MAX_WINDOW_2D, TextureModel2D
from .pipeline import AnalyticPipeline

__all__ = ["TexturePipeline2D", "make_texture2d_pipeline"]


class TexturePipeline2D(AnalyticPipeline, DiffusionPipeline):
    """Diffusers-style image pipeline around the 2-D analytic texture model.

    >>> pipe = make_texture2d_pipeline()                              # doctest: +SKIP
    >>> pipe("gravel", num_inference_steps=25).images[0].size         # (32, 32)  # doctest: +SKIP
    """

    model_cpu_offload_seq = "model"
    model_class = TextureModel2D
    vae_scale_factor = 1  # one pixel per latent cell

    def __init__(self, model: TextureModel2D, scheduler: Any) -> None:
        super().__init__()
        self.register_modules(model=model, scheduler=scheduler)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1)
        # The decoder: a fixed, seeded channels -> RGB matrix, scaled so that a unit-variance latent
        # spans about [-1, 1].
        mix = np.random.default_rng(model.config.seed + 1).standard_normal((3, model.channels))
        self.colour_matrix = torch.tensor(0.5 * mix / np.sqrt(model.channels), dtype=torch.float32)

    @property
    def dtype(self) -> torch.dtype:  # the latents' dtype; the model computes in it
        return torch.float32

    def encode_prompt(self, prompt: Union[str, List[str]]) -> torch.Tensor:
        """``(B, num_classes)`` float32 class weights (see :meth:`KroneckerMixture.encode_prompt`)."""
        return self.model.encode_prompt(prompt).to(torch.float32)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` latent -> ``(B, 3, H, W)`` pixels, about [-1, 1] (linear, per cell)."""
        m = self.colour_matrix.to(latents.device, latents.dtype)
        return torch.einsum("oc,bchw->bohw", m, latents)

    def check_inputs(self, height: Optional[int], width: Optional[int], output_type: str) -> None:
        w = self.model.window
        for name, value in (("height", height), ("width", width)):
            if value is not None and value != w:
                raise ValueError(f"{name} must be the model's window, {w} px (this pipeline samples one tile; "
                                 f"JointDiffusion makes larger images), got {value!r}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")

    @torch.no_grad()
    def __call__(self, prompt: Union[str, List[str]] = "", height: Optional[int] = None, width: Optional[int] = None,
                 num_inference_steps: int = 50, guidance_scale: float = 1.0, negative_prompt: Optional[str] = None,
                 num_images_per_prompt: int = 1, generator: Optional[torch.Generator] = None,
                 latents: Optional[torch.Tensor] = None, eta: float = 0.0, output_type: str = "pil",
                 return_dict: bool = True):
        """Sample one ``window x window`` tile per image; ``output_type`` in ``pil``, ``np``, ``pt``, ``latent``."""
        self.check_inputs(height, width, output_type)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        latents = self.sample_window(prompts, (self.model.channels, self.model.window, self.model.window),
                                     num_inference_steps, guidance_scale, negative_prompt, generator, latents, eta)
        # decode: pixels in [0, 1], then the image processor (as the adapter's output stage)
        if output_type == "latent":
            images = latents
        else:
            images = (self.decode(latents).float() / 2 + 0.5).clamp(0, 1)
            images = self.image_processor.postprocess(images, output_type=output_type,
                                                      do_denormalize=[False] * images.shape[0])
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def make_texture2d_pipeline(seed: int = 0, window: int = 32, channels: int = 4, prediction_type: str = "epsilon",
                            scheduler: Optional[Any] = None) -> TexturePipeline2D:
    """The 2-D built-in pipeline: ``window x window`` tiles of ``channels`` latent channels on Stable
    Diffusion's schedule (scaled-linear betas 0.00085 to 0.012), DPM-Solver++(2M) by default.

    ``window``: the tile side in latent cells (= pixels), an int in [2, 256].
    """
    if isinstance(window, bool) or not isinstance(window, int) or not 2 <= window <= MAX_WINDOW_2D:
        raise ValueError(f"window must be an int of latent cells in [2, {MAX_WINDOW_2D}], got {window!r}")
    model = TextureModel2D(channels=channels, window=window, seed=seed, prediction_type=prediction_type)
    if scheduler is None:
        scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                                beta_schedule="scaled_linear", prediction_type=prediction_type)
        # The latents are not bounded to [-1, 1]: a DDIM made from this config must not clip x0.
        scheduler.register_to_config(clip_sample=False)
    return TexturePipeline2D(model, scheduler)
