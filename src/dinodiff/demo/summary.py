"""The downstream rows of the demo's checks: classification (real-only AUC beside the synthetic arms and their
count-matched controls) and segmentation (DiffSeg beside the prior, Otsu, image-only superpixels and position-only
baselines), read from the results.json files the classify and segment stages wrote, and added to
OUT/checks/results.json."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from dinodiff.results import Results, read_results, write_results

AUC_MARGIN = 0.6  # "clearly above 0.5": the real-only baseline's mean AUC over folds reaches this
SEGMENT_METHODS = ("diffseg", "prior", "otsu", "superpixels", "position")


def _interval(row: dict[str, Any], side: str) -> str | None:
    d, low, high = (row.get(k) for k in (f"d_vs_{side}", f"ci_vs_{side}_low", f"ci_vs_{side}_high"))
    return None if d is None or low is None or high is None else f"{d:+.3f} [{low:+.3f}, {high:+.3f}]"


def classify_rows(path: Path) -> list[dict[str, Any]]:
    """One row per arm of the grid (regime, arm as classify names it): mean AUC over folds x seeds, the difference
    from real only and from the arm's matched control with their bootstrap intervals, and corrected p-values."""
    data = read_results(path).data
    level = f"{100 * (data.get('ci') or {}).get('level', 0.95):g}% CI"
    rows = []
    for r in data.get("summary", []):
        rows.append({"regime": r["regime"], "arm": r["arm"], "AUC mean": r["auc_mean"], "AUC SD": r["auc_sd"],
                     f"AUC - real only [{level}]": _interval(r, "real"), "p vs real (adj.)": r.get("p_vs_real_adj"),
                     "matched control": r.get("control"), f"AUC - control [{level}]": _interval(r, "control"),
                     "p vs control (adj.)": r.get("p_vs_control_adj")})
    return rows


def segment_rows(path: Path) -> list[dict[str, Any]]:
    """Dice (both lungs, Hungarian matching) of each method, combined over datasets."""
    data = read_results(path).data
    rows = []
    for key, method in data.get("methods", {}).items():
        combined = method["summary"].get("combined") or next(iter(method["summary"].values()))
        mean, sd = combined["hungarian_both"][:2]
        rows.append({"method": method["name"], "key": key, "Dice mean": mean, "Dice SD": sd, "images": combined["n"]})
    return rows


def add_downstream(root: Path) -> Results | None:
    """Add the classification and segmentation rows (and their checks) to OUT/checks/results.json."""
    path = root / "checks" / "results.json"
    if not path.is_file():
        return None
    results = read_results(path)
    checks = [r for r in results.tables["learning checks"] if not r["check"].startswith(("classification", "segm"))]
    tables = dict(results.tables)
    if (root / "classify" / "results.json").is_file():
        rows = classify_rows(root / "classify" / "results.json")
        tables["classification (macro AUC, held-out test split)"] = rows
        real = [r["AUC mean"] for r in rows if r["arm"] == "real only"]
        if real:
            checks.append({"check": "classification: real-only baseline AUC (chance 0.5)", "trained": round(real[0], 4),
                           "chance": 0.5, "holds": bool(real[0] >= AUC_MARGIN)})
    if (root / "segment" / "results.json").is_file():
        tables["segmentation (Dice, both lungs)"] = rows = segment_rows(root / "segment" / "results.json")
        shown = {r["key"] for r in rows}
        checks.append({"check": "segmentation: DiffSeg shown beside the prior, Otsu, superpixel and position-only "
                                "baselines",
                       "trained": " ".join(f"{r['key']} {r['Dice mean']:.3f}" for r in rows),
                       "holds": all(m in shown for m in SEGMENT_METHODS)})
    tables["learning checks"] = checks
    headline = {**results.headline, "checks that hold": f"{sum(r['holds'] for r in checks)}/{len(checks)}"}
    results = replace(results, tables=tables, headline=headline)
    write_results(path, results)
    return results
