"""The trainable part of DiNO-Diffusion: condition projection + UNet, as one module for DDP."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from dinodiff.models.projection import ConditionProjection


class ConditionedUNet(torch.nn.Module):
    """eps/v prediction from noisy latents, timesteps and the encoder's global tokens c_GLB."""

    def __init__(self, unet: UNet2DConditionModel, projection: ConditionProjection):
        super().__init__()
        self.unet = unet
        self.projection = projection

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, c_glb: torch.Tensor) -> torch.Tensor:
        context = self.projection(c_glb.to(self.unet.dtype))
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=context).sample
