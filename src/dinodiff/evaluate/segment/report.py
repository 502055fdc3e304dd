"""Summaries, the Table-2-style tables (CSV + Markdown) and Figure-5-style overlays of the segment stage."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from dinodiff.evaluate.segment.metrics import hungarian_scores, mean_sd
from dinodiff.evaluate.segment.settings import SegmentSettings
from dinodiff.files import atomic_path, write_bytes_atomic
from dinodiff.results import Results

COMBINED = "combined"
PRIMARY = ("hungarian", "both")
METRICS = {"hungarian_both": ("hungarian", "both"), "hungarian_left": ("hungarian", "left"),
           "hungarian_right": ("hungarian", "right"), "union_both": ("union", "both"),
           "single_both": ("single", "both")}
METHOD_NAMES = {"diffseg": "DiNO-Diffusion (DiffSeg)", "sd15": "SD 1.5 (DiffSeg)", "prior": "Mean-mask prior",
                "position": "Position-only k-means", "otsu": "Otsu", "whole": "Whole image (1 segment)"}


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


def best_cells(table: Mapping[Any, Sequence[dict]], datasets: Sequence[str]) -> dict[str, Any]:
    """The cell with the highest mean Hungarian both-lung Dice, overall ('combined') and per dataset."""
    cells = sorted(table, key=lambda c: (c.model, c.timestep, c.grid, c.threshold))
    summaries = {c: summarize(table[c]) for c in cells}
    return {name: max(cells, key=lambda c: summaries[c].get(name, {}).get("hungarian_both", [-1.0])[0])
            for name in [COMBINED, *datasets]}


def _pct(ms: Sequence[float]) -> str:
    mean, sd = ms
    return "-" if not np.isfinite(mean) else f"{100 * mean:.1f} ± {100 * sd:.1f}"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def _configs(best: Mapping[str, Any], sd_table: Mapping[Any, Sequence[dict]],
             methods: Mapping[str, Sequence[dict]]) -> dict[str, Any]:
    """The best overall cell of each DiffSeg method (DiNO-Diffusion, and SD 1.5 when it ran)."""
    configs = {"diffseg": best[COMBINED]}
    if "sd15" in methods:
        configs["sd15"] = best_cells(sd_table, [])[COMBINED]
    return configs


def _method_tables(summaries: Mapping[str, dict], configs: Mapping[str, Any], rows_order: Sequence[str],
                   settings: SegmentSettings) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """Header, Table 2 (hyper-parameters, then Hungarian Dice per dataset) and the union table, one column per method."""
    cols = [m for m in METHOD_NAMES if m in summaries]

    def hyper(m: str, field: str) -> str:
        c = configs.get(m)
        if c is None:
            return "-"
        return {"threshold": f"{settings.threshold_mode} {c.threshold:g} x{settings.merge_iterations}",
                "timestep": str(c.timestep), "grid": f"{c.grid}x{c.grid}", "model": c.model.rsplit("-", 1)[0]}[field]

    head = ["", *[METHOD_NAMES[m] for m in cols]]
    main = [[label, *[hyper(m, f) for m in cols]] for label, f in
            (("Threshold", "threshold"), ("Timestep", "timestep"), ("Grid size", "grid"), ("Checkpoint", "model"))]
    main += [[d, *[_pct(summaries[m][d]["hungarian_both"]) for m in cols]] for d in rows_order]
    union = [[d, *[f"{_pct(summaries[m][d]['union_both'])} (k={summaries[m][d]['n_segments'][0]:.1f})"
                   for m in cols]] for d in rows_order]
    return head, main, union


def _best_rows(table: Mapping[Any, Sequence[dict]], best: Mapping[str, Any], rows_order: Sequence[str],
               settings: SegmentSettings) -> tuple[list[list[str]], list[list[str]]]:
    """The best DiNO-Diffusion configuration per dataset, and per checkpoint (combined)."""
    per_ds = []
    for d in rows_order:
        s = summarize(table[best[d]])[d]
        per_ds.append([d, settings.describe(best[d]), _pct(s["hungarian_both"]), _pct(s["hungarian_left"]),
                       _pct(s["hungarian_right"]), f"{_pct(s['union_both'])} (k={s['n_segments'][0]:.1f})",
                       _pct(s["single_both"])])
    per_model = []
    for model in sorted({c.model for c in table}, key=_checkpoint_order):
        cell = best_cells({c: r for c, r in table.items() if c.model == model}, [])[COMBINED]
        s = summarize(table[cell])[COMBINED]
        per_model.append([model.rsplit("-", 1)[0], settings.describe(cell), _pct(s["hungarian_both"]),
                          f"{_pct(s['union_both'])} (k={s['n_segments'][0]:.1f})"])
    return per_ds, per_model


def _table_markdown(n_images: Mapping[str, int], entropy: Mapping[str, float], settings: SegmentSettings,
                    tables: tuple, best_rows: tuple) -> str:
    (head, main, union), (per_ds, per_model) = tables, best_rows
    return "\n\n".join([
        "# Zero-shot lung segmentation (DiffSeg)",
        f"Images: {', '.join(f'{d} {n}' for d, n in n_images.items())}; resolution {settings.resolution} px, "
        f"condition '{settings.condition}'. Dice in %, mean ± SD over images. Mean entropy of the aggregated "
        f"self-attention (best configuration): {entropy['mean']:.3f} nats of a possible {entropy['max_possible']:.3f} "
        "(uniform attention).",
        "## Table 2: one segment per lung (Hungarian matching), both lungs, best overall configuration",
        _markdown(head, main),
        "## Union of segments lying mostly inside the lungs (rewards over-segmentation; k = segments per image)",
        _markdown(head, union),
        "## Best DiNO-Diffusion configuration per dataset (Hungarian matching)",
        _markdown(["Dataset", "Configuration", "Both lungs", "Left lung", "Right lung", "Union (k)",
                   "Best single segment vs both lungs"], per_ds),
        "## Best configuration per checkpoint (combined)",
        _markdown(["Checkpoint", "Configuration", "Both lungs", "Union (k)"], per_model),
    ]) + "\n"


def _table_csv(table: Mapping[Any, Sequence[dict]], best: Mapping[str, Any], summaries: Mapping[str, dict],
               configs: Mapping[str, Any], rows_order: Sequence[str], settings: SegmentSettings) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["table", "dataset", "method", "configuration", "metric", "mean", "sd", "n"])
    for m in [m for m in METHOD_NAMES if m in summaries]:
        for d in rows_order:
            for metric in (*METRICS, "n_segments"):
                mean, sd = summaries[m][d][metric]
                cfg = settings.describe(configs[m]) if m in configs else "-"
                writer.writerow(["overall-best", d, m, cfg, metric, f"{mean:.5f}", f"{sd:.5f}", summaries[m][d]["n"]])
    for d in rows_order:
        s = summarize(table[best[d]])[d]
        for metric in (*METRICS, "n_segments"):
            writer.writerow(["dataset-best", d, "diffseg", settings.describe(best[d]), metric, f"{s[metric][0]:.5f}",
                             f"{s[metric][1]:.5f}", s["n"]])
    return buf.getvalue()


def write_outputs(out: Path, table: Mapping[Any, Sequence[dict]], sd_table: Mapping[Any, Sequence[dict]],
                  best: Mapping[str, Any], methods: Mapping[str, Sequence[dict]], settings: SegmentSettings) -> dict:
    """table.csv + table.md; returns the results.json content (without the overlays)."""
    datasets = [d for d in best if d != COMBINED]
    rows_order = [*datasets, COMBINED]
    summaries = {m: summarize(recs) for m, recs in methods.items()}
    configs = _configs(best, sd_table, methods)
    cols = [m for m in METHOD_NAMES if m in methods]
    n_images = {d: summaries[cols[0]][d]["n"] for d in rows_order}
    best_records = table[best[COMBINED]]
    entropy = {"mean": float(np.mean([r["entropy"] for r in best_records])),
               "max_possible": best_records[0]["max_entropy"]}
    md = _table_markdown(n_images, entropy, settings, _method_tables(summaries, configs, rows_order, settings),
                         _best_rows(table, best, rows_order, settings))
    write_bytes_atomic(out / "table.md", md.encode())
    write_bytes_atomic(out / "table.csv", _table_csv(table, best, summaries, configs, rows_order, settings).encode())
    describe = settings.describe
    return {
        "settings": settings.cell_settings(),
        "datasets": {d: n_images[d] for d in datasets},
        "cells": [{"cell": asdict(c), "description": describe(c), "summary": summarize(recs)}
                  for c, recs in sorted({**table, **sd_table}.items(), key=lambda kv: describe(kv[0]))],
        "best": {d: {"cell": asdict(c), "description": describe(c)} for d, c in best.items()},
        "methods": {m: {"name": METHOD_NAMES[m], "summary": summaries[m], "per_image": list(methods[m])}
                    for m in cols},
        "attention_entropy": entropy,
        "tables": {"markdown": str(out / "table.md"), "csv": str(out / "table.csv")},
    }


def _checkpoint_order(label: str) -> tuple:
    name = label.rsplit("-", 1)[0]
    step = name.rsplit("-", 1)[-1]
    return (name.rsplit("-", 1)[0], int(step)) if step.isdigit() else (name, -1)


def _pick(records: Sequence[dict], dataset: str, n: int) -> list[int]:
    idx = [i for i, r in enumerate(records) if r["dataset"] == dataset]
    idx.sort(key=lambda i: -records[i]["hungarian"]["both"])
    best, worst = idx[:n], [i for i in idx[::-1][:n] if i not in idx[:n]]
    return best + worst[::-1]


def write_overlays(out: Path, cases: Sequence[Any], records: Sequence[dict], n: int,
                   compute: Callable[[list], list[tuple[np.ndarray, dict]]]) -> dict[str, str]:
    """Per dataset, the n best and n worst images: image + ground truth, all segments, matched lungs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        chosen = _pick(records, dataset, n)
        labels = [lab for lab, _ in compute([cases[i] for i in chosen])]
        fig, axes = plt.subplots(len(chosen), 3, figsize=(7.5, 2.6 * len(chosen)), squeeze=False)
        for row, (i, lab) in enumerate(zip(chosen, labels)):
            case, rec = cases[i], records[i]
            match = hungarian_scores(lab, case.lungs)["segments"]
            for ax in axes[row]:
                ax.imshow(case.image, cmap="gray", vmin=0, vmax=255)
                ax.set_axis_off()
            for name, colour in (("left", "tab:red"), ("right", "tab:blue")):
                if name in case.lungs:
                    for ax in (axes[row][0], axes[row][2]):
                        ax.contour(case.lungs[name], levels=[0.5], colors=colour, linewidths=1)
            axes[row][1].imshow(lab % 20, cmap="tab20", alpha=0.55, vmin=0, vmax=19, interpolation="nearest")
            fill = np.zeros((*lab.shape, 4))
            for name, rgba in (("left", (1, 0.2, 0.2, 0.45)), ("right", (0.2, 0.4, 1, 0.45))):
                if name in match:
                    fill[lab == match[name]] = rgba
            axes[row][2].imshow(fill, interpolation="nearest")
            kind = "best" if row < min(n, len(chosen)) else "worst"
            axes[row][0].set_title(f"{kind}: {case.id[:22]}", fontsize=7)
            axes[row][1].set_title(f"{rec['n_segments']} segments", fontsize=7)
            axes[row][2].set_title(f"Dice {100 * rec['hungarian']['both']:.1f}", fontsize=7)
        fig.suptitle(f"{dataset}: ground truth | DiffSeg segments | matched lungs", fontsize=9)
        fig.tight_layout()
        path = out / "overlays" / f"{dataset}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        paths[dataset] = str(path)
    return paths


