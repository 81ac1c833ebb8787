"""Per-pixel conditions given for the whole canvas: the image read once, then cropped per view.

A ControlNet's control image, the x4 upscaler's low-resolution image and an img2img init image
are given for the whole output, not for one window. The rule (docs/conditions.md):

- the image is read as given, never resized: its size sets the output's (the same size for a
  control or init image, ``vae_scale_factor`` times it for the upscaler's low-resolution
  input). An image whose size is not what the call asks for is an error;
- every view gets ITS crop: the image's pixels under that view's window, where the view's
  latent window maps to ``pixels_per_column`` pixels per latent column (8 for a control
  image under SD's VAE, 1 for the upscaler's low-resolution image, which is at latent size).
  The crop is the kernels' own ``gather`` over the layout (loops wrap, 2-D grids are tiles,
  views in the layout's order), run on the image folded to latent resolution
  (``pixel_unshuffle``), so a crop is exactly what its view covers;
- an open layout covers a little more than the request (the output is cropped): the image is
  padded there by repeating its edge, and those pixels are generated and cropped away.

The crops are stored once per view (not per scheduler row); :class:`~safa.adapters.base.Conditions`
picks each row's crop by index.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from safa_kernels import GridLayout, ViewLayout, gather

__all__ = ["CanvasImage", "read_image", "crop_per_view", "pad_to"]

AnyLayout = Union[ViewLayout, GridLayout]


@dataclass(frozen=True)
class CanvasImage:
    """The call's ``image=``, read: ``pixels`` ``(B, 3, H, W)`` float32 in ``[0, 1]`` (B: 1, or one per output).

    ``role``: what the wrapped pipeline takes it for (``"init"``: img2img, ``"outpaint"``: an
    image narrower than the canvas, kept and generated around (:mod:`safa.known`), ``"control"``:
    a ControlNet's condition, ``"low_res"``: the upscaler's input); ``strength`` (img2img),
    ``image_start`` / ``crossfade`` / ``paste`` (outpainting: pixel column of its left edge,
    crossfade pixel columns, paste it back), ``conditioning_scale`` (ControlNet) and
    ``noise_level`` (upscaler) are the call's values for that role, checked.
    """

    pixels: torch.Tensor
    role: str
    strength: float = 1.0
    conditioning_scale: float = 1.0
    noise_level: int = 20
    image_start: int = 0
    crossfade: int = 0
    paste: bool = True

    @property
    def size(self) -> Tuple[int, int]:
        """``(width, height)`` in pixels of the image."""
        return int(self.pixels.shape[-1]), int(self.pixels.shape[-2])


def _from_pil(image: Any) -> np.ndarray:
    if image.mode != "RGB":
        raise ValueError(f"image must be an RGB image, got a PIL image in mode {image.mode!r} "
                         f"(convert it: image.convert('RGB'))")
    # As diffusers' VaeImageProcessor.pil_to_numpy: uint8 -> float32 / 255.
    return np.array(image).astype(np.float32) / 255.0


def read_image(image: Any) -> torch.Tensor:
    """``image`` (a PIL RGB image, a list of them, a ``(H, W, 3)`` / ``(B, H, W, 3)`` array or a
    ``(3, H, W)`` / ``(B, 3, H, W)`` tensor, values in ``[0, 1]`` as diffusers takes them) as a
    float32 ``(B, 3, H, W)`` tensor in ``[0, 1]``. Anything else is a ``ValueError`` naming it."""
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError("image is an empty list")
        return torch.cat([read_image(item) for item in image])
    if type(image).__module__.startswith("PIL."):
        image = _from_pil(image)
    if isinstance(image, np.ndarray):
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4 or image.shape[-1] != 3:
            raise ValueError(f"image must be an RGB array (H, W, 3) or (B, H, W, 3), got shape {image.shape}")
        if image.dtype == np.uint8:
            image = image.astype(np.float32) / 255.0
        image = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(0, 3, 1, 2)
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"image must be a PIL image, a numpy array or a torch tensor, got {type(image).__name__}")
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be an RGB image: a tensor (3, H, W) or (B, 3, H, W), got shape "
                         f"{tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"image tensor must be floating point with values in [0, 1], got {image.dtype}")
    if image.numel() and not bool(torch.isfinite(image).all()):
        raise ValueError("image has non-finite values")
    return image.float()


def pad_to(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``pixels`` ``(..., h, w)`` padded at the bottom / right to ``(height, width)`` by repeating
    its last row / column (the covering layout's extra columns, cropped at the output)."""
    h, w = pixels.shape[-2:]
    if (h, w) == (height, width):
        return pixels
    if h > height or w > width:
        raise ValueError(f"the image ({w} x {h} px) is larger than the canvas ({width} x {height} px)")
    flat = pixels.reshape(-1, *pixels.shape[-3:])
    return F.pad(flat, (0, width - w, 0, height - h), mode="replicate").reshape(*pixels.shape[:-2], height, width)


