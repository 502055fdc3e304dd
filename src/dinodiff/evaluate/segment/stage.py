"""The `segment` stage: zero-shot lung segmentation by DiffSeg, grid-searched, against baselines.

For every model (a run's checkpoints, model or pipeline folders) and timestep, one UNet pass per image
gives the self-attention maps; every (grid size, threshold) cell then merges them into a label map,
scored against the lung masks. Each cell's per-image scores are cached in ``OUT/cells/`` (a re-run only
computes missing cells). Outputs: ``results.json``, ``table.csv``, ``table.md``, ``overlays/<dataset>.png``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from dinodiff.evaluate.segment import report as seg_report
from dinodiff.evaluate.segment.attention import CONDITIONS, AttentionModel, capture_attention, load_attention_model
from dinodiff.evaluate.segment.data import SegCase, load_cases
from dinodiff.evaluate.segment.diffseg import THRESHOLD_MODES, aggregate_attention, attention_entropy, diffseg, map_side
from dinodiff.evaluate.segment.metrics import mean_mask_prior, otsu_segments, position_kmeans, score_labels
from dinodiff.files import write_bytes_atomic
from dinodiff.runs import list_checkpoints

log = logging.getLogger("dinodiff.segment")
CELL_VERSION = 2


@dataclass(frozen=True)
class Cell:
    """One grid-search configuration."""

    model: str  # model label (see model_label)
    timestep: int
    grid: int
    threshold: float

    def describe(self, mode: str, iterations: int) -> str:
        return f"{self.model} t={self.timestep} grid={self.grid}x{self.grid} {mode} {self.threshold:g}x{iterations}"


def expand_models(paths: Sequence[str | Path]) -> list[Path]:
    """A run folder -> each complete checkpoint's model/; a checkpoint -> its model/; else the folder itself."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"model not found: {p} (give a model folder, a checkpoint or a run folder).")
        if (p / "checkpoints").is_dir():
            found = [c / "model" for _, c in list_checkpoints(p)]
            if not found:
                raise FileNotFoundError(f"{p} is a run folder without complete checkpoints yet.")
            out.extend(found)
        elif (p / "model").is_dir() and not (p / "unet").is_dir():
            out.append(p / "model")
        else:
            out.append(p)
    return out


def model_resolution(path: Path) -> int:
    """The image size a model was trained at (its model_config.yaml, else from loading it)."""
    config = path / "model_config.yaml"
    if config.is_file():
        value = OmegaConf.select(OmegaConf.load(config), "resolution")
        if value:
            return int(value)
    return load_attention_model(path, "cpu").resolution


def model_label(path: Path) -> str:
    """'checkpoint-500' for RUN/checkpoints/checkpoint-500/model, else the folder name; plus a path hash."""
    path = path.resolve()
    name = path.parent.name if path.name == "model" else path.name
    return f"{name}-{hashlib.sha1(str(path).encode()).hexdigest()[:6]}"


def _cell_path(out: Path, cell: Cell, common: dict) -> Path:
    noise = "" if common["noise_seed"] is None else f"_noise{common['noise_seed']}"
    name = (f"t{cell.timestep}_g{cell.grid}_{common['threshold_mode'][:3]}{cell.threshold:g}"
            f"x{common['merge_iterations']}_{common['condition']}{noise}_r{common['resolution']}.json")
    return out / "cells" / cell.model / name


def _cell_key(cell: Cell, common: dict, model_path: Path) -> dict:
    return {"version": CELL_VERSION, **asdict(cell), **common, "model_path": str(model_path.resolve())}


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


def run_grid(models: Sequence[Path], cases: Sequence[SegCase], out: Path, *, thresholds: Sequence[float],
             timesteps: Sequence[int], grid_sizes: Sequence[int], common: dict, batch_size: int,
             device: str) -> dict[Cell, list[dict]]:
    """Every cell's per-image records, from the cache where it is complete, else computed and cached."""
    image_key = hashlib.sha1(json.dumps([(c.dataset, c.id) for c in cases]).encode()).hexdigest()[:12]
    common = {**common, "images": image_key}
    table: dict[Cell, list[dict]] = {}
    for path in models:
        label, model = model_label(path), None
        for t in timesteps:
            todo = []
            for grid in grid_sizes:
                for thr in thresholds:
                    cell = Cell(label, int(t), int(grid), float(thr))
                    cached = _read_cell(_cell_path(out, cell, common), _cell_key(cell, common, path))
                    if cached is None:
                        todo.append(cell)
                    else:
                        table[cell] = cached
            if not todo:
                continue
            model = model or load_attention_model(path, device)
            started = time.perf_counter()
            computed = segment_cases(model, cases, todo, timestep=t, threshold_mode=common["threshold_mode"],
                                     merge_iterations=common["merge_iterations"], condition=common["condition"],
                                     noise_seed=common["noise_seed"], batch_size=batch_size)
            for cell, items in computed.items():
                table[cell] = [_record(c, labels, info) for c, (labels, info) in zip(cases, items)]
                body = {"key": _cell_key(cell, common, path), "images": table[cell]}
                write_bytes_atomic(_cell_path(out, cell, common), json.dumps(body, indent=1).encode())
            log.info("%s t=%d: %d cells on %d images in %.1f s", label, t, len(todo), len(cases),
                     time.perf_counter() - started)
        del model
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


