"""The real-image cache's index, compact: the ids, subjects, positives and split of every cached image as arrays.

As Python lists (and the JSON that held them) the index took ~1.4 KB per image (130 MB at 100k images). Here the
ids are one UTF-8 buffer with offsets, the subjects codes into a table of the distinct ones (or into the ids, for an
image that is its own subject), the positives a uint8
matrix and the split codes: tens of bytes per image. They are saved with np.savez and read back without pickle.
"""

from __future__ import annotations

import operator
from array import array
from collections.abc import Iterable, Iterator, Sequence
from itertools import pairwise, repeat
from pathlib import Path

import numpy as np

from dinodiff.files import atomic_path

SPLITS = ("train", "test", "excluded")  # the split codes' names (split.EXCLUDED is the third)
CHUNK = 4096  # strings decoded per step when iterating


class _CompactStrings(Sequence[str]):
    """What Strings and Coded share: indexing and slicing as a list's, and equality with a list of the same
    strings (the list they replace); a subclass gives `_item(i)` for 0 <= i < len."""

    def _item(self, i: int) -> str:
        raise NotImplementedError

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = operator.index(i)
        i = i + len(self) if i < 0 else i
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} strings")
        return self._item(i)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(other) == len(self) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment] - mutable arrays inside, as a list


class Strings(_CompactStrings):
    """Strings held as one UTF-8 buffer and (n + 1) offsets: ~8 bytes each beyond the text (a str object: ~50)."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        self.data, self.offsets = data, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _item(self, i: int) -> str:
        return self.data[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        data = self.data.tobytes()
        for start in range(0, len(self), CHUNK):  # the offsets as Python ints a chunk at a time (36 bytes each)
            for a, b in pairwise(self.offsets[start:start + CHUNK + 1].tolist()):
                yield data[a:b].decode("utf-8")

    @classmethod
    def of(cls, strings: Iterable[str]) -> Strings:
        builder = StringsBuilder()
        for s in strings:
            builder.append(s)
        return builder.build()


class StringsBuilder:
    """Strings appended one at a time into a growing buffer (no str object kept)."""

    def __init__(self) -> None:
        self.data, self.offsets = bytearray(), array("q", [0])

    def append(self, s: str) -> None:
        self.data += s.encode("utf-8")
        self.offsets.append(len(self.data))

    def build(self) -> Strings:
        return Strings(np.frombuffer(self.data, dtype=np.uint8), np.frombuffer(self.offsets, dtype=np.int64))


class Coded(_CompactStrings):
    """Strings as int32 codes into a table of the distinct ones (the subjects: a patient has several images);
    code -1: the string at the same position of `own` (an image that is its own subject: its id)."""

    def __init__(self, codes: np.ndarray, table: Strings, own: Sequence[str] | None = None):
        self.codes, self.table, self.own = codes, table, own

    def __len__(self) -> int:
        return len(self.codes)

    def _item(self, i: int) -> str:
        code = int(self.codes[i])
        return self.table[code] if code >= 0 else self.own[i]

    def __iter__(self) -> Iterator[str]:
        table = list(self.table)  # the distinct strings only
        own = iter(self.own) if self.own is not None and (self.codes < 0).any() else repeat(None)
        for start in range(0, len(self), CHUNK):
            for c, o in zip(self.codes[start:start + CHUNK].tolist(), own):
                yield table[c] if c >= 0 else o


class Positives:
    """The positive (== 1.0) labels of images added one at a time: one byte per image and label name."""

    def __init__(self) -> None:
        self.columns: dict[str, bytearray] = {}
        self.count = 0

    def add(self, labels: dict[str, float | None]) -> None:
        for name in labels.keys() - self.columns.keys():  # a name first seen now: negative for the images before
            self.columns[name] = bytearray(self.count)
        for name, column in self.columns.items():
            column.append(labels.get(name) == 1.0)
        self.count += 1

    def matrix(self) -> tuple[list[str], np.ndarray]:
        """(sorted names, (N, L) bool)."""
        names = sorted(self.columns)
        out = np.zeros((self.count, len(names)), dtype=bool)
        for j, name in enumerate(names):
            out[:, j] = np.frombuffer(self.columns[name], dtype=np.uint8)
        return names, out


def save_index(path: Path, ids: Strings, subjects: Coded, positive: np.ndarray, split: np.ndarray) -> None:
    """The arrays of the index (split: names in SPLITS) into one .npz, written atomically."""
    codes = {name: i for i, name in enumerate(SPLITS)}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, ids_data=ids.data, ids_offsets=ids.offsets, subject_codes=subjects.codes,
                 subject_data=subjects.table.data, subject_offsets=subjects.table.offsets,
                 positive=positive.astype(np.uint8), split=np.array([codes[s] for s in split], dtype=np.int8))


def load_index(path: Path) -> tuple[Strings, Coded, np.ndarray, np.ndarray]:
    """(ids, subjects, (N, L) bool positives, split names) as save_index wrote them; no pickle is read."""
    with np.load(path, allow_pickle=False) as f:
        ids = Strings(f["ids_data"], f["ids_offsets"])
        subjects = Coded(f["subject_codes"], Strings(f["subject_data"], f["subject_offsets"]), own=ids)
        return ids, subjects, f["positive"].astype(bool), np.array(SPLITS)[f["split"]]
