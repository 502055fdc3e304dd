"""`dinodiff classify`: the paper's augmentation and full-synthetic classification experiments (Table 1,
Figure 4), with a count-matched control, on the user's labelled data.

OUT/ holds: grid.json (the settings the cells were made with), cache/ (decoded, resized real images),
subsets/nN.csv (each regime's images and folds), synthetic/nN/<strategy>-x<ratio>/ (generated sets, reused),
cells/*.json (one cached result per cell), results.csv, table.md, table.csv, figure4.png, results.json.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from dinodiff.evaluate.classify.grid import GRID_FILE, plan_cells, run_cells, synthetic_folder
from dinodiff.evaluate.classify.images import ImageSet, load_real, load_synthetic, source_options
from dinodiff.evaluate.classify.report import write_report
from dinodiff.evaluate.classify.settings import ClassifySettings, to_dict
from dinodiff.evaluate.classify.subsets import NONE_STRATUM, build_subsets, read_subset
from dinodiff.files import write_json_atomic
from dinodiff.generate.plan import GenerateSettings
from dinodiff.generate.stage import generate_dataset
from dinodiff.runs import resolve_model

logger = logging.getLogger(__name__)

# Settings that do not change what a cached cell computed: a grid may be resumed or extended with other values.
# The generation settings are guarded by each synthetic set's provenance.json instead: `generate` refuses to
# touch a set made with another model or other settings, so a cached synthetic cell can never go stale.
# regimes, seeds, strategies and ratios only choose which cells run (a regime's subset is a prefix of the draw).
_FREE = ("out", "workers", "test", "correction", "alpha", "experiments", "regimes", "seeds", "synthetic.strategies",
         "synthetic.ratios", "classifier.device", "classifier.num_workers",
         "classifier.threads", "synthetic.model", "synthetic.num_inference_steps", "synthetic.guidance_scale",
         "synthetic.scheduler", "synthetic.seed", "synthetic.batch_size")


class GridMismatch(ValueError):
    """OUT holds cells computed with other settings."""


def choose_labels(real: ImageSet, settings: ClassifySettings) -> list[str]:
    """settings.data.labels, or every label with at least min_positives positives in the pool and the test set."""
    data, test = settings.data, real.split == "test"
    if data.labels:
        missing = [name for name in data.labels if name not in real.names]
        if missing:
            raise ValueError(f"labels {missing} are not in {data.source} (it has {real.names}); fix data.labels.")
        return list(data.labels)
    counts = {name: (int(real.positive[~test, j].sum()), int(real.positive[test, j].sum()))
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
    if path.is_file():
        old, new = _fixed(json.loads(path.read_text())["settings"]), _fixed(record)
        if old != new and any((out / "cells").glob("*.json")):
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise GridMismatch(f"{path} records a grid run with other settings ({', '.join(changed)}); rerun with "
                               "the same settings to finish it, or choose a new out folder.")
    write_json_atomic(path, {"settings": record, "labels": labels, "test_rows": [int(r) for r in test_rows]})


def _complete(folder: Path, wanted: GenerateSettings) -> bool:
    path = folder / "provenance.json"
    if not path.is_file():
        return False
    record, want = json.loads(path.read_text()), json.loads(json.dumps(asdict(wanted), default=str))
    have = record.get("settings") or {}
    # a set made before GenerateSettings gained a field matches when this grid leaves that field at its default
    defaults = json.loads(json.dumps(asdict(GenerateSettings()), default=str))
    return bool(record.get("complete")) and all(have.get(k, defaults.get(k)) == v for k, v in want.items())


def make_synthetic(settings: ClassifySettings, real: ImageSet) -> None:
    """Every regime x strategy x ratio synthetic set, generated from that regime's real subset only (reused)."""
    syn = settings.synthetic
    model = resolve_model(syn.model)
    for n in settings.regimes:
        rows, _, _ = read_subset(Path(settings.out) / "subsets" / f"n{n}.csv")
        ids = sorted(real.ids[r] for r in rows)
        for strategy in syn.strategies:
            for ratio in syn.ratios:
                folder = synthetic_folder(settings, n, strategy, ratio)
                wanted = GenerateSettings(strategy=strategy, ratio=ratio, seed=syn.seed,
                                          num_inference_steps=syn.num_inference_steps, guidance_scale=syn.guidance_scale,
                                          scheduler=syn.scheduler, source_options={**source_options(settings.data),
                                                                                   "ids": ids})
                if not _complete(folder, wanted):  # generate resumes a partial set and refuses other settings
                    logger.info("generating %s x%d from the %d images of regime %d into %s", strategy, ratio,
                                len(ids), n, folder)
                    generate_dataset(model, settings.data.source, folder, wanted, batch_size=syn.batch_size,
                                     preview_rows=0, progress=False)
                load_synthetic(folder, settings.classifier.image_size)  # decode once, before the cells run


def classify(settings: ClassifySettings, progress: bool = True) -> dict:
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
    positive = real.columns(labels) > 0.5
    build_subsets(out / "subsets", real.ids, positive, labels, settings.regimes, pool, seed=settings.subset_seed,
                  folds=settings.folds, balance_none=settings.data.balance_none,
                  subject_pattern=settings.data.subject_pattern)
    wants_synthetic = any(e in settings.experiments for e in ("augmentation", "full-synthetic"))
    if wants_synthetic and not settings.synthetic.model:
        logger.warning("no synthetic.model given: running only the real-only baseline and the control")
    synthetic = wants_synthetic and bool(settings.synthetic.model)
    if synthetic:
        make_synthetic(settings, real)
    rows = run_cells(settings, plan_cells(settings, synthetic), progress=progress)
    weights = sorted({r["weights"] for r in rows})
    extra = {"labels": labels, "strata": labels + ([NONE_STRATUM] if settings.data.balance_none else []),
             "classifier": {"backbone": settings.classifier.backbone, "weights": weights,
                            "image_size": settings.classifier.image_size},
             "synthetic_model": settings.synthetic.model, "pool_images": len(pool), "test_images": len(test_rows),
             "cells": len(rows), "seconds": time.time() - start, "settings": to_dict(settings)}
    return write_report(out, rows, settings, extra)
