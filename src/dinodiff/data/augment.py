"""The paper's training augmentation: random sharpening + affine (5% shear, 5% translation, scale 0.9-1.4).

"5% shear" is read as a shear *factor* of 0.05 (a point moves by 5% of its distance from the
centre line), i.e. an angle of atan(0.05) = 2.86 degrees; `RandomAffine` takes degrees, so the
factor is converted and applied on both axes, each drawn uniformly in [-2.86, 2.86].
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms import v2


def shear_degrees(factor: float) -> float:
    """Shear angle in degrees for a shear factor (tangent): 0.05 -> 2.862."""
    return math.degrees(math.atan(factor))


def paper_augmentation(
    sharpness: float = 2.0,
    sharpness_p: float = 0.5,
    shear: float = 0.05,
    translate: float = 0.05,
    scale: tuple[float, float] = (0.9, 1.4),
) -> v2.Transform:
    """torchvision v2 transform for uint8 (C, H, W) tensors; output keeps dtype and range.

    Sharpening by `sharpness` with probability `sharpness_p`, then an affine with no rotation,
    shear factor up to `shear` on x and y, translation up to `translate` of the size and zoom in
    `scale`. Uncovered pixels are filled with 0 (black), like the padded borders of radiographs.
    Randomness comes from torch's global RNG: seed it (the loader does, per sample) to reproduce.
    """
    s = shear_degrees(shear)
    return v2.Compose([
        v2.RandomAdjustSharpness(sharpness_factor=sharpness, p=sharpness_p),
        v2.RandomAffine(
            degrees=0.0, translate=(translate, translate), scale=scale, shear=(-s, s, -s, s),
            interpolation=v2.InterpolationMode.BILINEAR, fill=0,
        ),
    ])


def augment_seeded(transform: v2.Transform, image: torch.Tensor, seed: int) -> torch.Tensor:
    """Apply `transform` with torch's RNG seeded by `seed`, leaving the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        # The CPU generator only (the one the transforms draw from): the same state as torch.manual_seed, without
        # its lazy seeding of accelerator generators, which records a stack trace per call (~3 ms each).
        torch.default_generator.manual_seed(seed)
        return transform(image)
