"""Images with lung masks for the segmentation evaluation, preprocessed exactly as `prepare` does.

Layouts: Montgomery (CXR_png + ManualMask/leftMask|rightMask), Shenzhen (CXR_png + masks/<stem>_mask),
JSRT/SCR (found by `dinodiff.data.datasets.discover`) and any ``images/`` + ``masks/`` folder pair (a mask
named like its image, optionally with a ``_mask`` suffix, holding both lungs). Two-lung masks are split into
the patient's left and right lung.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dinodiff.data.datasets import (
    Record,
    detect_kind,
    discover,
    files_by_stem,
    images_in,
    make_id,
)
from dinodiff.data.preprocess import preprocess_image, preprocess_mask
from dinodiff.data.readers import (  # the same reading rules as the shards
    UnreadableImage,
    load_image,
    load_mask,
)
from dinodiff.evaluate.segment.metrics import split_lungs

log = logging.getLogger(__name__)
MASK_LAYOUTS = ("montgomery", "shenzhen", "jsrt")


@dataclass
class SegCase:
    """One preprocessed image (uint8, size x size) and its lungs {'left', 'right'} (bool, same size); ``subject``
    is the patient when the dataset names one (None: unknown, the image is its own subject); ``path`` the source
    file."""

    id: str
    dataset: str
    image: np.ndarray
    lungs: dict[str, np.ndarray] = field(default_factory=dict)
    subject: str | None = None
    path: str | None = None


def _folder_pairs(root: Path) -> list[Record]:
    images, masks = root / "images", root / "masks"
    by_stem = files_by_stem(masks, "_mask")
    return [Record(path=p.resolve(), id=make_id(p.name), dataset=root.name,
                   masks={"lungs": by_stem[p.stem]} if p.stem in by_stem else {})
            for p in sorted(images_in(images))]


def find_records(source: str | Path) -> list[Record]:
    """Records with at least one lung mask, from any supported layout; a clear error otherwise."""
    root = Path(source).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"segmentation data folder not found: {root}")
    kind = detect_kind(root)
    if kind in MASK_LAYOUTS:
        records = discover(root, kind)
    elif (root / "images").is_dir() and (root / "masks").is_dir():
        records = _folder_pairs(root)
    else:
        raise ValueError(f"{root}: no lung masks found. Use a Montgomery (CXR_png/ + ManualMask/), Shenzhen "
                         "(CXR_png/ + masks/), JSRT/SCR layout, or a folder with images/ and masks/ (same stems).")
    with_masks = [r for r in records if r.masks]
    if not with_masks:
        raise ValueError(f"{root}: {len(records)} images but none has a lung mask.")
    return with_masks


def load_case(record: Record, size: int, dataset: str) -> SegCase:
    """Read, preprocess (borders, centre crop, resize) and carry the masks through the same crop."""
    img, _ = load_image(record.path, "minmax")
    image, info = preprocess_image(img, size)
    masks = {name: preprocess_mask(load_mask(path, info.original_size), info) > 127
             for name, path in record.masks.items()}
    lungs = {n: m for n, m in masks.items() if n in ("left", "right") and m.any()}
    if "lungs" in masks and not lungs:
        lungs = split_lungs(masks["lungs"])
    return SegCase(record.id, dataset, image, lungs, record.subject, str(record.path))


def load_cases(source: str | Path, size: int, limit: int | None = None, name: str | None = None) -> list[SegCase]:
    """All images with lung masks under ``source`` at ``size`` px; the dataset is named after the folder."""
    records = find_records(source)[:limit]
    dataset = name or Path(source).expanduser().resolve().name
    cases = []
    for rec in records:
        try:
            case = load_case(rec, size, dataset)
        except (UnreadableImage, ValueError, OSError) as err:
            log.warning("skipping %s: %s", rec.path, getattr(err, "reason", err))
            continue
        if not any(m.any() for m in case.lungs.values()):
            log.warning("skipping %s: its lung mask is empty", rec.path)
            continue
        cases.append(case)
    if not cases:
        raise ValueError(f"{source}: no usable image with a lung mask.")
    return cases
