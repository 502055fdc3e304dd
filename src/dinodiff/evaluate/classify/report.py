"""Outputs of a classification grid: results.csv (one row per cell), a Table-1-style summary (Markdown + CSV),
Figure-4-style box plots of the relative AUC improvement, and results.json for the report page.
"""

from __future__ import annotations

import csv
import io
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from dinodiff.evaluate.classify.settings import ClassifySettings
from dinodiff.evaluate.classify.stats import correct, mean_sd, paired_test, relative_improvement
from dinodiff.files import write_bytes_atomic, write_json_atomic

logger = logging.getLogger(__name__)

Setup = tuple[str, str, int]  # experiment, strategy, ratio


def write_csv(path: Path, rows: list[dict]) -> Path:
    buffer = io.StringIO()
    names = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(path, buffer.getvalue().encode())
    return path


def _by_setup(rows: list[dict]) -> dict[int, dict[Setup, dict[tuple[int, int], float]]]:
    """regime -> (experiment, strategy, ratio) -> (fold, seed) -> macro AUC."""
    table: dict = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        table[r["regime"]][(r["experiment"], r["strategy"], r["ratio"])][(r["fold"], r["seed"])] = r["auc"]
    return table


def _paired(a: dict, b: dict) -> tuple[list[float], list[float]]:
    keys = sorted(set(a) & set(b))
    return [a[k] for k in keys], [b[k] for k in keys]


def summarise(rows: list[dict], settings: ClassifySettings) -> list[dict]:
    """One row per regime x setup: mean +- SD, relative improvement, p vs real and vs control, corrected."""
    summary, family = [], []  # family: (summary index, column) of every p-value, corrected together
    for regime, setups in sorted(_by_setup(rows).items()):
        real = setups.get(("real", "-", 0), {})
        for setup, runs in sorted(setups.items(), key=lambda kv: (kv[0][0] != "real", kv[0])):
            mean, sd = mean_sd(list(runs.values()))
            a, b = _paired(runs, real)
            row: dict[str, Any] = {"regime": regime, "experiment": setup[0], "strategy": setup[1], "ratio": setup[2],
                                   "runs": len(runs), "auc_mean": mean, "auc_sd": sd,
                                   "rel_improvement": float(np.mean(relative_improvement(a, b))) if a else np.nan,
                                   "p_vs_real": np.nan, "p_vs_control": np.nan}
            if setup[0] != "real" and len(a) >= 2:
                row["p_vs_real"] = paired_test(a, b, settings.test)
                family.append((len(summary), "p_vs_real"))
            control = setups.get(("control", "-", setup[2]))
            if setup[0] in ("augmentation", "full-synthetic") and control:
                a, b = _paired(runs, control)
                if len(a) >= 2:
                    row["p_vs_control"] = paired_test(a, b, settings.test)
                    row["control_auc_mean"] = float(np.mean(b))
                    family.append((len(summary), "p_vs_control"))
            summary.append(row)
    adjusted = correct([summary[i][c] for i, c in family], settings.correction)
    for row in summary:
        row["p_vs_real_adj"], row["p_vs_control_adj"] = np.nan, np.nan
    for (i, column), p in zip(family, adjusted):
        summary[i][f"{column}_adj"] = float(p)
    real_means = {r["regime"]: r["auc_mean"] for r in summary if r["experiment"] == "real"}
    for row in summary:
        gain = row["auc_mean"] > real_means.get(row["regime"], np.inf)
        row["significant_gain"] = bool(gain and row["p_vs_real_adj"] < settings.alpha)
        row["beats_control"] = bool(row["p_vs_control_adj"] < settings.alpha
                                    and row["auc_mean"] > row.get("control_auc_mean", np.inf))
    return summary


def _setup_name(row: dict) -> str:
    if row["experiment"] == "real":
        return "real only"
    if row["experiment"] == "control":
        return f"control (real repeated) 1:{row['ratio']}"
    return f"{row['experiment']} {row['strategy']} 1:{row['ratio']}"