def segment(models: Sequence[str | Path], data: Sequence[str | Path], out: str | Path, *,
            thresholds: Sequence[float] = (0.05,), threshold_mode: str = "absolute", merge_iterations: int = 3,
            timesteps: Sequence[int] = (300,), grid_sizes: Sequence[int] = (16,), condition: str = "image",
            noise_seed: int | None = None, resolution: int | None = None, sd15: str | Path | None = None,
            batch_size: int = 8, device: str = "auto", limit: int | None = None, n_overlay: int = 3) -> dict:
    """Grid search DiffSeg over models x timesteps x grid sizes x thresholds; tables, overlays, results.json.

    Defaults are the paper's DiNO-Diffusion setting (absolute 0.05, t=300, 16x16). ``threshold_mode='relative'``
    reads each threshold as a quantile of the image's anchor-to-anchor KL instead. ``resolution`` defaults to
    the (first) model's. ``sd15``: a Stable Diffusion 1.x folder, run through the same code as a baseline.
    """
    if threshold_mode not in THRESHOLD_MODES:
        raise ValueError(f"--threshold-mode must be one of {THRESHOLD_MODES}, got {threshold_mode!r}.")
    if condition not in CONDITIONS:
        raise ValueError(f"--condition must be one of {CONDITIONS}, got {condition!r}.")
    if merge_iterations < 1 or not thresholds or not timesteps or not grid_sizes:
        raise ValueError("need >= 1 merge iteration, threshold, timestep and grid size.")
    out = Path(out)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    paths = expand_models(models)
    sd_paths = [Path(sd15)] if sd15 else []
    resolution = resolution or model_resolution(paths[0])
    per_source = [load_cases(src, resolution, limit) for src in data]
    if len({c[0].dataset for c in per_source}) < len(per_source):
        raise ValueError(f"two --data folders share a name ({[c[0].dataset for c in per_source]}): datasets are "
                         "named after their folder, so give each a distinct folder name.")
    cases = [c for group in per_source for c in group]
    names = [c.dataset for c in cases]
    log.info("%d images (%s) at %d px; %d model(s)", len(cases), ", ".join(sorted(set(names))), resolution,
             len(paths))
    common = {"threshold_mode": threshold_mode, "merge_iterations": merge_iterations, "condition": condition,
              "noise_seed": noise_seed, "resolution": resolution}
    grid_args = dict(thresholds=thresholds, timesteps=timesteps, grid_sizes=grid_sizes, common=common,
                     batch_size=batch_size, device=device)
    table = run_grid(paths, cases, out, **grid_args)
    sd_table = run_grid(sd_paths, cases, out, **grid_args) if sd_paths else {}
    best = seg_report.best_cells(table, sorted(set(names)))
    labels_of = {model_label(p): p for p in paths + sd_paths}
    by_id = {(r["dataset"], r["id"]): r["n_segments"] for r in table[best["combined"]]}
    baselines = run_baselines(cases, by_id)
    methods = {"diffseg": table[best["combined"]], **baselines}
    if sd_table:
        methods["sd15"] = sd_table[seg_report.best_cells(sd_table, [])["combined"]]
    results = seg_report.write_outputs(out, table, sd_table, best, methods, common,
                                       describe=lambda c: c.describe(threshold_mode, merge_iterations))
    if n_overlay > 0:
        cell = best["combined"]
        model = load_attention_model(labels_of[cell.model], device)
        results["overlays"] = seg_report.write_overlays(
            out, cases, table[cell], n_overlay,
            lambda sel: segment_cases(model, sel, [cell], timestep=cell.timestep, threshold_mode=threshold_mode,
                                      merge_iterations=merge_iterations, condition=condition,
                                      noise_seed=noise_seed, batch_size=batch_size)[cell])
    write_bytes_atomic(out / "results.json", json.dumps(results, indent=1).encode())
    return results
