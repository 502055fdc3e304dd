"""Sections of the report, one builder per kind of results file (run folder, generated set, results.json)."""

from __future__ import annotations

import csv
import logging
import math
import re
from pathlib import Path
from typing import Any

import yaml

from dinodiff.report.blocks import (
    Code,
    Figure,
    Markdown,
    Section,
    Table,
    flatten,
    fmt,
    image_figure,
    loss_figure,
    rows_table,
)
from dinodiff.report.discover import read_json, resolve_file
from dinodiff.results import Results
from dinodiff.runs import list_checkpoints

logger = logging.getLogger(__name__)

MAX_CSV_ROWS = 60
MAX_FIGURES = 24


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _dig(data: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def checkpoint_steps(run: Path) -> list[int]:
    return [step for step, _ in list_checkpoints(run)]


def loss_quantity(cfg: dict) -> str:
    """What a run's metrics.csv `loss` is: the DINO loss of an encoder run, else the diffusion MSE on its target."""
    if "head" in cfg and "loss" in cfg:  # `dinodiff pretrain-encoder`'s config (backbone, head, loss, ...)
        return "DINO loss (teacher-student cross-entropy)"
    target = "v" if _dig(cfg, "model.noise.prediction_type") == "v_prediction" else "noise"
    return f"MSE({target}, prediction)"


def best_info(run: Path, problems: list[str]) -> dict:
    path = run / "best" / "best.json"
    return (read_json(path, problems) or {}) if path.is_file() else {}


# ------------------------------------------------------------------------------------------ runs
def config_section(run: Path) -> Section:
    text = (run / "config.yaml").read_text()
    cfg = yaml.safe_load(text) or {}
    keys = {"run": "train.run_dir", "seed": "train.seed", "data (shards)": "data.shards", "data (cache)": "data.cache",
            "encoder": "model.encoder.name_or_path", "autoencoder": "model.autoencoder.kind",
            "UNet preset": "model.unet.preset", "resolution": "model.resolution", "max steps": "train.max_steps",
            "batch size": "train.batch_size", "learning rate": "optim.lr"}
    facts = {name: fmt(_dig(cfg, key)) for name, key in keys.items() if _dig(cfg, key) not in (None, "")}
    return Section("config", f"Run configuration: {run.name}", run / "config.yaml",
                   [Table("Key settings", ["setting", "value"], [[k, v] for k, v in facts.items()]),
                    Code("config.yaml (resolved, as saved with the run)", text, run / "config.yaml")],
                   provenance={"config": str(run / "config.yaml"), **facts})


def training_section(run: Path, problems: list[str]) -> Section | None:
    if not (run / "metrics.csv").is_file():
        return None
    rows = [r for r in read_csv(run / "metrics.csv") if _float(r.get("loss")) is not None
            and _float(r.get("step")) is not None]
    if not rows:
        return None  # a run that has not logged yet
    steps, loss = [int(float(r["step"])) for r in rows], [float(r["loss"]) for r in rows]
    lr = [_float(r.get("lr")) for r in rows]
    best = best_info(run, problems)
    best_step = int(best["step"]) if isinstance(best.get("step"), (int, float)) else None
    cfg = yaml.safe_load((run / "config.yaml").read_text()) or {} if (run / "config.yaml").is_file() else {}
    quantity = loss_quantity(cfg)
    figure = loss_figure(steps, loss, lr if all(v is not None for v in lr) else None, checkpoint_steps(run), best_step,
                         quantity=quantity, run=run.name)
    tail = loss[-max(1, len(loss) // 10):]
    last = rows[-1]
    facts = {"loss": quantity, "steps": str(steps[-1]), "final loss (mean of last 10%)": f"{sum(tail) / len(tail):.4g}",
             "first loss": f"{loss[0]:.4g}", "images seen": fmt(last.get("images_seen")),
             "elapsed (s)": fmt(_float(last.get("elapsed_s"))), "images/s (last)": fmt(_float(last.get("images_per_s"))),
             "checkpoints": fmt(checkpoint_steps(run)) or "-"}
    if best:
        facts["best checkpoint"] = f"step {best.get('step')} ({best.get('metric')} {fmt(best.get('value'))})"
    return Section("training", f"Training: {run.name}", run / "metrics.csv",
                   [Figure(f"{quantity} by step: {run.name}", figure, "Grey lines: checkpoints; dashed red: the best checkpoint.",
                           run / "metrics.csv"), Table("Summary", ["", ""], [[k, v] for k, v in facts.items()])],
                   provenance={"metrics": str(run / "metrics.csv"), **({"best.json": str(run / "best" / "best.json")}
                                                                        if best else {})},
                   headline={f"training steps of {run.name}": str(steps[-1]),
                             f"final {quantity} of {run.name}": facts["final loss (mean of last 10%)"]})


def samples_section(run: Path) -> Section | None:
    files = sorted((run / "samples").glob("*.png")) if (run / "samples").is_dir() else []
    chosen = [files[0], files[-1]] if len(files) > 1 else files
    figures = []
    for path in chosen:
        match = re.search(r"(\d+)", path.stem)
        label = f"step {int(match.group(1))}" if match else path.stem
        figure = image_figure(path, f"Samples at {label}",
                              "Each row: a held-out image, then samples conditioned on its c_GLB.", grid=True)
        if figure is not None:
            figures.append(figure)
    if not figures:
        return None
    return Section("samples", f"Samples during training: {run.name}", run / "samples", figures,
                   provenance={"samples": str(run / "samples"), "grids": str(len(files))},
                   note=f"{len(files)} grids in samples/; the first and the last are shown.")


# ------------------------------------------------------------------------------ generated sets
def generated_section(folder: Path, prov: dict) -> Section:
    settings = prov.get("settings") if isinstance(prov.get("settings"), dict) else {}
    strategy = str(settings.get("strategy") or "generated")
    blocks: list[Any] = []
    preview = image_figure(folder / "preview.png", f"{strategy}: preview",
                           "Interpolation: source A, r = 0 ... 1, source B." if strategy == "interpolation" else
                           "Each row: a source image, then images generated from its c_GLB.", grid=True) \
        if (folder / "preview.png").is_file() else None
    blocks.append(preview) if preview else None
    provenance = {"folder": str(folder), **{k: fmt(prov.get(k)) for k in (
        "model", "checkpoint_step", "source", "scheduler", "num_inference_steps", "guidance_scale", "images",
        "sources", "complete") if k in prov}, **{f"settings.{k}": fmt(v) for k, v in settings.items()},
        **{f"code_version.{k}": fmt(v) for k, v in (prov.get("code_version") or {}).items()}}
    warning = "" if preview else f"No preview.png in {folder} (rerun `dinodiff generate` with --preview-rows 4)."
    note = "" if prov.get("complete", True) else "Generation is not complete (provenance.json: complete false)."
    return Section(strategy, f"{strategy.capitalize()}: {folder.name}", folder, blocks, provenance,
                   headline={f"{strategy} images": fmt(prov.get("images"))} if "images" in prov else {}, note=note,
                   warning=warning)


# ------------------------------------------------------------------------------- results.json
def _table_value(name: str, value: Any, base: Path, used: set[Path]) -> Any:
    if isinstance(value, list):
        return rows_table(name, value)
    path = resolve_file(base, value)
    if path is None:
        return Markdown(name, str(value)) if "|" in value else None
    used.add(path)
    if path.suffix == ".md":
        return Markdown(name, path.read_text(), path)
    if path.suffix == ".csv":
        rows = read_csv(path)
        return rows_table(name, rows) if len(rows) <= MAX_CSV_ROWS else None
    return None


def results_section(path: Path, record: Results) -> Section:
    """A results record (dinodiff.results): its tables, figures, headline numbers, provenance, note and warnings;
    the stage's own `data` is never read."""
    base, used, blocks = path.parent, set(), []
    for name, value in record.tables.items():
        block = _table_value(str(name), value, base, used)
        blocks.append(block) if block is not None else None
    missing = []
    for name, value in list(record.figures.items())[:MAX_FIGURES]:
        file = resolve_file(base, value)
        if file is None:
            missing.append(str(value))
        elif file not in used and (figure := image_figure(file, str(name))) is not None:
            used.add(file)
            blocks.append(figure)
    provenance = {"results": str(path), **flatten(record.provenance)}
    warning = " ".join([*record.warnings, *([f"Named but not found: {', '.join(missing)}."] if missing else [])])
    return Section(record.kind, record.title or record.kind, path, blocks, provenance,
                   {str(k): fmt(v) for k, v in record.headline.items()}, note=record.note, warning=warning)
