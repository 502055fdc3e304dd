"""Which images a model was fitted to: an encoder folder's `training_images.json` (written by `pretrain-encoder`),
and the prepared image sets behind a diffusion model folder (`model_training_sources`).

A probe or retrieval measured on images the encoder trained on is transductive (DESIGN.md, protocol rules), so
`probe-encoder` must know them. The record lists, for every image the run loaded (its weights and its
normalisation statistics come from them), the prepared sample id, the source file it was prepared from and
the subject (patient) when known. A probe image counts as seen when any of the three matches: ids differ
between two `prepare` runs of the same files (a multi-source run prefixes them), source paths do not.

The record travels with the encoder: `GlobalTokenEncoder.save_pretrained` writes it back beside the weights
(e.g. into a diffusion model folder's `image_encoder/`), and `load_encoder` reads it. A folder without it
(a hub model) is *unknown*: nothing says which images it saw.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from dinodiff.data.cached import read_cache_info
from dinodiff.data.fingerprints import find_in_prepared, fingerprints
from dinodiff.data.shards import list_shards
from dinodiff.files import write_json_atomic
from dinodiff.runs import run_config

logger = logging.getLogger(__name__)

TRAINING_IMAGES_FILE = "training_images.json"
KIND = "dinodiff-encoder-training-images"


@dataclass
class TrainingImages:
    """The images an encoder was fitted to: parallel lists of prepared ids, source paths and subjects."""

    ids: tuple[str, ...] = ()
    paths: tuple[str | None, ...] = ()
    subjects: tuple[str | None, ...] = ()
    shards: str | None = None  # the prepared folder they were read from
    split: str | None = None  # its split (None: every split)
    step: int = 0  # training steps behind the weights (0: initialisation; the statistics still come from them)
    _sets: dict[str, frozenset[str]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.ids, self.paths, self.subjects = tuple(self.ids), tuple(self.paths), tuple(self.subjects)
        if not (len(self.ids) == len(self.paths) == len(self.subjects)):
            raise ValueError("TrainingImages: ids, paths and subjects must have one entry per image.")
        self._sets = {"ids": frozenset(self.ids), "paths": frozenset(p for p in self.paths if p),
                      "subjects": frozenset(s for s in self.subjects if s)}

    @property
    def count(self) -> int:
        return len(self.ids)

    def seen(self, ident: str, path: str | None = None, subject: str | None = None) -> bool:
        """True when an image with this id, source path or subject is among the training images."""
        return (ident in self._sets["ids"] or (path is not None and path in self._sets["paths"])
                or (subject is not None and subject in self._sets["subjects"]))

    def to_json(self) -> dict[str, Any]:
        return {"kind": KIND, "count": self.count, "shards": self.shards, "split": self.split, "step": self.step,
                "ids": list(self.ids), "paths": list(self.paths), "subjects": list(self.subjects)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainingImages":
        if data.get("kind") != KIND:
            raise ValueError(f"not a {TRAINING_IMAGES_FILE} record (kind {data.get('kind')!r}).")
        ids = tuple(str(i) for i in data["ids"])
        return cls(ids=ids, paths=tuple(data.get("paths") or [None] * len(ids)),
                   subjects=tuple(data.get("subjects") or [None] * len(ids)), shards=data.get("shards"),
                   split=data.get("split"), step=int(data.get("step", 0)))


def read_training_images(folder: str | Path) -> TrainingImages | None:
    """The record of an encoder folder, or None (a hub id, or a folder written without one)."""
    path = Path(folder) / TRAINING_IMAGES_FILE
    if not path.is_file():
        return None
    return TrainingImages.from_json(json.loads(path.read_text()))


def write_training_images(folder: str | Path, record: TrainingImages) -> Path:
    path = Path(folder) / TRAINING_IMAGES_FILE
    write_json_atomic(path, record.to_json(), indent=1)
    return path


@dataclass(frozen=True)
class TrainingSource:
    """A prepared image set (a `dinodiff prepare` folder and its split; None = every split) a model was fitted to,
    and which part of the model it trained (``what``)."""

    shards: str
    split: str | None
    what: str


def model_training_sources(model_folder: str | Path) -> tuple[list[TrainingSource], list[str]]:
    """The image sets behind a diffusion model folder, and a line for each part whose training images are unknown.

    The UNet: the run's config.yaml (the folder lies in RUN/checkpoints/checkpoint-N/ or RUN/best/): the latent
    cache's source folder (cache.json) when data.cache is set, else data.shards, its train split (what `cache` and
    the trainer read). The encoder: the record in ``image_encoder/training_images.json``; a random encoder saw none.
    """
    folder = Path(model_folder)
    sources, unknown = [], []
    config = run_config(folder)
    data = OmegaConf.select(OmegaConf.load(config), "data") if config else None
    shards = None
    if data is not None and data.get("cache") and Path(data.cache).is_dir():
        shards = read_cache_info(data.cache).get("source_shards")
    elif data is not None and data.get("shards") and Path(data.shards).is_dir():
        shards = str(data.shards)
    if shards and Path(shards).is_dir():
        split = "train" if list_shards(shards, "train") else None
        sources.append(TrainingSource(str(Path(shards).resolve()), split, f"UNet (run {config.parent})"))
    else:
        why = (f"no run config.yaml above {folder}" if config is None
               else f"the run {config.parent} names no prepared folder or cache on this disk")
        unknown.append(f"the UNet's ({why})")
    record = read_training_images(folder / "image_encoder")
    model_config = folder / "model_config.yaml"
    encoder_name = str(OmegaConf.select(OmegaConf.load(model_config), "encoder.name_or_path") or "") \
        if model_config.is_file() else ""
    if record is not None and record.shards and Path(record.shards).is_dir():
        sources.append(TrainingSource(str(Path(record.shards).resolve()), record.split,
                                      "encoder (training_images.json)"))
    elif not encoder_name.startswith("random:"):
        why = ("its training_images.json names a folder not on this disk" if record is not None
               else "no training_images.json in image_encoder/")
        unknown.append(f"the encoder's ({why})")
    return sources, unknown


@dataclass
class Overlap:
    """Which evaluation images are among the training images of the models evaluated: index -> why."""

    seen: dict[int, str]
    sources: list[TrainingSource]
    unknown: list[str]  # parts of a model whose training images could not be checked

    def statement(self, total: int) -> str:
        checked = ", ".join(sorted({f"{s.shards} ({s.split or 'every split'})" for s in self.sources})) or "none"
        text = (f"{len(self.seen)} of {total} evaluation images are training images of the model (the same picture, "
                f"by content fingerprint, or the same source file); training sets checked: {checked}")
        return text + (f". Not checked, training images unknown: {'; '.join(self.unknown)}" if self.unknown else "")


def find_overlap(images: Sequence[np.ndarray], paths: Sequence[str | None], model_folders: Sequence[str | Path],
                 cache_dir: str | Path | None = None) -> Overlap:
    """The evaluation images (prepared uint8 arrays, with their source files when known) that any of the model
    folders trained on, UNet or encoder; each training set is read and fingerprinted once (and its fingerprints
    kept in ``cache_dir`` for the next call, when given)."""
    sources, unknown = [], []
    for folder in model_folders:
        found, missing = model_training_sources(folder)
        sources += [s for s in found if s not in sources]
        unknown += [f"{Path(folder).name}: {line}" for line in missing if f"{Path(folder).name}: {line}" not in unknown]
    queries = fingerprints(images)
    seen: dict[int, str] = {}
    for shards, split in dict.fromkeys((s.shards, s.split) for s in sources):
        found, count = find_in_prepared(queries, paths, shards, split, cache_dir)
        logger.info("checked %d evaluation images against %d training images of %s", len(queries), count, shards)
        for index, why in enumerate(found):
            if why is not None and index not in seen:
                seen[index] = f"{why} in {shards}"
    return Overlap(seen, sources, unknown)