def crop_per_view(canvas: torch.Tensor, layout: AnyLayout, pixels_per_column: int) -> torch.Tensor:
    """Every view's crop of ``canvas`` ``(B, C, H, W)`` (pixels, already the layout's canvas size:
    ``pixels_per_column`` times its latent rows and columns): ``(num_views * B, C, h, w)``,
    view-major (row ``v * B + b``), each ``pixels_per_column`` times its view's latent window.

    A strip (:class:`ViewLayout`) crops the columns of the full height; a grid crops tiles. The
    kernels' ``gather`` does it on the canvas folded to one cell per latent position, so a loop
    wraps and the views come in the layout's own order.
    """
    s = int(pixels_per_column)
    folded = F.pixel_unshuffle(canvas, s) if s > 1 else canvas
    dims = (-2, -1) if isinstance(layout, GridLayout) else -1
    views = gather(folded.contiguous(), layout, dims)  # (num_views, B, C * s * s, h, w)
    views = views.reshape(-1, *views.shape[2:])
    return F.pixel_shuffle(views, s) if s > 1 else views


def canvas_cells(adapter: Any, layout: AnyLayout, height: Optional[int]) -> Tuple[int, int]:
    """``(rows, cols)`` latent cells of the layout's canvas: a grid's, or a strip's ``height`` rows."""
    if isinstance(layout, GridLayout):
        return layout.rows.length, layout.cols.length
    return adapter.latent_rows(height), layout.length


def add_view_crops(adapter: Any, conditions: Any, view_rows: torch.Tensor, image: CanvasImage, layout: AnyLayout,
                   height: Optional[int], batch_size: int, generator: Any) -> torch.Tensor:
    """Step 5 with a canvas image: its per-pixel conditions (``adapter.image_conditions``, for the
    whole canvas) cropped per view into ``conditions.windows``; returns the rows of every views'
    scheduler row ``v * batch_size + b`` as (prompt, crop) pairs (:meth:`Conditions.row`).

    The image has one row, shared by every output, or one per output (``batch_size``).
    """
    conditions.extra.update(controlnet_conditioning_scale=image.conditioning_scale, noise_level=image.noise_level)
    canvases = adapter.image_conditions(image, generator)
    if not canvases:
        return view_rows
    per_image = int(image.pixels.shape[0])
    if per_image not in (1, batch_size):
        raise ValueError(f"image has {per_image} images but this call makes {batch_size} output(s): give one image "
                         f"for all of them, or one per output")
    s = adapter.image_pixels_per_column
    rows, cols = canvas_cells(adapter, layout, height)
    conditions.windows.update({name: crop_per_view(pad_to(canvas, rows * s, cols * s), layout, s)
                               for name, canvas in canvases.items()})
    view = torch.arange(layout.num_views).repeat_interleave(batch_size)
    item = torch.arange(batch_size).repeat(layout.num_views)
    return conditions.row(view_rows, view * per_image + (item if per_image > 1 else 0))


def encode_canvas_image(adapter: Any, pixels: torch.Tensor, generator: Any,
                        sample_mode: str = "sample") -> torch.Tensor:
    """img2img's (and outpainting's, ``sample_mode="argmax"``: the posterior's mode) encode of the
    user's image: the one place the sampler encodes an image, so that a tiled encode can take its
    place (today the adapter's whole-image VAE encode)."""
    if sample_mode == "sample":  # img2img's call, as it always was
        return adapter.encode_image(pixels, generator)
    return adapter.encode_image(pixels, generator, sample_mode=sample_mode)


def noised_init_latents(adapter: Any, scheduler: Any, image: CanvasImage, shape: Tuple[int, ...],
                        timestep: torch.Tensor, generator: Any, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """img2img's ``J``: the encoded image (padded to the canvas ``shape``), noised to ``timestep`` by
    the scheduler's forward process, in the pipeline's order (encode, then draw the noise)."""
    from diffusers.utils.torch_utils import randn_tensor
    latent = encode_canvas_image(adapter, image.pixels, generator)
    batch = shape[0]
    if latent.shape[0] not in (1, batch):
        raise ValueError(f"image has {latent.shape[0]} images but this call makes {batch} output(s): give one image "
                         f"for all of them, or one per output")
    latent = pad_to(latent.repeat(batch // latent.shape[0], 1, 1, 1), shape[-2], shape[-1])
    if noise is None:
        noise = randn_tensor(tuple(shape), generator=generator, device=adapter.device, dtype=adapter.dtype)
    elif tuple(noise.shape) != tuple(shape):
        raise ValueError(f"latents must have shape {tuple(shape)}, got {tuple(noise.shape)}")
    t = timestep.reshape(1).repeat(batch)
    if hasattr(scheduler, "add_noise"):
        return scheduler.add_noise(latent, noise.to(latent), t)
    return scheduler.scale_noise(latent, t, noise.to(latent))  # flow matching
