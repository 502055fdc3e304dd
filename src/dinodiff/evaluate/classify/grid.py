"""The experiment grid: regime x experiment x strategy x ratio x fold x seed, each cell an independent job whose
result is cached in ``OUT/cells/<key>.json``, so an interrupted grid resumes where it stopped. Cells run in
this process or in parallel worker processes (one per GPU when several are visible).

A cell trains on 4/5 of its regime's subset (plus synthetic images, or repeated real images for the control),
early-stops on the held-out fifth and is scored on the real test set.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from dinodiff.evaluate.classify.classifier import Part, fit_and_test
from dinodiff.evaluate.classify.images import ImageSet, load_real, load_synthetic
from dinodiff.evaluate.classify.settings import ClassifySettings
from dinodiff.evaluate.classify.stats import macro_auc, per_label_auc
from dinodiff.evaluate.classify.subsets import count_matched, read_subset
from dinodiff.files import write_json_atomic

logger = logging.getLogger(__name__)

GRID_FILE = "grid.json"
BASELINE = "real"


@dataclass(frozen=True)
class Cell:
    regime: int
    experiment: str  # real | augmentation | full-synthetic | control
    strategy: str  # reconstruction | interpolation | '-' (real, control)
    ratio: int  # synthetic images per real one; 0 for real
    fold: int
    seed: int

    @property
    def key(self) -> str:
        return f"n{self.regime}-{self.experiment}-{self.strategy}-x{self.ratio}-f{self.fold}-s{self.seed}"


def plan_cells(settings: ClassifySettings, synthetic: bool) -> list[Cell]:
    """Every cell of the grid; the synthetic experiments only when synthetic sets can be made."""
    cells = []
    for n in settings.regimes:
        for seed in settings.seeds:
            for fold in range(settings.folds):
                cells.append(Cell(n, BASELINE, "-", 0, fold, seed))
                for ratio in settings.synthetic.ratios:
                    if "control" in settings.experiments:
                        cells.append(Cell(n, "control", "-", ratio, fold, seed))
                    for experiment in ("augmentation", "full-synthetic"):
                        if synthetic and experiment in settings.experiments:
                            cells.extend(Cell(n, experiment, s, ratio, fold, seed) for s in settings.synthetic.strategies)
    return cells


def synthetic_folder(settings: ClassifySettings, regime: int, strategy: str, ratio: int) -> Path:
    root = Path(settings.synthetic.folder) if settings.synthetic.folder else Path(settings.out) / "synthetic"
    return root / f"n{regime}" / f"{strategy}-x{ratio}"


def cell_path(out: Path, cell: Cell) -> Path:
    return out / "cells" / f"{cell.key}.json"


def _synthetic_rows(syn: ImageSet, train_ids: set[str], only_train_sources: bool) -> np.ndarray:
    if not only_train_sources:
        return np.arange(len(syn.ids))
    keep = [i for i, (a, b) in enumerate(zip(syn.source_a, syn.source_b)) if a in train_ids and b in train_ids]
    return np.array(keep, dtype=np.int64)


def cell_parts(settings: ClassifySettings, cell: Cell, real: ImageSet, labels: list[str], test_rows: np.ndarray,
               syn: Optional[ImageSet]) -> tuple[list[np.ndarray], Part, Part, Part]:
    """(arrays, train, val, test) of a cell: array 0 is the real cache, array 1 the cell's synthetic set."""
    out = Path(settings.out)
    rows, _, folds = read_subset(out / "subsets" / f"n{cell.regime}.csv")
    targets = real.columns(labels)
    train_real, val = rows[folds != cell.fold], rows[folds == cell.fold]

    def real_part(r: np.ndarray) -> Part:
        return Part(np.zeros(len(r), dtype=np.int64), r, targets[r])

    arrays = [real.images]
    if cell.experiment == BASELINE:
        train = real_part(train_real)
    elif cell.experiment == "control":
        train = real_part(count_matched(train_real, len(train_real) * (1 + cell.ratio)))
    else:
        assert syn is not None
        arrays.append(syn.images)
        picked = _synthetic_rows(syn, {real.ids[r] for r in train_real}, settings.synthetic.train_sources_only)
        synthetic = Part(np.ones(len(picked), dtype=np.int64), picked, syn.columns(labels)[picked])
        if cell.experiment == "full-synthetic":
            train = synthetic
        else:
            own = real_part(train_real)
            train = Part(np.concatenate([own.which, synthetic.which]), np.concatenate([own.rows, synthetic.rows]),
                         np.concatenate([own.targets, synthetic.targets]))
    return arrays, train, real_part(val), real_part(test_rows)


def run_cell(out: str | Path, cell: Cell, device: Optional[str] = None) -> dict:
    """Train and test one cell (in any process) and cache its result; returns the result row."""
    out = Path(out)
    path = cell_path(out, cell)
    if path.is_file():
        return json.loads(path.read_text())
    grid = json.loads((out / GRID_FILE).read_text())
    settings = _from_grid(grid)
    if device is not None:
        settings.classifier.device = device
    if settings.classifier.threads > 0:
        torch.set_num_threads(settings.classifier.threads)
    size, labels = settings.classifier.image_size, grid["labels"]
    real = load_real(settings.data, size, out / "cache")
    syn = None
    if cell.experiment in ("augmentation", "full-synthetic"):
        syn = load_synthetic(synthetic_folder(settings, cell.regime, cell.strategy, cell.ratio), size)
    arrays, train, val, test = cell_parts(settings, cell, real, labels, np.array(grid["test_rows"]), syn)
    fitted = fit_and_test(settings.classifier, arrays, train, val, test, seed=cell.seed)
    per_label = per_label_auc(fitted["scores"], fitted["targets"])
    row = {**asdict(cell), "auc": macro_auc(fitted["scores"], fitted["targets"]),
           **{f"auc_{name}": float(v) for name, v in zip(labels, per_label)},
           **{k: fitted[k] for k in ("val_auc", "best_epoch", "epochs", "weights", "train_images", "seconds", "device")},
           "val_images": len(val), "test_images": len(test)}
    write_json_atomic(path, row)
    return row


def _from_grid(grid: dict) -> ClassifySettings:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ClassifySettings), grid["settings"]))


def _devices(settings: ClassifySettings) -> list[Optional[str]]:
    if settings.classifier.device == "auto" and torch.cuda.device_count() > 1:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [None]


def run_cells(settings: ClassifySettings, cells: Iterable[Cell], progress: bool = True) -> list[dict]:
    """Run every cell not cached yet (in parallel when settings.workers > 1) and return all rows in cell order."""
    out, cells = Path(settings.out), list(cells)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    todo = [c for c in cells if not cell_path(out, c).is_file()]
    logger.info("grid: %d cells, %d cached, %d to run", len(cells), len(cells) - len(todo), len(todo))
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="classify cells", unit="cell",
               disable=not progress)
    devices = _devices(settings)
    if settings.workers <= 1 or len(todo) <= 1:
        for cell in todo:
            run_cell(out, cell, devices[0])
            bar.update(1)
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=settings.workers, mp_context=context) as pool:
            futures = [pool.submit(run_cell, str(out), c, devices[i % len(devices)]) for i, c in enumerate(todo)]
            for future in as_completed(futures):
                future.result()  # a failed cell stops the grid; finished cells stay cached
                bar.update(1)
    bar.close()
    return [json.loads(cell_path(out, c).read_text()) for c in cells]
