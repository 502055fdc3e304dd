"""`dinodiff audit SYN... --train PREP`: nearest-real-training-image privacy audit of synthetic datasets.

For every synthetic image and every available feature space: its DCR to the training set, read against two real
references (held-out -> train, train -> other-patient train; see stats.py), the fraction below the references'
5th percentile and the fraction flagged as near-copies (each with an exact 95% interval), and, for
reconstruction, per-source memorisation. Results per dataset (= strategy and ratio, from provenance.json);
reconstruction is reported apart, since it conditions on a patient's own embedding. The training set is streamed
once (search.py): cost linear in its size, memory bounded by `chunk` and `max_memory_mb`.
Outputs in OUT: results.json (``kind: audit``), audit.md, closest-pairs.png and dcr.png.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from dinodiff.devices import resolve_device
from dinodiff.evaluate.audit import tables
from dinodiff.evaluate.audit.data import (
    ImageSet,
    TrainingSet,
    load_real,
    load_synthetic,
    open_training,
    strategy_and_ratio,
)
from dinodiff.evaluate.audit.report import write_outputs
from dinodiff.evaluate.audit.search import (
    QuerySet,
    calibration_positions,
    pair_distances,
    search,
)
from dinodiff.evaluate.audit.settings import AuditSettings
from dinodiff.evaluate.audit.spaces import (
    FeatureSpace,
    encoder_space,
    find_encoder,
    pixel_space,
    rad_dino_space,
    xrv_space,
)
from dinodiff.evaluate.audit.tables import HOLDOUT_REFERENCE, TRAIN_REFERENCE, Space
from dinodiff.results import Results

logger = logging.getLogger(__name__)

SOURCES = "reconstruction sources"


def build_spaces(settings: AuditSettings, model: str | None,
                 device: torch.device) -> tuple[list[FeatureSpace], dict[str, str]]:
    """The available feature spaces (on `device`), and a status line for every requested one."""
    found, status = [], {}
    for name in settings.spaces:
        if name == "pixels":
            space, why = pixel_space(settings.candidates), "available"
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
            found.append(space.to(device))
    return found, status


def audit(synthetic: list[str | Path], out: str | Path, settings: AuditSettings) -> Results:
    """Audit each synthetic dataset against the training set; writes OUT/results.json, audit.md and the figures."""
    sets = [load_synthetic(s, settings.size, settings.limit) for s in synthetic]
    train = open_training(settings.train, settings.size, settings.train_split, _source_ids(sets))
    holdout = _holdout(settings)
    model = next((s.provenance.get("model") for s in sets if s.provenance.get("model")), None)
    spaces, status = build_spaces(settings, model, resolve_device(settings.device))
    logger.info("feature spaces: %s", status)
    calibration = calibration_positions(len(train), settings.calibration_queries, settings.seed)
    source_ids = sorted(_source_ids(sets))
    fetched = _fetch(train, [*calibration, *(train.positions[i] for i in source_ids if i in train.positions)],
                     settings.chunk)  # one pass decodes the train->train queries and the training sources
    calib_images = np.stack([fetched[int(p)] for p in calibration])
    sources = _sources(source_ids, train, holdout, fetched)
    for sp in spaces:
        sp.fit(calib_images)
    query_sets = [QuerySet(TRAIN_REFERENCE, calib_images, train.groups[calibration]), *(
        [QuerySet(HOLDOUT_REFERENCE, holdout.images, holdout.groups)] if holdout is not None else []),
        *(QuerySet(s.name, s.images) for s in sets), *([sources[0]] if sources else [])]
    found = search(spaces, query_sets, train, settings.chunk, settings.max_memory_mb)
    measured = [Space(sp, {r: found[sp.name][r].dcr for r in (TRAIN_REFERENCE, HOLDOUT_REFERENCE)
                           if r in found[sp.name]}) for sp in spaces]
    dcr_rows, memo_rows = [], []
    for syn in sets:
        dcr_rows += tables.dataset_rows(syn, measured, {sp.name: found[sp.name][syn.name].dcr for sp in spaces})
        if strategy_and_ratio(syn)[0] == "reconstruction" and sources:
            memo_rows += _memorisation(syn, spaces, sources, found)
    closest = {s.name: {k: v for sp in spaces for k, v in ((sp.name, found[sp.name][s.name].dcr),
                                                           (sp.name + ":index", found[sp.name][s.name].index))}
               for s in sets}
    nearest = _nearest_images(train, sets, spaces, closest, settings)
    queries = {TRAIN_REFERENCE: f"{len(calibration)} of {len(train)} training images (seed {settings.seed})"}
    return write_outputs(Path(out), settings, status, train, holdout, sets, measured, dcr_rows, memo_rows, closest,
                         nearest, queries)


def _fetch(train: TrainingSet, positions: list[int], chunk: int) -> dict[int, np.ndarray]:
    """The training images at `positions` (only they are decoded), by position."""
    return {int(p): image for found, batch in train.fetch(positions, chunk) for p, image in zip(found, batch)}


def _source_ids(sets: list[ImageSet]) -> set[str]:
    return {r.source_a for s in sets if strategy_and_ratio(s)[0] == "reconstruction" for r in s.rows
            if r.source_a}


def _sources(ids: list[str], train: TrainingSet, holdout: ImageSet | None,
             fetched: dict[int, np.ndarray]) -> tuple[QuerySet, dict[str, int]] | None:
    """The real images reconstructions name as sources (training or held-out), with their patients, and the row
    of each id; None when no reconstruction names a known image."""
    in_train = [i for i in ids if i in train.positions]
    held = {h: j for j, h in enumerate(holdout.ids)} if holdout is not None else {}
    in_holdout = [i for i in ids if i not in train.positions and i in held]
    if not in_train and not in_holdout:
        return None
    positions = np.array([train.positions[i] for i in in_train], dtype=np.int64)
    images = [*(fetched[int(p)] for p in positions), *(holdout.images[held[i]] for i in in_holdout)]
    groups = np.concatenate([train.groups[positions], holdout.groups[[held[i] for i in in_holdout]]
                             if in_holdout else np.zeros(0, np.int64)])
    return QuerySet(SOURCES, np.stack(images), groups), {i: r for r, i in enumerate(in_train + in_holdout)}


def _memorisation(syn: ImageSet, spaces: list[FeatureSpace], sources: tuple[QuerySet, dict[str, int]],
                  found: dict) -> list[dict]:
    """Per space: reconstruction variations against their own source and the source's other-patient neighbour."""
    query, row_of = sources
    keep = [i for i, r in enumerate(syn.rows) if r.source_a in row_of]
    if not keep:
        return []
    source_of = np.array([row_of[syn.rows[i].source_a] for i in keep])
    return [tables.memorisation_row(syn, sp.name, pair_distances(sp, syn.images[keep], query.images[source_of]),
                                    source_of, found[sp.name][SOURCES].dcr) for sp in spaces]


def _nearest_images(train: TrainingSet, sets: list[ImageSet], spaces: list[FeatureSpace], closest: dict,
                    settings: AuditSettings) -> dict[int, np.ndarray]:
    """The training images drawn in the closest-pairs figure (first space), by position."""
    if not spaces:
        return {}
    name = spaces[0].name
    wanted = {int(closest[s.name][name + ":index"][i]) for s in sets
              for i in np.argsort(closest[s.name][name])[:settings.pairs]}
    wanted.discard(-1)
    return _fetch(train, sorted(wanted), settings.chunk)


def _holdout(settings: AuditSettings) -> ImageSet | None:
    if settings.holdout:
        return load_real(settings.holdout, settings.size, None, settings.limit)
    try:
        return load_real(settings.train, settings.size, settings.holdout_split, settings.limit)
    except FileNotFoundError:
        logger.info("no held-out set (%s has no %s split): calibrating on train -> train only", settings.train,
                    settings.holdout_split)
        return None
