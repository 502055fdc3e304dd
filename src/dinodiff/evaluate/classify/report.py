"""Outputs of a classification grid: results.csv (one row per cell), a Table-1-style summary and a table of
differences with confidence intervals (Markdown + CSV), Figure-4-style box plots of the relative AUC improvement,
and results.json for the report page (the `kind` / `provenance` / `tables` / `figures` convention of
`dinodiff.report`).
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from dinodiff.evaluate.classify.arms import REAL
from dinodiff.evaluate.classify.bootstrap import CI_NAME
from dinodiff.evaluate.classify.compare import by_setup
from dinodiff.evaluate.classify.settings import ClassifySettings
from dinodiff.evaluate.classify.stats import TEST_NAME, relative_improvement
from dinodiff.files import write_bytes_atomic
from dinodiff.results import Results, write_results

logger = logging.getLogger(__name__)


def write_csv(path: Path, rows: list[dict]) -> Path:
    buffer = io.StringIO()
    names = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(path, buffer.getvalue().encode())
    return path


def methods_note(settings: ClassifySettings) -> str:
    """How the numbers were tested: the test, the interval, the correction and the controls (one paragraph)."""
    return (f"Test: {TEST_NAME}; {settings.correction} correction over every comparison of the grid, alpha "
            f"{settings.alpha}. Intervals: {100 * settings.ci_level:g}% {CI_NAME}, B = {settings.bootstrap}, seed "
            f"{settings.bootstrap_seed}. Controls repeat the real training images: augmentation 1:r is compared with "
            "its control (real x(1 + r), the same count), full-synthetic 1:r with its control (real x r); at 1:1 "
            "that control is the real-only cell itself.")


def main_table(summary: list[dict], alpha: float) -> str:
    """Rows = arms, columns = regimes; bold = the best significant gain of a regime, * = above real only (p < alpha
    after correction), + = also above the arm's matched control (corrected)."""
    regimes = sorted({r["regime"] for r in summary})
    best = {}
    for n in regimes:
        gains = [r for r in summary if r["regime"] == n and r["significant_gain"]]
        if gains:
            best[n] = max(gains, key=lambda r: r["auc_mean"])
    names = list(dict.fromkeys(r["arm"] for r in summary))
    cells = {(r["arm"], r["regime"]): r for r in summary}
    lines = ["| arm | " + " | ".join(f"n = {n}" for n in regimes) + " |", "|---|" + "---|" * len(regimes)]
    for name in names:
        out = []
        for n in regimes:
            r = cells.get((name, n))
            if r is None:
                out.append("")
                continue
            text = f"{r['auc_mean']:.3f} ± {r['auc_sd']:.3f}" + ("*" if r["significant_gain"] else "")
            text += "+" if r["beats_control"] else ""
            out.append(f"**{text}**" if best.get(n) is r else text)
        lines.append(f"| {name} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def _interval(row: dict, side: str) -> str:
    d, low, high = row[f"d_vs_{side}"], row[f"ci_vs_{side}_low"], row[f"ci_vs_{side}_high"]
    return "" if not np.isfinite(d) else f"{d:+.3f} [{low:+.3f}, {high:+.3f}]"


def _p(value: float) -> str:
    return "" if not np.isfinite(value) else f"{value:.3g}"


def differences_table(summary: list[dict], level: float) -> str:
    """One row per regime x arm: the AUC difference from real only and from the matched control, CI and p (adj.)."""
    ci = f"{100 * level:g}% CI"
    lines = [f"| n | arm | AUC − real only [{ci}] | p (adj.) | matched control | AUC − control [{ci}] | p (adj.) |",
             "|---|---|---|---|---|---|---|"]
    for r in summary:
        if r["experiment"] == "real":
            continue
        lines.append(f"| {r['regime']} | {r['arm']} | {_interval(r, 'real')} | {_p(r['p_vs_real_adj'])} | "
                     f"{r['control'] or ''} | {_interval(r, 'control')} | {_p(r['p_vs_control_adj'])} |")
    return "\n".join(lines) + "\n"


def markdown_table(summary: list[dict], settings: ClassifySettings) -> str:
    """table.md: Table 1, the differences with their intervals, and how they were tested."""
    return (main_table(summary, settings.alpha) + "\n"
            f"Test macro AUC, mean ± SD over folds x seeds. * above real only, p < {settings.alpha} after correction; "
            "+ also above the arm's matched control (corrected); bold: the best significant gain of each regime.\n\n"
            + differences_table(summary, settings.ci_level) + "\n" + methods_note(settings) + "\n")


def _kind_label(kind: tuple[str, str]) -> str:
    if kind[0] == "control":
        return "control for augmentation (real x(1 + r))"
    if kind[0] == "control-full":
        return "control for full-synthetic (real x r)"
    return " ".join(kind)


def box_plots(path: Path, rows: list[dict]) -> Path | None:
    """Figure 4: relative improvement (%) over real only, per regime (panel) and ratio (x), one box per arm kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = by_setup(rows)
    regimes = sorted(table)
    setups = sorted({s for n in regimes for s in table[n] if s != REAL})
    kinds = sorted({(s[0], s[1]) for s in setups})
    ratios = sorted({s[2] for s in setups})
    if not setups:
        return None
    fig, axes = plt.subplots(1, len(regimes), figsize=(5 + 3 * len(regimes), 4), squeeze=False, sharey=True)
    colours = plt.get_cmap("tab10")
    width = 0.8 / max(len(kinds), 1)
    for ax, n in zip(axes[0], regimes):
        real = table[n].get(REAL, {})
        for k, kind in enumerate(kinds):
            data, positions = [], []
            for i, ratio in enumerate(ratios):
                runs = table[n].get((*kind, ratio), {})
                keys = sorted(set(runs) & set(real))
                if keys:
                    data.append(relative_improvement([runs[j]["auc"] for j in keys], [real[j]["auc"] for j in keys]))
                    positions.append(i + (k - (len(kinds) - 1) / 2) * width)
            if data:
                box = ax.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True, manage_ticks=False)
                for patch in box["boxes"]:
                    patch.set_facecolor(colours(k))
                ax.plot([], [], color=colours(k), lw=6, label=_kind_label(kind))
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(ratios)), [f"1:{r}" for r in ratios])
        ax.set_title(f"n = {n}")
        ax.set_xlabel("real : synthetic")
    axes[0][0].set_ylabel("relative AUC improvement over real only (%)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())
    return path


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and not np.isfinite(value) else value


def write_report(out: Path, rows: list[dict], summary: list[dict], settings: ClassifySettings,
                 provenance: dict[str, Any], extra: dict[str, Any]) -> Results:
    """results.csv, table.md, table.csv, figure4.png and results.json in `out`; returns the results record.

    The record's data holds `summary` (one row per regime x arm, the keys of table.csv), `files`, the test and
    the interval, and `extra`.
    """
    files = {"results_csv": str(write_csv(out / "results.csv", rows)),
             "table_csv": str(write_csv(out / "table.csv", summary))}
    write_bytes_atomic(out / "table.md", markdown_table(summary, settings).encode())
    files["table_markdown"] = str(out / "table.md")
    figure = box_plots(out / "figure4.png", rows)
    if figure is not None:
        files["figure"] = str(figure)
    headline = {f"AUC, real only, n = {r['regime']}": round(r["auc_mean"], 4) for r in summary
                if r["experiment"] == "real"}
    test = {"name": settings.test, "description": TEST_NAME, "correction": settings.correction, "alpha": settings.alpha}
    ci = {"level": settings.ci_level, "method": CI_NAME, "resamples": settings.bootstrap, "seed": settings.bootstrap_seed}
    results = Results(
        kind="classify", title="Classification: Table 1 and Figure 4",
        provenance={**provenance, "test": TEST_NAME, "confidence intervals": CI_NAME}, headline=headline,
        tables={"Table 1 and differences (table.md)": "table.md"},
        figures={"Figure 4: relative AUC improvement over real only": "figure4.png"} if figure else {},
        data={"test": test, "ci": ci, **extra, "summary": [{k: _clean(v) for k, v in r.items()} for r in summary],
              "files": files})
    write_results(out, results)
    return results
