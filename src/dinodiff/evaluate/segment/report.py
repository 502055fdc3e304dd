"""Summaries and the Table-2-style tables (Markdown + CSV) of the segment stage.

Every configuration is chosen on the tuning split (`split.TUNE`) and every number in the tables is measured
on the report split (`split.REPORT`), which the choice never saw.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dinodiff.evaluate.segment.metrics import mean_sd, paired_bootstrap
from dinodiff.evaluate.segment.settings import Cell, SegmentSettings
from dinodiff.evaluate.segment.split import REPORT, TUNE, only
from dinodiff.results import Results, markdown_table

COMBINED = "combined"
METRICS = {"hungarian_both": ("hungarian", "both"), "hungarian_left": ("hungarian", "left"),
           "hungarian_right": ("hungarian", "right"), "union_both": ("union", "both"),
           "single_both": ("single", "both")}
METHOD_NAMES = {"diffseg": "DiNO-Diffusion (DiffSeg)", "diffseg+cc": "DiNO-Diffusion (DiffSeg + components)",
                "diffcut": "DiNO-Diffusion (DiffCut)", "diffcut+cc": "DiNO-Diffusion (DiffCut + components)",
                "ncut-inputs": "DiNO-Diffusion (Ncut on attention inputs)",
                "ncut-inputs+cc": "DiNO-Diffusion (Ncut on attention inputs + components)",
                "ncut-superpixels": "DiNO-Diffusion (Ncut over superpixels)",
                "ncut-superpixels+cc": "DiNO-Diffusion (Ncut over superpixels + components)",
                "sd15": "SD 1.5 (DiffSeg)", "prior": "Mean-mask prior (leave-one-out)",
                "position": "Position-only k-means", "otsu": "Otsu",
                "superpixels": "Superpixels (Felzenszwalb, image only)", "whole": "Whole image (1 segment)"}
ZERO_SHOT = ("diffseg", "diffseg+cc", "diffcut", "diffcut+cc", "ncut-inputs", "ncut-inputs+cc", "ncut-superpixels",
             "ncut-superpixels+cc", "sd15")
BASELINES = ("prior", "position", "otsu", "superpixels", "whole")


def summarize(records: Sequence[dict]) -> dict[str, dict]:
    """{dataset | 'combined': {metric: [mean, sd], 'n_segments': [mean, sd], 'n': images}}."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["dataset"], []).append(r)
    groups[COMBINED] = list(records)
    out = {}
    for name, rows in groups.items():
        entry: dict[str, Any] = {"n": len(rows)}
        for metric, (family, key) in METRICS.items():
            entry[metric] = list(mean_sd([r[family][key] for r in rows if key in r[family]]))
        entry["n_segments"] = list(mean_sd([r["n_segments"] for r in rows]))
        out[name] = entry
    return out


def _score(records: Sequence[dict], dataset: str) -> float:
    rows = [r["hungarian"]["both"] for r in records if dataset == COMBINED or r["dataset"] == dataset]
    return float(np.mean(rows)) if rows else -1.0


def best_cells(table: Mapping[Cell, Sequence[dict]], datasets: Sequence[str], split: str = TUNE) -> dict[str, Cell]:
    """The cell with the highest mean Hungarian both-lung Dice on ``split`` images, overall ('combined') and
    per dataset (records tagged with their split)."""
    cells = sorted(table, key=lambda c: (c.model, c.method, c.timesteps, c.grid, c.threshold, c.alpha, c.refine))
    scores = {c: {d: _score(only(table[c], split), d) for d in [COMBINED, *datasets]} for c in cells}
    return {d: max(cells, key=lambda c: scores[c][d]) for d in [COMBINED, *datasets]}


def _pct(ms: Sequence[float]) -> str:
    mean, sd = ms
    return "-" if not np.isfinite(mean) else f"{100 * mean:.1f} ± {100 * sd:.1f}"


def _config_of(settings: SegmentSettings, cell: Cell | str | None) -> tuple[str, str]:
    """(configuration without the model, checkpoint name) of a chosen cell; a baseline's configuration (a string)
    or '-'."""
    if cell is None or isinstance(cell, str):
        return cell or "-", "-"
    text = settings.describe(cell).split(" ", 1)[1]
    return text, cell.model.rsplit("-", 1)[0]


