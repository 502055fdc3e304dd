"""Feature spaces the audit measures distances in. Each maps uint8 grey images (N, H, W) to (N, D) float features.

- ``pixels``: 32x32 grey thumbnails, each standardised to zero mean and unit variance (robust to brightness and
  contrast), flattened: what "the same picture" means to a person. Plain L2 on thumbnails is not robust to a
  few pixels of shift or zoom, so a query is also compared in JITTERS geometric variants (shifts up to 5% of the
  side, zoom 0.95-1.05) and its distance is the smallest over them; the calibration references are computed the
  same way, so thresholds stay comparable.
- ``c_glb``: the model's own encoder (the DINO global tokens the generator is conditioned on), flattened; then
  standardised per dimension with the training set's statistics.
- ``xrv``: TorchXRayVision densenet121-res224-all features (1024-d) when its weights are on disk, and
  ``rad-dino``: microsoft/rad-dino global tokens when it is in the local Hugging Face cache; otherwise these are
  reported as unavailable, never silently replaced.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import gaussian_blur

from dinodiff.models.encoders import GlobalTokenEncoder, load_encoder
from dinodiff.runs import model_folders

logger = logging.getLogger(__name__)

XRV_WEIGHTS = "densenet121-res224-all"
XRV_FILE = "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
RAD_DINO = "microsoft/rad-dino"


@dataclass
class FeatureSpace:
    """A named map images -> features; `standardise`: per-dimension z-score with the training set's statistics."""

    name: str
    describe: str
    embed: Callable[[torch.Tensor], torch.Tensor]  # (B, 1, H, W) float in [0, 1] -> (B, D)
    standardise: bool = False
    stats: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    jitters: tuple[tuple[float, float, float], ...] = ((1.0, 0.0, 0.0),)  # (zoom, dx, dy); the first: identity

    def views(self, images: np.ndarray, batch_size: int = 64) -> list[np.ndarray]:
        """Features of every jitter of the images (the first is the images themselves): J arrays (N, D)."""
        out = [[] for _ in self.jitters]
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.asarray(images[start:start + batch_size])).float()[:, None] / 255.0
            for j, jitter in enumerate(self.jitters):
                moved = batch if tuple(jitter) == (1.0, 0.0, 0.0) else warp(batch, *jitter)
                out[j].append(self.standardised(self.embed(moved).reshape(len(batch), -1).double().cpu().numpy()))
        return [np.concatenate(parts) if parts else np.zeros((0, 0)) for parts in out]

    @torch.no_grad()
    def features(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        out = []
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.asarray(images[start:start + batch_size])).float()[:, None] / 255.0
            out.append(self.embed(batch).reshape(len(batch), -1).double().cpu().numpy())
        feats = np.concatenate(out) if out else np.zeros((0, 0))
        return self.standardised(feats)

    def fit(self, train_features: np.ndarray) -> None:
        """Remember the training features' per-dimension mean and std (used by later `features` calls)."""
        if self.standardise:
            self.stats = (train_features.mean(0), np.maximum(train_features.std(0), 1e-8))

    def standardised(self, feats: np.ndarray) -> np.ndarray:
        if not self.standardise or self.stats is None:
            return feats
        return (feats - self.stats[0]) / self.stats[1]


