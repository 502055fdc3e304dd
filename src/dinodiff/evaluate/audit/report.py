"""The audit's outputs: results.json (the report page reads it), audit.md, closest-pairs.png and dcr.png."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

import dinodiff
from dinodiff.evaluate.audit import copies, stats, tables
from dinodiff.files import atomic_path, write_bytes_atomic
from dinodiff.results import Results, markdown_table as rows_to_markdown, write_results

logger = logging.getLogger(__name__)

GRID_FILE, HISTOGRAM_FILE, RESULTS_FILE, MARKDOWN_FILE = "closest-pairs.png", "dcr.png", "results.json", "audit.md"
MARKDOWN_COLUMNS = ("dataset", "strategy", "ratio", "space", "dcr_n", "dcr_min", "dcr_p5", "dcr_median", "reference",
                    "reference_n", "reference_p5", "below_reference_p5 (95% CI)", "flagged_copies (95% CI)")
CI_METHOD = ("95% intervals: exact Clopper-Pearson for every fraction (scipy.stats.binomtest); for a reference's 5th "
             "percentile, distribution-free from order statistics (Binomial(n, 0.05) ranks).")


def _save(fig: Any, path: Path) -> Path:
    """Lay out and write a figure atomically (the temporary name has no suffix, so the format is named), then close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def _clean(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, nan/inf to None."""
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def markdown_table(rows: list[dict], columns: tuple[str, ...] = MARKDOWN_COLUMNS) -> str:
    def cell(v: Any) -> str:
        return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    return rows_to_markdown(columns, [[cell(_clean(r.get(c))) for c in columns] for r in rows])


def write_markdown(path: Path, results: Results) -> None:
    table_rows = results.tables
    parts = [f"# {results.title}", "", "Feature spaces: " + "; ".join(f"{r['space']}: {r['status']}"
                                                                      for r in table_rows["spaces"]), "",
             results.note, ""]
    parts += [f"**Warning.** {w}\n" for w in results.warnings]
    for name, title in (("dcr", "Interpolation, sampled and other strategies"),
                        ("dcr_reconstruction", "Reconstruction (conditions on the patient's own embedding)")):
        if table_rows[name]:
            parts += [f"## {title}", "", markdown_table(table_rows[name]), ""]
    parts += ["## Calibration (real vs real)", "",
              markdown_table(table_rows["calibration"], ("space", "reference", "queries", "dcr_n", "dcr_min", "dcr_p5",
                                                      "dcr_median", "p5", "p5_ci95_low", "p5_ci95_high",
                                                      "copy_threshold", "too_small")), ""]
    if table_rows["memorisation"]:
        parts += ["## Reconstruction: per-source memorisation", "",
                  markdown_table(table_rows["memorisation"], ("dataset", "ratio", "space", "sources", "variations",
                                                           "memorised (95% CI)", "median_ratio", "min_ratio")), ""]
    write_bytes_atomic(path, "\n".join(parts).encode())


def closest_pairs_figure(path: Path, sets: list, nearest: dict[int, np.ndarray], closest: dict, space: str,
                         pairs: int) -> Path:
    """One row per synthetic dataset: its `pairs` closest (synthetic, nearest real training image) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(sets), 2 * pairs, figsize=(1.6 * 2 * pairs, 2.0 * len(sets)), squeeze=False)
    for row, syn in enumerate(sets):
        d, index = closest[syn.name][space], closest[syn.name][space + ":index"]
        order = np.argsort(d)[:pairs]
        for col in range(pairs):
            for side in range(2):
                ax = axes[row, 2 * col + side]
                ax.axis("off")
                if col >= len(order) or int(index[order[col]]) not in nearest:
                    continue
                i = order[col]
                ax.imshow(syn.images[i] if side == 0 else nearest[int(index[i])], cmap="gray", vmin=0, vmax=255)
                ax.set_title(f"syn d={d[i]:.2f}" if side == 0 else "nearest train", fontsize=7)
        axes[row, 0].text(-0.1, 0.5, Path(syn.name).name, transform=axes[row, 0].transAxes, rotation=90,
                          va="center", ha="right", fontsize=8)
    fig.suptitle(f"Closest synthetic / real training pairs ({space} space)", fontsize=9)
    return _save(fig, path)


