"""Image sets: the one reader of images for every stage after `prepare`, and of what `generate` writes.

- **Real images** (`image_records`, `iter_sources`): prepared shards, or any dataset `discover` reads (a labelled
  CSV, a folder, MIMIC-CXR, the lung-mask layouts), each image with its id, labels, subject (patient) and source
  file. A record decodes its image only when asked, so a set filtered by key (`ids=`) decodes nothing else: for
  shards the members are read undecoded and only the wanted keys are decoded; for a dataset only the wanted files
  are opened. Raw datasets are preprocessed exactly as `prepare` does (bit depth -> uint8, border removal,
  centre crop, Lanczos resize).
- **Synthetic datasets** (`SyntheticDataset`): ``images/`` + ``labels.csv`` + ``provenance.json`` of
  `dinodiff generate`, read by one typed reader.

One PNG decoder (`dinodiff.data.shards.decode_png`) and one resize rule (`resize_square`) serve them all.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dinodiff.data.datasets import discover
from dinodiff.data.preprocess import preprocess_image
from dinodiff.data.readers import UnreadableImage, load_image
from dinodiff.data.shards import (
    CorruptShard,
    ShardError,
    decode_png,
    list_shards,
    read_members,
)

log = logging.getLogger(__name__)

SUBJECT_KEYS = ("subject", "patient", "patient_id", "subject_id")  # metadata keys naming the patient, first wins
RESAMPLE = Image.Resampling.BILINEAR  # the resize rule of every image set (evaluations compare at one size)


def resize_square(image: np.ndarray, size: int, resample: Image.Resampling = RESAMPLE) -> np.ndarray:
    """uint8 (H, W) -> (size, size) (the image itself when it already is); no reducing gap, so exact PIL output."""
    if image.shape == (size, size):
        return image
    return np.array(Image.fromarray(image).resize((size, size), resample, reducing_gap=None))


def subject_of(meta: dict) -> str | None:
    """The patient a prepared sample's metadata names (`prepare` writes `subject`), or None."""
    return next((str(meta[k]) for k in SUBJECT_KEYS if meta.get(k) not in (None, "")), None)


def is_prepared(source: str | Path) -> bool:
    """A `prepare` output folder, a folder of .tar shards, or one .tar file."""
    path = Path(source)
    if path.is_file():
        return path.suffix == ".tar"
    return (path / "shards").is_dir() or any(path.glob("*.tar"))


@dataclass(frozen=True)
class ImageRecord:
    """One real image before decoding: its id, labels, subject, source file, and how to decode it."""

    id: str
    labels: dict[str, float | None]  # 1 / 0 / -1 (uncertain) / None
    subject: str | None
    path: str | None  # the source file (as `prepare` recorded it for shards), when known
    decode: Callable[[], np.ndarray] = field(repr=False, compare=False)  # uint8 (H, W); raises when unreadable


@dataclass
class SourceImage:
    """A decoded real image with its id, labels, subject and source file."""

    id: str
    labels: dict[str, float | None] = field(default_factory=dict)
    image: np.ndarray | None = None  # uint8 (H, W)
    subject: str | None = None
    path: str | None = None


def image_records(source: str | Path, *, size: int, kind: str = "auto", split: str | None = None,
                  ids: set[str] | None = None, min_size: int | None = None, **discover_options) -> Iterator[ImageRecord]:
    """The records of a source in a stable order (shard order, or sorted by id), filtered by split and by `ids`
    before anything is decoded. A dataset's records decode through `prepare`'s preprocessing at `size`.

    kind: 'shards' or any `discover` kind ('csv', 'folder', 'mimic-cxr', ...; 'auto' detects); discover_options
    go to the adapter (path_column=, label_columns=['finding'], root=, subject_column= for a CSV).
    """
    if kind == "shards" or (kind == "auto" and is_prepared(source)):
        return _shard_records(source, split, ids)
    return _dataset_records(source, kind, split, size, min(64, size) if min_size is None else min_size,
                            discover_options, ids)


def _shard_records(source: str | Path, split: str | None, ids: set[str] | None) -> Iterator[ImageRecord]:
    """Checks now that there are shards (a missing split is named at once), then reads them lazily."""
    path = Path(source)
    urls = [str(path)] if path.is_file() else list_shards(path, split)
    if not urls:
        raise FileNotFoundError(f"No {split + ' ' if split else ''}shards in {source}.")
    return _member_records(urls, ids)


def _member_records(urls: list[str], ids: set[str] | None) -> Iterator[ImageRecord]:
    for key, members in read_members(urls):
        if (ids is not None and key not in ids) or "png" not in members:
            continue
        meta = json.loads(members["json"]) if "json" in members else {}
        yield ImageRecord(key, dict(meta.get("labels") or {}), subject_of(meta),
                          str(meta["path"]) if meta.get("path") else None,
                          lambda png=members["png"], key=key: _decode_member(png, key))


def _decode_member(png: bytes, key: str) -> np.ndarray:
    try:
        return decode_png(png)
    except (OSError, ValueError) as err:
        raise CorruptShard(f"sample {key}: its PNG cannot be decoded ({err}); prepare the shard again.") from err


def _dataset_records(source: str | Path, kind: str, split: str | None, size: int, min_size: int, options: dict,
                     ids: set[str] | None) -> Iterator[ImageRecord]:
    for rec in discover(source, kind, **options):
        if (split is None or rec.split == split) and (ids is None or rec.id in ids):  # open only what is needed
            yield ImageRecord(rec.id, dict(rec.labels), rec.subject, str(rec.path),
                              lambda path=rec.path: preprocess_image(load_image(path)[0], size, True, min_size)[0])


