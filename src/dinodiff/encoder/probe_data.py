"""The probe's images: labelled sources, and which of them an encoder trained on (then left out by default).

A probe measured on images the encoder trained on is transductive (DESIGN.md, protocol rules). Each encoder
folder written by `pretrain-encoder` records its training images (dinodiff.models.training_images); a probe
image counts as seen by that encoder when its prepared id, its source file or its subject (patient) matches
one of them. By default the probe keeps only the images that *no* probed encoder with a record has seen,
and probes every encoder (random baselines included) on those same images, so comparisons stay paired. An
encoder without a record (a hub model, a folder from elsewhere) cannot be checked: its numbers are labelled
unknown. With `transductive=True` every image is kept and each encoder's numbers say how many it had seen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from dinodiff.data.image_sets import iter_sources
from dinodiff.data.subjects import subject_key
from dinodiff.models.training_images import TrainingImages

logger = logging.getLogger(__name__)

HELD_OUT, TRANSDUCTIVE, UNKNOWN = "held-out", "transductive", "unknown"


class NoHeldOutImages(ValueError):
    """Every probe image was seen in pretraining by a probed encoder; the message says what to do."""


@dataclass
class ProbeImages:
    ids: list[str]
    images: torch.Tensor  # uint8 (N, 1, S, S)
    labels: dict[str, np.ndarray]  # name -> (N,) float: 1 / 0 / nan (missing or uncertain)
    paths: list[str | None] | None = None  # source files, when known
    subjects: list[str | None] | None = None  # patients, when known

    def __post_init__(self) -> None:
        self.paths = self.paths or [None] * len(self.ids)
        self.subjects = self.subjects or [None] * len(self.ids)

    def subset(self, keep: np.ndarray) -> "ProbeImages":
        index = np.flatnonzero(keep)
        pick = lambda values: [values[i] for i in index]  # noqa: E731
        return replace(self, ids=pick(self.ids), images=self.images[torch.from_numpy(index)],
                       labels={k: v[index] for k, v in self.labels.items()}, paths=pick(self.paths),
                       subjects=pick(self.subjects))

    def groups(self) -> np.ndarray:
        """Cross-validation groups: the subject when known, else the image itself (dinodiff.data.subjects)."""
        return np.array([subject_key(i, s) for i, s in zip(self.ids, self.subjects)])


def load_probe_images(sources: list[str | Path], size: int, label_columns: list[str] | None = None) -> ProbeImages:
    """Images, labels, source files and subjects of prepared shards, labelled CSVs or dataset folders.

    label_columns: for a CSV, the columns to read labels from (a text column such as `finding` becomes one
    0/1 label per value); None = the CSV's 0/1 columns."""
    items = []
    for src in sources:
        options = {"label_columns": label_columns} if label_columns and str(src).endswith(".csv") else {}
        items.extend(iter_sources(src, size=size, **options))
    if not items:
        raise FileNotFoundError(f"No images in {[str(s) for s in sources]}; give prepared shards or a labelled CSV.")
    names = sorted({n for it in items for n in it.labels})
    labels = {n: np.array([_binary(it.labels.get(n)) for it in items], dtype=float) for n in names}
    images = torch.from_numpy(np.stack([it.image for it in items]))[:, None]
    return ProbeImages([it.id for it in items], images, labels, [it.path for it in items],
                       [it.subject for it in items])


def _binary(value: float | None) -> float:
    return float(value) if value in (0.0, 1.0) else float("nan")


def seen_mask(data: ProbeImages, record: TrainingImages) -> np.ndarray:
    """(N,) bool: the probe images whose id, source file or subject is among the record's training images."""
    return np.array([record.seen(i, p, s) for i, p, s in zip(data.ids, data.paths, data.subjects)], dtype=bool)


@dataclass
class ProbeSelection:
    """Which loaded images are probed, and what each encoder saw of them (None: unknown, no record)."""

    keep: np.ndarray  # (N,) bool over the loaded images
    seen: dict[str, np.ndarray | None]  # encoder -> (N,) bool over the loaded images
    transductive: bool

    def protocol(self, name: str) -> tuple[str, int | None]:
        """(held-out | transductive | unknown, how many probed images this encoder trained on)."""
        seen = self.seen[name]
        if seen is None:
            return UNKNOWN, None
        count = int((seen & self.keep).sum())
        return (TRANSDUCTIVE if count else HELD_OUT), count

    def statement(self) -> str:
        """One line for the table and results.json, e.g. 'probe images: 64, none seen in pretraining'."""
        n, loaded = int(self.keep.sum()), len(self.keep)
        known = [k for k, v in self.seen.items() if v is not None]
        unknown = [k for k, v in self.seen.items() if v is None]
        if self.transductive:
            counts = [f"{k} trained on {self.protocol(k)[1]}" for k in known if self.protocol(k)[1]]
            text = (f"probe images: {n}, TRANSDUCTIVE (asked for): {'; '.join(counts)} of them" if counts
                    else f"probe images: {n}, none seen in pretraining (transductive asked for, not needed)")
        elif known:
            text = f"probe images: {n}, none seen in pretraining"
            if loaded > n:
                text += f" ({loaded - n} of {loaded} left out: seen by {', '.join(self._seers())})"
        else:
            text = f"probe images: {n}"
        if unknown:
            text += f"; unknown whether {', '.join(unknown)} saw them (no training record: labelled unknown)"
        return text

    def _seers(self) -> list[str]:
        return [k for k, v in self.seen.items() if v is not None and bool(v.any())]


def select_probe_images(data: ProbeImages, records: dict[str, TrainingImages | None],
                        transductive: bool = False) -> ProbeSelection:
    """Keep the images no encoder with a record trained on (all of them when transductive)."""
    seen = {name: None if rec is None else seen_mask(data, rec) for name, rec in records.items()}
    keep = np.ones(len(data.ids), dtype=bool)
    if not transductive:
        for mask in seen.values():
            if mask is not None:
                keep &= ~mask
    selection = ProbeSelection(keep, seen, transductive)
    if not keep.any():
        raise NoHeldOutImages(
            f"All {len(keep)} probe images were seen in pretraining by {', '.join(selection._seers())}. Probe on "
            "labelled images they did not train on (e.g. pretrain with data.split=train on a prepared folder "
            "with a test split, then probe that folder: its test split is what is left), or pass --transductive "
            "to probe these anyway, labelled transductive.")
    logger.info("%s", selection.statement())
    return selection
