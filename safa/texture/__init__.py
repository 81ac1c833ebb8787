"""The built-in analytic texture model: exact denoiser, Griffin-Lim decoder, diffusers pipeline.

No weights, no downloads: every parameter is derived from a seed, so it is the offline
default for ``make demo`` and ``safa generate``, and because its denoiser is the exact
posterior mean, it is the ground truth for :mod:`safa.metrics`' seam-fidelity evaluation.
The sampler adapter lives in :mod:`safa.adapters.texture`.
"""
from .decoder import TextureDecoder
from .model import DEFAULT_CLASSES, TextureClass, TextureModel, alpha_bar_at
from .pipeline import TexturePipeline, make_texture_pipeline, window_frames

__all__ = ["TextureModel", "TextureClass", "DEFAULT_CLASSES", "TextureDecoder", "TexturePipeline",
           "make_texture_pipeline", "window_frames", "alpha_bar_at"]