def method_table(summaries: Mapping[str, dict], tuned: Mapping[str, float], chosen: Mapping[str, Cell],
                 rows_order: Sequence[str], settings: SegmentSettings,
                 controls: Mapping[str, str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Table 2: one column per method; configuration, checkpoint, tuning-split Dice, then report-split Dice.
    ``controls``: the configuration of a baseline chosen on the tuning split."""
    cols = [m for m in METHOD_NAMES if m in summaries]
    configs = {**(controls or {}), **chosen}
    head = ["", *[METHOD_NAMES[m] for m in cols]]
    rows = [["Configuration (chosen on the tuning split)", *[_config_of(settings, configs.get(m))[0] for m in cols]],
            ["Checkpoint", *[_config_of(settings, configs.get(m))[1] for m in cols]],
            ["Tuning split, combined", *[f"{100 * tuned[m]:.1f}" if m in tuned else "-" for m in cols]]]
    rows += [[f"{d} (report split, n={summaries[cols[0]].get(d, {}).get('n', 0)})",
              *[_pct(summaries[m][d]["hungarian_both"]) if d in summaries[m] else "-" for m in cols]]
             for d in rows_order]
    return head, rows


def union_table(summaries: Mapping[str, dict], rows_order: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    cols = [m for m in METHOD_NAMES if m in summaries]
    rows = [[d, *[f"{_pct(summaries[m][d]['union_both'])} (k={summaries[m][d]['n_segments'][0]:.1f})"
                  if d in summaries[m] else "-" for m in cols]] for d in rows_order]
    return ["", *[METHOD_NAMES[m] for m in cols]], rows


def difference_rows(methods: Mapping[str, Sequence[dict]], leader: str, seed: int = 0) -> list[list[str]]:
    """The leading zero-shot method minus each other method, paired over report images: mean, 95% CI, p (the
    bootstrap's 5000 draws resolve p down to 0.0004)."""
    rows = []
    ours = {(r["dataset"], r["id"]): r["hungarian"]["both"] for r in methods[leader]}
    for base in [m for m in (*ZERO_SHOT, *BASELINES) if m in methods and m != leader]:
        theirs = {(r["dataset"], r["id"]): r["hungarian"]["both"] for r in methods[base]}
        keys = sorted(set(ours) & set(theirs))
        diff, lo, hi, p = paired_bootstrap([ours[k] for k in keys], [theirs[k] for k in keys], seed=seed)
        rows.append([f"{METHOD_NAMES[leader]} - {METHOD_NAMES[base]}", str(len(keys)), f"{100 * diff:+.1f}",
                     f"[{100 * lo:+.1f}, {100 * hi:+.1f}]", f"{p:.3g}" if p > 0 else "< 0.0004"])
    return rows


def per_dataset_rows(table: Mapping[Cell, Sequence[dict]], method: str, datasets: Sequence[str],
                     settings: SegmentSettings) -> list[list[str]]:
    """Per dataset: the configuration chosen on that dataset's tuning images, scored on its report images."""
    cells = {c: r for c, r in table.items() if c.variant == method}
    if not cells:
        return []
    best = best_cells(cells, datasets)
    rows = []
    for d in datasets:
        s = summarize(only(cells[best[d]], REPORT)).get(d)
        if s is None:
            continue
        rows.append([METHOD_NAMES[method], d, settings.describe(best[d]), _pct(s["hungarian_both"]),
                     _pct(s["hungarian_left"]), _pct(s["hungarian_right"]),
                     f"{_pct(s['union_both'])} (k={s['n_segments'][0]:.1f})", _pct(s["single_both"])])
    return rows


def per_checkpoint_rows(table: Mapping[Cell, Sequence[dict]], method: str,
                        settings: SegmentSettings) -> list[list[str]]:
    """Per checkpoint: the configuration chosen on the tuning split, its Dice on the report split."""
    rows = []
    for model in sorted({c.model for c in table if c.variant == method}, key=_checkpoint_order):
        cell = best_cells({c: r for c, r in table.items() if c.model == model and c.variant == method}, [])[COMBINED]
        s = summarize(only(table[cell], REPORT))[COMBINED]
        rows.append([METHOD_NAMES[method], model.rsplit("-", 1)[0], settings.describe(cell).split(" ", 1)[1],
                     f"{100 * _score(only(table[cell], TUNE), COMBINED):.1f}", _pct(s["hungarian_both"]),
                     f"{_pct(s['union_both'])} (k={s['n_segments'][0]:.1f})"])
    return rows


def table_markdown(context: Mapping[str, Any], tables: Mapping[str, tuple]) -> str:
    """The page: header line, then each table (header, rows) under its title."""
    parts = ["# Zero-shot lung segmentation", context["intro"]]
    for title, (head, rows) in tables.items():
        if rows:
            parts += [f"## {title}", markdown_table(head, rows)]
    return "\n\n".join(parts) + "\n"


def table_csv(summaries: Mapping[str, dict], chosen: Mapping[str, Cell], rows_order: Sequence[str],
              settings: SegmentSettings, controls: Mapping[str, str] | None = None) -> str:
    """Every method's report-split metrics (mean, SD, n) per dataset, with the configuration chosen on tuning
    (``controls``: a baseline's)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["split", "dataset", "method", "configuration", "metric", "mean", "sd", "n"])
    for m in [m for m in METHOD_NAMES if m in summaries]:
        cfg = settings.describe(chosen[m]) if m in chosen else (controls or {}).get(m, "-")
        for d in rows_order:
            if d not in summaries[m]:
                continue
            for metric in (*METRICS, "n_segments"):
                mean, sd = summaries[m][d][metric]
                writer.writerow([REPORT, d, m, cfg, metric, f"{mean:.5f}", f"{sd:.5f}", summaries[m][d]["n"]])
    return buf.getvalue()


def _checkpoint_order(label: str) -> tuple:
    name = label.rsplit("-", 1)[0]
    step = name.rsplit("-", 1)[-1]
    return (name.rsplit("-", 1)[0], int(step)) if step.isdigit() else (name, -1)


def results_record(out: Path, results: Mapping[str, Any]) -> Results:
    """`dinodiff segment`'s results record: the tables (table.md) and the overlays of each method, each method's
    combined Dice on the report split as the headline, the settings, images, split sizes and chosen
    configurations as provenance; everything `segment` returns under data."""
    out = Path(out)
    methods = results["methods"]
    n = next(iter(methods.values()))["summary"].get(COMBINED, {}).get("n", 0)
    headline = {}
    for key in [m for m in METHOD_NAMES if m in methods]:  # zero-shot methods first, then the baselines
        mean, sd = methods[key]["summary"][COMBINED]["hungarian_both"][:2]
        headline[f"Dice, both lungs, report split (n={n}): {methods[key]['name']}"] = \
            "-" if not np.isfinite(mean) else f"{100 * mean:.1f} ± {100 * sd:.1f} %"
    chosen = {METHOD_NAMES.get(m, m): b[COMBINED]["description"]
              for m, b in results.get("best_by_method", {}).items() if COMBINED in b}
    chosen.update({METHOD_NAMES.get(m, m): c["description"] for m, c in results.get("controls", {}).items()})
    splits = {name: len(subjects) for name, subjects in results.get("splits", {}).items()}
    figures = {}
    for name, path in (results.get("overlays") or {}).items():
        path = Path(path)
        figures[f"overlays: {name}"] = str(path.relative_to(out)) if path.is_relative_to(out) else str(path)
    leader = results.get("leader")
    entropy = results["attention_entropy"]
    return Results(
        kind="segment", title="Zero-shot lung segmentation (Table 2, Figure 5)",
        provenance={"settings": results["settings"], "images": results["datasets"],
                    "subjects per split": splits, "report images": n,
                    "training images among the evaluation images": results["training_images"]["statement"],
                    "configuration chosen on the tuning split": chosen},
        tables={"Table 2, paired differences and per-dataset choices (table.md)": "table.md"},
        figures=figures, headline=headline, data=dict(results),
        note=(f"Each method's configuration and checkpoint are chosen on the tuning split; every Dice is on the "
              f"report split (mean ± SD over images). Best on the tuning split: "
              f"{METHOD_NAMES.get(leader, leader)}. Attention entropy of its configuration: {entropy['mean']:.3f} "
              f"of {entropy['max_possible']:.3f} nats possible (near the maximum: near-uniform attention). "
              f"{results['training_images']['statement']}"))
