"""Real chest X-rays for the audit tests: cxr-covid at 64 px, prepared shards with patients, disguised copies."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinodiff.data.shards import encode_png, shard_path, write_shard
from dinodiff.data.image_sets import SourceImage, iter_sources

SIZE = 64
# cxr-covid publishes one patient's series twice: eurorad 16660_{2..5}_1 = radiopaedia
# covid-19-rapidly-progressive-acute-respiratory-distress-syndrome-ards-{admission, day-1..3} (registered pixel
# distance ~0.05, against >= 2.5 for every pair of different patients): one patient, two near-identical images each
TWIN_PATIENT = "16660"


def subject(image_id: str, urls: dict[str, str]) -> str:
    """The patient: the case page (url) of metadata.csv, the twice-published patient named once."""
    if "16660" in image_id or "rapidly-progressive-acute-respiratory-distress-syndrome-ards" in image_id:
        return TWIN_PATIENT
    return urls.get(image_id.split("__", 1)[-1], image_id)


@pytest.fixture(scope="session")
def cxr(shared_data) -> list[SourceImage]:
    """cxr-covid at 64 px, each image with its patient (twins first, then the others in id order)."""
    with (shared_data / "cxr-covid" / "metadata.csv").open(newline="") as handle:
        urls = {Path(r["filename"]).stem: r["url"] for r in csv.DictReader(handle)}
    items = list(iter_sources(shared_data / "cxr-covid", size=SIZE))
    for item in items:
        item.subject = subject(item.id, urls)
    twins = [s for s in items if s.subject == TWIN_PATIENT]
    return twins + [s for s in items if s.subject != TWIN_PATIENT]


def write_prepared(folder: Path, train: list[SourceImage], test: list[SourceImage], subjects: bool = True) -> Path:
    """Shards as `prepare` writes them: the metadata names each image's patient (`subject`)."""
    for split, items in (("train", train), ("test", test)):
        if items:
            write_shard(shard_path(folder, split, 0), [
                {"__key__": s.id, "png": encode_png(s.image),
                 "json": {"split": split, **({"subject": s.subject} if subjects else {})}} for s in items])
    return folder


def write_synthetic(folder: Path, images: list[np.ndarray], strategy: str, sources: list[str] | None = None) -> Path:
    """A dataset laid out as `dinodiff generate` writes it (labels.csv with source_a, provenance.json)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = ["path,strategy,source_a,source_b,r,seed"]
    for i, image in enumerate(images):
        (folder / "images" / f"{i:07d}.png").write_bytes(encode_png(image))
        rows.append(f"images/{i:07d}.png,{strategy},{sources[i] if sources else ''},,,0")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    (folder / "provenance.json").write_text(json.dumps({"settings": {"strategy": strategy, "ratio": 1}}))
    return folder


def disguise(image: np.ndarray, angle: float = 0.0, zoom: float = 1.0, shift: tuple[float, float] = (0.0, 0.0),
             gamma: float = 1.0, contrast: float = 1.0, jpeg: int | None = None) -> np.ndarray:
    """A copy as it may come back: rotated (degrees), zoomed about the centre, shifted (fractions of the side),
    black where the frame moved in, then gamma, contrast about mid-grey (clipped) and JPEG at that quality."""
    pil, n = Image.fromarray(image), image.shape[0]
    a = math.radians(angle)
    inverse = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]]) / zoom  # output -> input
    centre = np.array([n / 2, n / 2])
    offset = centre - inverse @ (centre + np.array(shift) * n)
    moved = pil.transform(pil.size, Image.Transform.AFFINE, (*inverse[0], offset[0], *inverse[1], offset[1]),
                          resample=Image.Resampling.BILINEAR, fillcolor=0)
    x = np.asarray(moved, np.float64) / 255.0
    x = np.clip((x ** gamma - 0.5) * contrast + 0.5, 0.0, 1.0)
    out = np.round(x * 255).astype(np.uint8)
    if jpeg is None:
        return out
    buffer = io.BytesIO()
    Image.fromarray(out).save(buffer, format="JPEG", quality=jpeg)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L"))


# One disguise per kind, drawn per copy: each kind alone, then combined (the brief's ranges: rotation up to 6 deg,
# zoom 0.9-1.1, shift 5%, gamma and contrast changes, JPEG)
DISGUISES = {
    "rotate": lambda r: {"angle": r.choice([-1, 1]) * r.uniform(3, 6)},
    "zoom": lambda r: {"zoom": r.choice([0.9, 0.93, 1.07, 1.1])},
    "shift": lambda r: {"shift": (r.choice([-0.05, 0.05]), r.choice([-0.05, 0.0, 0.05]))},
    "gamma": lambda r: {"gamma": r.choice([0.6, 0.75, 1.4, 1.6])},
    "contrast": lambda r: {"contrast": r.choice([0.7, 0.8, 1.2, 1.3])},
    "jpeg": lambda r: {"jpeg": int(r.integers(30, 61))},
    "geometric": lambda r: {"angle": r.uniform(-6, 6), "zoom": r.uniform(0.9, 1.1),
                            "shift": tuple(r.uniform(-0.05, 0.05, size=2))},
    "photometric": lambda r: {"gamma": float(np.exp(r.uniform(-0.5, 0.5))), "contrast": r.uniform(0.75, 1.3),
                              "jpeg": int(r.integers(30, 80))},
    "all": lambda r: {**DISGUISES["geometric"](r), **DISGUISES["photometric"](r)},
}
COPIES = 12  # per disguise ("all": twice as many)


@pytest.fixture(scope="session")
def cxr_audit(cxr, tmp_path_factory) -> dict:
    """One audit of real CXRs: 151 training images (one patient twice published), 60 held out, 60 unrelated,
    12-24 disguised copies per disguise, and a reconstruction set (copies of twin and other sources, plus
    unrelated images as variations). Returns the results and the sets."""
    from dinodiff.evaluate.audit import AuditSettings, audit

    root = tmp_path_factory.mktemp("cxr-audit")
    train, holdout, unrelated = cxr[:151], cxr[151:211], cxr[211:271]
    prep = write_prepared(root / "prep", train, holdout)
    rng = np.random.default_rng(0)
    folders = [write_synthetic(root / name, [disguise(s.image, **make(rng)) for s in
                                             train[12:12 + COPIES * (2 if name == "all" else 1)]], name)
               for name, make in DISGUISES.items()]
    folders.append(write_synthetic(root / "unrelated", [s.image for s in unrelated], "unrelated"))
    twins = [s for s in train if s.subject == TWIN_PATIENT][:4]
    copied, others = twins + train[40:44], train[44:48]  # 8 sources copied (JPEG q50), 4 given unrelated images
    recon = [disguise(s.image, jpeg=50) for s in copied] + [s.image for s in unrelated[:4]]
    folders.append(write_synthetic(root / "reconstruction", recon, "reconstruction", [s.id for s in copied + others]))
    settings = AuditSettings(train=str(prep), size=SIZE, spaces=["pixels", "xrv"], pairs=4)
    results = audit(folders, root / "out", settings)
    return {"results": results, "out": root / "out", "train": train, "holdout": holdout, "copied": len(copied),
            "prep": prep, "root": root}


def row(results: dict, dataset: str, space: str = "pixels") -> dict:
    rows = results.tables["dcr"] + results.tables["dcr_reconstruction"]
    return next(r for r in rows if r["dataset"] == dataset and r["space"] == space)
