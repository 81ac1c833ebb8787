"""Adapters for ControlNet panoramas: ``StableDiffusionControlNetPipeline`` and its SDXL twin.

The control image (diffusers' ``image=``) is given for the whole canvas and every view gets ITS
crop of it (:mod:`safa.adapters.canvas`, docs/conditions.md), never the whole image squeezed
into each window, which is what tiled-diffusion front ends do and what their users report as
"the ControlNet image applies to each tile". Per model call, as the pipelines do: the ControlNet
runs on the same (CFG-batched) input as the UNet, with the crop duplicated for both guidance
branches, and its residuals scaled by ``controlnet_conditioning_scale`` are added to the UNet's.

One ``ControlNetModel`` (a ``MultiControlNetModel`` is refused), ``guess_mode`` off and the
control applied at every step (``control_guidance_start=0``, ``control_guidance_end=1``, the
pipelines' defaults).
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch

from .base import register_adapter
from .stable_diffusion import StableDiffusionAdapter, StableDiffusionXLAdapter

__all__ = ["StableDiffusionControlNetAdapter", "StableDiffusionXLControlNetAdapter"]


class _ControlNet:
    """What both ControlNet families share: the control image's conditions and the ControlNet call."""

    image_role = "control"
    pipe: Any

    def _check_controlnet(self) -> torch.nn.Module:
        controlnet = self.pipe.controlnet
        if type(controlnet).__name__ != "ControlNetModel":
            raise ValueError(f"one ControlNetModel is supported, got {type(controlnet).__name__} "
                             f"(a MultiControlNetModel: run one ControlNet per call)")
        if getattr(controlnet.config, "global_pool_conditions", False):
            raise ValueError("this ControlNet has global_pool_conditions (the pipelines' guess mode), "
                             "which is not supported here")
        return controlnet

    def image_conditions(self, image: Any, generator: Any) -> Dict[str, torch.Tensor]:
        # As the pipelines' prepare_image: [0, 1] pixels in the ControlNet's dtype (no normalisation).
        controlnet = self._check_controlnet()
        return {"controlnet_cond": image.pixels.to(device=self.device, dtype=controlnet.dtype)}  # type: ignore

    def _residuals(self, x: torch.Tensor, t: torch.Tensor, c: Dict[str, torch.Tensor], extra: Dict[str, Any],
                   **kwargs: Any) -> Tuple[Any, Any]:
        return self.pipe.controlnet(x, t, encoder_hidden_states=c["encoder_hidden_states"],
                                    controlnet_cond=c["controlnet_cond"],
                                    conditioning_scale=extra.get("controlnet_conditioning_scale", 1.0),
                                    guess_mode=False, return_dict=False, **kwargs)


@register_adapter
class StableDiffusionControlNetAdapter(_ControlNet, StableDiffusionAdapter):
    """SD 1.x / 2.x with a ControlNet (``StableDiffusionControlNetPipeline``)."""

    pipeline_classes = ("StableDiffusionControlNetPipeline",)

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, c: Dict[str, torch.Tensor],
                 extra: Dict[str, Any]) -> torch.Tensor:
        down, mid = self._residuals(x, t, c, extra)
        return self.denoiser(x, t, encoder_hidden_states=c["encoder_hidden_states"],
                             down_block_additional_residuals=down, mid_block_additional_residual=mid,
                             return_dict=False)[0]


@register_adapter
class StableDiffusionXLControlNetAdapter(_ControlNet, StableDiffusionXLAdapter):
    """SDXL with a ControlNet (``StableDiffusionXLControlNetPipeline``): the ControlNet takes the
    same added conditions (pooled text, per-window time ids) as the UNet."""

    pipeline_classes = ("StableDiffusionXLControlNetPipeline",)

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, c: Dict[str, torch.Tensor],
                 extra: Dict[str, Any]) -> torch.Tensor:
        added = self._added_cond(x, c)
        down, mid = self._residuals(x, t, c, extra, added_cond_kwargs=added)
        return self.denoiser(x, t, encoder_hidden_states=c["encoder_hidden_states"], added_cond_kwargs=added,
                             down_block_additional_residuals=down, mid_block_additional_residual=mid,
                             return_dict=False)[0]
