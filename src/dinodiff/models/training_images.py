"""Which images an encoder folder was fitted to: `training_images.json`, written by `pretrain-encoder`.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dinodiff.files import write_json_atomic

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
