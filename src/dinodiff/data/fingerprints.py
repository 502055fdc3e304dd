"""Content fingerprints of images, to find the same picture in two image sets whatever its file name, format or
size: an evaluation image that is also one of a model's training images makes that evaluation transductive.

A fingerprint is the prepared image (border-free, centre-cropped, square: `prepare`'s preprocessing, which every
evaluation set also goes through) resized to 32 x 32, minus its own 4 x 4 blur (a band-pass: what is left
is the image's own structure, not the brightness layout every chest X-ray shares), centred and L2-normalised.
Two images are the same picture when the cosine similarity of their fingerprints is at least `SAME_IMAGE`.
Measured (BENCHMARKS.md, "Training images among the evaluation images"): against `cxr-covid` prepared at 256 px,
the 37 `lungs-covid` images that are cxr-covid images re-encoded score 0.999 or more (read at 32, 48 or 64 px)
and every other pair at most 0.875; two different phantoms of the demo, which share one drawn anatomy, at most
0.986. Another image of the same patient is a different picture: it is not found here.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dinodiff.data.image_sets import ImageRecord, image_records
from dinodiff.data.readers import UnreadableImage
from dinodiff.data.shards import ShardError, list_shards
from dinodiff.files import write_bytes_atomic

logger = logging.getLogger(__name__)

SIDE, BLUR_SIDE = 32, 4
SAME_IMAGE = 0.99  # cosine similarity of fingerprints from which two images count as one picture
_CHUNK = 2048  # training images decoded and compared at a time: memory stays flat over any training set
EXCLUDE_READ_SIDE = 64  # side at which an exclusion set is read (the margins above were measured at 32-64 px)


def fingerprint(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W) prepared image -> (SIDE * SIDE,) float32 band-passed, centred, unit length (flat: zeros)."""
    # Lanczos, not box: box averaging over a side that is not a multiple of SIDE shifts the sampling phase and
    # costs the same picture 0.01 of similarity (read at 40 or 48 px); Lanczos keeps it above 0.998 at any side
    small = Image.fromarray(np.asarray(image, np.uint8)).resize((SIDE, SIDE), Image.Resampling.LANCZOS)
    fine = np.asarray(small, np.float32)
    blur = Image.fromarray(fine).resize((BLUR_SIDE, BLUR_SIDE), Image.Resampling.BOX)
    band = (fine - np.asarray(blur.resize((SIDE, SIDE), Image.Resampling.BILINEAR), np.float32)).ravel()
    band -= band.mean()
    norm = np.linalg.norm(band)
    return band / norm if norm > 1e-6 else band


def fingerprints(images: Iterable[np.ndarray]) -> np.ndarray:
    """(N, SIDE * SIDE) fingerprints of the images, in order."""
    rows = [fingerprint(image) for image in images]
    return np.stack(rows) if rows else np.zeros((0, SIDE * SIDE), np.float32)


def _chunks(records: Iterator[ImageRecord]) -> Iterator[list[ImageRecord]]:
    chunk: list[ImageRecord] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == _CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _source_key(shards: str | Path, split: str | None) -> str:
    """Changes whenever a shard of the folder is rewritten (name, size, modification time) or the fingerprint does."""
    files = [Path(p) for p in list_shards(shards, split)] or [Path(shards)]
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    text = json.dumps([str(Path(shards).resolve()), split, SIDE, BLUR_SIDE, stamp])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def prepared_fingerprints(shards: str | Path, split: str | None,
                          cache_dir: str | Path | None = None) -> Iterator[tuple[list[str], list[str], np.ndarray]]:
    """The fingerprints of a prepared folder (one split, or all), a chunk at a time: (ids, source paths ('' when
    unknown), fingerprints). With ``cache_dir``, each chunk is saved there (``.npz``, no pickle) and read back on
    the next call instead of decoding the images again."""
    folder = Path(cache_dir) / _source_key(shards, split) if cache_dir is not None else None
    if folder is not None and (folder / "complete").is_file():
        for path in sorted(folder.glob("chunk-*.npz")):
            with np.load(path, allow_pickle=False) as saved:
                yield saved["ids"].tolist(), saved["paths"].tolist(), saved["prints"].astype(np.float32)
        return
    for index, chunk in enumerate(_chunks(image_records(shards, size=0, kind="shards", split=split))):
        ids, paths = [r.id for r in chunk], [r.path or "" for r in chunk]
        prints = fingerprints(record.decode() for record in chunk)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            np.savez(buffer, ids=np.array(ids), paths=np.array(paths), prints=prints.astype(np.float16))
            write_bytes_atomic(folder / f"chunk-{index:06d}.npz", buffer.getvalue())
        yield ids, paths, prints
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "complete").write_text("")


