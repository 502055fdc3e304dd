"""AUC, paired significance tests over folds x seeds, multiple-comparison correction and relative improvement.

scipy gives the paired tests (`ttest_rel`, `wilcoxon`); its `false_discovery_control` is Benjamini-Hochberg
only, so Holm's step-down family-wise correction (Holm 1979) and Bonferroni are written out here.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from scipy import stats as sps

logger = logging.getLogger(__name__)


def auc(scores: np.ndarray, targets: np.ndarray) -> float:
    """ROC AUC of one label by the Mann-Whitney rank statistic (ties count one half); NaN without both classes."""
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets) > 0.5
    positives, negatives = int(targets.sum()), int((~targets).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = sps.rankdata(scores)
    return float((ranks[targets].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def per_label_auc(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """AUC of each column of (N, L) scores and targets."""
    return np.array([auc(scores[:, j], targets[:, j]) for j in range(scores.shape[1])])


def macro_auc(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean AUC over the labels that have both classes; NaN when none has."""
    values = per_label_auc(scores, targets)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def paired_test(a: Sequence[float], b: Sequence[float], method: str = "ttest") -> float:
    """Two-sided p-value that paired samples a and b (same folds and seeds) differ: paired t-test or Wilcoxon.

    Identical samples give p = 1. With 5 pairs the Wilcoxon signed-rank test cannot go below p = 0.0625.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or len(a) < 2:
        raise ValueError(f"paired samples need the same length >= 2, got {a.shape} and {b.shape}")
    diff = a - b
    if np.allclose(diff, 0):
        return 1.0
    if method == "ttest":
        if np.allclose(diff, diff.mean()):  # constant non-zero difference: infinitely significant
            return 0.0
        return float(sps.ttest_rel(a, b).pvalue)
    if method == "wilcoxon":
        return float(sps.wilcoxon(a, b).pvalue)
    raise ValueError(f"unknown test {method!r}; use ttest or wilcoxon")


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values: sort ascending, multiply the i-th smallest by (m - i), running max, cap at 1.

    NaN p-values are left out of the family and stay NaN.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full_like(p, np.nan)
    valid = np.flatnonzero(np.isfinite(p))
    m = len(valid)
    order = valid[np.argsort(p[valid], kind="stable")]
    running = 0.0
    for i, index in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[index]))
        out[index] = running
    return out


def bonferroni(pvalues: Sequence[float]) -> np.ndarray:
    p = np.asarray(pvalues, dtype=np.float64)
    return np.minimum(1.0, p * np.isfinite(p).sum())


def correct(pvalues: Sequence[float], method: str = "holm") -> np.ndarray:
    if method == "holm":
        return holm(pvalues)
    if method == "bonferroni":
        return bonferroni(pvalues)
    raise ValueError(f"unknown correction {method!r}; use holm or bonferroni")


def relative_improvement(value: np.ndarray | float, baseline: np.ndarray | float) -> np.ndarray:
    """100 x (value - baseline) / baseline: Figure 4's relative AUC improvement, in percent."""
    return 100.0 * (np.asarray(value, dtype=np.float64) - baseline) / np.asarray(baseline, dtype=np.float64)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample SD (ddof 1; 0 for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
