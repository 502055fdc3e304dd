"""Image sets the audit reads, as uint8 (N, size, size) with each image's patient (subject).

- Synthetic datasets (``images/**/*.png`` + ``labels.csv`` + ``provenance.json`` of `dinodiff generate`) and held-out
  real images are read whole (`--limit` caps them).
- The training set is **streamed** (`TrainingSet`): a first pass reads ids and patients only, later passes decode
  one chunk at a time, or only the images asked for. It is never truncated: a training set cut short would push
  distances up and hide copies. A `dinodiff prepare` folder is streamed from its shards; another dataset is read
  into memory first (prepare it for large sets).

Patients come from the prepared metadata (`subject`, see `dinodiff.data.image_sets.subject_of`) or the dataset's
adapter; an image without one is its own patient (`dinodiff.data.subjects.subject_key`). Patients are compared as
64-bit integer groups (a hash of the subject key), never as object arrays.
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dinodiff.data.image_sets import (
    SyntheticDataset,
    SyntheticRow,
    image_records,
    is_prepared,
    iter_sources,
    resize_square,
)
from dinodiff.data.subjects import subject_key

logger = logging.getLogger(__name__)

Record = tuple[str, "str | None", Callable[[], np.ndarray]]  # id, subject, decode (uint8 (size, size))


def group_of(ident: str, subject: str | None) -> int:
    """The patient group of an image: a non-negative 63-bit hash of its subject (or of its id when unknown)."""
    digest = hashlib.blake2b(subject_key(ident, subject).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def groups_of(ids: Iterable[str], subjects: Iterable[str | None]) -> np.ndarray:
    return np.fromiter((group_of(i, s) for i, s in zip(ids, subjects)), dtype=np.int64)


@dataclass
class ImageSet:
    """uint8 images (N, size, size) with their ids and subjects (None where unknown)."""

    name: str
    ids: list[str]
    images: np.ndarray
    subjects: list[str | None] = field(default_factory=list)
    rows: list[SyntheticRow] = field(default_factory=list)  # synthetic: the labels.csv row of each image
    provenance: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def groups(self) -> np.ndarray:
        return groups_of(self.ids, self.subjects or [None] * len(self.ids))

    @property
    def subjects_known(self) -> int:
        return sum(s is not None for s in self.subjects)


def _stack(images: list[np.ndarray], size: int) -> np.ndarray:
    return np.stack(images) if images else np.zeros((0, size, size), np.uint8)


def load_real(source: str | Path, size: int, split: str | None = None, limit: int | None = None) -> ImageSet:
    """Real images (a `prepare` folder's split, or any dataset `prepare` reads), with their subjects."""
    items = list(iter_sources(source, size=size, split=split, limit=limit))
    if not items:
        raise FileNotFoundError(f"No images found in {source} (split {split}).")
    return ImageSet(str(source), [s.id for s in items], _stack([s.image for s in items], size),
                    [s.subject for s in items])


def load_synthetic(folder: str | Path, size: int, limit: int | None = None) -> ImageSet:
    """A generated dataset (`SyntheticDataset`): its images in labels.csv order, its rows and provenance.json."""
    dataset = SyntheticDataset.read(folder, limit)
    return ImageSet(str(dataset.folder), [r.path for r in dataset.rows], _stack(list(dataset.images(size)), size),
                    [None] * len(dataset), dataset.rows, dataset.provenance)


def strategy_and_ratio(synthetic: ImageSet) -> tuple[str, int | None]:
    """(strategy, ratio) of a synthetic set, as `SyntheticDataset` reads them."""
    dataset = SyntheticDataset(Path(synthetic.name), synthetic.rows, [], synthetic.provenance)
    return dataset.strategy, dataset.ratio


@dataclass
class TrainingSet:
    """The training images, streamed in a fixed order (positions 0..N-1); never all decoded at once."""

    name: str
    groups: np.ndarray  # (N,) int64 patient group of each position
    subjects_known: int
    positions: dict[str, int]  # position of each id asked for when opened
    records: Callable[[], Iterator[Record]] = field(repr=False)  # a fresh pass, decoding deferred

    def __len__(self) -> int:
        return len(self.groups)

    def chunks(self, chunk: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first position, uint8 (C, size, size)) for consecutive chunks of at most `chunk` images."""
        batch, start = [], 0
        for _, _, decode in self.records():
            batch.append(decode())
            if len(batch) == chunk:
                yield start, np.stack(batch)
                start, batch = start + len(batch), []
        if batch:
            yield start, np.stack(batch)

    def fetch(self, positions: Iterable[int], chunk: int = 1024) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions, uint8 images) in batches of at most `chunk`, decoding only the images at `positions`."""
        wanted = set(int(p) for p in positions)
        found, batch = [], []
        for position, (_, _, decode) in enumerate(self.records()):
            if position in wanted:
                found.append(position)
                batch.append(decode())
                if len(batch) == chunk:
                    yield np.array(found), np.stack(batch)
                    found, batch = [], []
        if batch:
            yield np.array(found), np.stack(batch)


def open_training(source: str | Path, size: int, split: str | None, wanted: Iterable[str] = ()) -> TrainingSet:
    """Read the ids and patients of the training set (no image decoded for shards) and the positions of `wanted`."""
    records = _shard_records(source, size, split) if is_prepared(source) else _memory_records(source, size, split)
    wanted, positions, groups, known = set(wanted), {}, array("q"), 0
    for position, (ident, subject, _) in enumerate(records()):
        groups.append(group_of(ident, subject))
        known += subject is not None
        if ident in wanted:
            positions[ident] = position
    if not groups:
        raise FileNotFoundError(f"No images found in {source} (split {split}).")
    logger.info("training set %s: %d images, %d with a patient id", source, len(groups), known)
    return TrainingSet(str(source), np.frombuffer(groups, dtype=np.int64).copy(), known, positions, records)


def _shard_records(source: str | Path, size: int, split: str | None) -> Callable[[], Iterator[Record]]:
    image_records(source, size=size, kind="shards", split=split)  # a missing split is named now, not at a pass

    def records() -> Iterator[Record]:
        for record in image_records(source, size=size, kind="shards", split=split):
            yield record.id, record.subject, lambda decode=record.decode: resize_square(decode(), size)

    return records


def _memory_records(source: str | Path, size: int, split: str | None) -> Callable[[], Iterator[Record]]:
    """A dataset that is not prepared: read (and preprocessed) once into memory."""
    items = list(iter_sources(source, size=size, split=split))
    logger.info("%s is not a `dinodiff prepare` folder: its %d images are held in memory", source, len(items))

    def records() -> Iterator[Record]:
        for item in items:
            yield item.id, item.subject, lambda image=item.image: image

    return records