def histogram_figure(path: Path, sets: list, spaces: list, closest: dict) -> Path:
    """DCR distributions per space: the real references and each synthetic dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(spaces), figsize=(4.5 * len(spaces), 3.2), squeeze=False)
    for ax, sp in zip(axes[0], spaces):
        name = sp.space.name
        curves = {**{f"real {k}": v for k, v in sp.references.items()},
                  **{Path(s.name).name: closest[s.name][name] for s in sets}}
        finite = np.concatenate([v[np.isfinite(v)] for v in curves.values()])
        bins = np.linspace(0, np.quantile(finite, 0.99) if len(finite) else 1, 30)
        for label, values in curves.items():
            ax.hist(values[np.isfinite(values)], bins=bins, density=True, histtype="step", label=label,
                    linestyle="--" if label.startswith("real") else "-")
        ax.set_title(f"DCR in {name} space", fontsize=9)
        ax.set_xlabel("distance to closest training record", fontsize=8)
        ax.legend(fontsize=6)
    return _save(fig, path)


def write_outputs(out: Path, settings, status: dict, train, holdout, sets: list, spaces: list, dcr_rows: list[dict],
                  memo_rows: list[dict], closest: dict, nearest: dict[int, np.ndarray],
                  queries: dict[str, str]) -> Results:
    out.mkdir(parents=True, exist_ok=True)
    figures = {}
    if spaces:
        primary = spaces[0].space.name
        figures["closest_pairs"] = closest_pairs_figure(out / GRID_FILE, sets, nearest, closest, primary,
                                                        settings.pairs).name
        figures["dcr_histogram"] = histogram_figure(out / HISTOGRAM_FILE, sets, spaces, closest).name
    describe = {sp.space.name: sp.space.describe for sp in spaces}
    table_rows = {
        "dcr": [r for r in dcr_rows if r["strategy"] != "reconstruction"],
        "dcr_reconstruction": [r for r in dcr_rows if r["strategy"] == "reconstruction"],
        "calibration": tables.calibration_rows(spaces, queries), "memorisation": memo_rows,
        "spaces": [{"space": k, "status": v, "describe": describe.get(k, "")} for k, v in status.items()],
    }
    table_rows = {k: [{c: _clean(v) for c, v in row.items()} for row in rows] for k, rows in table_rows.items()}
    results = Results(
        kind="audit", title="Privacy audit: distance of synthetic images to their closest training record",
        headline=tables.headline(table_rows["dcr"] + table_rows["dcr_reconstruction"]),
        note=f"Copy rule: {copy_rule()} {CI_METHOD}",
        warnings=tuple(tables.warnings(spaces, train.subjects_known, len(train))),
        provenance=_provenance(settings, train, holdout, sets, queries), tables=table_rows, figures=figures)
    write_results(out / RESULTS_FILE, results)
    write_markdown(out / MARKDOWN_FILE, results)
    return results


def copy_rule() -> str:
    return (f"a synthetic image is flagged as a copy when its DCR is below {stats.COPY_FACTOR} x the "
            f"{stats.REFERENCE_QUANTILE:.0%} quantile of the real reference (holdout->train when a held-out set "
            "exists, else train->train; both against other patients only). The pixel space searches: "
            f"{copies.SEARCH}.")


def _provenance(settings, train, holdout, sets: list, queries: dict[str, str]) -> dict:
    return {
        "dinodiff": dinodiff.__version__, "settings": asdict(settings),
        "train": {"source": train.name, "images": len(train), "patient_ids": train.subjects_known},
        "holdout": None if holdout is None else {"source": holdout.name, "images": len(holdout),
                                                 "patient_ids": holdout.subjects_known},
        "calibration_queries": queries,
        "synthetic": [{"folder": s.name, "images": len(s), "strategy": s.provenance.get("settings", {}).get(
            "strategy"), "ratio": s.provenance.get("settings", {}).get("ratio"), "model": s.provenance.get("model"),
            "checkpoint_step": s.provenance.get("checkpoint_step")} for s in sets],
        "copy_rule": copy_rule(), "confidence_intervals": CI_METHOD,
    }
