"""Decoded, resized images cached once per grid (a raw uint8 memmap + a JSON index), for the real pool, the real
test set and every synthetic set. Cells open the memmaps read-only, so no fold decodes an image again.
The real index also holds each image's subject and split (see `split`), as compact arrays (real-SIZE.npz, index.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dinodiff.data.image_sets import (
    SourceImage,
    SyntheticDataset,
    iter_sources,
)
from dinodiff.evaluate.classify.index import (
    Positives,
    StringsBuilder,
    load_index,
    save_index,
)
from dinodiff.evaluate.classify.settings import DataSettings
from dinodiff.evaluate.classify.split import resolve_subjects, split_by_subject
from dinodiff.files import atomic_path, write_json_atomic

logger = logging.getLogger(__name__)

REAL_FORMAT = 3  # 2: subjects and a split by subject; 3: the index as arrays (real-SIZE.npz, index.py)


@dataclass
class ImageSet:
    """Images (N, S, S) uint8 (a read-only memmap), their ids and positives (N, L) over `names`."""

    images: np.ndarray
    ids: Sequence[str]  # a list, or for the real images index.Strings (compact)
    positive: np.ndarray
    names: list[str]
    split: np.ndarray | None = None  # 'train' / 'test' / 'excluded' per image (real images only)
    subjects: Sequence[str] | None = None  # the subject (patient) key of each image (real images only; index.Coded)
    subject_counts: dict[str, int] | None = None  # how many images got their subject each way (see split)
    source_a: list[str] | None = None  # synthetic: the source(s) each image was made from
    source_b: list[str] | None = None

    def columns(self, labels: list[str]) -> np.ndarray:
        """(N, len(labels)) float32 targets; a label this set lacks is all negative."""
        out = np.zeros((len(self.ids), len(labels)), dtype=np.float32)
        for j, name in enumerate(labels):
            if name in self.names:
                out[:, j] = self.positive[:, self.names.index(name)]
        return out


def source_options(data: DataSettings) -> dict:
    options: dict = {"kind": data.kind}
    for key in ("label_columns", "path_column", "root", "subject_column"):
        if getattr(data, key) is not None:
            options[key] = getattr(data, key)
    return options


def _write_images(path: Path, images: Iterable[np.ndarray]) -> int:
    """Stream uint8 images into a raw file (temp + rename); returns how many were written."""
    count = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for image in images:
            f.write(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
            count += 1
    return count


def _open(path: Path, count: int, size: int) -> np.ndarray:
    if count == 0:
        return np.zeros((0, size, size), dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", shape=(count, size, size))


def _read_sources(data: DataSettings, size: int) -> Iterator[tuple[SourceImage, str | None]]:
    """Every labelled source image, streamed (decoded one at a time), with the source's own split ('train'/'test')
    when it has a test split, else None: the train split first, then the test split."""
    options = source_options(data)
    test = iter_sources(data.source, size=size, split="test", **options)
    try:
        first = next(test, None)
    except FileNotFoundError:  # shards without a test split
        first = None
    if first is not None:
        yield from ((s, "train") for s in iter_sources(data.source, size=size, split="train", **options))
        yield first, "test"
        yield from ((s, "test") for s in test)
        return
    logger.info("%s has no test split: %.0f%% of its subjects go to the test set by subject hash (seed %d)",
                data.source, 100 * data.test_fraction, data.split_seed)
    yield from ((s, None) for s in iter_sources(data.source, size=size, split=None, **options))


def load_real(data: DataSettings, size: int, cache: Path) -> ImageSet:
    """The real images at `size` px with their subjects and split, decoded once into `cache` (rebuilt if the data
    settings change). Raises SubjectPatternMismatch when data.subject_pattern misses an id that needs it.
    Images are streamed into the memmap, and the ids, subjects, labels and split are held as compact arrays
    (index.py: tens of bytes per image), never as a list of Python objects per image."""
    key = {"data": asdict(data), "size": size, "format": REAL_FORMAT}
    meta_path, index_path, raw_path = cache / f"real-{size}.json", cache / f"real-{size}.npz", cache / f"real-{size}.u8"
    if meta_path.is_file() and index_path.is_file() and raw_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == json.loads(json.dumps(key)):
            return _real_set(meta, index_path, raw_path, size)
    if not data.source:
        raise ValueError("No real data: set data.source (a prepared folder, shards, a labelled CSV or a dataset root).")
    ids, known, own, positives = StringsBuilder(), StringsBuilder(), [], Positives()

    def images() -> Iterator[np.ndarray]:
        for source, split in _read_sources(data, size):
            ids.append(source.id)
            known.append(source.subject or "")  # "" as None: no subject known
            own.append(split)  # 'train', 'test' or None: the same few str objects, a pointer per image
            positives.add(source.labels)
            yield source.image

    cache.mkdir(parents=True, exist_ok=True)
    count = _write_images(raw_path, images())
    if not count:
        raw_path.unlink(missing_ok=True)
        raise FileNotFoundError(f"No labelled images found in {data.source}.")
    subjects, counts = resolve_subjects(ids.build(), known.build(), data.subject_pattern)
    splits = split_by_subject(subjects, own if own[0] is not None else None, data.test_fraction, data.split_seed)
    names, positive = positives.matrix()
    save_index(index_path, ids.build(), subjects, positive, splits)
    meta = {"key": key, "count": count, "names": names, "subject_counts": counts}
    write_json_atomic(meta_path, meta)  # last: the key says the cache is complete
    logger.info("cached %d real images at %d px in %s", count, size, raw_path)
    return _real_set(meta, index_path, raw_path, size)


def cached_real(cache: Path, size: int) -> ImageSet:
    """The real-image cache that load_real wrote in `cache` at `size` px, whatever data settings made it."""
    meta = json.loads((cache / f"real-{size}.json").read_text())
    return _real_set(meta, cache / f"real-{size}.npz", cache / f"real-{size}.u8", size)


def _real_set(meta: dict, index_path: Path, raw_path: Path, size: int) -> ImageSet:
    ids, subjects, positive, split = load_index(index_path)
    return ImageSet(_open(raw_path, meta["count"], size), ids, positive.reshape(meta["count"], len(meta["names"])),
                    meta["names"], split, subjects, meta["subject_counts"])


def load_synthetic(folder: Path, size: int) -> ImageSet:
    """A `dinodiff generate` folder (`SyntheticDataset`) at `size` px, decoded once into the folder."""
    dataset = SyntheticDataset.read(folder)
    raw_path, index_path = folder / f"images-{size}.u8", folder / f"images-{size}.json"
    if not (index_path.is_file() and json.loads(index_path.read_text()).get("count") == len(dataset)):
        count = _write_images(raw_path, dataset.images(size))
        write_json_atomic(index_path, {"count": count, "size": size})
    return ImageSet(_open(raw_path, len(dataset), size), [r.path for r in dataset.rows], dataset.positive(),
                    dataset.label_names, source_a=[r.source_a for r in dataset.rows],
                    source_b=[r.source_b or r.source_a for r in dataset.rows])
