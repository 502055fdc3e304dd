"""Labelled source images for generation: prepared shards, or any dataset `discover` reads (a labelled CSV, ...).

Shards give back what `prepare` stored (uint8 grey + the `labels` of its JSON). Raw datasets are read and
preprocessed exactly as `prepare` does (bit depth -> uint8, border removal, centre crop, Lanczos resize).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image

from dinodiff.data.datasets import discover
from dinodiff.data.preprocess import preprocess_image
from dinodiff.data.readers import UnreadableImage, load_image
from dinodiff.data.shards import decode_png, list_shards, read_members

log = logging.getLogger(__name__)


@dataclass
class SourceImage:
    id: str
    labels: dict[str, Optional[float]] = field(default_factory=dict)  # 1 / 0 / -1 (uncertain) / None
    image: Optional[np.ndarray] = None  # uint8 (H, W)
    subject: Optional[str] = None  # the patient, when the dataset names one (see dinodiff.data.subjects)
    path: Optional[str] = None  # the source file (as `prepare` recorded it for shards), when known


def is_prepared(source: str | Path) -> bool:
    """A `prepare` output folder, a folder of .tar shards, or one .tar file."""
    path = Path(source)
    if path.is_file():
        return path.suffix == ".tar"
    return (path / "shards").is_dir() or any(path.glob("*.tar"))


def iter_sources(source: str | Path, *, size: int, kind: str = "auto", split: Optional[str] = None,
                 limit: Optional[int] = None, ids: Optional[set[str]] = None, min_size: Optional[int] = None,
                 **discover_options) -> Iterator[SourceImage]:
    """Source images in a stable order (shard order, or sorted by id), uint8 (size, size).

    kind: 'shards' or any `discover` kind ('csv', 'folder', 'mimic-cxr', ...; 'auto' detects). split: keep only
    that split (None: all). limit: stop after that many. ids: only those ids (used to redraw previews;
    limit is then ignored, and reading stops once all are found).
    discover_options go to the adapter, e.g. path_column=, label_columns=['finding'], root= for a CSV.
    """
    if kind == "shards" or (kind == "auto" and is_prepared(source)):
        stream = _from_shards(source, split, ids)
    else:
        stream = _from_records(source, kind, split, size, min(64, size) if min_size is None else min_size,
                               discover_options, ids)
    left = set(ids) if ids is not None else set()
    for count, item in enumerate(stream):
        if ids is None and limit is not None and count >= limit:
            return
        if ids is not None:
            if item.id not in left:
                continue
            left.discard(item.id)
        yield SourceImage(item.id, item.labels, _resize(item.image, size), item.subject, item.path)
        if ids is not None and not left:
            return  # every wanted source found: do not read the rest


def _from_shards(source: str | Path, split: Optional[str], ids: Optional[set[str]] = None) -> Iterator[SourceImage]:
    """Shard samples in order; with `ids`, a sample is matched by its key before anything of it is decoded."""
    path = Path(source)
    urls = [str(path)] if path.is_file() else list_shards(path, split)
    if not urls:
        raise FileNotFoundError(f"No {split + ' ' if split else ''}shards in {source}.")
    for key, fields in read_members(urls):
        if (ids is not None and key not in ids) or "png" not in fields:
            continue
        meta = json.loads(fields["json"]) if "json" in fields else {}
        yield SourceImage(key, dict(meta.get("labels") or {}), decode_png(fields["png"]), subject_of(meta),
                          str(meta["path"]) if meta.get("path") else None)


def _from_records(source: str | Path, kind: str, split: Optional[str], size: int, min_size: int,
                  options: dict, ids: Optional[set[str]] = None) -> Iterator[SourceImage]:
    records = [r for r in discover(source, kind, **options)
               if (split is None or r.split == split) and (ids is None or r.id in ids)]  # read only what is needed
    skipped = 0
    for rec in records:
        try:
            image, _ = preprocess_image(load_image(rec.path)[0], size, True, min_size)
        except (UnreadableImage, OSError, ValueError) as err:  # a bad source costs that source only
            skipped += 1
            log.warning("skipping source %s: %s", rec.path, getattr(err, "reason", err))
            continue
        yield SourceImage(rec.id, dict(rec.labels), image, rec.subject, str(rec.path))
    if skipped:
        log.warning("%d of %d sources could not be read and were skipped.", skipped, len(records))


SUBJECT_KEYS = ("subject", "patient", "patient_id", "subject_id")  # metadata keys naming the patient, first wins


def subject_of(meta: dict) -> Optional[str]:
    """The patient a prepared sample's metadata names (`prepare` writes `subject`), or None."""
    return next((str(meta[k]) for k in SUBJECT_KEYS if meta.get(k) not in (None, "")), None)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape == (size, size):
        return image
    return np.array(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None))


def label_names(sources: list[SourceImage]) -> list[str]:
    """Every label name any source has, sorted."""
    return sorted({name for s in sources for name in s.labels})


def positive_matrix(sources: list[SourceImage], names: list[str]) -> np.ndarray:
    """(N, L) bool: source i is positive (1.0) for label l; 0, uncertain (-1) and missing are not."""
    rows = [[s.labels.get(n) == 1.0 for n in names] for s in sources]
    return np.array(rows, dtype=bool).reshape(len(sources), len(names))
