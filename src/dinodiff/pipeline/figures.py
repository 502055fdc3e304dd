"""Figures a person looks at: reconstruction grids and interpolation strips (the paper's Figure 2)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from dinodiff.interpolate import mix
from dinodiff.pipeline.diffusion import DiNODiffusionPipeline
from dinodiff.pipeline.sample import generate_reconstructions, sample_batches
from dinodiff.sampling import item_seed

STRIP_R = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def save_rows(path: str | Path, rows: Sequence[torch.Tensor]) -> Path:
    """One row per tensor (k, 1, H, W) in [0, 1]; shorter rows are padded with white."""
    from torchvision.utils import save_image

    width = max(len(r) for r in rows)
    blank = torch.ones_like(rows[0][:1])
    padded = [torch.cat([r.float().cpu(), *[blank.cpu()] * (width - len(r))]) for r in rows]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.cat(padded), path, nrow=width, padding=2, pad_value=1.0)
    return path


def save_reconstruction_grid(path: str | Path, pipeline: DiNODiffusionPipeline, images: torch.Tensor, *,
                             variations: int = 3, steps: int = 25, seed: int = 0, guidance_scale: float = 1.0,
                             batch_size: int = 16) -> Path:
    """Rows: a source image (N, 1, H, W) in [0, 1], then `variations` samples conditioned on its c_GLB."""
    images = pipeline.to_tensor(images).cpu()
    samples = generate_reconstructions(pipeline, images, variations, seed, batch_size, num_inference_steps=steps,
                                       guidance_scale=guidance_scale)
    images = images.mean(dim=1, keepdim=True)
    return save_rows(path, [torch.cat([images[i:i + 1], samples[i * variations:(i + 1) * variations]])
                            for i in range(len(images))])


def interpolation_strip(pipeline: DiNODiffusionPipeline, c_a: torch.Tensor, c_b: torch.Tensor, *,
                        rs: Sequence[float] = STRIP_R, seed: int = 0, steps: int = 25, method: str = "lerp",
                        guidance_scale: float = 1.0) -> torch.Tensor:
    """Images (len(rs), 1, H, W) for c = mix(c_a, c_b, r), all from the same noise, so only the condition changes."""
    cond = mix(c_a[None].expand(len(rs), *c_a.shape), c_b[None].expand(len(rs), *c_b.shape),
               torch.tensor(rs, dtype=c_a.dtype), method)
    return next(sample_batches(pipeline, cond, [seed] * len(rs), batch_size=len(rs), num_inference_steps=steps,
                               guidance_scale=guidance_scale))


def save_interpolation_strips(path: str | Path, pipeline: DiNODiffusionPipeline,
                              pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], *, rs: Sequence[float] = STRIP_R,
                              seed: int = 0, steps: int = 25, method: str = "lerp",
                              guidance_scale: float = 1.0) -> Path:
    """One row per pair of source images (1, H, W): source A, the strip from r = 0 to 1, source B."""
    rows = []
    for i, (a, b) in enumerate(pairs):
        sources = pipeline.to_tensor(torch.stack([a, b])).cpu()
        c_glb = pipeline.encode_images(sources).cpu()
        strip = interpolation_strip(pipeline, c_glb[0], c_glb[1], rs=rs, seed=item_seed(seed, i), steps=steps,
                                    method=method, guidance_scale=guidance_scale)
        grey = sources.mean(dim=1, keepdim=True)
        rows.append(torch.cat([grey[:1], strip, grey[1:]]))
    return save_rows(path, rows)
