"""Sections of the report, one builder per kind of results file (run folder, generated set, results.json)."""

from __future__ import annotations

import csv
import logging
import math
import re
from pathlib import Path
from typing import Any

import yaml

from dinodiff.report.blocks import (Code, Figure, Markdown, Section, Table, fid_figure, flatten, fmt, image_figure,
                                    loss_figure, rows_table)
from dinodiff.report.discover import read_json, resolve_file

logger = logging.getLogger(__name__)

MAX_CSV_ROWS = 60
MAX_NAMED_FIGURES = 24
PROVENANCE_KEYS = ("checkpoint", "model", "extractor", "tap", "seed", "seeds", "data", "command", "encoder",
                   "settings", "code_version", "split", "source")


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
    folder = run / "checkpoints"
    names = [p.name for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
    return sorted(int(m.group(1)) for m in map(re.compile(r"checkpoint-(\d+)$").match, names) if m)


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
    figure = loss_figure(steps, loss, lr if all(v is not None for v in lr) else None, checkpoint_steps(run), best_step)
    tail = loss[-max(1, len(loss) // 10):]
    last = rows[-1]
    facts = {"steps": str(steps[-1]), "final loss (mean of last 10%)": f"{sum(tail) / len(tail):.4g}",
             "first loss": f"{loss[0]:.4g}", "images seen": fmt(last.get("images_seen")),
             "elapsed (s)": fmt(_float(last.get("elapsed_s"))), "images/s (last)": fmt(_float(last.get("images_per_s"))),
             "checkpoints": fmt(checkpoint_steps(run)) or "-"}
    if best:
        facts["best checkpoint"] = f"step {best.get('step')} ({best.get('metric')} {fmt(best.get('value'))})"
    return Section("training", f"Training: {run.name}", run / "metrics.csv",
                   [Figure("Loss by step", figure, "Grey lines: checkpoints; dashed red: the best checkpoint.",
                           run / "metrics.csv"), Table("Summary", ["", ""], [[k, v] for k, v in facts.items()])],
                   provenance={"metrics": str(run / "metrics.csv"), **({"best.json": str(run / "best" / "best.json")}
                                                                        if best else {})},
                   headline={"training steps": str(steps[-1]), "final loss": facts["final loss (mean of last 10%)"]})


def _setting(row: dict) -> str:
    return (f"{row.get('extractor')}:{row.get('tap')} ({row.get('n_real')} real vs {row.get('n_fake')} generated, "
            f"{row.get('sample_steps')} steps, seed {row.get('seed')})")


def fid_section(run: Path) -> Section | None:
    if not (run / "fid.csv").is_file():
        return None
    rows = [r for r in read_csv(run / "fid.csv") if _float(r.get("fid")) is not None and _float(r.get("step")) is not None]
    if not rows:
        raise ValueError("no row with a numeric step and FID")
    for r in rows:
        r["step"] = str(int(float(r["step"])))
    rows.sort(key=lambda r: int(r["step"]))
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for r in rows:
        steps, values = curves.setdefault(_setting(r), ([], []))
        steps.append(int(r["step"]))
        values.append(float(r["fid"]))
    best = {name: min(zip(steps, values), key=lambda sv: (sv[1], sv[0])) for name, (steps, values) in curves.items()}
    table = [[r["step"], f"{float(r['fid']):.4g}" + (" ★" if (int(r["step"]), float(r["fid"])) == best[_setting(r)]
                                                     else ""),
              f"{fmt(_float(r.get('kid_mean')))} ± {fmt(_float(r.get('kid_std')))}", _setting(r),
              r.get("checkpoint", "")] for r in rows]
    first_name = next(iter(best))
    step, value = best[first_name]
    best_row = next(r for r in rows if int(r["step"]) == step and _setting(r) == first_name)
    provenance = {"fid.csv": str(run / "fid.csv"), "best checkpoint": best_row.get("checkpoint", ""),
                  **{k: str(best_row.get(k, "")) for k in ("extractor", "tap", "n_real", "n_fake", "per_source",
                                                           "sample_steps", "seed")},
                  "to rerun": f"dinodiff sweep {run} (same settings: scored checkpoints are skipped)"}
    return Section("fid", f"Image quality by checkpoint: {run.name}", run / "fid.csv",
                   [Figure("FID/FD by checkpoint", fid_figure(curves, best), "★: the best checkpoint of each setting.",
                           run / "fid.csv"),
                    Table("fid.csv", ["step", "FID/FD", "KID", "features and set", "checkpoint"], table)],
                   provenance=provenance,
                   headline={f"best FD ({best_row.get('extractor')}:{best_row.get('tap')})": f"{value:.4g} @ step {step}"})


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
TITLES = {"encoder-probe": "Encoder probe", "classify": "Classification: Table 1 and Figure 4",
          "segment": "Zero-shot lung segmentation: Table 2 and Figure 5", "audit": "Privacy audit"}


def _table_value(name: str, value: Any, base: Path, used: set[Path]) -> Any:
    if isinstance(value, list):
        return rows_table(name, value)
    path = resolve_file(base, value)
    if path is None:
        return Markdown(name, str(value)) if isinstance(value, str) and "|" in value else None
    used.add(path)
    if path.suffix == ".md":
        return Markdown(name, path.read_text(), path)
    if path.suffix == ".csv":
        rows = read_csv(path)
        return rows_table(name, rows) if len(rows) <= MAX_CSV_ROWS else None
    return None


def _named_files(data: Any, depth: int = 0) -> list[str]:
    """String values that look like figure or table files, anywhere in the first levels of a results.json."""
    if depth > 3:
        return []
    if isinstance(data, str):
        return [data] if data.lower().endswith((".png", ".jpg", ".jpeg", ".md")) else []
    values = data.values() if isinstance(data, dict) else data if isinstance(data, list) else []
    return [s for v in list(values)[:200] for s in _named_files(v, depth + 1)]


def _segment_extras(data: dict) -> tuple[dict[str, str], dict[str, str]]:
    """Headline Dice numbers and provenance of `dinodiff segment`'s results.json."""
    headline = {}
    for method in ("diffseg", "diffcut", "prior"):
        mean = _dig(data, f"methods.{method}.summary.combined.hungarian_both")
        if isinstance(mean, list) and mean and _float(mean[0]) is not None:
            headline[f"Dice, {_dig(data, f'methods.{method}.name') or method}"] = f"{100 * float(mean[0]):.1f} %"
    best = _dig(data, "best.combined") or {}
    provenance = {**flatten(data.get("settings") or {}, "settings"), "best configuration": fmt(best.get("description")),
                  "checkpoint": fmt(_dig(best, "cell.model")), **flatten(data.get("datasets") or {}, "images")}
    return headline, provenance


def results_section(path: Path, data: dict) -> Section:
    """Any results.json: its tables (row dicts, Markdown, files), figures, headline numbers and provenance."""
    kind, base, used = str(data["kind"]), path.parent, set()
    blocks: list[Any] = []
    if isinstance(data.get("table"), list):
        blocks.append(rows_table("", data["table"]))
    tables = data.get("tables")
    for name, value in (tables.items() if isinstance(tables, dict) else [("Table", tables)] if tables else []):
        block = _table_value(str(name), value, base, used)
        blocks.append(block) if block is not None else None
    named: list[tuple[str, Any]] = []
    for key in ("figures", "overlays"):
        value = data.get(key)
        named += list(value.items()) if isinstance(value, dict) else [(key, v) for v in value] \
            if isinstance(value, list) else []
    scanned = [(Path(v).stem, v) for v in _named_files(data)]
    missing = [str(v) for _, v in named if resolve_file(base, v) is None]
    for name, value in (named + scanned)[:MAX_NAMED_FIGURES]:
        file = resolve_file(base, value)
        if file is None or file in used:
            continue
        used.add(file)
        if file.suffix == ".md":
            blocks.append(Markdown(file.stem, file.read_text(), file))
        elif (figure := image_figure(file, str(name))) is not None:
            blocks.append(figure)
    headline = {str(k): fmt(v) for k, v in (data.get("headline") or {}).items()} \
        if isinstance(data.get("headline"), dict) else {}
    provenance = {"results": str(path), **flatten(data.get("provenance") or {})} \
        if isinstance(data.get("provenance"), dict) else {"results": str(path)}
    provenance.update({k: fmt(data[k]) for k in PROVENANCE_KEYS if k in data and k not in ("settings",)})
    if kind == "segment" and "methods" in data:
        extra_headline, extra_provenance = _segment_extras(data)
        headline, provenance = {**extra_headline, **headline}, {**provenance, **extra_provenance}
    warning = f"Named but not found: {', '.join(missing)}." if missing else ""
    title = str(data.get("title") or TITLES.get(kind) or kind)
    return Section(kind, title, path, blocks, provenance, headline, warning=warning)


def fid_results_section(results: list[tuple[Path, dict]]) -> Section:
    """`dinodiff fid --out X.json` results: one row each."""
    rows = [{"result": str(p.name), "FID/FD": d.get("fid"), "KID": f"{fmt(d.get('kid_mean'))} ± {fmt(d.get('kid_std'))}",
             "features": f"{d.get('extractor')}:{d.get('tap')}", "real": d.get("real"), "generated": d.get("fake"),
             "n real / generated": f"{d.get('n_real')} / {d.get('n_fake')}", "seed": d.get("seed")}
            for p, d in results]
    provenance = {f"{p.name}.{k}": fmt(d.get(k)) for p, d in results for k in ("extractor", "tap", "weights", "real",
                                                                               "fake", "seed") if k in d}
    first = results[0][1]
    return Section("fid", "Image quality: FID/FD of generated sets", results[0][0],
                   [rows_table("dinodiff fid results", rows)], provenance,
                   headline={f"FD ({first.get('extractor')}:{first.get('tap')})": fmt(_float(first.get("fid")))})
