"""The comparisons of a classification grid: every arm against real only and every synthetic arm against the
control whose training count matches its own (see `arms`), each with the corrected resampled t-test over
folds x seeds (`stats`), a paired-bootstrap confidence interval of the AUC difference (`bootstrap`), and Holm
(or Bonferroni) over every comparison of the grid.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

from dinodiff.evaluate.classify.arms import (
    ORDER,
    REAL,
    Setup,
    arm_name,
    control_name,
    matched_control,
)
from dinodiff.evaluate.classify.bootstrap import bootstrap_arms, percentile_interval
from dinodiff.evaluate.classify.settings import ClassifySettings
from dinodiff.evaluate.classify.stats import (
    correct,
    corrected_resampled_ttest,
    mean_sd,
    relative_improvement,
)

logger = logging.getLogger(__name__)


def by_setup(rows: list[dict]) -> dict[int, dict[Setup, dict[tuple[int, int], dict]]]:
    """regime -> (experiment, strategy, ratio) -> (fold, seed) -> cell row."""
    table: dict = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        table[r["regime"]][(r["experiment"], r["strategy"], r["ratio"])][(r["fold"], r["seed"])] = r
    return table


def _difference(runs: dict, other: dict, boot: dict[Setup, np.ndarray], pair: tuple[Setup, Setup],
                sizes: tuple[float, float], level: float) -> dict[str, Any]:
    """Mean AUC difference (runs - other), its bootstrap interval and the corrected resampled t-test."""
    keys = sorted(set(runs) & set(other))
    a, b = [runs[k]["auc"] for k in keys], [other[k]["auc"] for k in keys]
    low, high = percentile_interval(boot[pair[0]] - boot[pair[1]], level)
    out: dict[str, Any] = {"d": float(np.mean(runs_auc(runs)) - np.mean(runs_auc(other))), "low": low, "high": high,
                           "t": np.nan, "p": np.nan, "df": len(keys) - 1}
    if len(keys) >= 2:
        test = corrected_resampled_ttest(a, b, n_train=sizes[0], n_val=sizes[1])
        out.update(t=test.t, p=test.p)
    return out


def runs_auc(runs: dict) -> list[float]:
    return [r["auc"] for r in runs.values()]


def _regime_rows(regime: int, setups: dict[Setup, dict], targets: np.ndarray, scores: Callable[[str], np.ndarray],
                 settings: ClassifySettings) -> list[dict[str, Any]]:
    """One summary row per arm of one regime (uncorrected p-values)."""
    real, ratios = setups.get(REAL, {}), settings.synthetic.ratios
    boot = bootstrap_arms({s: [scores(r["key"]) for _, r in sorted(runs.items())] for s, runs in setups.items()},
                          targets, settings.bootstrap, settings.bootstrap_seed)
    sizes = (float(np.mean([r["real_images"] for r in real.values()])) if real else np.nan,
             float(np.mean([r["val_images"] for r in real.values()])) if real else np.nan)
    rows = []
    for setup, runs in sorted(setups.items(), key=lambda kv: (ORDER.get(kv[0][0], 9), kv[0][1], kv[0][2])):
        mean, sd = mean_sd(runs_auc(runs))
        keys = sorted(set(runs) & set(real))
        control = matched_control(setup, ratios, settings.experiments)
        control = control if control in setups else None  # not in the grid's experiments: no comparison
        row: dict[str, Any] = {
            "regime": regime, "arm": arm_name(setup), "experiment": setup[0], "strategy": setup[1], "ratio": setup[2],
            "runs": len(runs), "train_images": float(np.mean([r["train_images"] for r in runs.values()])),
            "auc_mean": mean, "auc_sd": sd, "rel_improvement": float(np.mean(relative_improvement(
                [runs[k]["auc"] for k in keys], [real[k]["auc"] for k in keys]))) if keys else np.nan,
            "control": control_name(setup, control)}
        if setup != REAL and real:
            vs = _difference(runs, real, boot, (setup, REAL), sizes, settings.ci_level)
            row.update(d_vs_real=vs["d"], ci_vs_real_low=vs["low"], ci_vs_real_high=vs["high"], t_vs_real=vs["t"],
                       p_vs_real=vs["p"], df=vs["df"])
        if control is not None:
            vs = _difference(runs, setups[control], boot, (setup, control), sizes, settings.ci_level)
            row.update(control_auc_mean=float(np.mean(runs_auc(setups[control]))), d_vs_control=vs["d"],
                       ci_vs_control_low=vs["low"], ci_vs_control_high=vs["high"], t_vs_control=vs["t"],
                       p_vs_control=vs["p"])
        rows.append(row)
    return rows


COLUMNS = ("d_vs_real", "ci_vs_real_low", "ci_vs_real_high", "t_vs_real", "p_vs_real", "df", "control_auc_mean",
           "d_vs_control", "ci_vs_control_low", "ci_vs_control_high", "t_vs_control", "p_vs_control")


def summarise(rows: list[dict], settings: ClassifySettings, targets: np.ndarray,
              scores: Callable[[str], np.ndarray]) -> list[dict[str, Any]]:
    """One row per regime x arm: mean +- SD, the differences from real only and from the matched control (95% CI,
    corrected resampled t-test), p-values corrected over the grid, and whether the arm beats each significantly.

    scores(key) gives a cell's per-image test scores, (test images, labels); targets are the test labels.
    """
    summary = []
    for regime, setups in sorted(by_setup(rows).items()):
        summary += _regime_rows(regime, setups, targets, scores, settings)
    for row in summary:
        for column in COLUMNS:
            row.setdefault(column, np.nan)
    reuses_real = [matched_control(_setup(r), settings.synthetic.ratios, settings.experiments) == REAL for r in summary]
    family = [(i, c) for i, r in enumerate(summary) for c in ("p_vs_real", "p_vs_control")
              if np.isfinite(r[c]) and not (c == "p_vs_control" and reuses_real[i])]
    adjusted = correct([summary[i][c] for i, c in family], settings.correction)
    for row in summary:
        row["p_vs_real_adj"], row["p_vs_control_adj"] = np.nan, np.nan
    for (i, column), p in zip(family, adjusted):
        summary[i][f"{column}_adj"] = float(p)
    for row, same in zip(summary, reuses_real):
        if same:  # the control is real only: the same comparison, counted once
            row["p_vs_control_adj"] = row["p_vs_real_adj"]
        row["significant_gain"] = bool(row["d_vs_real"] > 0 and row["p_vs_real_adj"] < settings.alpha)
        row["beats_control"] = bool(row["d_vs_control"] > 0 and row["p_vs_control_adj"] < settings.alpha)
    return summary


def _setup(row: dict) -> Setup:
    return row["experiment"], row["strategy"], row["ratio"]
