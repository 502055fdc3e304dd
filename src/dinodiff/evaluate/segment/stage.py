"""The `segment` stage: zero-shot lung segmentation by DiffSeg, grid-searched, against baselines.

For every model (a run's checkpoints, model or pipeline folders) and timestep, one UNet pass per image
gives the self-attention maps; every (grid size, threshold) cell then merges them into a label map,
scored against the lung masks. Each cell's per-image scores are cached in ``OUT/cells/`` (a re-run only
computes missing cells). Outputs: ``results.json``, ``table.csv``, ``table.md``, ``overlays/<dataset>.png``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from dinodiff import runs
from dinodiff.devices import resolve_device
from dinodiff.evaluate.segment import report as seg_report
from dinodiff.evaluate.segment.attention import (
    AttentionModel,
    capture_attention,
    load_attention_model,
)
from dinodiff.evaluate.segment.data import SegCase, load_cases
from dinodiff.evaluate.segment.diffseg import (
    aggregate_attention,
    attention_entropy,
    diffseg,
    map_side,
)
from dinodiff.evaluate.segment.metrics import (
    mean_mask_prior,
    otsu_segments,
    position_kmeans,
    score_labels,
)
from dinodiff.evaluate.segment.settings import Cell, SegmentSettings
from dinodiff.files import write_bytes_atomic
from dinodiff.results import write_results

log = logging.getLogger(__name__)
CELL_VERSION = 2


class ModelLoader:
    """Attention models on one device, keeping the last one loaded: the resolution look-up, the grid and the
    overlays that use one model in turn load it once (and only one model is held at a time)."""

    def __init__(self, device: str) -> None:
        self.device, self._path, self._model = device, None, None

    def __call__(self, path: Path) -> AttentionModel:
        if self._path != path:
            self._path, self._model = None, None  # free the previous model before loading the next
            self._model, self._path = load_attention_model(path, self.device), path
        return self._model


def expand_models(paths: Sequence[str | Path]) -> list[Path]:
    """A run folder -> each complete checkpoint's model/; a checkpoint -> its model/; else the folder itself."""
    return [model for path in paths for model in runs.run_models(path)]


def model_resolution(path: Path, load: ModelLoader) -> int:
    """The image size a model was trained at (its model_config.yaml, else from loading it)."""
    config = path / "model_config.yaml"
    if config.is_file():
        value = OmegaConf.select(OmegaConf.load(config), "resolution")
        if value:
            return int(value)
    return load(path).resolution


def model_label(path: Path) -> str:
    """'checkpoint-500' for RUN/checkpoints/checkpoint-500/model, else the folder name; plus a path hash."""
    path = path.resolve()
    name = path.parent.name if path.name == "model" else path.name
    return f"{name}-{hashlib.sha1(str(path).encode()).hexdigest()[:6]}"


def _cell_path(out: Path, cell: Cell, settings: SegmentSettings) -> Path:
    s = settings
    noise = "" if s.noise_seed is None else f"_noise{s.noise_seed}"
    name = (f"t{cell.timestep}_g{cell.grid}_{s.threshold_mode[:3]}{cell.threshold:g}"
            f"x{s.merge_iterations}_{s.condition}{noise}_r{s.resolution}.json")
    return out / "cells" / cell.model / name


def _cell_key(cell: Cell, settings: SegmentSettings, images: str, model_path: Path) -> dict:
    return {"version": CELL_VERSION, **asdict(cell), **settings.cell_settings(), "images": images,
            "model_path": str(model_path.resolve())}


def _read_cell(path: Path, key: dict) -> list[dict] | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data["images"] if data.get("key") == key else None


def _images_tensor(cases: Sequence[SegCase]) -> torch.Tensor:
    return torch.from_numpy(np.stack([c.image for c in cases])).float().div(255.0)[:, None]


