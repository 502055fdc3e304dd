"""Label-balanced, nested training subsets (the paper's regimes), their cross-validation folds and the
count-matched controls.

Balance and nesting (DiNO-Diffusion, Section 4.3, "Classification"): every regime draws n/|L| images per
label, without replacement, and each regime's subset lies inside the next larger one. Both follow from one
draw: a seeded round robin over the labels, each turn taking the next not-yet-taken image from a seeded
permutation of that label's positives. The subset of regime n is the first n draws, so it holds n/|L|
images drawn for each label and every smaller regime is its prefix.

Repeated cross-validation: a regime's subset is drawn once (subset_seed); each repetition seed re-draws its
folds (stratified by the drawn-for stratum, grouped by subject), saved as ``nN-sSEED.csv``.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from dinodiff.files import write_bytes_atomic

logger = logging.getLogger(__name__)

NONE_STRATUM = "(none)"


class SubsetTooLarge(ValueError):
    """A regime needs more positives of a label than the pool holds."""


def balanced_draw(positive: np.ndarray, names: Sequence[str], n: int, seed: int,
                  balance_none: bool = False) -> tuple[np.ndarray, list[str]]:
    """The first `n` draws of the seeded round robin: (row indices, the stratum each was drawn for).

    positive: (N, L) bool over `names`. balance_none adds a stratum of images positive for no label.
    """
    strata = [positive[:, j] for j in range(positive.shape[1])]
    names = list(names)
    if balance_none:
        strata.append(~positive.any(axis=1))
        names.append(NONE_STRATUM)
    k = len(strata)
    if n % k:
        logger.warning("regime %d is not a multiple of %d strata: the first %d strata get one more image", n, k, n % k)
    rng = np.random.default_rng(seed)
    queues = [rng.permutation(np.flatnonzero(s)) for s in strata]
    heads = [0] * k
    taken: set[int] = set()
    rows, drawn_for = [], []
    for turn in range(n):
        j = turn % k
        queue = queues[j]
        while heads[j] < len(queue) and int(queue[heads[j]]) in taken:
            heads[j] += 1
        if heads[j] == len(queue):
            need = -(-n // k)
            raise SubsetTooLarge(f"regime n={n} needs {need} images for stratum {names[j]!r}, but the pool has only "
                                 f"{int(strata[j].sum())} positives (some already drawn for other labels); "
                                 "use smaller regimes or fewer labels.")
        row = int(queue[heads[j]])
        taken.add(row)
        rows.append(row)
        drawn_for.append(names[j])
    return np.array(rows, dtype=np.int64), drawn_for


def make_folds(strata: Sequence[str], subjects: Sequence[str], folds: int, seed: int) -> np.ndarray:
    """Fold index per image: stratified by the drawn-for stratum, and no subject in two folds."""
    if len(set(subjects)) < folds:
        raise ValueError(f"{len(set(subjects))} subjects cannot fill {folds} folds; use a larger regime or fewer folds.")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    out = np.full(len(strata), -1, dtype=np.int64)
    for fold, (_, held) in enumerate(splitter.split(np.zeros(len(strata)), list(strata), list(subjects))):
        out[held] = fold
    return out


def count_matched(train_rows: np.ndarray, total: int) -> np.ndarray:
    """A control: the real training rows repeated in order until there are `total` (each used floor/ceil times):
    (1 + r) n for the augmentation control, r n for the full-synthetic control (control-full)."""
    if len(train_rows) == 0:
        raise ValueError("the control needs at least one real training image")
    return np.resize(np.asarray(train_rows), total)


@dataclass(frozen=True)
class Subset:
    """One regime's images under one repetition seed: rows (in the real cache), drawn-for stratum, subject, fold."""

    rows: np.ndarray
    drawn_for: list[str]
    subjects: list[str]
    folds: np.ndarray

    def split(self, fold: int) -> tuple[np.ndarray, np.ndarray]:
        """(training rows, validation rows) of `fold`: train on the other folds, early-stop on this one."""
        return self.rows[self.folds != fold], self.rows[self.folds == fold]


def subset_path(folder: Path, regime: int, seed: int) -> Path:
    return Path(folder) / f"n{regime}-s{seed}.csv"


def write_subset(path: Path, ids: Sequence[str], subset: Subset) -> None:
    """CSV of one regime and repetition: id, row (in the real cache), drawn_for, subject, fold."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "row", "drawn_for", "subject", "fold"])
    for row, stratum, subject, fold in zip(subset.rows, subset.drawn_for, subset.subjects, subset.folds):
        writer.writerow([ids[row], int(row), stratum, subject, int(fold)])
    write_bytes_atomic(path, buffer.getvalue().encode())


def read_subset(path: Path) -> Subset:
    with open(path, newline="") as f:
        table = list(csv.DictReader(f))
    return Subset(np.array([int(r["row"]) for r in table], dtype=np.int64), [r["drawn_for"] for r in table],
                  [r["subject"] for r in table], np.array([int(r["fold"]) for r in table], dtype=np.int64))


def build_subsets(folder: Path, ids: Sequence[str], positive: np.ndarray, names: Sequence[str], regimes: Sequence[int],
                  pool: np.ndarray, subjects: Sequence[str], *, subset_seed: int, seeds: Sequence[int], folds: int,
                  balance_none: bool = False) -> dict[tuple[int, int], Path]:
    """Write (or keep) `folder/nN-sSEED.csv` for every regime and repetition seed; returns (regime, seed) -> path.

    `ids`/`positive` ((N, L) over `names`)/`subjects` describe every cached real image; `pool` holds the rows
    that may be drawn (the training pool: test images excluded). The draw depends on `subset_seed` only, the
    folds on the repetition seed. Existing CSVs are kept, so every experiment of a grid, and every rerun, uses
    exactly the same images and folds.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for n in sorted(regimes):
        drawn = None
        for seed in seeds:
            path = subset_path(folder, n, seed)
            if not path.is_file():
                if drawn is None:
                    drawn = balanced_draw(positive[pool], names, n, subset_seed, balance_none)
                rows = np.asarray(pool)[drawn[0]]
                own = [subjects[r] for r in rows]
                write_subset(path, ids, Subset(rows, drawn[1], own, make_folds(drawn[1], own, folds, seed)))
            paths[(n, seed)] = path
    return paths
