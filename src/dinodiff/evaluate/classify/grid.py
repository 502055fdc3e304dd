"""The experiment grid: regime x experiment x strategy x ratio x fold x seed, each cell an independent job whose
result is cached in ``OUT/cells/<key>.json`` (its per-image test scores beside it, ``<key>.npy``), so an
interrupted grid resumes where it stopped. Cells run in this process or in parallel worker processes (one
per GPU when several are visible).

A cell trains on its regime's subset minus one fold (plus synthetic images, or repeated real images for a
control), early-stops on that fold and is scored on the real test set. A seed is one repetition of the
cross-validation: it re-draws the folds (see `subsets`) and seeds the training. Synthetic cells carry the
key of the model and generation settings their images came from (see `synthetic`).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from dinodiff.evaluate.classify.arms import same_cells_as
from dinodiff.evaluate.classify.classifier import Part, fit_and_test
from dinodiff.evaluate.classify.images import ImageSet, load_real, load_synthetic
from dinodiff.evaluate.classify.settings import ClassifySettings
from dinodiff.evaluate.classify.stats import macro_auc, per_label_auc
from dinodiff.evaluate.classify.subsets import count_matched, read_subset, subset_path
from dinodiff.evaluate.classify.synthetic import set_folder, training_rows
from dinodiff.files import atomic_path, write_json_atomic

logger = logging.getLogger(__name__)

GRID_FILE = "grid.json"
BASELINE = "real"
SYNTHETIC = ("augmentation", "full-synthetic")
CONTROLS = ("control", "control-full")


@dataclass(frozen=True)
class Cell:
    regime: int
    experiment: str  # real | augmentation | full-synthetic | control | control-full
    strategy: str  # reconstruction | interpolation | '-' (real, controls)
    ratio: int  # synthetic images per real one; 0 for real
    fold: int
    seed: int  # the repetition: its folds and its training seed
    model: str = ""  # synthetic cells: the key of the model and generation settings (synthetic.SyntheticModel)

    @property
    def key(self) -> str:
        base = f"n{self.regime}-{self.experiment}-{self.strategy}-x{self.ratio}-f{self.fold}-s{self.seed}"
        return f"{base}-m{self.model}" if self.model else base


def plan_cells(settings: ClassifySettings, model_key: str | None) -> list[Cell]:
    """Every cell of the grid; synthetic experiments only with a model (`model_key`). A control-full cell that
    would repeat another cell (real x1 = real only; real x r = the control at r - 1) is not trained again."""
    cells, ratios = [], settings.synthetic.ratios
    for n in settings.regimes:
        for seed in settings.seeds:
            for fold in range(settings.folds):
                cells.append(Cell(n, BASELINE, "-", 0, fold, seed))
                for ratio in ratios:
                    for control in CONTROLS:
                        setup = (control, "-", ratio)
                        if control in settings.experiments and same_cells_as(setup, ratios, settings.experiments) is None:
                            cells.append(Cell(n, control, "-", ratio, fold, seed))
                    for experiment in SYNTHETIC:
                        if model_key and experiment in settings.experiments:
                            cells.extend(Cell(n, experiment, s, ratio, fold, seed, model_key)
                                         for s in settings.synthetic.strategies)
    return cells


def cell_path(out: Path, cell: Cell) -> Path:
    return out / "cells" / f"{cell.key}.json"


def scores_path(out: Path, key: str) -> Path:
    """A cell's per-image test scores, (test images, labels) float32, in the order of grid.json's test_rows."""
    return out / "cells" / f"{key}.npy"


def is_done(out: Path, cell: Cell) -> bool:
    return cell_path(out, cell).is_file() and scores_path(out, cell.key).is_file()


def cell_parts(settings: ClassifySettings, cell: Cell, real: ImageSet, labels: list[str], test_rows: np.ndarray,
               syn: ImageSet | None) -> tuple[list[np.ndarray], Part, Part, Part]:
    """(arrays, train, val, test) of a cell: array 0 is the real cache, array 1 the cell's synthetic set."""
    subset = read_subset(subset_path(Path(settings.out) / "subsets", cell.regime, cell.seed))
    targets = real.columns(labels)
    train_real, val = subset.split(cell.fold)

    def real_part(r: np.ndarray) -> Part:
        return Part(np.zeros(len(r), dtype=np.int64), r, targets[r])

    arrays = [real.images]
    if cell.experiment == BASELINE:
        train = real_part(train_real)
    elif cell.experiment in CONTROLS:
        times = cell.ratio + (cell.experiment == "control")  # (1 + r) n: augmentation's count; r n: full-synthetic's
        train = real_part(count_matched(train_real, len(train_real) * times))
    else:
        assert syn is not None
        arrays.append(syn.images)
        picked = training_rows(syn, cell.strategy, cell.ratio, {real.ids[r] for r in train_real})
        synthetic = Part(np.ones(len(picked), dtype=np.int64), picked, syn.columns(labels)[picked])
        if cell.experiment == "full-synthetic":
            train = synthetic
        else:
            own = real_part(train_real)
            train = Part(np.concatenate([own.which, synthetic.which]), np.concatenate([own.rows, synthetic.rows]),
                         np.concatenate([own.targets, synthetic.targets]))
    return arrays, train, real_part(val), real_part(test_rows)


