"""The built-in analytic texture models: exact denoisers, a Griffin-Lim decoder, diffusers pipelines.

No weights, no downloads: every parameter is derived from a seed, so it is the offline
default for ``make demo`` and ``safa generate``, and because its denoiser is the exact
posterior mean, it is the ground truth for :mod:`safa.metrics`' seam-fidelity evaluation.
:class:`TextureModel` is the audio one (1-D windows along time); :class:`TextureModel2D` the image
one (square tiles, for 2-D seams: ``safa evaluate --task seams2d``); both share
:class:`~safa.texture.mixture.KroneckerMixture`'s exact denoiser. The sampler adapters live in
:mod:`safa.adapters.texture` and :mod:`safa.adapters.texture2d`.
"""
from .decoder import TextureDecoder
from .mixture import KroneckerMixture
from .model import DEFAULT_CLASSES, TextureClass, TextureModel, alpha_bar_at
from .model2d import IMAGE_CLASSES, ImageTextureClass, TextureModel2D
from .pipeline import TexturePipeline, make_texture_pipeline, window_frames
from .pipeline2d import TexturePipeline2D, make_texture2d_pipeline

__all__ = ["TextureModel", "TextureClass", "DEFAULT_CLASSES", "TextureDecoder", "TexturePipeline",
           "make_texture_pipeline", "window_frames", "alpha_bar_at", "KroneckerMixture", "TextureModel2D",
           "ImageTextureClass", "IMAGE_CLASSES", "TexturePipeline2D", "make_texture2d_pipeline"]