def markdown_table(summary: list[dict], alpha: float) -> str:
    """Rows = setups, columns = regimes; bold = the best significant gain of a regime, * = p < alpha vs real
    after correction, + = also better than the count-matched control at the same ratio (corrected)."""
    regimes = sorted({r["regime"] for r in summary})
    best = {}
    for n in regimes:
        gains = [r for r in summary if r["regime"] == n and r["significant_gain"]]
        if gains:
            best[n] = max(gains, key=lambda r: r["auc_mean"])
    names = list(dict.fromkeys(_setup_name(r) for r in summary))
    cells = {(_setup_name(r), r["regime"]): r for r in summary}
    lines = ["| setup | " + " | ".join(f"n = {n}" for n in regimes) + " |", "|---|" + "---|" * len(regimes)]
    for name in names:
        out = []
        for n in regimes:
            r = cells.get((name, n))
            if r is None:
                out.append("")
                continue
            text = f"{r['auc_mean']:.3f} ± {r['auc_sd']:.3f}" + ("*" if r["p_vs_real_adj"] < alpha else "")
            text += "+" if r["beats_control"] else ""
            out.append(f"**{text}**" if best.get(n) is r else text)
        lines.append(f"| {name} | " + " | ".join(out) + " |")
    lines.append("")
    lines.append(f"Test macro AUC, mean ± SD over folds x seeds. * p < {alpha} against real only (paired test, "
                 "corrected over the grid); + also above the count-matched control at that ratio (corrected); "
                 "bold: the best significant gain of each regime.")
    return "\n".join(lines) + "\n"


def box_plots(path: Path, rows: list[dict]) -> Path | None:
    """Figure 4: relative improvement (%) over real only, per regime (panel) and ratio (x), one box per setup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = _by_setup(rows)
    regimes = sorted(table)
    setups = sorted({s for n in regimes for s in table[n] if s[0] != "real"}, key=lambda s: (s[0], s[1], s[2]))
    kinds = sorted({(s[0], s[1]) for s in setups})
    ratios = sorted({s[2] for s in setups})
    if not setups:
        return None
    fig, axes = plt.subplots(1, len(regimes), figsize=(4 + 3 * len(regimes), 4), squeeze=False, sharey=True)
    colours = plt.get_cmap("tab10")
    width = 0.8 / max(len(kinds), 1)
    for ax, n in zip(axes[0], regimes):
        real = table[n].get(("real", "-", 0), {})
        for k, kind in enumerate(kinds):
            data, positions = [], []
            for i, ratio in enumerate(ratios):
                a, b = _paired(table[n].get((*kind, ratio), {}), real)
                if a:
                    data.append(relative_improvement(a, b))
                    positions.append(i + (k - (len(kinds) - 1) / 2) * width)
            if data:
                box = ax.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True, manage_ticks=False)
                for patch in box["boxes"]:
                    patch.set_facecolor(colours(k))
                ax.plot([], [], color=colours(k), lw=6, label=" ".join(x for x in kind if x != "-"))
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


def write_report(out: Path, rows: list[dict], settings: ClassifySettings, extra: dict) -> dict:
    """results.csv, table.md, table.csv, figure4.png and results.json in `out`; returns the results.json payload."""
    summary = summarise(rows, settings)
    files = {"results_csv": str(write_csv(out / "results.csv", rows)),
             "table_csv": str(write_csv(out / "table.csv", summary))}
    table_md = markdown_table(summary, settings.alpha)
    write_bytes_atomic(out / "table.md", table_md.encode())
    files["table_markdown"] = str(out / "table.md")
    figure = box_plots(out / "figure4.png", rows)
    if figure is not None:
        files["figure"] = str(figure)
    clean = [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()} for r in summary]
    payload = {"evaluation": "classify", "test": settings.test, "correction": settings.correction,
               "alpha": settings.alpha, **extra, "summary": clean, "files": files}
    write_json_atomic(out / "results.json", payload)
    return payload
