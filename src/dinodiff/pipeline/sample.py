"""Sampling at the pipeline level, shared by generate, the checkpoint sweep, the training grids and the demo.

A pipeline with a chosen sampler, the sources' c_GLB, and images drawn one generator per item.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from dinodiff.models.factory import enable_tf32
from dinodiff.pipeline.diffusion import DiNODiffusionPipeline
from dinodiff.sampling import inference_scheduler, item_seed

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CUDA_BATCH, CPU_BATCH = 32, 8  # default images per batch: a 512 px sd15 batch of 32 fills ~20 GB in bf16


def resolve_precision(precision: str, device: torch.device | str) -> torch.dtype:
    """auto: bf16 on CUDA (fp16's range overflows SD's VAE decoder at 512 px), fp32 elsewhere (bf16 is slow on CPUs)."""
    if precision == "auto":
        cuda = torch.device(device).type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: use auto or one of {', '.join(PRECISIONS)}.")
    return PRECISIONS[precision]


def default_batch_size(device: torch.device | str) -> int:
    return CUDA_BATCH if torch.device(device).type == "cuda" else CPU_BATCH


def load_pipeline(model: str | Path, scheduler: str, device: torch.device | str,
                  precision: str = "auto") -> DiNODiffusionPipeline:
    """The pipeline of a model folder / hub id with the named sampling scheduler (see sampling.SCHEDULERS).

    The UNet, projection and VAE run in `precision` (see resolve_precision); the image encoder stays fp32, so the
    sources' c_GLB are the numbers training saw. The scheduler's arithmetic is fp32 whatever the precision.
    """
    pipeline = DiNODiffusionPipeline.from_pretrained(str(model))
    pipeline.scheduler = inference_scheduler(pipeline.scheduler, scheduler)
    pipeline = pipeline.to(device)
    dtype = resolve_precision(precision, device)
    if dtype != torch.float32:
        for module in (pipeline.unet, pipeline.projection, pipeline.vae):
            module.to(dtype)
    if torch.device(device).type == "cuda":
        enable_tf32()  # the fp32 encoder (and an fp32 pipeline)
    return pipeline


def sample_batches(pipeline: DiNODiffusionPipeline, c_glb: torch.Tensor, seeds: Sequence[int], *, batch_size: int,
                   num_inference_steps: int = 25, guidance_scale: float = 1.0) -> Iterator[torch.Tensor]:
    """Images (b, 1, H, W) in [0, 1] for consecutive slices of `batch_size` conditions, one generator per item."""
    for start in range(0, len(seeds), batch_size):
        gens = [torch.Generator().manual_seed(s) for s in seeds[start:start + batch_size]]
        yield pipeline(c_glb=c_glb[start:start + batch_size], generator=gens, num_inference_steps=num_inference_steps,
                       guidance_scale=guidance_scale, output_type="pt").images


@torch.no_grad()
def encode_sources(pipeline: DiNODiffusionPipeline, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """c_GLB (N, S, N_tok) of source images (N, 1, H, W) in [0, 1], on the CPU."""
    return torch.cat([pipeline.encode_images(images[i:i + batch_size]).cpu()
                      for i in range(0, len(images), batch_size)])


def generate_reconstructions(pipeline: DiNODiffusionPipeline, images: torch.Tensor, per_source: int, seed: int,
                             batch_size: int, *, num_inference_steps: int = 25,
                             guidance_scale: float = 1.0) -> torch.Tensor:
    """`per_source` variations of each image, source-major: (N * per_source, 1, H, W) in [0, 1], on the CPU.

    Variation j of source s is item s * per_source + j of `dinodiff generate --strategy reconstruction` with
    the same seed, so the two give the same images.
    """
    c_glb = encode_sources(pipeline, images, batch_size).repeat_interleave(per_source, dim=0)
    seeds = [item_seed(seed, i) for i in range(len(c_glb))]
    return torch.cat(list(sample_batches(pipeline, c_glb, seeds, batch_size=batch_size,
                                         num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)))
