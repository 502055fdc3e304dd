"""`dinodiff classify`: the paper's augmentation and full-synthetic classification experiments (Table 1,
Figure 4), with count-matched controls, on the user's labelled data.

OUT/ holds: grid.json (the settings the cells were made with), cache/ (decoded, resized real images, their
subjects and split), subsets/nN-sSEED.csv (each regime's images, subjects and the folds of repetition SEED),
synthetic/m<model key>/... (generated sets, reused; see `synthetic`), cells/*.json + *.npy (one cached result
and its per-image test scores per cell), results.csv, table.md, table.csv, figure4.png, results.json.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from dinodiff.evaluate.classify.compare import summarise
from dinodiff.evaluate.classify.grid import (
    GRID_FILE,
    plan_cells,
    run_cells,
    scores_path,
)
from dinodiff.evaluate.classify.images import ImageSet, load_real
from dinodiff.evaluate.classify.report import write_report
from dinodiff.evaluate.classify.settings import ClassifySettings, to_dict
from dinodiff.evaluate.classify.split import EXCLUDED, OWN
from dinodiff.evaluate.classify.subsets import NONE_STRATUM, build_subsets
from dinodiff.evaluate.classify.synthetic import (
    SyntheticModel,
    make_synthetic,
    synthetic_model,
)
from dinodiff.files import write_json_atomic
from dinodiff.results import Results

logger = logging.getLogger(__name__)

PROTOCOL = 2  # 2: subject splits, repeated CV, exact per-fold synthetic counts, two controls, per-image scores

# Settings that do not change what a cached cell computed: a grid may be resumed or extended with other values.
# Synthetic cells and sets are keyed on the model's identity and the generation settings (see `synthetic`), so
# a new model or generation setting makes new ones instead of reusing stale ones. regimes, seeds, strategies
# and ratios only choose which cells run (a regime's subset is a prefix of the draw; a seed adds a repetition).
_FREE = ("out", "workers", "test", "correction", "alpha", "ci_level", "bootstrap", "bootstrap_seed", "experiments",
         "regimes", "seeds", "synthetic.strategies", "synthetic.ratios", "classifier.device", "classifier.num_workers",
         "classifier.threads", "synthetic.model", "synthetic.num_inference_steps", "synthetic.guidance_scale",
         "synthetic.scheduler", "synthetic.seed", "synthetic.batch_size", "synthetic.folder")


class GridMismatch(ValueError):
    """OUT holds cells computed with other settings."""


def choose_labels(real: ImageSet, settings: ClassifySettings) -> list[str]:
    """settings.data.labels, or every label with at least min_positives positives in the pool and the test set."""
    data, test, pool = settings.data, real.split == "test", real.split == "train"
    if data.labels:
        missing = [name for name in data.labels if name not in real.names]
        if missing:
            raise ValueError(f"labels {missing} are not in {data.source} (it has {real.names}); fix data.labels.")
        return list(data.labels)
    counts = {name: (int(real.positive[pool, j].sum()), int(real.positive[test, j].sum()))
              for j, name in enumerate(real.names)}
    chosen = [name for name, (pool, held) in counts.items() if min(pool, held) >= data.min_positives]
    if not chosen:
        raise ValueError(f"no label of {data.source} has {data.min_positives} positives in both the pool and the test "
                         f"set ({counts}); set data.labels or data.min_positives.")
    logger.info("labels: %s (positives in pool/test: %s)", chosen, {n: counts[n] for n in chosen})
    return chosen


def _fixed(record: dict) -> dict:
    """The settings a cell's result depends on (dotted keys), without the free ones."""
    flat = {f"{group}.{k}": v for group, sub in record.items() if isinstance(sub, dict) for k, v in sub.items()}
    flat.update({k: v for k, v in record.items() if not isinstance(v, dict)})
    return {k: v for k, v in flat.items() if k not in _FREE}


