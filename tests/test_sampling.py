"""The sampling loop and its schedulers: latent-space settings, determinism, guidance."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from dinodiff.sampling import SCHEDULERS, inference_scheduler, sample_latents


class ZeroNoise(torch.nn.Module):
    """A 'UNet' that predicts zero noise: the sampler's x0 estimate is then x_t / sqrt(alpha_bar_t), large at
    high noise, so any x0 clipping shows in the result."""

    dtype = torch.float32

    def forward(self, x, t, encoder_hidden_states):  # noqa: ARG002 - the UNet signature
        return type("Out", (), {"sample": torch.zeros_like(x)})()


def train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)  # clip_sample=True


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_ddim_and_ddpm_never_clip_latents_to_the_unit_interval(name):
    scheduler = inference_scheduler(train_scheduler(), name)
    assert scheduler.config.clip_sample is False and scheduler.config.thresholding is False
    generator = torch.Generator().manual_seed(0)
    latents = sample_latents(ZeroNoise(), scheduler, torch.zeros(2, 1, 4), latent_shape=(4, 8, 8),
                             num_inference_steps=10, generator=generator)
    # unit-variance latents divided by sqrt(alpha_bar) near t = T: far outside [-1, 1] unless clipped
    assert latents.abs().max() > 3.0


def test_pndm_skips_the_runge_kutta_warm_up_like_the_sd_pipelines():
    scheduler = inference_scheduler(train_scheduler(), "pndm")
    assert scheduler.config.skip_prk_steps is True
    scheduler.set_timesteps(10)
    assert len(scheduler.prk_timesteps) == 0 and len(scheduler.plms_timesteps) > 0


@pytest.mark.parametrize("name", sorted(set(SCHEDULERS) - {"dpm-sde"}))
def test_every_scheduler_keeps_the_training_betas_and_prediction_type(name):
    base = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type="v_prediction")
    scheduler = inference_scheduler(base, name)
    assert scheduler.config.beta_start == 0.00085 and scheduler.config.beta_end == 0.012
    assert scheduler.config.prediction_type == "v_prediction"


def test_an_unknown_scheduler_is_named_in_the_error():
    with pytest.raises(ValueError, match="Unknown scheduler 'nope'"):
        inference_scheduler(train_scheduler(), "nope")


def test_a_scheduler_whose_extra_library_is_missing_names_it():
    with pytest.raises(ValueError, match=r"'dpm-sde' \(DPMSolverSDEScheduler\) needs .*torchsde"):
        inference_scheduler(train_scheduler(), "dpm-sde")  # torchsde is not a dependency


def test_embedding_samples_are_not_clipped_either():
    from dinodiff.embeddings.model_io import EmbeddingModel, ddim_sample
    from dinodiff.models.embedding_denoiser import EmbeddingDenoiser

    denoiser = EmbeddingDenoiser(dim=8, width=16, depth=1, time_dim=16)
    for p in denoiser.parameters():
        torch.nn.init.zeros_(p)  # predicts zero noise, as ZeroNoise above
    x = ddim_sample(EmbeddingModel(denoiser, train_scheduler(), {}), 16, steps=10,
                    generator=torch.Generator().manual_seed(0))
    assert x.abs().max() > 3.0  # unit-variance embeddings: clipping to [-1, 1] would cut them
