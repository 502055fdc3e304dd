"""The `segment` stage: zero-shot lung segmentation (DiffSeg and/or DiffCut), grid-searched on a tuning split,
reported on a report split beside baselines.

For every model (a run's checkpoints, model or pipeline folders) and timestep group, UNet passes give the
self-attention maps and the encoder's self-attention outputs; every cell (method x parameters) turns them
into label maps scored against the lung masks (`grid`). The configuration of each method is chosen on the
tuning images (`split`); the tables show the report images only. Outputs: ``results.json``, ``table.csv``,
``table.md``, ``overlays/<method>-<dataset>.png``, ``cells/`` (the cache).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from dinodiff import runs
from dinodiff.devices import resolve_device
from dinodiff.evaluate.segment import report as seg_report
from dinodiff.evaluate.segment.attention import AttentionModel, load_attention_model
from dinodiff.evaluate.segment.data import SegCase, load_cases
from dinodiff.evaluate.segment.grid import record, run_grid, segment_cases
from dinodiff.evaluate.segment.metrics import (
    mean_mask_prior,
    otsu_segments,
    position_kmeans,
    superpixel_segments,
)
from dinodiff.evaluate.segment.overlays import write_overlays
from dinodiff.evaluate.segment.settings import Cell, SegmentSettings
from dinodiff.evaluate.segment.split import (
    REPORT,
    TUNE,
    assign_splits,
    limit_cases,
    only,
    subjects_by_split,
    tag,
)
from dinodiff.files import write_bytes_atomic
from dinodiff.models.training_images import Overlap, find_overlap
from dinodiff.results import write_results

log = logging.getLogger(__name__)


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


def run_baselines(cases: Sequence[SegCase],
                  n_segments: dict[tuple[str, str], int] | None = None) -> dict[str, list[dict]]:
    """Mean-mask prior (leave-one-out mean of the other images' masks, >= 0.5), Otsu, the whole image as one
    segment, and position-only k-means with, per image, the number of segments the zero-shot method produced
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
        out["prior"].append(record(case, mean_mask_prior(means)))
        out["otsu"].append(record(case, otsu_segments(case.image)))
        out["whole"].append(record(case, np.zeros(case.image.shape, np.int64)))  # what a merge-all scores
        if n_segments is not None:
            out["position"].append(record(case, position_kmeans(case.image.shape, n_segments[case.dataset, case.id])))
    if n_segments is None:
        del out["position"]
    return out


def superpixel_control(cases: Sequence[SegCase], splits: dict, scales: Sequence[float]) -> tuple[list[dict], float]:
    """The image-only control: Felzenszwalb superpixels at each scale, the scale chosen on the tuning split as the
    zero-shot methods' configurations are; returns its records (tagged with their split) and the scale."""
    by_scale = {float(s): tag([record(c, superpixel_segments(c.image, s)) for c in cases], splits) for s in scales}

    def tuning_dice(scale: float) -> float:
        return float(np.mean([r["hungarian"]["both"] for r in only(by_scale[scale], TUNE)]))

    best = max(by_scale, key=tuning_dice)
    return by_scale[best], best


def load_all_cases(data: Sequence[str | Path], resolution: int) -> list[SegCase]:
    """The cases of every data folder, in order; datasets are named after their folders, so names must differ."""
    per_source = [load_cases(src, resolution) for src in data]
    if len({c[0].dataset for c in per_source}) < len(per_source):
        raise ValueError(f"two --data folders share a name ({[c[0].dataset for c in per_source]}): datasets are "
                         "named after their folder, so give each a distinct folder name.")
    return [c for group in per_source for c in group]


def choose(table: dict[Cell, list[dict]], methods: Sequence[str], names: Sequence[str]) -> dict[str, dict[str, Cell]]:
    """Per method, the best cell on the tuning split, overall ('combined') and per dataset."""
    return {m: seg_report.best_cells({c: r for c, r in table.items() if c.variant == m}, names) for m in methods}


def evaluation_images(data: Sequence[str | Path], paths: Sequence[Path], settings: SegmentSettings,
                      out: Path) -> tuple[list[SegCase], dict, dict]:
    """The cases, their tuning / report split (the model's training images tune only, unless transductive), cut
    to ``settings.limit`` per dataset after the split, and the record of the training-image check."""
    cases = load_all_cases(data, settings.resolution)
    overlap = training_overlap(cases, paths, settings.transductive, out / "training-fingerprints")
    statement = overlap.statement(len(cases))
    seen = {(cases[i].dataset, cases[i].id): why for i, why in overlap.seen.items()}
    splits = assign_splits(cases, settings.report_fraction, settings.split_seed, () if settings.transductive else seen)
    cases = limit_cases(cases, splits, settings.limit, settings.report_fraction)
    splits = {(c.dataset, c.id): splits[c.dataset, c.id] for c in cases}
    seen = {key: why for key, why in seen.items() if key in splits}
    record = {"statement": _overlap_statement(statement, overlap, seen, splits, settings.transductive),
              "transductive": settings.transductive, "unknown": overlap.unknown,
              "sources": [dataclasses.asdict(s) for s in overlap.sources],
              "seen": [{"dataset": d, "id": i, "split": splits[d, i], "why": why} for (d, i), why in seen.items()]}
    return cases, splits, record


def training_overlap(cases: Sequence[SegCase], paths: Sequence[Path], transductive: bool,
                     cache_dir: Path | None = None) -> Overlap:
    """The evaluation images the models trained on (UNet or encoder), found by content and by source file."""
    overlap = find_overlap([c.image for c in cases], [c.path for c in cases], paths, cache_dir)
    if overlap.seen:
        log.warning("%d of %d images are training images of the model; %s", len(overlap.seen), len(cases),
                    "they are kept in the report split (--transductive)" if transductive
                    else "they (and their subjects) only tune")
    for line in overlap.unknown:
        log.warning("training images not checked, %s: the report split may hold images the model saw", line)
    return overlap


def _overlap_statement(checked: str, overlap: Overlap, seen: dict, splits: dict, transductive: bool) -> str:
    """What the check found, and where those images went."""
    in_report = sum(1 for key in seen if splits[key] == REPORT)
    if transductive and in_report:
        rule = f"--transductive: {in_report} of them are in the report split, so the report is transductive"
    elif overlap.unknown:
        rule = "the images found only tune, but the report split may hold images of the parts not checked"
    else:
        rule = "they and their subjects only tune: no report image is one the model trained on"
    return f"{checked}. {rule}."


def _intro(cases: Sequence[SegCase], splits: dict, settings: SegmentSettings, entropy: float, max_h: float,
           seen: str) -> str:
    counts = {s: sum(1 for v in splits.values() if v == s) for s in (TUNE, REPORT)}
    per = ", ".join(f"{d} {sum(1 for c in cases if c.dataset == d)}" for d in dict.fromkeys(c.dataset for c in cases))
    return (f"Images: {per}; resolution {settings.resolution} px, condition '{settings.condition}'. Split by subject "
            f"(an image without a subject id is its own subject), seed {settings.split_seed}: **{counts[TUNE]} tuning "
            f"images choose each method's configuration and checkpoint; every Dice below is on the other "
            f"{counts[REPORT]} (report split)**, mean ± SD over images, in %. The mean-mask prior is the mean of all "
            f"other images' masks (leave-one-out). Mean entropy of the aggregated self-attention (DiffSeg's chosen "
            f"configuration): {entropy:.3f} nats of a possible {max_h:.3f} (uniform attention). "
            f"Training images: {seen}")


def write_tables(out: Path, cases: Sequence[SegCase], splits: dict, table: dict[Cell, list[dict]],
                 methods: dict[str, list[dict]], chosen: dict[str, Cell], settings: SegmentSettings,
                 seen: str, controls: dict[str, str] | None = None) -> dict:
    """table.md + table.csv; returns the tables' part of results.json. ``controls``: the configuration of each
    baseline chosen on the tuning split (the superpixels' scale)."""
    controls = controls or {}
    names = list(dict.fromkeys(c.dataset for c in cases))
    rows_order = [*names, seg_report.COMBINED]
    report = {m: only(recs, REPORT) for m, recs in methods.items()}
    summaries = {m: seg_report.summarize(recs) for m, recs in report.items()}
    tuned = {m: float(np.mean([r["hungarian"]["both"] for r in only(methods[m], TUNE)])) for m in [*chosen, *controls]}
    # the dinodiff zero-shot method that won on the tuning split (the SD 1.5 baseline is not a candidate)
    leader = max((m for m in chosen if m != "sd15"), key=lambda m: tuned[m])
    first = table[chosen[leader]]
    entropy = float(np.mean([r["entropy"] for r in first])), first[0]["max_entropy"]
    tables = {
        "Table 2: one segment per lung (Hungarian matching), both lungs, report split":
            seg_report.method_table(summaries, tuned, chosen, rows_order, settings, controls),
        f"Paired differences on the report split (bootstrap over images, 95% CI): {seg_report.METHOD_NAMES[leader]}"
        " (best on the tuning split) against the others": (["Difference (Dice %)", "Images", "Mean", "95% CI", "p"],
                                                          seg_report.difference_rows(report, leader)),
        "Union of segments lying mostly inside the lungs (rewards over-segmentation; k = segments per image)":
            seg_report.union_table(summaries, rows_order),
        "Configuration chosen per dataset (on its tuning images; scored on its report images)":
            (["Method", "Dataset", "Configuration", "Both lungs", "Left lung", "Right lung", "Union (k)",
              "Best single segment vs both lungs"],
             [row for m in chosen for row in seg_report.per_dataset_rows(table, m, names, settings)]),
        "Per checkpoint (configuration chosen on the tuning split; combined)":
            (["Method", "Checkpoint", "Configuration", "Tuning Dice", "Report Dice", "Union (k)"],
             [row for m in chosen for row in seg_report.per_checkpoint_rows(table, m, settings)]),
    }
    md = seg_report.table_markdown({"intro": _intro(cases, splits, settings, *entropy, seen)}, tables)
    write_bytes_atomic(out / "table.md", md.encode())
    write_bytes_atomic(out / "table.csv",
                       seg_report.table_csv(summaries, chosen, rows_order, settings, controls).encode())
    return {"summaries": summaries, "tuned": tuned, "leader": leader, "entropy": entropy}


def segment(models: Sequence[str | Path], data: Sequence[str | Path], out: str | Path,
            settings: SegmentSettings = SegmentSettings(), **changes: Any) -> dict:
    """Grid-search the zero-shot methods over models x timesteps x parameters on the tuning split; tables,
    overlays and results.json on the report split.

    `settings` (with any `changes` to its fields, e.g. ``thresholds=[0.1]``): see :class:`SegmentSettings`.
    Each model is loaded once for the grid and, when it is the chosen one, reused for the overlays.
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
    cases, splits, seen_images = evaluation_images(data, paths, settings, out)
    names = list(dict.fromkeys(c.dataset for c in cases))
    log.info("%d images (%s) at %d px; %d model(s)", len(cases), ", ".join(names), settings.resolution, len(paths))
    table = {c: tag(r, splits) for c, r in run_grid(paths, cases, out, settings, load, model_label).items()}
    best = choose(table, settings.variants(), names)
    chosen = {m: best[m][seg_report.COMBINED] for m in settings.variants()}
    if sd_paths:
        sd_settings = dataclasses.replace(settings, methods=("diffseg",), refinements=("none",))
        sd_table = {c: tag(r, splits) for c, r in run_grid(sd_paths, cases, out, sd_settings, load, model_label).items()}
        chosen["sd15"] = seg_report.best_cells(sd_table, [])[seg_report.COMBINED]
        table.update({dataclasses.replace(c, method="sd15"): r for c, r in sd_table.items()})
        chosen["sd15"] = dataclasses.replace(chosen["sd15"], method="sd15")
    primary = table[chosen[settings.variants()[0]]]
    by_id = {(r["dataset"], r["id"]): r["n_segments"] for r in primary}
    methods = {m: table[c] for m, c in chosen.items()}
    methods.update({m: tag(r, splits) for m, r in run_baselines(cases, by_id).items()})
    methods["superpixels"], scale = superpixel_control(cases, splits, settings.superpixel_scales)
    controls = {"superpixels": f"scale={scale:g}"}
    tables = write_tables(out, cases, splits, table, methods, chosen, settings, seen_images["statement"], controls)
    describe = settings.describe
    results = {
        "settings": {**settings.cell_settings(), "methods": list(settings.methods),
                     "refinements": list(settings.refinements),
                     "timesteps": [list(g) for g in settings.timestep_groups()],
                     **{k: list(getattr(settings, k)) for k in ("thresholds", "grid_sizes", "taus", "alphas",
                                                                "feature_sides")},
                     "report_fraction": settings.report_fraction, "split_seed": settings.split_seed,
                     "limit": settings.limit, "sd15": settings.sd15,
                     "superpixel_scales": list(settings.superpixel_scales)},
        "datasets": {d: sum(1 for c in cases if c.dataset == d) for d in names},
        "splits": {s: sorted(k) for s, k in subjects_by_split(cases, splits).items()},
        "training_images": seen_images,
        "cells": [{"cell": asdict(c), "description": describe(c),
                   "tuning": seg_report.summarize(only(recs, TUNE)), "report": seg_report.summarize(only(recs, REPORT))}
                  for c, recs in sorted(table.items(), key=lambda kv: describe(kv[0]))],
        "best": {d: {"cell": asdict(c), "description": describe(c)} for d, c in best[tables["leader"]].items()},
        "best_by_method": {m: {d: {"cell": asdict(c), "description": describe(c)} for d, c in b.items()}
                           for m, b in best.items()},
        "leader": tables["leader"],
        "controls": {m: {"description": text} for m, text in controls.items()},
        "methods": {m: {"name": seg_report.METHOD_NAMES[m], "summary": tables["summaries"][m],
                        "tuning_dice": tables["tuned"].get(m), "per_image": only(recs, REPORT)}
                    for m, recs in methods.items()},
        "attention_entropy": {"mean": tables["entropy"][0], "max_possible": tables["entropy"][1]},
        "tables": {"markdown": str(out / "table.md"), "csv": str(out / "table.csv")},
    }
    if settings.n_overlay > 0:
        results["overlays"] = draw_overlays(out, cases, splits, table, chosen, paths + sd_paths, settings, load)
        report_cases = [c for c in cases if splits[c.dataset, c.id] == REPORT]  # what the image alone gives
        results["overlays"].update(write_overlays(
            out, "superpixels", seg_report.METHOD_NAMES["superpixels"], report_cases,
            only(methods["superpixels"], REPORT), settings.n_overlay,
            lambda sel: [(superpixel_segments(c.image, scale), {}) for c in sel]))
    write_results(out, seg_report.results_record(out, results))
    return results


def draw_overlays(out: Path, cases: Sequence[SegCase], splits: dict, table: dict[Cell, list[dict]],
                  chosen: dict[str, Cell], paths: Sequence[Path], settings: SegmentSettings,
                  load: ModelLoader) -> dict[str, str]:
    """Per zero-shot method and dataset, the best and worst report-split images with its chosen configuration."""
    by_label = {model_label(p): p for p in paths}
    report_cases = [c for c in cases if splits[c.dataset, c.id] == REPORT]
    drawn = {}
    for method, cell in chosen.items():
        model = load(by_label[cell.model])
        real = dataclasses.replace(cell, method="diffseg") if method == "sd15" else cell
        records = only(table[cell], REPORT)
        drawn.update(write_overlays(
            out, method, seg_report.METHOD_NAMES[method], report_cases, records, settings.n_overlay,
            lambda sel, m=model, c=real: segment_cases(m, sel, [c], settings)[c]))
    return drawn