def segment_cases(model: AttentionModel, cases: Sequence[SegCase], cells: Sequence[Cell], *, timestep: int,
                  threshold_mode: str, merge_iterations: int, condition: str, noise_seed: int | None,
                  batch_size: int) -> dict[Cell, list[tuple[np.ndarray, dict]]]:
    """Label maps and per-image info for every cell (all with ``timestep``) from one UNet pass per image."""
    half = model.device.type == "cuda"  # fp16 maps on GPU: half the memory of the 4-D attention tensor
    dtype = torch.float16 if half else torch.float32
    results: dict[Cell, list[tuple[np.ndarray, dict]]] = {c: [] for c in cells}
    for start in range(0, len(cases), batch_size):
        batch = cases[start:start + batch_size]
        images = _images_tensor(batch)
        maps = capture_attention(model, images, timestep=timestep, condition=condition, noise_seed=noise_seed,
                                 dtype=dtype)
        agg = aggregate_attention(maps, dtype=dtype)
        side = map_side(agg.shape[-1])
        too_big = sorted({c.grid for c in cells if c.grid > side})
        if too_big:
            raise ValueError(f"grid size {too_big} larger than the model's largest self-attention map ({side}x{side}) "
                             f"at {images.shape[-1]} px: use --grid-size <= {side}.")
        for b, case in enumerate(batch):
            entropy, max_entropy = attention_entropy(agg[b])
            for cell in cells:
                labels, used = diffseg(agg[b], cell.grid, [cell.threshold] * merge_iterations,
                                       case.image.shape, mode=threshold_mode)
                info = {"thresholds": [round(t, 6) for t in used], "entropy": round(entropy, 4),
                        "max_entropy": round(max_entropy, 4)}
                results[cell].append((labels.cpu().numpy(), info))
    return results


def _record(case: SegCase, labels: np.ndarray, extra: dict | None = None) -> dict:
    score = score_labels(labels, case.lungs)
    hung = {k: v for k, v in score["hungarian"].items() if k != "segments"}
    return {"id": case.id, "dataset": case.dataset, "n_segments": score["n_segments"], "hungarian": hung,
            "union": {k: v for k, v in score["union"].items() if k != "n_segments"}, "single": score["single"],
            **(extra or {})}


def segment_with(model: AttentionModel, cases: Sequence[SegCase], cells: Sequence[Cell], timestep: int,
                 settings: SegmentSettings) -> dict[Cell, list[tuple[np.ndarray, dict]]]:
    """segment_cases with the settings' merging, condition, noise and batch size."""
    s = settings
    return segment_cases(model, cases, cells, timestep=timestep, threshold_mode=s.threshold_mode,
                         merge_iterations=s.merge_iterations, condition=s.condition, noise_seed=s.noise_seed,
                         batch_size=s.batch_size)


def run_grid(models: Sequence[Path], cases: Sequence[SegCase], out: Path, settings: SegmentSettings,
             load: ModelLoader) -> dict[Cell, list[dict]]:
    """Every cell's per-image records, from the cache where it is complete, else computed and cached."""
    images = hashlib.sha1(json.dumps([(c.dataset, c.id) for c in cases]).encode()).hexdigest()[:12]
    table: dict[Cell, list[dict]] = {}
    for path in models:
        label = model_label(path)
        for t in settings.timesteps:
            todo = []
            for grid in settings.grid_sizes:
                for thr in settings.thresholds:
                    cell = Cell(label, int(t), int(grid), float(thr))
                    cached = _read_cell(_cell_path(out, cell, settings), _cell_key(cell, settings, images, path))
                    if cached is None:
                        todo.append(cell)
                    else:
                        table[cell] = cached
            if not todo:
                continue
            started = time.perf_counter()
            for cell, items in segment_with(load(path), cases, todo, t, settings).items():
                table[cell] = [_record(c, labels, info) for c, (labels, info) in zip(cases, items)]
                body = {"key": _cell_key(cell, settings, images, path), "images": table[cell]}
                write_bytes_atomic(_cell_path(out, cell, settings), json.dumps(body, indent=1).encode())
            log.info("%s t=%d: %d cells on %d images in %.1f s", label, t, len(todo), len(cases),
                     time.perf_counter() - started)
    return table


