"""`dinodiff audit SYN... --train PREP`: nearest-real-training-image privacy audit of synthetic datasets.

For every synthetic image and every available feature space: its DCR to the training set, read against two real
references (held-out -> train, train -> other train; see stats.py), the fraction below the references' 5th
percentile, near-copy flags and, for reconstruction, per-source memorisation. Results per dataset (= strategy and
ratio, from provenance.json); reconstruction is reported apart, since it conditions on a patient's own embedding.
Outputs in OUT: results.json (``kind: audit``), audit.md, closest-pairs.png and dcr.png.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dinodiff.evaluate.audit import stats
from dinodiff.evaluate.audit.data import ImageSet, load_real, load_synthetic, strategy_and_ratio
from dinodiff.evaluate.audit.report import write_outputs
from dinodiff.evaluate.audit.spaces import (FeatureSpace, find_encoder, encoder_space, pixel_space, rad_dino_space,
                                            xrv_space)

logger = logging.getLogger(__name__)


@dataclass
class AuditSettings:
    """What the audit reads and how (saved under results.json's provenance)."""

    train: str
    holdout: str | None = None  # real images never trained on; default: the train folder's test split, if any
    train_split: str = "train"
    holdout_split: str = "test"
    model: str | None = None  # pipeline model folder whose image_encoder/ gives the c_glb space
    encoder: str | None = None  # or an encoder folder directly
    xrv_weights: str | None = None
    size: int = 128  # images are compared at this resolution
    limit: int | None = None  # at most this many images per set
    pairs: int = 8  # closest synthetic/real pairs drawn per dataset in the grid
    spaces: list[str] = field(default_factory=lambda: ["pixels", "c_glb", "xrv", "rad-dino"])


@dataclass
class Space:
    space: FeatureSpace
    train: np.ndarray
    holdout: np.ndarray | None = None
    references: dict[str, np.ndarray] = field(default_factory=dict)
    train_ids: list[str] = field(default_factory=list)


def build_spaces(settings: AuditSettings, model: str | None) -> tuple[list[FeatureSpace], dict[str, str]]:
    """The available feature spaces, and a status line for every requested one."""
    found, status = [], {}
    for name in settings.spaces:
        if name == "pixels":
            space, why = pixel_space(), "available"
        elif name == "c_glb":
            encoder, why = find_encoder(settings.encoder, settings.model or model)
            space = encoder_space(encoder) if encoder is not None else None
        elif name == "xrv":
            space, why = xrv_space(settings.xrv_weights)
        elif name == "rad-dino":
            space, why = rad_dino_space()
        else:
            raise ValueError(f"Unknown feature space {name!r}; use pixels, c_glb, xrv or rad-dino.")
        status[name] = why if space is None else f"available ({why})" if why != "available" else why
        if space is not None:
            found.append(space)
    return found, status


def reference_space(space: FeatureSpace, train: ImageSet, holdout: ImageSet | None) -> Space:
    """Features of the real sets and the two calibration references in one space."""
    space.fit(space.features(train.images))
    views = space.views(train.images)
    result = Space(space, views[0], train_ids=list(train.ids))
    result.references["train->train"] = stats.train_self_dcr_views(views, views[0], train.patients)[0]
    if holdout is not None:
        held = space.views(holdout.images)
        result.holdout = held[0]
        result.references["holdout->train"] = stats.dcr_views(held, views[0])[0]
    return result


def primary_reference(space: Space) -> tuple[str, np.ndarray]:
    """holdout -> train when there is a held-out set (it is how unseen real images look), else train -> train."""
    name = "holdout->train" if "holdout->train" in space.references else "train->train"
    return name, space.references[name]


def dataset_rows(synthetic: ImageSet, spaces: list[Space]) -> tuple[list[dict], dict[str, np.ndarray]]:
    """One row per feature space for a synthetic dataset, and its DCR / nearest-train index per space."""
    strategy, ratio = strategy_and_ratio(synthetic)
    rows, found = [], {}
    for sp in spaces:
        d, index = stats.dcr_views(sp.space.views(synthetic.images), sp.train)
        found[sp.space.name], found[sp.space.name + ":index"] = d, index
        ref_name, ref = primary_reference(sp)
        cal = stats.calibration(ref)
        row = {"dataset": Path(synthetic.name).name, "strategy": strategy, "ratio": ratio, "space": sp.space.name,
               **{f"dcr_{k}": v for k, v in stats.distribution(d).items()}, "reference": ref_name,
               "reference_p5": cal["p5"], "below_reference_p5": stats.fraction_below(d, cal["p5"]),
               "copy_threshold": cal["copy_threshold"], "flagged_copies": stats.fraction_below(d, cal["copy_threshold"])}
        for name, values in sp.references.items():
            row[f"below_p5[{name}]"] = stats.fraction_below(d, stats.quantile(values, stats.REFERENCE_QUANTILE))
        rows.append(row)
    return rows, found


def memorisation_rows(synthetic: ImageSet, spaces: list[Space], sources: ImageSet) -> list[dict]:
    """Reconstruction: per source, is one of its variations nearer it than its nearest real neighbour is?"""
    position = {sid: i for i, sid in enumerate(sources.ids)}
    keep = [i for i, r in enumerate(synthetic.rows) if r.get("source_a") in position]
    if not keep:
        return []
    source_of = np.array([position[synthetic.rows[i]["source_a"]] for i in keep])
    used = np.unique(source_of)
    strategy, ratio = strategy_and_ratio(synthetic)
    rows = []
    for sp in spaces:
        source_feats = sp.space.features(sources.images[used])
        neighbour = _nearest_other(source_feats, [sources.ids[u] for u in used], sp)
        syn = sp.space.features(synthetic.images[keep])
        local = np.searchsorted(used, source_of)
        own = np.linalg.norm(syn - source_feats[local], axis=1)
        result = stats.memorisation(own, local, neighbour)
        rows.append({"dataset": Path(synthetic.name).name, "strategy": strategy, "ratio": ratio,
                     "space": sp.space.name, **{k: v for k, v in result.items() if k != "ratios"}})
    return rows


def _nearest_other(source_feats: np.ndarray, source_ids: list[str], sp: Space) -> np.ndarray:
    """Each source's distance to its nearest real training image other than itself."""
    d = stats.distance_matrix(source_feats, sp.train)
    d[np.asarray(source_ids, dtype=object)[:, None] == np.asarray(sp.train_ids, dtype=object)[None, :]] = np.inf
    return d.min(axis=1)


def audit(synthetic: list[str | Path], out: str | Path, settings: AuditSettings) -> dict:
    """Audit each synthetic dataset against the training set; writes OUT/results.json, audit.md and the figures."""
    out = Path(out)
    train = load_real(settings.train, settings.size, settings.train_split, settings.limit)
    holdout = _holdout(settings)
    sets = [load_synthetic(s, settings.size, settings.limit) for s in synthetic]
    model = next((s.provenance.get("model") for s in sets if s.provenance.get("model")), None)
    feature_spaces, status = build_spaces(settings, model)
    spaces = [reference_space(fs, train, holdout) for fs in feature_spaces]
    logger.info("feature spaces: %s", status)
    dcr_rows, memo_rows, closest = [], [], {}
    sources = _sources(train, holdout)
    for syn in sets:
        rows, found = dataset_rows(syn, spaces)
        dcr_rows += rows
        closest[syn.name] = found
        if strategy_and_ratio(syn)[0] == "reconstruction":
            memo_rows += memorisation_rows(syn, spaces, sources)
    return write_outputs(out, settings, status, train, holdout, sets, spaces, dcr_rows, memo_rows, closest)


def _holdout(settings: AuditSettings) -> ImageSet | None:
    if settings.holdout:
        return load_real(settings.holdout, settings.size, None, settings.limit)
    try:
        return load_real(settings.train, settings.size, settings.holdout_split, settings.limit)
    except FileNotFoundError:
        logger.info("no held-out set (%s has no %s split): calibrating on train -> train only", settings.train,
                    settings.holdout_split)
        return None


def _sources(train: ImageSet, holdout: ImageSet | None) -> ImageSet:
    """The real images a reconstruction's source ids can name: train and held-out."""
    if holdout is None:
        return train
    return ImageSet("sources", train.ids + holdout.ids, np.concatenate([train.images, holdout.images]))
