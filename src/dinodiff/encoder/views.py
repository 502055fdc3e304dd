"""Held-out views for the probe's invariance measure: augmentations the encoder never saw in pretraining.

An encoder pretrained with DINO was taught to map two pretraining augmentations of an image together; finding
the pair of two such views measures its own objective (a *pretext* measure, kept in the probe only under that
name). The reported invariance measure uses another family, none of whose transforms `encoder/augment.py`
applies in pretraining (crops, rotation, translation, flips, brightness, contrast, gamma, blur, sharpening):

- **shear** (up to 8% in x and y) and **zoom out** (the whole image shrunk to 85-100% inside a black border: a
  wider field of view, never a crop), in one bilinear resampling;
- **resolution loss**: down to 50-100% of the side (antialiased) and back up, as a lower-resolution detector;
- **detector noise**: additive Gaussian, sigma 0-0.03 of the grey range;
- **JPEG** compression at quality 30-70 (Pillow's libjpeg), as images exported by a PACS or a web site.

Every random number comes from a generator seeded by the caller, so every encoder sees the same views.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dinodiff.encoder.settings import HeldOutViewSettings

logger = logging.getLogger(__name__)

def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (hi - lo) + lo


def _shear_zoom(x: torch.Tensor, s: HeldOutViewSettings, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    inv = 1 / _uniform(n, *s.zoom_out, gen)  # sampling span > 1: the image shrinks inside a zero border
    shx, shy = _uniform(n, -s.shear, s.shear, gen), _uniform(n, -s.shear, s.shear, gen)
    zero = torch.zeros(n)
    theta = torch.stack([torch.stack([inv, shx * inv, zero], 1), torch.stack([shy * inv, inv, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _resolution_loss(x: torch.Tensor, s: HeldOutViewSettings, gen: torch.Generator) -> torch.Tensor:
    side = x.shape[-1]
    keep = _uniform(x.shape[0], *s.downsample, gen)
    out = []
    for image, factor in zip(x, keep.tolist()):
        small = max(4, round(side * factor))
        low = F.interpolate(image[None], size=(small, small), mode="bilinear", antialias=True, align_corners=False)
        out.append(F.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)[0])
    return torch.stack(out)


def _jpeg(x: torch.Tensor, s: HeldOutViewSettings, gen: torch.Generator) -> torch.Tensor:
    quality = torch.randint(s.jpeg_quality[0], s.jpeg_quality[1] + 1, (x.shape[0],), generator=gen)
    grey = (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    out = []
    for image, q in zip(grey, quality.tolist()):
        buffer = io.BytesIO()
        Image.fromarray(image[0]).save(buffer, format="JPEG", quality=int(q))
        out.append(np.asarray(Image.open(buffer), dtype=np.uint8))
    return torch.from_numpy(np.stack(out))[:, None].float() / 255


def heldout_views(images: torch.Tensor, settings: HeldOutViewSettings, seed: int) -> torch.Tensor:
    """One held-out-family view of every image: uint8 or [0, 1] float (B, 1, H, W) -> float (B, 1, H, W)."""
    gen = torch.Generator().manual_seed(seed)
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    x = _shear_zoom(x, settings, gen)
    x = _resolution_loss(x, settings, gen)
    sigma = _uniform(x.shape[0], *settings.noise_std, gen).view(-1, 1, 1, 1)
    x = (x + sigma * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    return _jpeg(x, settings, gen)