def run_cell(out: str | Path, cell: Cell, device: str | None = None) -> dict:
    """Train and test one cell (in any process) and cache its result and test scores; returns the result row."""
    out = Path(out)
    path = cell_path(out, cell)
    if is_done(out, cell):
        return json.loads(path.read_text())
    grid = json.loads((out / GRID_FILE).read_text())
    settings = _from_grid(grid)
    if device is not None:
        settings = replace(settings, classifier=replace(settings.classifier, device=device))
    if settings.classifier.threads > 0:
        torch.set_num_threads(settings.classifier.threads)
    size, labels = settings.classifier.image_size, grid["labels"]
    real = load_real(settings.data, size, out / "cache")
    syn = None
    if cell.experiment in SYNTHETIC:
        syn = load_synthetic(set_folder(settings, cell.model, cell.regime, cell.strategy, cell.ratio, cell.seed,
                                        cell.fold), size)
    arrays, train, val, test = cell_parts(settings, cell, real, labels, np.array(grid["test_rows"]), syn)
    fitted = fit_and_test(settings.classifier, arrays, train, val, test, seed=cell.seed)
    per_label = per_label_auc(fitted["scores"], fitted["targets"])
    row = {**asdict(cell), "key": cell.key, "auc": macro_auc(fitted["scores"], fitted["targets"]),
           **{f"auc_{name}": float(v) for name, v in zip(labels, per_label)},
           **{k: fitted[k] for k in ("val_auc", "best_epoch", "epochs", "weights", "train_images", "seconds", "device")},
           "real_images": len(np.unique(train.rows[train.which == 0])),  # distinct (a control repeats them)
           "synthetic_images": int((train.which == 1).sum()), "val_images": len(val), "test_images": len(test)}
    with atomic_path(scores_path(out, cell.key)) as tmp, open(tmp, "wb") as handle:
        np.save(handle, fitted["scores"].astype(np.float32))
    write_json_atomic(path, row)  # written last: its presence (with the scores) marks the cell done
    return row


def _from_grid(grid: dict) -> ClassifySettings:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ClassifySettings), grid["settings"]))


def _devices(settings: ClassifySettings) -> list[str | None]:
    if settings.classifier.device == "auto" and torch.cuda.device_count() > 1:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [None]


def run_cells(settings: ClassifySettings, cells: Iterable[Cell], progress: bool = True) -> list[dict]:
    """Run every cell not cached yet (in parallel when settings.workers > 1) and return all rows in cell order."""
    out, cells = Path(settings.out), list(cells)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    todo = [c for c in cells if not is_done(out, c)]
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
