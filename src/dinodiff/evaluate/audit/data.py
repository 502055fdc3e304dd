"""Image sets the audit reads: real images (prepared shards or any dataset `prepare` reads) and synthetic datasets
(``images/*.png`` + ``labels.csv`` + ``provenance.json`` of `dinodiff generate`), as uint8 (N, size, size)."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dinodiff.data.shards import decode_png, list_shards, read_samples
from dinodiff.data.sources import is_prepared, iter_sources

logger = logging.getLogger(__name__)

PATIENT_KEYS = ("patient", "patient_id", "subject_id")


@dataclass
class ImageSet:
    """uint8 images (N, size, size) with their ids; patients (one id or None each) when the source has them."""

    name: str
    ids: list[str]
    images: np.ndarray
    patients: list[str | None] | None = None
    rows: list[dict] = field(default_factory=list)  # synthetic: the labels.csv row of each image
    provenance: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None))


def _stack(images: list[np.ndarray], size: int) -> np.ndarray:
    return np.stack(images) if images else np.zeros((0, size, size), np.uint8)


def load_real(source: str | Path, size: int, split: str | None = None, limit: int | None = None) -> ImageSet:
    """Real images: a `prepare` folder (that split; with patient ids when its metadata has them) or any dataset."""
    ids, images, patients = [], [], []
    if is_prepared(source):
        path = Path(source)
        urls = [str(path)] if path.is_file() else list_shards(path, split)
        if not urls:
            raise FileNotFoundError(f"No {split or ''} shards in {source}: pass a `dinodiff prepare` folder "
                                    "(or another --split).")
        for sample in read_samples(urls):
            meta = sample.get("json") or {}
            ids.append(sample["__key__"])
            images.append(_resize(sample["image"], size))
            patients.append(next((str(meta[k]) for k in PATIENT_KEYS if meta.get(k) is not None), None))
            if limit is not None and len(ids) >= limit:
                break
    else:
        for item in iter_sources(source, size=size, split=split, limit=limit):
            ids.append(item.id)
            images.append(item.image)
            patients.append(None)
    if not ids:
        raise FileNotFoundError(f"No images found in {source} (split {split}).")
    known = patients if any(p is not None for p in patients) else None
    return ImageSet(str(source), ids, _stack(images, size), known)


def load_synthetic(folder: str | Path, size: int, limit: int | None = None) -> ImageSet:
    """A generated dataset: its images in labels.csv order (or sorted), its labels.csv rows and provenance.json."""
    folder = Path(folder)
    provenance_file = folder / "provenance.json"
    if not provenance_file.is_file():
        raise FileNotFoundError(f"{provenance_file} not found: pass a folder written by `dinodiff generate`.")
    provenance = json.loads(provenance_file.read_text())
    labels_file = folder / "labels.csv"
    if labels_file.is_file():
        with labels_file.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    else:
        rows = [{"path": p.relative_to(folder).as_posix()} for p in sorted((folder / "images").glob("*.png"))]
    rows = rows[:limit] if limit is not None else rows
    if not rows:
        raise FileNotFoundError(f"No images in {folder / 'images'}: the generate run made none; rerun it.")
    images = [_resize(decode_png((folder / r["path"]).read_bytes()), size) for r in rows]
    return ImageSet(str(folder), [r["path"] for r in rows], _stack(images, size), None, rows, provenance)


def strategy_and_ratio(synthetic: ImageSet) -> tuple[str, int | None]:
    """(strategy, ratio) from provenance.json's settings (strategy also read from labels.csv when absent)."""
    settings = synthetic.provenance.get("settings") or {}
    strategy = settings.get("strategy") or (synthetic.rows[0].get("strategy") if synthetic.rows else None)
    return str(strategy or "unknown"), settings.get("ratio")
