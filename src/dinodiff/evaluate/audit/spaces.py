"""Feature spaces the audit measures distances in. Each maps uint8 grey images (B, H, W) to float32 features.

- ``pixels``: the near-copy search of copies.py: equalised, blurred thumbnails compared in several views of the
  query for candidates, then each candidate registered (rotation, zoom, shift) and the distance taken once aligned;
  invariant to monotone intensity maps (gamma, contrast).
- ``c_glb``: the model's own encoder (the DINO global tokens the generator is conditioned on), flattened; then
  standardised per dimension with the training set's statistics (of the calibration subsample of it).
- ``xrv``: TorchXRayVision densenet121-res224-all features (1024-d) when its weights are on disk, and
  ``rad-dino``: microsoft/rad-dino global tokens when it is in the local Hugging Face cache; otherwise these are
  reported as unavailable, never silently replaced.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dinodiff.evaluate.audit import copies
from dinodiff.models.encoders import GlobalTokenEncoder, load_encoder
from dinodiff.runs import resolve_model

logger = logging.getLogger(__name__)

XRV_WEIGHTS = "densenet121-res224-all"
XRV_FILE = "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
RAD_DINO = "microsoft/rad-dino"


@dataclass
class FeatureSpace:
    """A named map images -> features (`embed`), or, with no `embed`, the registered copy search (copies.py).

    standardise: per-dimension z-score with statistics `fit` on training images. candidates: training rows kept
    per query by the search (the copy search registers them; other spaces use the nearest).
    """

    name: str
    describe: str
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None  # (B, 1, H, W) float in [0, 1] -> (B, D)
    standardise: bool = False
    candidates: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    stats: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    batch_size: int = 64

    @property
    def registers(self) -> bool:
        return self.embed is None

    def to(self, device: torch.device) -> "FeatureSpace":
        self.device = device
        module = getattr(self.embed, "module", None)
        if module is not None:
            module.to(device)
        return self

    @torch.no_grad()
    def _batches(self, images: np.ndarray, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        out = [fn(torch.from_numpy(np.asarray(images[i:i + self.batch_size])).to(self.device))
               for i in range(0, len(images), self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, device=self.device)

    def working(self, images: np.ndarray) -> torch.Tensor:
        """The copy search's working images (B, 1, WORK, WORK)."""
        return self._batches(images, copies.working)

    def rows(self, images: np.ndarray) -> torch.Tensor:
        """Features (B, D) of training images, as the search compares them."""
        if self.registers:
            return self._batches(images, lambda x: copies.descriptors(copies.working(x))[:, 0])
        return self._standardised(self._batches(images, self._embed))

    def queries(self, images: np.ndarray) -> torch.Tensor:
        """Features (B, V, D) of query images: V views for the copy search, one otherwise."""
        if self.registers:
            return self._batches(images, lambda x: copies.descriptors(copies.working(x), copies.VIEWS.to(x.device)))
        return self.rows(images)[:, None]

    def fit(self, images: np.ndarray) -> None:
        """Remember the per-dimension mean and std of these training images' features (standardised spaces)."""
        if self.standardise:
            feats = self._batches(images, self._embed)
            self.stats = (feats.mean(0), feats.std(0, unbiased=False).clamp_min(1e-8))

    def _embed(self, batch: torch.Tensor) -> torch.Tensor:
        return self.embed(batch.float()[:, None] / 255.0).reshape(len(batch), -1).float()

    def _standardised(self, feats: torch.Tensor) -> torch.Tensor:
        if not self.standardise or self.stats is None:
            return feats
        return (feats - self.stats[0]) / self.stats[1]


class _ModuleCall:
    """embed = a frozen module's call (kept as `.module`, so the space can move it to the GPU)."""

    def __init__(self, module: torch.nn.Module, fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]):
        self.module, self.fn = module.eval(), fn

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.module, x)


def pixel_space(candidates: int = 16) -> FeatureSpace:
    return FeatureSpace("pixels", copies.SEARCH, None, candidates=candidates)


def encoder_space(encoder: GlobalTokenEncoder, name: str = "c_glb", describe: str = "") -> FeatureSpace:
    return FeatureSpace(name, describe or f"global tokens of {encoder.name_or_path} ({encoder.num_tokens}x"
                        f"{encoder.hidden_size}), standardised per dimension on the training set (its train->train "
                        "subsample), L2",
                        _ModuleCall(encoder, lambda m, x: m(x).flatten(1)), standardise=True)


def find_encoder(encoder: str | Path | None, model: str | Path | None) -> tuple[GlobalTokenEncoder | None, str]:
    """The encoder to audit with: a given encoder folder, else the model folder's image_encoder/."""
    candidates = [Path(encoder)] if encoder else []
    if model:
        try:
            candidates.append(resolve_model(model, marker="image_encoder/global_tokens.json").path / "image_encoder")
        except FileNotFoundError:
            pass  # said below: the c_glb space is unavailable
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
    model = xrv.models.DenseNet(weights=XRV_WEIGHTS, cache_dir=str(folder))

    def embed(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
        return m.features2(x * 2048.0 - 1024.0)  # XRV input range [-1024, 1024]

    return FeatureSpace("xrv", f"TorchXRayVision {XRV_WEIGHTS} features2 (1024-d), L2",
                        _ModuleCall(model, embed)), str(folder)


def rad_dino_space() -> tuple[FeatureSpace | None, str]:
    """RAD-DINO global tokens when the model is in the local Hugging Face cache, else (None, why)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(RAD_DINO, "config.json")
    if not isinstance(found, str):
        return None, f"unavailable: {RAD_DINO} is not in the local Hugging Face cache"
    encoder = load_encoder(str(Path(found).parent), "transformers")
    return encoder_space(encoder, "rad-dino", f"{RAD_DINO} global tokens, standardised per dimension, L2"), found
