"""AUC, the corrected resampled t-test over folds x seeds, multiple-comparison correction and relative improvement.

Cross-validation folds share most of their training images, so the AUC differences of the J = folds x seeds
runs are correlated and a plain paired t-test over them is anti-conservative. The corrected resampled t-test
(Nadeau & Bengio 2003, "Inference for the generalization error"; for repeated k-fold CV, Bouckaert & Frank
2004, "Evaluating the replicability of significance tests for comparing learning algorithms") inflates the
variance by n_val/n_train. scipy gives the t distribution; its `false_discovery_control` is Benjamini-Hochberg
only, so Holm's step-down family-wise correction (Holm 1979) and Bonferroni are written out here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

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


TEST_NAME = ("corrected resampled t-test (Nadeau & Bengio 2003; repeated k-fold CV: Bouckaert & Frank 2004): "
             "t = mean(d) / sqrt((1/J + n_val/n_train) var(d)), df = J - 1, J = folds x seeds")


@dataclass(frozen=True)
class TTest:
    t: float
    df: int
    p: float  # two-sided


def corrected_resampled_ttest(a: Sequence[float], b: Sequence[float], n_train: float, n_val: float) -> TTest:
    """Two-sided corrected resampled t-test that paired runs a and b (same folds and seeds) differ.

    d = a - b over the J runs; t = mean(d) / sqrt((1/J + n_val/n_train) * var(d, ddof=1)), df = J - 1. With
    n_val = 0 it is the paired t-test (`scipy.stats.ttest_rel`). Identical runs give p = 1; a constant non-zero
    difference p = 0 (t infinite).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"paired runs need the same length >= 2, got {a.shape} and {b.shape}")
    if n_train <= 0 or n_val < 0:
        raise ValueError(f"n_train must be > 0 and n_val >= 0, got {n_train} and {n_val}")
    diff, df = a - b, len(a) - 1
    if np.allclose(diff, 0):
        return TTest(0.0, df, 1.0)
    if np.allclose(diff, diff.mean()):  # constant non-zero difference: infinitely significant
        return TTest(float(np.sign(diff.mean()) * np.inf), df, 0.0)
    t = float(diff.mean() / np.sqrt((1.0 / len(diff) + n_val / n_train) * np.var(diff, ddof=1)))
    return TTest(t, df, float(2 * sps.t.sf(abs(t), df)))


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
