"""AUC, paired tests and multiple-comparison correction of `dinodiff classify`, on known inputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from dinodiff.evaluate.classify.stats import (
    auc, bonferroni, holm, macro_auc, mean_sd, paired_test, per_label_auc, relative_improvement,
)


def test_auc_matches_scikit_learn_with_ties() -> None:
    rng = np.random.default_rng(0)
    targets = rng.random(200) < 0.3
    scores = np.round(rng.random(200) + 0.4 * targets, 1)  # rounded: many ties
    assert auc(scores, targets) == pytest.approx(roc_auc_score(targets, scores), abs=1e-12)


def test_auc_of_known_rankings() -> None:
    assert auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert auc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5
    assert np.isnan(auc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_macro_auc_matches_scikit_learn_and_skips_single_class_labels() -> None:
    rng = np.random.default_rng(1)
    targets = (rng.random((100, 3)) < 0.4).astype(float)
    scores = rng.random((100, 3)) + targets * [0.5, 0.2, 0.0]
    assert macro_auc(scores, targets) == pytest.approx(roc_auc_score(targets, scores, average="macro"))
    targets[:, 2] = 0  # no positive: left out
    assert np.isnan(per_label_auc(scores, targets)[2])
    assert macro_auc(scores, targets) == pytest.approx(roc_auc_score(targets[:, :2], scores[:, :2]))


def test_paired_tests_match_scipy_and_handle_equal_samples() -> None:
    a = [0.80, 0.82, 0.79, 0.85, 0.81]
    b = [0.78, 0.80, 0.79, 0.80, 0.77]
    assert paired_test(a, b, "ttest") == pytest.approx(sps.ttest_rel(a, b).pvalue)
    assert paired_test(a, b, "wilcoxon") == pytest.approx(sps.wilcoxon(a, b).pvalue)
    # a hand-checked value: differences 0.02, 0.02, 0, 0.05, 0.04 -> mean 0.026, SD 0.0195, t = 2.982, 4 df -> p = 0.0406
    assert paired_test(a, b, "ttest") == pytest.approx(0.0406, abs=5e-4)
    assert paired_test(a, a) == 1.0
    assert paired_test([1.0, 2.0, 3.0], [0.5, 1.5, 2.5]) == 0.0  # constant gain
    with pytest.raises(ValueError):
        paired_test([1.0], [2.0])


def test_holm_on_a_textbook_example() -> None:
    # Holm (1979) step-down: sorted p 0.01, 0.02, 0.03, 0.04 -> x4, x3, x2, x1 with a running maximum.
    p = [0.04, 0.01, 0.03, 0.02]
    assert holm(p) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.001, 0.5, 0.9]) == pytest.approx([0.003, 1.0, 1.0])  # capped at 1, monotone
    out = holm([0.01, np.nan, 0.02])  # NaN is not part of the family
    assert np.isnan(out[1]) and out[[0, 2]] == pytest.approx([0.02, 0.02])


def test_holm_is_never_above_bonferroni_and_rejects_the_same_or_more() -> None:
    p = np.random.default_rng(2).random(20) ** 3
    assert np.all(holm(p) <= bonferroni(p) + 1e-12)
    assert bonferroni([0.01, 0.2]) == pytest.approx([0.02, 0.4])


def test_relative_improvement_and_mean_sd() -> None:
    assert relative_improvement(0.88, 0.80) == pytest.approx(10.0)
    assert relative_improvement(np.array([0.8, 0.9]), np.array([0.8, 0.6])) == pytest.approx([0.0, 50.0])
    assert mean_sd([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert mean_sd([4.0]) == (4.0, 0.0)