def warp(images: torch.Tensor, zoom: float, dx: float, dy: float) -> torch.Tensor:
    """Zoom about the centre and shift by (dx, dy) fractions of the side; borders repeat the edge pixels."""
    theta = torch.tensor([[1 / zoom, 0.0, -2 * dx], [0.0, 1 / zoom, -2 * dy]], dtype=images.dtype)
    grid = F.affine_grid(theta.expand(len(images), 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


BLUR = 1.0
MARGIN = 0.08  # > the largest shift, so what a shift brings in from outside is never compared
SHIFTS = (-0.05, -0.025, 0.0, 0.025, 0.05)
IDENTITY = (1.0, 0.0, 0.0)
JITTERS = (IDENTITY, *((1.0, dx, dy) for dx in SHIFTS for dy in SHIFTS if (dx, dy) != (0.0, 0.0)),
           (0.95, 0.0, 0.0), (1.05, 0.0, 0.0))  # the images themselves first


def thumbnails(images: torch.Tensor, size: int = 32, margin: float = MARGIN, blur: float = BLUR) -> torch.Tensor:
    """(B, 1, H, W) -> (B, size*size): the central (1 - 2 margin) of each image, shrunk, blurred (sigma in
    thumbnail pixels) and standardised per image.

    The margin keeps borders (filled in by shifts, burnt-in frames) out of the comparison; the blur makes the
    distance vary smoothly with a residual sub-pixel misalignment.
    """
    h, w = images.shape[-2:]
    top, left = round(h * margin), round(w * margin)
    centre = images[..., top:h - top, left:w - left]
    small = F.interpolate(centre, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    if blur > 0:
        small = gaussian_blur(small, kernel_size=2 * math.ceil(3 * blur) + 1, sigma=blur)
    flat = small.reshape(len(small), -1).double()
    return (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True).clamp_min(1e-6)


def pixel_space(size: int = 32) -> FeatureSpace:
    return FeatureSpace("pixels", f"{size}x{size} grey thumbnails, per-image standardised, L2, smallest over "
                        f"{len(JITTERS)} shifts/zooms of the query", lambda x: thumbnails(x, size), jitters=JITTERS)


def encoder_space(encoder: GlobalTokenEncoder, name: str = "c_glb", describe: str = "") -> FeatureSpace:
    encoder = encoder.eval()
    return FeatureSpace(name, describe or f"global tokens of {encoder.name_or_path} ({encoder.num_tokens}x"
                        f"{encoder.hidden_size}), standardised per dimension on the training set, L2",
                        lambda x: encoder(x).flatten(1), standardise=True)


def find_encoder(encoder: str | Path | None, model: str | Path | None) -> tuple[GlobalTokenEncoder | None, str]:
    """The encoder to audit with: a given encoder folder, else the model folder's image_encoder/."""
    candidates = [Path(encoder)] if encoder else []
    if model:
        candidates += [folder / "image_encoder" for folder in model_folders(model)]
    for folder in candidates:
        if (folder / "global_tokens.json").is_file():
            return GlobalTokenEncoder.from_pretrained(folder), str(folder)
    if encoder:
        raise FileNotFoundError(f"--encoder {encoder}: no global_tokens.json there; pass a pipeline model folder's "
                                "image_encoder/ (or the model folder with --model).")
    return None, "unavailable: no model folder with image_encoder/ (pass --model or --encoder)"


def xrv_space(weights_dir: str | Path | None = None) -> tuple[FeatureSpace | None, str]:
    """TorchXRayVision features when the package and its weights file are present, else (None, why)."""
    folder = Path(weights_dir) if weights_dir else Path.home() / ".torchxrayvision" / "models_data"
    if not (folder / XRV_FILE).is_file():
        return None, f"unavailable: no {XRV_FILE} in {folder}"
    try:
        import torchxrayvision as xrv
    except ImportError:
        return None, "unavailable: torchxrayvision is not installed"
    model = xrv.models.DenseNet(weights=XRV_WEIGHTS, cache_dir=str(folder)).eval()

    def embed(x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
        return model.features2(x * 2048.0 - 1024.0)  # XRV input range [-1024, 1024]

    return FeatureSpace("xrv", f"TorchXRayVision {XRV_WEIGHTS} features2 (1024-d), L2", embed), str(folder)


def rad_dino_space() -> tuple[FeatureSpace | None, str]:
    """RAD-DINO global tokens when the model is in the local Hugging Face cache, else (None, why)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(RAD_DINO, "config.json")
    if not isinstance(found, str):
        return None, f"unavailable: {RAD_DINO} is not in the local Hugging Face cache"
    encoder = load_encoder(str(Path(found).parent), "transformers")
    return encoder_space(encoder, "rad-dino", f"{RAD_DINO} global tokens, standardised per dimension, L2"), found
