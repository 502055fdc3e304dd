"""The sources of a generated dataset, encoded once into `OUT/sources/` and read by every process without
loading them whole.

Layout (written by the main process; `complete.json` last, so a folder without it is redone):

- ``ids.txt``: one source id per line, in source order;
- ``labels.npy``: (N, L) float32, 1 / 0 / -1 (uncertain), NaN where a source has no value; ``names.json``: the L names;
- ``c_glb-NNNNNN.npy``: float32 c_GLB rows of sources [k * CHUNK, (k + 1) * CHUNK), shape (rows, S, N);
- ``complete.json``: count, chunk size and token shape.

Every array is opened memory-mapped: a process reads only the pages of the sources its own items use, so
memory stays bounded by the batch, not by the number of sources (the fp32 c_GLB of 1M ViT-B sources with two
tokens is 6 GB). Encoding streams too: sources go through the encoder `encode_batch` at a time, and ids and
labels are spooled to disk, never held as a list of images.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from dinodiff.data.image_sets import SourceImage
from dinodiff.files import atomic_path, write_bytes_atomic

logger = logging.getLogger(__name__)

SOURCES_DIR = "sources"
CHUNK = 4096  # sources per c_GLB file
_COMPLETE = "complete.json"
Encoder = Callable[[list[SourceImage]], torch.Tensor]  # sources with images -> c_GLB (B, S, N) on the CPU


class SourceTable:
    """Ids, labels and c_GLB of the encoded sources, memory-mapped (see the module docstring)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        info = json.loads((self.folder / _COMPLETE).read_text())
        self.count, self.chunk, self.token_shape = int(info["count"]), int(info["chunk"]), tuple(info["shape"])
        self.names: list[str] = json.loads((self.folder / "names.json").read_text())
        self.labels: np.ndarray = np.load(self.folder / "labels.npy", mmap_mode="r")
        self._ids: list[str] | None = None
        self._chunks: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.count

    @property
    def ids(self) -> list[str]:
        """Source ids (read on first use: only the process that writes labels.csv needs them)."""
        if self._ids is None:
            self._ids = (self.folder / "ids.txt").read_text().splitlines()
        return self._ids

    def positive(self) -> np.ndarray:
        """(N, L) bool: source i is positive (1.0) for label l, as data.image_sets.positive_matrix."""
        return np.asarray(self.labels == 1.0)

    def label_row(self, index: int) -> dict[str, float | None]:
        return {n: float(v) for n, v in zip(self.names, self.labels[index]) if not math.isnan(v)}

    def source(self, index: int) -> SourceImage:
        return SourceImage(self.ids[index], self.label_row(index))

    def c_glb(self, indices: Sequence[int]) -> torch.Tensor:
        """float32 (len(indices), S, N) for the given source indices, read from the memory-mapped chunks."""
        rows = np.empty((len(indices), *self.token_shape), np.float32)
        for n, index in enumerate(indices):
            k = int(index) // self.chunk
            if k not in self._chunks:
                self._chunks[k] = np.load(self.folder / f"c_glb-{k:06d}.npy", mmap_mode="r")
            rows[n] = self._chunks[k][int(index) - k * self.chunk]
        return torch.from_numpy(rows)

    def all_c_glb(self) -> torch.Tensor:
        """Every source's c_GLB at once (only the sampled strategy, which needs just their shape, asks)."""
        return self.c_glb(range(self.count))


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / _COMPLETE).is_file()


def write_sources(folder: str | Path, sources: Iterable[SourceImage], encode: Encoder, encode_batch: int) -> int:
    """Encode `sources` (streamed) into `folder`; returns their number. Raises FileNotFoundError when none."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / _COMPLETE).unlink(missing_ok=True)
    spool, pending, rows, count, chunk_index = folder / ".index.jsonl", [], [], 0, 0
    with open(spool, "w") as index:
        for item in sources:
            index.write(json.dumps([item.id, item.labels]) + "\n")
            pending.append(item)
            count += 1
            if len(pending) == encode_batch:
                rows.append(encode(pending).numpy())
                pending = []
            if sum(len(r) for r in rows) >= CHUNK:
                rows, chunk_index = _flush(folder, rows, chunk_index)
        if pending:
            rows.append(encode(pending).numpy())
        while rows:
            rows, chunk_index = _flush(folder, rows, chunk_index)
    if count == 0:
        spool.unlink()
        raise FileNotFoundError("no source images found")
    shape = np.load(folder / "c_glb-000000.npy", mmap_mode="r").shape[1:]
    _write_index(folder, spool, count)
    spool.unlink()
    write_bytes_atomic(folder / _COMPLETE, json.dumps({"count": count, "chunk": CHUNK, "shape": list(shape)}).encode())
    return count


def _flush(folder: Path, rows: list[np.ndarray], chunk_index: int) -> tuple[list[np.ndarray], int]:
    """Write the first CHUNK rows (or all that are left) as one c_GLB file; return the rest."""
    block = np.concatenate(rows)
    with atomic_path(folder / f"c_glb-{chunk_index:06d}.npy") as tmp, open(tmp, "wb") as handle:
        np.save(handle, block[:CHUNK].astype(np.float32), allow_pickle=False)
    rest = block[CHUNK:]
    return ([rest] if len(rest) else []), chunk_index + 1


def _write_index(folder: Path, spool: Path, count: int) -> None:
    """ids.txt, names.json and labels.npy from the spooled (id, labels) lines: two streaming passes."""
    names: set[str] = set()
    with open(spool) as lines:
        for line in lines:
            names.update(json.loads(line)[1])
    ordered = sorted(names)
    column = {n: i for i, n in enumerate(ordered)}
    with atomic_path(folder / "labels.npy") as tmp:
        labels = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(count, len(ordered)))
        labels[:] = np.nan
        with atomic_path(folder / "ids.txt") as ids_tmp, open(ids_tmp, "w") as ids, open(spool) as lines:
            for row, line in enumerate(lines):
                ident, values = json.loads(line)
                ids.write(ident + "\n")
                for name, value in values.items():
                    if value is not None:
                        labels[row, column[name]] = value
        labels.flush()
        del labels
    write_bytes_atomic(folder / "names.json", json.dumps(ordered).encode())