def _check_grid(out: Path, settings: ClassifySettings, labels: list[str], test_rows: np.ndarray) -> None:
    record = to_dict(settings)
    path = out / GRID_FILE
    if path.is_file() and any((out / "cells").glob("*.json")):
        saved = json.loads(path.read_text())
        if saved.get("protocol") != PROTOCOL:
            raise GridMismatch(f"{out} holds cells of an older classify protocol (ids split by image, synthetic "
                               "counts below their ratio, one control): choose a new out folder.")
        old, new = _fixed(saved["settings"]), _fixed(record)
        if old != new:
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise GridMismatch(f"{path} records a grid run with other settings ({', '.join(changed)}); rerun with "
                               "the same settings to finish it, or choose a new out folder.")
    write_json_atomic(path, {"protocol": PROTOCOL, "settings": record, "labels": labels,
                             "test_rows": [int(r) for r in test_rows]})


def _synthetic(settings: ClassifySettings, real: ImageSet) -> SyntheticModel | None:
    """The model the synthetic sets come from (and the sets, made now), or None without synthetic experiments."""
    wanted = any(e in settings.experiments for e in ("augmentation", "full-synthetic"))
    if wanted and not settings.synthetic.model:
        logger.warning("no synthetic.model given: running only the real-only baseline and the controls")
    if not (wanted and settings.synthetic.model):
        return None
    model = synthetic_model(settings)
    made = make_synthetic(settings, real, model)
    logger.info("synthetic sets: %d generated now, the others reused", made)
    return model


def _provenance(settings: ClassifySettings, real: ImageSet, model: SyntheticModel | None) -> dict[str, Any]:
    counts = real.subject_counts or {}
    excluded = int((real.split == EXCLUDED).sum())
    subjects = {k: v for k, v in counts.items() if v}
    return {"data": settings.data.source, "synthetic model": model.folder if model else None,
            "synthetic model given": model.given if model else None,
            "synthetic model chosen": model.chosen if model else None,
            "synthetic model sha256": model.sha256 if model else None, "synthetic key": model.key if model else None,
            "subjects": subjects, "subjects unknown (each image its own subject)": counts.get(OWN, 0),
            "pool images left out (their subject is in the test split)": excluded,
            "repetitions (seeds)": list(settings.seeds), "folds": settings.folds,
            "command": "dinodiff classify"}


def classify(settings: ClassifySettings, progress: bool = True) -> Results:
    """Run (or finish) the grid described by `settings` and write its tables, figure and results.json."""
    start, out = time.time(), Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    real = load_real(settings.data, settings.classifier.image_size, out / "cache")
    labels = choose_labels(real, settings)
    pool = np.flatnonzero(real.split == "train")
    test_rows = np.flatnonzero(real.split == "test")[:settings.data.test_limit]
    if len(test_rows) == 0:
        raise ValueError(f"{settings.data.source} gives no test images; set data.test_fraction > 0.")
    _check_grid(out, settings, labels, test_rows)
    build_subsets(out / "subsets", real.ids, real.columns(labels) > 0.5, labels, settings.regimes, pool,
                  real.subjects, subset_seed=settings.subset_seed, seeds=settings.seeds,
                  folds=settings.folds, balance_none=settings.data.balance_none)
    model = _synthetic(settings, real)
    rows = run_cells(settings, plan_cells(settings, model.key if model else None), progress=progress)
    targets = real.columns(labels)[test_rows]
    summary = summarise(rows, settings, targets, lambda key: np.load(scores_path(out, key)))
    extra = {"labels": labels, "strata": labels + ([NONE_STRATUM] if settings.data.balance_none else []),
             "classifier": {"backbone": settings.classifier.backbone, "weights": sorted({r["weights"] for r in rows}),
                            "image_size": settings.classifier.image_size},
             "synthetic_model": asdict(model) if model else None, "subjects": real.subject_counts,
             "pool_images": len(pool), "test_images": len(test_rows), "cells": len(rows),
             "seconds": time.time() - start, "settings": to_dict(settings)}
    return write_report(out, rows, summary, settings, _provenance(settings, real, model), extra)
