"""Reverse diffusion as a pure function: conditions and a scheduler in, latents out."""

from __future__ import annotations

from typing import Optional

import torch
from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin


def inference_scheduler(train_scheduler: SchedulerMixin, name: str = "dpm") -> SchedulerMixin:
    """A sampling scheduler sharing the training scheduler's betas and prediction type."""
    if name != "dpm":
        import diffusers

        return getattr(diffusers, name).from_config(train_scheduler.config)
    return DPMSolverMultistepScheduler.from_config(train_scheduler.config)


@torch.no_grad()
def sample_latents(
    unet: UNet2DConditionModel,
    scheduler: SchedulerMixin,
    cond: torch.Tensor,
    *,
    latent_shape: tuple[int, int, int],
    num_inference_steps: int = 25,
    generator: Optional[torch.Generator] = None,
    guidance_scale: float = 1.0,
    null_cond: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Denoise from pure noise with `cond` (B, S, D) as cross-attention context.

    With guidance_scale > 1, `null_cond` (same shape as cond) is the unconditional context of
    classifier-free guidance.
    """
    device, dtype = cond.device, unet.dtype
    latents = torch.randn((cond.shape[0], *latent_shape), generator=generator, device=device, dtype=torch.float32)
    latents = latents * scheduler.init_noise_sigma
    scheduler.set_timesteps(num_inference_steps, device=device)
    guided = guidance_scale != 1.0
    if guided and null_cond is None:
        raise ValueError("guidance_scale != 1 needs null_cond (the model must be trained with cond_dropout > 0).")
    context = torch.cat([null_cond, cond]) if guided else cond
    for t in scheduler.timesteps:
        model_in = torch.cat([latents] * 2) if guided else latents
        model_in = scheduler.scale_model_input(model_in, t)
        pred = unet(model_in.to(dtype), t, encoder_hidden_states=context.to(dtype)).sample.float()
        if guided:
            uncond, conditioned = pred.chunk(2)
            pred = uncond + guidance_scale * (conditioned - uncond)
        latents = scheduler.step(pred, t, latents, generator=generator).prev_sample
    return latents