def run_baselines(cases: Sequence[SegCase],
                  n_segments: dict[tuple[str, str], int] | None = None) -> dict[str, list[dict]]:
    """Mean-mask prior (leave-one-out mean of the other images' masks, >= 0.5), Otsu, the whole image as one
    segment, and position-only k-means with, per image, the number of segments DiffSeg produced
    (``n_segments`` by (dataset, case id))."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for case in cases:
        for name, m in case.lungs.items():
            sums[name] = sums.get(name, 0) + m.astype(np.float64)
            counts[name] = counts.get(name, 0) + 1
    out: dict[str, list[dict]] = {"prior": [], "otsu": [], "position": [], "whole": []}
    for case in cases:
        # leave this image out, so its own mask never shapes its prediction
        means = {n: (sums[n] - case.lungs.get(n, 0)) / max(counts[n] - (n in case.lungs), 1) for n in sums}
        out["prior"].append(_record(case, mean_mask_prior(means)))
        out["otsu"].append(_record(case, otsu_segments(case.image)))
        out["whole"].append(_record(case, np.zeros(case.image.shape, np.int64)))  # what a merge-all scores
        if n_segments is not None:
            out["position"].append(_record(case, position_kmeans(case.image.shape, n_segments[case.dataset, case.id])))
    if n_segments is None:
        del out["position"]
    return out


def load_all_cases(data: Sequence[str | Path], resolution: int, limit: int | None) -> list[SegCase]:
    """The cases of every data folder, in order; datasets are named after their folders, so names must differ."""
    per_source = [load_cases(src, resolution, limit) for src in data]
    if len({c[0].dataset for c in per_source}) < len(per_source):
        raise ValueError(f"two --data folders share a name ({[c[0].dataset for c in per_source]}): datasets are "
                         "named after their folder, so give each a distinct folder name.")
    return [c for group in per_source for c in group]


def segment(models: Sequence[str | Path], data: Sequence[str | Path], out: str | Path,
            settings: SegmentSettings = SegmentSettings(), **changes: Any) -> dict:
    """Grid search DiffSeg over models x timesteps x grid sizes x thresholds; tables, overlays, results.json.

    `settings` (with any `changes` to its fields, e.g. ``thresholds=[0.1]``): see :class:`SegmentSettings`.
    Each model is loaded once for the grid and, when it is the best one, reused for the overlays.
    """
    settings = dataclasses.replace(settings, **changes) if changes else settings
    settings.check()
    out = Path(out)
    device = resolve_device(settings.device)
    load = ModelLoader(device)
    paths = expand_models(models)
    sd_paths = [Path(settings.sd15)] if settings.sd15 else []
    settings = dataclasses.replace(settings, device=device,
                                   resolution=settings.resolution or model_resolution(paths[0], load))
    cases = load_all_cases(data, settings.resolution, settings.limit)
    names = sorted({c.dataset for c in cases})
    log.info("%d images (%s) at %d px; %d model(s)", len(cases), ", ".join(names), settings.resolution, len(paths))
    table = run_grid(paths, cases, out, settings, load)
    sd_table = run_grid(sd_paths, cases, out, settings, load) if sd_paths else {}
    best = seg_report.best_cells(table, names)
    by_id = {(r["dataset"], r["id"]): r["n_segments"] for r in table[best["combined"]]}
    methods = {"diffseg": table[best["combined"]], **run_baselines(cases, by_id)}
    if sd_table:
        methods["sd15"] = sd_table[seg_report.best_cells(sd_table, [])["combined"]]
    results = seg_report.write_outputs(out, table, sd_table, best, methods, settings)
    if settings.n_overlay > 0:
        cell = best["combined"]
        model = load({model_label(p): p for p in paths + sd_paths}[cell.model])
        results["overlays"] = seg_report.write_overlays(
            out, cases, table[cell], settings.n_overlay,
            lambda sel: segment_with(model, sel, [cell], cell.timestep, settings)[cell])
    write_results(out, seg_report.results_record(out, results))
    return results
