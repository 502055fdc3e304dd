"""Reverse diffusion as a pure function: conditions and a scheduler in, latents out.

This is the one sampling loop of dinodiff: training-time sample grids, `DiNODiffusionPipeline` and
`dinodiff generate` all run it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

Generators = torch.Generator | list[torch.Generator] | None

# Short names accepted wherever a sampling scheduler is chosen (`--scheduler`); any diffusers class name works too.
SCHEDULERS = {
    "dpm": "DPMSolverMultistepScheduler",  # DPM-Solver++ (2M), the default
    "dpm-sde": "DPMSolverSDEScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "ddpm": "DDPMScheduler",
    "unipc": "UniPCMultistepScheduler",
    "pndm": "PNDMScheduler",
}


# diffusers' pixel-space defaults that are wrong for latents (and normalised embeddings), which have unit variance:
# DDIM/DDPM clip the predicted x0 to [-1, 1] (it greys the samples), PNDM runs Runge-Kutta warm-up steps that the
# Stable Diffusion pipelines skip. Set whatever a scheduler's config has of these.
LATENT_OVERRIDES = {"clip_sample": False, "thresholding": False, "skip_prk_steps": True}


def inference_scheduler(train_scheduler: SchedulerMixin, name: str = "dpm") -> SchedulerMixin:
    """A sampling scheduler (short or diffusers class name) with `train_scheduler`'s betas and prediction type,
    and the latent-space settings of LATENT_OVERRIDES (never x0 clipping)."""
    import diffusers

    class_name = SCHEDULERS.get(name, name)
    klass = getattr(diffusers, class_name, None)
    backends = getattr(klass, "_backends", None)  # diffusers' stand-in for a class whose extra library is missing
    if backends:
        raise ValueError(f"Scheduler {name!r} ({class_name}) needs {' and '.join(backends)}: pip install "
                         f"{' '.join(b for b in backends if b != 'torch')}, or choose another scheduler.")
    if not (isinstance(klass, type) and issubclass(klass, SchedulerMixin)):
        raise ValueError(f"Unknown scheduler {name!r}: use one of {', '.join(SCHEDULERS)} or a diffusers scheduler "
                         "class name (e.g. DPMSolverMultistepScheduler).")
    scheduler = klass.from_config(train_scheduler.config)
    overrides = {k: v for k, v in LATENT_OVERRIDES.items() if k in scheduler.config}
    return klass.from_config(scheduler.config, **overrides) if overrides else scheduler


def initial_latents(shape: tuple[int, ...], generator: Generators, device: torch.device) -> torch.Tensor:
    """Standard-normal latents drawn on the generator's device (CPU generators give the same noise on any device).

    With a list of generators, item i is drawn from generator i alone, so it does not depend on the batch.
    """
    return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)


@torch.no_grad()
def sample_latents(
    unet: UNet2DConditionModel,
    scheduler: SchedulerMixin,
    cond: torch.Tensor,
    *,
    latent_shape: tuple[int, int, int],
    num_inference_steps: int = 25,
    generator: Generators = None,
    guidance_scale: float = 1.0,
    null_cond: torch.Tensor | None = None,
    latents: torch.Tensor | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> torch.Tensor:
    """Denoise from pure noise with `cond` (B, S, D) as cross-attention context.

    `generator` is one generator or a list of B (one per item: batch-invariant results, also for the
    per-step noise of stochastic schedulers such as DDPM). `latents` replaces the initial noise.
    With guidance_scale != 1, `null_cond` (same shape as cond) is the unconditional context of
    classifier-free guidance.
    """
    device, dtype = cond.device, unet.dtype
    if isinstance(generator, list) and len(generator) != cond.shape[0]:
        raise ValueError(f"Got {len(generator)} generators for {cond.shape[0]} conditions; pass one per item.")
    if latents is None:
        latents = initial_latents((cond.shape[0], *latent_shape), generator, device)
    latents = latents.to(device, torch.float32) * scheduler.init_noise_sigma
    scheduler.set_timesteps(num_inference_steps, device=device)
    guided = guidance_scale != 1.0
    if guided and null_cond is None:
        raise ValueError("guidance_scale != 1 needs null_cond (the model must be trained with cond_dropout > 0).")
    context = torch.cat([null_cond, cond]) if guided else cond
    # Not every scheduler's step() takes a generator (deterministic ones such as PNDM do not).
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    timesteps = scheduler.timesteps if progress is None else progress(scheduler.timesteps)
    for t in timesteps:
        model_in = torch.cat([latents] * 2) if guided else latents
        model_in = scheduler.scale_model_input(model_in, t)
        pred = unet(model_in.to(dtype), t, encoder_hidden_states=context.to(dtype)).sample.float()
        if guided:
            uncond, conditioned = pred.chunk(2)
            pred = uncond + guidance_scale * (conditioned - uncond)
        latents = scheduler.step(pred, t, latents, **step_kwargs).prev_sample
    return latents


def item_seed(seed: int, index: int) -> int:
    """Seed of item `index`'s generator: a hash of (seed, index), so neighbouring items share no noise."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)
