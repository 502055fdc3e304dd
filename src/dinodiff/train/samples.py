"""The training run's sample grids: held-out images and samples conditioned on their c_GLB, drawn by the
same DiNODiffusionPipeline that `dinodiff generate` uses."""

from __future__ import annotations

from pathlib import Path

import torch

from dinodiff.models.factory import Components
from dinodiff.pipeline import DiNODiffusionPipeline
from dinodiff.pipeline.figures import save_reconstruction_grid as save_grid
from dinodiff.sampling import inference_scheduler


@torch.no_grad()
def save_reconstruction_grid(path: Path, images: torch.Tensor, model, parts: Components, *, steps: int = 25,
                             seed: int = 0, variations: int = 3) -> Path:
    """Rows: a held-out image, then `variations` samples conditioned on its c_GLB (the paper's reconstruction).

    `model` is the trained ConditionedUNet (its UNet and projection, EMA weights when swapped in); the samples
    come from DiNODiffusionPipeline, as `dinodiff generate` makes them.
    """
    pipeline = DiNODiffusionPipeline(unet=model.unet, vae=parts.autoencoder, image_encoder=parts.encoder,
                                     projection=model.projection, scheduler=inference_scheduler(parts.noise_scheduler))
    pipeline.set_progress_bar_config(disable=True)
    return save_grid(path, pipeline, images, variations=variations, steps=steps, seed=seed)
