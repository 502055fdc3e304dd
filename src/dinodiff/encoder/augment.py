"""DINO multi-crop for grey radiographs, batched: 2 global crops + N local crops per image.

Follows the multi-crop of Caron et al. 2021 (DINO, section 3.1 and appendix; `DataAugmentationDINO` in
facebookresearch/dino), with the colour parts replaced by what varies between chest X-rays:

- kept: random resized crops (global 0.4-1 of the image at the encoder's size, local 0.1-0.4 at a small
  size, aspect ratio 3/4-4/3), Gaussian blur (p = 1.0 / 0.1 / 0.5 for global 1 / global 2 / locals);
- added for radiographs: a small rotation and translation (patient positioning), brightness and contrast
  (exposure, detector), gamma (tone curves differ between sites and vendors' processing), sharpening
  (the edge enhancement some vendors apply);
- left out: colour jitter, greyscale and solarisation (the images are grey and never inverted after
  `prepare`), and horizontal flips by default (`hflip_p=0`): left/right carries anatomy in a CXR (the heart
  is on the patient's left; dextrocardia and situs inversus are findings), so the encoder must not be
  taught to ignore it.

Implementation: each crop of a whole batch is one `affine_grid` + `grid_sample` (crop, zoom, rotation,
translation and optional flip in a single bilinear resampling), then per-image intensity changes. The
per-image torchvision v2 pipeline cost ~29 ms per crop on the shared 2-core machine, more than the ViT;
this costs well under 1 ms. Every random number comes from a `torch.Generator` the caller seeds, so a
batch is a pure function of (seed, step): that is what makes a resumed run bit-identical.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from dinodiff.encoder.settings import AugmentSettings

logger = logging.getLogger(__name__)

# What pretraining varies; the probe's held-out views (encoder/views.py) use none of it.
PRETRAINING_FAMILY = ("random resized crop", "rotation", "translation", "horizontal flip", "brightness", "contrast",
                      "gamma", "gaussian blur", "sharpening")


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (hi - lo) + lo


def _crop_grid(n: int, size: int, a: AugmentSettings, scale: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    """Sampling grids (n, size, size, 2) of random resized, rotated and shifted crops, in [-1, 1] coordinates."""
    area = _uniform(n, scale[0], scale[1], gen)
    log_ratio = _uniform(n, math.log(3 / 4), math.log(4 / 3), gen)
    w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)  # half-widths as fractions of the image
    h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    cx = _uniform(n, -1, 1, gen) * (1 - w) + _uniform(n, -a.translate, a.translate, gen) * 2
    cy = _uniform(n, -1, 1, gen) * (1 - h) + _uniform(n, -a.translate, a.translate, gen) * 2
    angle = _uniform(n, -a.rotation, a.rotation, gen) * math.pi / 180
    flip = torch.where(torch.rand(n, generator=gen) < a.hflip_p, -1.0, 1.0)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([w * cos * flip, -h * sin, cx], 1),
                         torch.stack([w * sin * flip, h * cos, cy], 1)], 1)
    return F.affine_grid(theta, [n, 1, size, size], align_corners=False)


def _blur(x: torch.Tensor, apply: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Gaussian blur (sigma 0.1-1.5 px, per image) of the images where `apply` is true."""
    n = int(apply.sum())
    if n == 0:
        return x
    sigma = _uniform(n, 0.1, 1.5, gen)
    radius = 2 if x.shape[-1] >= 48 else 1
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # (n, 2r+1)
    sub = x[apply].transpose(0, 1)  # (1, n, H, W): one group per image
    sub = F.conv2d(F.pad(sub, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=n)
    sub = F.conv2d(F.pad(sub, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=n)
    out = x.clone()
    out[apply] = sub.transpose(0, 1)
    return out


def _intensity(x: torch.Tensor, a: AugmentSettings, blur_p: float, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = _uniform(n, 1 - a.contrast, 1 + a.contrast, gen).view(n, 1, 1, 1)
    brightness = _uniform(n, 1 - a.brightness, 1 + a.brightness, gen).view(n, 1, 1, 1)
    x = ((x - mean) * contrast + mean).clamp(0, 1) * brightness
    gamma = _uniform(n, math.log(a.gamma[0]), math.log(a.gamma[1]), gen).exp().view(n, 1, 1, 1)
    x = x.clamp(0, 1).pow(gamma)
    x = _blur(x, torch.rand(n, generator=gen) < blur_p, gen)
    sharpen = torch.rand(n, generator=gen) < a.sharpen_p
    if bool(sharpen.any()):
        x = x.clone()
        x[sharpen] = TF.adjust_sharpness(x[sharpen], 2.0)
    return x.clamp(0, 1)


def random_crops(images: torch.Tensor, size: int, a: AugmentSettings, scale: tuple[float, float], blur_p: float,
                 gen: torch.Generator) -> torch.Tensor:
    """One augmented crop of every image: uint8 or [0, 1] float (B, 1, H, W) -> float (B, 1, size, size)."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    grid = _crop_grid(x.shape[0], size, a, tuple(scale), gen)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _intensity(x, a, blur_p, gen)


class MultiCrop:
    """uint8 images (B, 1, H, W) + generator -> [global_1, global_2, local_1..local_N], float in [0, 1]."""

    def __init__(self, a: AugmentSettings, global_size: int) -> None:
        self.a, self.global_size = a, global_size

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        a = self.a
        crops = [random_crops(images, self.global_size, a, a.global_scale, a.blur_p[0], gen),
                 random_crops(images, self.global_size, a, a.global_scale, a.blur_p[1], gen)]
        crops += [random_crops(images, a.local_size, a, a.local_scale, a.blur_p[2], gen) for _ in range(a.local_crops)]
        return crops


def global_views(images: torch.Tensor, a: AugmentSettings, size: int, seed: int) -> torch.Tensor:
    """The second global crop's augmentation of every image, seeded: the probe's *pretext* views (the encoder was
    trained to match exactly these; its reported invariance uses encoder/views.py instead)."""
    return random_crops(images, size, a, a.global_scale, a.blur_p[1], torch.Generator().manual_seed(seed))