def results_record(out: Path, results: Mapping[str, Any]) -> Results:
    """`dinodiff segment`'s results record: Table 2 (table.md), the overlays, each method's combined Dice as the
    headline; everything `segment` returns under data."""
    headline = {}
    for key, method in results["methods"].items():
        combined = method["summary"].get(COMBINED) or next(iter(method["summary"].values()))
        mean, sd = combined["hungarian_both"][:2]
        headline[f"Dice, both lungs, {method['name']}"] = f"{100 * mean:.1f} ± {100 * sd:.1f} %"
    best = results["best"].get(COMBINED, {})
    return Results(
        kind="segment", title="Zero-shot lung segmentation: Table 2 and Figure 5",
        provenance={"settings": results["settings"], "images": results["datasets"],
                    "best configuration (combined)": best.get("description", ""),
                    "model": (best.get("cell") or {}).get("model", "")},
        tables={"Table 2 (table.md)": "table.md"},
        figures={f"overlays: {name}": str(Path(path).relative_to(out)) if Path(path).is_relative_to(out) else path
                 for name, path in (results.get("overlays") or {}).items()},
        headline=headline, data=dict(results),
        note=f"Attention entropy of the best configuration: {results['attention_entropy']['mean']:.3f} of "
             f"{results['attention_entropy']['max_possible']:.3f} nats possible (near the maximum: near-uniform "
             "attention).")
