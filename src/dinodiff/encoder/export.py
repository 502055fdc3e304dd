"""Write a pretrained backbone as an encoder folder that `model.encoder.name_or_path=ENC` loads unchanged.

The folder is in the backbone's own library format, read by `dinodiff.models.encoders.load_encoder`:
- transformers (`Dinov2WithRegistersModel` / `Dinov2Model` / `ViTModel`): `config.json`,
  `model.safetensors` and `preprocessor_config.json` (size, mean and std of the training normalisation);
- timm: timm's hub layout (`config.json` with `architecture`, `model.safetensors`, mean/std in its
  pretrained config).
Beside them, `dinodiff_encoder.json` records the provenance (data, steps, settings, library versions) and
`training_images.json` the images the run trained on (see dinodiff.models.training_images).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from dinodiff.encoder.dino import DINONet
from dinodiff.files import atomic_folder, write_json_atomic
from dinodiff.models.encoders import load_encoder
from dinodiff.models.training_images import TrainingImages, write_training_images

logger = logging.getLogger(__name__)

PROVENANCE_FILE = "dinodiff_encoder.json"


def _processor(family: str, size: int, mean: list[float], std: list[float]):
    from transformers import BitImageProcessor, ViTImageProcessor

    crop = {"height": size, "width": size}
    if family == "transformers-vit":
        return ViTImageProcessor(size=crop, image_mean=mean, image_std=std)
    return BitImageProcessor(size={"shortest_edge": size}, crop_size=crop, do_center_crop=True,
                             image_mean=mean, image_std=std, do_convert_rgb=True)


def _write_backbone(net: DINONet, folder: Path, image_size: int) -> None:
    mean, std = net.mean.flatten().tolist(), net.std.flatten().tolist()
    if net.family == "timm":
        from timm.models import save_for_hf

        data_config = {"mean": mean, "std": std, "input_size": [3, image_size, image_size]}
        save_for_hf(net.backbone, folder, safe_serialization=True, data_config=data_config)
        return
    net.backbone.save_pretrained(folder, safe_serialization=True)
    _processor(net.family, image_size, mean, std).save_pretrained(folder)


def save_encoder_folder(net: DINONet, out_dir: str | Path, image_size: int, provenance: dict[str, Any],
                        training_images: TrainingImages) -> Path:
    """Write `net`'s backbone and the record of its training images to `out_dir` (replaced atomically), and
    check that it reloads to the same tokens."""
    out = Path(out_dir)
    with atomic_folder(out) as tmp:
        _write_backbone(net, tmp, image_size)
        write_training_images(tmp, training_images)
        record = {**provenance, "family": net.family, "image_size": image_size,
                  "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": _versions()}
        write_json_atomic(tmp / PROVENANCE_FILE, record)
        _check_reload(net, tmp, image_size)
    return out


@torch.no_grad()
def _check_reload(net: DINONet, folder: Path, image_size: int) -> None:
    """The saved folder, loaded like any conditioning encoder, must give the CLS token the net computes."""
    enc = load_encoder(str(folder))
    images = torch.rand(2, 1, image_size, image_size, generator=torch.Generator().manual_seed(0))
    was_training = net.training
    net.eval()
    try:
        expected = net.embed(images.to(net.mean.device)).float().cpu()
    finally:
        net.train(was_training)
    got = enc(images)[:, 0]
    if not torch.allclose(got, expected, atol=1e-4, rtol=1e-4):
        raise RuntimeError(f"The encoder saved in {folder} does not reload to the same tokens "
                           f"(max difference {float((got - expected).abs().max()):.2e}); please report this.")


def _versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "transformers", "timm", "lightly"):
        try:
            out[name] = version(name)
        except Exception:  # noqa: BLE001 - a missing optional package just is not recorded
            continue
    return out


def read_provenance(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def settings_record(settings: Any) -> dict[str, Any]:
    return asdict(settings)
