"""The files of a generated dataset: sources.pt, provenance.json, labels.csv and preview.png."""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

import dinodiff
from dinodiff.data.shards import decode_png
from dinodiff.data.sources import SourceImage, iter_sources
from dinodiff.files import write_bytes_atomic
from dinodiff.generate.plan import SOURCES_FILE, GenerateSettings, Item, image_path
from dinodiff.generate.previews import save_interpolation_strips, save_rows
from dinodiff.generate.sample import encode_sources
from dinodiff.pipeline import DiNODiffusionPipeline

logger = logging.getLogger("dinodiff.generate")

PROVENANCE_FILE, LABELS_FILE, PREVIEW_FILE = "provenance.json", "labels.csv", "preview.png"


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def code_version() -> dict[str, Optional[str]]:
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
        elif any((out / "images").glob("*.png")):
            raise ValueError(f"{out} holds a dataset generated with other {', '.join(changed)} "
                             f"({ {k: old.get(k) for k in changed} }); rerun with the same settings to finish it, "
                             "or choose a new --out.")
        else:  # an earlier attempt made no image yet: start again with these settings
            logger.info("%s: no images yet, replacing the settings of an earlier attempt", out)
            (out / SOURCES_FILE).unlink(missing_ok=True)
    write_bytes_atomic(path, (json.dumps(record, indent=1) + "\n").encode())
    return record


def read_or_encode_sources(out: Path, source: str | Path, pipeline: DiNODiffusionPipeline, settings: GenerateSettings,
                           state: Any, batch_size: int) -> tuple[list[SourceImage], torch.Tensor]:
    """Sources' ids, labels and c_GLB: computed once by the main process into sources.pt, then read by all."""
    path = out / SOURCES_FILE
    if state.is_main_process and not path.is_file():
        ids, labels, chunks, pending = [], [], [], []

        def flush() -> None:
            if pending:
                chunks.append(encode_sources(pipeline, pipeline.to_tensor([s.image for s in pending]), batch_size))
                pending.clear()

        for item in iter_sources(source, size=pipeline.resolution, **settings.source_options):
            ids.append(item.id)
            labels.append(item.labels)
            pending.append(item)
            if len(pending) == 4 * batch_size:
                flush()
        flush()
        if not ids:
            raise FileNotFoundError(f"No source images found in {source} (options {settings.source_options}).")
        buffer = io.BytesIO()
        torch.save({"ids": ids, "labels": labels, "c_glb": torch.cat(chunks)}, buffer)
        write_bytes_atomic(path, buffer.getvalue())
        logger.info("encoded %d sources into %s", len(ids), path)
    state.wait_for_everyone()
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return [SourceImage(i, lab) for i, lab in zip(saved["ids"], saved["labels"])], saved["c_glb"]


def _label_cell(value: Optional[float]) -> str:
    return "" if value is None else f"{value:g}"


def write_labels(out: Path, items: list[Item], sources: list[SourceImage], names: list[str], strategy: str) -> Path:
    """labels.csv: path, one column per label (1 / 0 / -1 / empty), strategy, source_a, source_b, r, seed."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", *names, "strategy", "source_a", "source_b", "r", "seed"])
    for it in items:
        labels = sources[it.label_source].labels
        writer.writerow([image_path(out, it.index).relative_to(out).as_posix(),
                         *[_label_cell(labels.get(n)) for n in names], strategy, sources[it.a].id,
                         "" if it.b is None else sources[it.b].id, "" if it.r is None else f"{it.r:.6f}", it.seed])
    write_bytes_atomic(out / LABELS_FILE, buffer.getvalue().encode())
    return out / LABELS_FILE


def write_outputs(out: Path, items: list[Item], sources: list[SourceImage], names: list[str],
                  settings: GenerateSettings, pipeline: DiNODiffusionPipeline, source: str | Path,
                  preview_rows: int) -> None:
    """labels.csv, the preview and provenance.json marked complete (main process, after every image exists)."""
    missing = [it.index for it in items if not image_path(out, it.index).is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} images are missing in {out / 'images'} (first: {missing[:5]}); rerun.")
    write_labels(out, items, sources, names, settings.strategy)
    if preview_rows > 0:
        write_preview(out, items, sources, settings, pipeline, source, preview_rows)
    path = out / PROVENANCE_FILE
    record = json.loads(path.read_text())
    record.update(complete=True, images=len(items), sources=len(sources), labels=names)
    write_bytes_atomic(path, (json.dumps(record, indent=1) + "\n").encode())


def write_preview(out: Path, items: list[Item], sources: list[SourceImage], settings: GenerateSettings,
                  pipeline: DiNODiffusionPipeline, source: str | Path, rows: int) -> Path:
    """Reconstruction: sources and their first generated images. Interpolation: A, r = 0 ... 1, B strips."""
    firsts: dict[tuple[int, Optional[int]], list[Item]] = {}
    for it in items:
        if (it.a, it.b) in firsts or len(firsts) < rows:
            firsts.setdefault((it.a, it.b), []).append(it)
    wanted = {sources[i].id for key in firsts for i in key if i is not None}
    options = {k: v for k, v in settings.source_options.items() if k != "limit"}
    found = {s.id: torch.from_numpy(s.image)[None].float() / 255
             for s in iter_sources(source, size=pipeline.resolution, ids=wanted, **options)}
    path = out / PREVIEW_FILE
    if settings.strategy == "interpolation":
        pairs = [(found[sources[a].id], found[sources[b].id]) for a, b in firsts]
        return save_interpolation_strips(path, pipeline, pairs, seed=settings.seed, steps=settings.num_inference_steps,
                                         method=settings.mix, guidance_scale=settings.guidance_scale)
    grid = []
    for (a, _), its in firsts.items():
        generated = [torch.from_numpy(decode_png(image_path(out, it.index).read_bytes()))[None].float() / 255
                     for it in its[:8]]
        grid.append(torch.stack([found[sources[a].id], *generated]))
    return save_rows(path, grid)