def find_in_prepared(queries: np.ndarray, query_paths: Sequence[str | None], shards: str | Path,
                     split: str | None, cache_dir: str | Path | None = None) -> tuple[list[str | None], int]:
    """Which query images are images of a prepared folder (one split, or all): per query, a line naming the
    prepared image it is (the same source file, or the same picture with its similarity) or None; and how many
    prepared images were read. ``cache_dir``: see `prepared_fingerprints`."""
    wanted = {_resolved(p): i for i, p in enumerate(query_paths) if p}
    best = np.full(len(queries), -1.0, np.float32)
    found: list[str | None] = [None] * len(queries)
    count = 0
    for ids, paths, prints in prepared_fingerprints(shards, split, cache_dir):
        count += len(ids)
        for ident, path in zip(ids, paths):
            index = wanted.get(_resolved(path)) if path else None
            if index is not None:
                found[index], best[index] = f"same source file as {ident}", 2.0
        if not len(queries):
            continue
        sims = queries @ prints.T
        arg = sims.argmax(1)
        value = sims[np.arange(len(queries)), arg]
        for index in np.flatnonzero((value >= SAME_IMAGE) & (value > best)):
            best[index] = value[index]
            found[index] = f"same picture as {ids[arg[index]]} (similarity {value[index]:.4f})"
    return found, count


def _resolved(path: str) -> str:
    return str(Path(path).expanduser().resolve())


@dataclass(frozen=True)
class ExcludedImages:
    """Image sets that must stay out of another one (``prepare --exclude``: a training set that holds none of the
    evaluation images): their fingerprints, names ('set/id') and resolved source files."""

    prints: np.ndarray  # (N, SIDE * SIDE) float32
    names: tuple[str, ...]
    paths: dict[str, str]  # resolved source file -> name

    @property
    def key(self) -> str:
        """Changes whenever the excluded images do: part of what a prepared shard depends on."""
        digest = hashlib.sha1(np.ascontiguousarray(self.prints, np.float16).tobytes())
        digest.update(json.dumps([self.names, sorted(self.paths)]).encode())
        return digest.hexdigest()[:16]

    def match(self, path: str | Path | None, image: np.ndarray | None = None) -> str | None:
        """Why this file or prepared image (uint8 (H, W)) is an excluded one, or None when it is not."""
        if path is not None and (name := self.paths.get(_resolved(str(path)))) is not None:
            return f"the same file as {name}"
        if image is None or not len(self.prints):
            return None
        sims = self.prints @ fingerprint(image)
        best = int(sims.argmax())
        if sims[best] >= SAME_IMAGE:
            return f"the same picture as {self.names[best]} (similarity {sims[best]:.4f})"
        return None


def excluded_images(sources: Sequence[str | Path]) -> ExcludedImages:
    """Reads every image of the sets (folders, datasets, prepared folders; any split) once, through `prepare`'s
    preprocessing at EXCLUDE_READ_SIDE px. An image that cannot be decoded still excludes its source file."""
    prints, names, paths = [], [], {}
    for source in sources:
        label = Path(source).name
        for record in image_records(source, size=EXCLUDE_READ_SIDE):
            name = f"{label}/{record.id}"
            if record.path:
                paths[_resolved(record.path)] = name
            try:
                image = record.decode()
            except ShardError:  # a damaged exclusion set must not let its images through silently
                raise
            except (UnreadableImage, OSError, ValueError) as err:
                logger.warning("excluded image %s cannot be decoded (%s): only its file is excluded", name,
                               getattr(err, "reason", err))
                continue
            prints.append(fingerprint(image))
            names.append(name)
    stacked = np.stack(prints) if prints else np.zeros((0, SIDE * SIDE), np.float32)
    return ExcludedImages(stacked, tuple(names), paths)