def iter_sources(source: str | Path, *, size: int, kind: str = "auto", split: str | None = None,
                 limit: int | None = None, ids: set[str] | None = None, min_size: int | None = None,
                 **discover_options) -> Iterator[SourceImage]:
    """Decoded source images (uint8 (size, size)) in a stable order; see `image_records` for the arguments.

    limit: stop after that many. ids: only those ids (limit is then ignored, and reading stops once all are
    found). A dataset file that cannot be read costs that source only (logged and counted).
    """
    left = set(ids) if ids is not None else set()
    skipped = count = 0
    for record in image_records(source, size=size, kind=kind, split=split, ids=ids, min_size=min_size,
                                **discover_options):
        if ids is None and limit is not None and count >= limit:
            break
        try:
            image = record.decode()
        except ShardError:  # a prepared set must not shrink silently: a damaged shard stops the reader
            raise
        except (UnreadableImage, OSError, ValueError) as err:  # a bad source file costs that source only
            skipped += 1
            log.warning("skipping source %s: %s", record.path, getattr(err, "reason", err))
            continue
        count += 1
        left.discard(record.id)
        yield SourceImage(record.id, record.labels, resize_square(image, size), record.subject, record.path)
        if ids is not None and not left:
            break  # every wanted source found: do not read the rest
    if skipped:
        log.warning("%d sources could not be read and were skipped.", skipped)


def label_names(sources: list[SourceImage]) -> list[str]:
    """Every label name any source has, sorted."""
    return sorted({name for s in sources for name in s.labels})


def positive_matrix(sources: list[SourceImage], names: list[str]) -> np.ndarray:
    """(N, L) bool: source i is positive (1.0) for label l; 0, uncertain (-1) and missing are not."""
    rows = [[s.labels.get(n) == 1.0 for n in names] for s in sources]
    return np.array(rows, dtype=bool).reshape(len(sources), len(names))


# ------------------------------------------------------------------------------------------ synthetic datasets
SYNTHETIC_COLUMNS = ("path", "strategy", "source_a", "source_b", "r", "seed")  # labels.csv columns that are no label


@dataclass(frozen=True)
class SyntheticRow:
    """One generated image: its path (relative to the dataset), labels and what it was made from."""

    path: str
    labels: dict[str, float | None]
    strategy: str | None = None
    source_a: str | None = None
    source_b: str | None = None  # interpolation's second source
    r: float | None = None
    seed: int | None = None

    @property
    def sources(self) -> tuple[str, ...]:
        """The real images this one was made from (one or two ids)."""
        return tuple(s for s in (self.source_a, self.source_b) if s)


@dataclass
class SyntheticDataset:
    """A `dinodiff generate` output folder: its rows (labels.csv order) and provenance.json."""

    folder: Path
    rows: list[SyntheticRow]
    label_names: list[str]
    provenance: dict

    @classmethod
    def read(cls, folder: str | Path, limit: int | None = None) -> "SyntheticDataset":
        """Read labels.csv and provenance.json (a folder without labels.csv lists its images, sorted)."""
        folder = Path(folder)
        provenance_file = folder / "provenance.json"
        if not provenance_file.is_file():
            raise FileNotFoundError(f"{provenance_file} not found: pass a folder written by `dinodiff generate`.")
        table, names = _read_labels(folder)
        rows = table[:limit] if limit is not None else table
        if not rows:
            raise FileNotFoundError(f"No images in {folder / 'images'}: the generate run made none; rerun it.")
        return cls(folder, rows, names, json.loads(provenance_file.read_text()))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def settings(self) -> dict:
        return self.provenance.get("settings") or {}

    @property
    def strategy(self) -> str:
        return str(self.settings.get("strategy") or (self.rows[0].strategy if self.rows else None) or "unknown")

    @property
    def ratio(self) -> int | None:
        return self.settings.get("ratio")

    def positive(self, names: list[str] | None = None) -> np.ndarray:
        """(N, L) bool over `names` (default: the dataset's label names): a label a row lacks is negative."""
        names = self.label_names if names is None else names
        rows = [[row.labels.get(n) == 1.0 for n in names] for row in self.rows]
        return np.array(rows, dtype=bool).reshape(len(self.rows), len(names))

    def image(self, index: int, size: int | None = None) -> np.ndarray:
        """Image `index` as uint8 (H, W), resized to (size, size) when given."""
        image = decode_png((self.folder / self.rows[index].path).read_bytes())
        return image if size is None else resize_square(image, size)

    def images(self, size: int) -> Iterator[np.ndarray]:
        """Every image in row order at (size, size)."""
        for i in range(len(self.rows)):
            yield self.image(i, size)


def _read_labels(folder: Path) -> tuple[list[SyntheticRow], list[str]]:
    labels_file = folder / "labels.csv"
    if not labels_file.is_file():
        paths = sorted((folder / "images").rglob("*.png"))
        return [SyntheticRow(p.relative_to(folder).as_posix(), {}) for p in paths], []
    with labels_file.open(newline="") as handle:
        table = list(csv.DictReader(handle))
    names = [c for c in (table[0].keys() if table else []) if c not in SYNTHETIC_COLUMNS]
    return [SyntheticRow(row["path"], {n: _label(row[n]) for n in names}, row.get("strategy") or None,
                         row.get("source_a") or None, row.get("source_b") or None,
                         float(row["r"]) if row.get("r") not in (None, "") else None,
                         int(row["seed"]) if row.get("seed") not in (None, "") else None)
            for row in table], names


def _label(value: str | None) -> float | None:
    value = (value or "").strip()
    return float(value) if value else None
