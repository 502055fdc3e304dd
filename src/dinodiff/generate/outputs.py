"""The files of a generated dataset: sources/, provenance.json, labels.csv and preview.png.

Everything here streams over the plan (`ItemPlan`) and the memory-mapped sources (`SourceTable`): labels.csv is
written row by row, the completeness check stats one file at a time.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dinodiff
from dinodiff.data.image_sets import SourceImage, iter_sources
from dinodiff.data.shards import decode_png
from dinodiff.files import atomic_path, write_bytes_atomic
from dinodiff.generate.plan import GenerateSettings, Item, ItemPlan, image_path
from dinodiff.generate.sources import (
    SOURCES_DIR,
    SourceTable,
    is_complete,
    write_sources,
)
from dinodiff.pipeline import DiNODiffusionPipeline
from dinodiff.pipeline.figures import save_interpolation_strips, save_rows
from dinodiff.pipeline.sample import encode_sources

logger = logging.getLogger(__name__)

PROVENANCE_FILE, LABELS_FILE, PREVIEW_FILE = "provenance.json", "labels.csv", "preview.png"
LEGACY_SOURCES_FILE = "sources.pt"  # what dinodiff wrote before sources/ (whole c_GLB in one file)


def has_images(out: Path) -> bool:
    """Whether any image was generated in `out` (nested images/NNN/ folders, or the older flat images/)."""
    return next((out / "images").rglob("*.png"), None) is not None


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def code_version() -> dict[str, str | None]:
    """dinodiff's version and, when run from a git checkout, its commit (+ '-dirty' with local changes)."""
    here = Path(dinodiff.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, ""
    return {"dinodiff": dinodiff.__version__, "git_commit": f"{commit}-dirty" if commit and dirty else commit}


def start_provenance(out: Path, model: str | Path, pipeline: DiNODiffusionPipeline, settings: GenerateSettings,
                     source: str | Path) -> dict:
    """Write provenance.json (complete: false); refuse to continue a folder made with other settings."""
    match = re.search(r"checkpoint-(\d+)", str(model))
    record = {
        "model": str(model), "checkpoint_step": int(match.group(1)) if match else None, "source": str(source),
        "scheduler": type(pipeline.scheduler).__name__, "num_inference_steps": settings.num_inference_steps,
        "guidance_scale": settings.guidance_scale, "cond_dropout": pipeline.config.cond_dropout,
        "resolution": pipeline.resolution, "settings": _jsonable(asdict(settings)), "code_version": code_version(),
        "scheduler_config": _jsonable(dict(pipeline.scheduler.config)), "complete": False,
    }
    path = out / PROVENANCE_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        keys = ("model", "source", "settings")
        changed = [k for k in keys if old.get(k) != record[k]]
        if not changed:
            record = {**old, "code_version": record["code_version"], "complete": False}
        elif has_images(out):
            raise ValueError(f"{out} holds a dataset generated with other {', '.join(changed)} "
                             f"({ {k: old.get(k) for k in changed} }); rerun with the same settings to finish it, "
                             "or choose a new --out.")
        else:  # an earlier attempt made no image yet: start again with these settings
            logger.info("%s: no images yet, replacing the settings of an earlier attempt", out)
            (out / LEGACY_SOURCES_FILE).unlink(missing_ok=True)
            shutil.rmtree(out / SOURCES_DIR, ignore_errors=True)
    write_bytes_atomic(path, (json.dumps(record, indent=1) + "\n").encode())
    return record


def open_sources(out: Path, source: str | Path, pipeline: DiNODiffusionPipeline, settings: GenerateSettings,
                 state: Any, batch_size: int) -> SourceTable:
    """Sources' ids, labels and c_GLB: encoded once by the main process into OUT/sources/, memory-mapped by all."""
    folder = out / SOURCES_DIR
    if state.is_main_process and not is_complete(folder):
        def encode(items: list[SourceImage]) -> torch.Tensor:
            return encode_sources(pipeline, pipeline.to_tensor([s.image for s in items]), batch_size)

        stream = iter_sources(source, size=pipeline.resolution, **settings.source_options)
        try:
            count = write_sources(folder, stream, encode, encode_batch=4 * batch_size)
        except FileNotFoundError:
            raise FileNotFoundError(f"No source images found in {source} (options {settings.source_options}).") from None
        logger.info("encoded %d sources into %s", count, folder)
    state.wait_for_everyone()
    return SourceTable(folder)


def _label_cell(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def write_labels(out: Path, plan: ItemPlan, sources: SourceTable, names: list[str], strategy: str,
                 block: int = 4096) -> Path:
    """labels.csv: path, one column per label (1 / 0 / -1 / empty), strategy, source_a, source_b, r, seed."""
    columns = [sources.names.index(n) if n in sources.names else None for n in names]
    ids = sources.ids
    with atomic_path(out / LABELS_FILE) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", *names, "strategy", "source_a", "source_b", "r", "seed"])
        for start in range(0, len(plan), block):
            for it in plan.items(start, start + block):
                row = sources.labels[it.label_source]
                cells = [_label_cell(None if c is None or np.isnan(row[c]) else float(row[c])) for c in columns]
                writer.writerow([image_path(out, it.index).relative_to(out).as_posix(), *cells, strategy, ids[it.a],
                                 "" if it.b is None else ids[it.b], "" if it.r is None else f"{it.r:.6f}", it.seed])
    return out / LABELS_FILE


def write_outputs(out: Path, plan: ItemPlan, sources: SourceTable, names: list[str], settings: GenerateSettings,
                  pipeline: DiNODiffusionPipeline, source: str | Path, preview_rows: int) -> None:
    """labels.csv, the preview and provenance.json marked complete (main process, after every image exists)."""
    missing = [i for i in range(len(plan)) if not image_path(out, i).is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} images are missing in {out / 'images'} (first: {missing[:5]}); rerun.")
    write_labels(out, plan, sources, names, settings.strategy)
    if preview_rows > 0:
        write_preview(out, preview_items(plan, preview_rows), sources, settings, pipeline, source, preview_rows)
    path = out / PROVENANCE_FILE
    record = json.loads(path.read_text())
    record.update(complete=True, images=len(plan), sources=len(sources), labels=names)
    write_bytes_atomic(path, (json.dumps(record, indent=1) + "\n").encode())


def preview_items(plan: ItemPlan, rows: int, per_row: int = 8) -> list[Item]:
    """The items of the first `rows` distinct (a, b) pairs in plan order, at most `per_row` of each."""
    keys = plan.a * (int(max(plan.a.max(), plan.b.max())) + 2) + (plan.b + 1)
    _, first = np.unique(keys, return_index=True)
    chosen = keys[np.sort(first)[:rows]]
    picked = [i for key in chosen for i in np.flatnonzero(keys == key)[:per_row]]
    return [plan.items(int(i), int(i) + 1)[0] for i in sorted(picked)]


def write_preview(out: Path, items: list[Item], sources: SourceTable, settings: GenerateSettings,
                  pipeline: DiNODiffusionPipeline, source: str | Path, rows: int) -> Path:
    """Reconstruction: sources and their first generated images. Interpolation: A, r = 0 ... 1, B strips."""
    firsts: dict[tuple[int, int | None], list[Item]] = {}
    for it in items:
        if (it.a, it.b) in firsts or len(firsts) < rows:
            firsts.setdefault((it.a, it.b), []).append(it)
    ids = sources.ids
    wanted = {ids[i] for key in firsts for i in key if i is not None}
    options = {k: v for k, v in settings.source_options.items() if k != "limit"}
    found = {s.id: torch.from_numpy(s.image)[None].float() / 255
             for s in iter_sources(source, size=pipeline.resolution, ids=wanted, **options)}
    path = out / PREVIEW_FILE
    if settings.strategy == "interpolation":
        pairs = [(found[ids[a]], found[ids[b]]) for a, b in firsts]
        return save_interpolation_strips(path, pipeline, pairs, seed=settings.seed, steps=settings.num_inference_steps,
                                         method=settings.mix, guidance_scale=settings.guidance_scale)
    grid = []
    for (a, _), its in firsts.items():
        generated = [torch.from_numpy(decode_png(image_path(out, it.index).read_bytes()))[None].float() / 255
                     for it in its[:8]]
        grid.append(torch.stack([found[ids[a]], *generated]))
    return save_rows(path, grid)
