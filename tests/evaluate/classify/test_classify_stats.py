"""AUC, the corrected resampled t-test, the paired bootstrap and multiple-comparison correction of
`dinodiff classify`, on known inputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from dinodiff.config import ConfigError
from dinodiff.evaluate.classify import load_settings
from dinodiff.evaluate.classify.bootstrap import _Ranked, bootstrap_arms, percentile_interval, resample_weights
from dinodiff.evaluate.classify.stats import (
    auc, bonferroni, corrected_resampled_ttest, holm, macro_auc, mean_sd, per_label_auc, relative_improvement,
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


A = [0.80, 0.82, 0.79, 0.85, 0.81]
B = [0.78, 0.80, 0.79, 0.80, 0.77]


def test_corrected_resampled_ttest_on_a_hand_worked_example() -> None:
    # d = 0.02, 0.02, 0, 0.05, 0.04: mean 0.026, var (ddof 1) = 0.00152 / 4 = 0.00038; J = 5, n_val/n_train = 10/40:
    # t = 0.026 / sqrt((1/5 + 1/4) x 0.00038) = 0.026 / 0.013077 = 1.988, df 4 -> two-sided p = 0.1177
    test = corrected_resampled_ttest(A, B, n_train=40, n_val=10)
    assert test.t == pytest.approx(1.988, abs=1e-3) and test.df == 4 and test.p == pytest.approx(0.1177, abs=1e-4)
    plain = sps.ttest_rel(A, B)  # the uncorrected test: t = 2.982, p = 0.041, far more "significant"
    assert plain.pvalue < 0.05 < test.p


def test_corrected_resampled_ttest_is_ttest_rel_when_the_correction_term_is_zero() -> None:
    rng = np.random.default_rng(3)
    for _ in range(5):
        a, b = rng.random(15), rng.random(15)
        test, plain = corrected_resampled_ttest(a, b, n_train=100, n_val=0), sps.ttest_rel(a, b)
        assert test.t == pytest.approx(plain.statistic) and test.p == pytest.approx(plain.pvalue)
        assert corrected_resampled_ttest(a, b, n_train=100, n_val=25).p > test.p  # the correction only widens


def test_corrected_resampled_ttest_edge_cases() -> None:
    assert corrected_resampled_ttest(A, A, 40, 10).p == 1.0
    assert corrected_resampled_ttest([1.0, 2.0, 3.0], [0.5, 1.5, 2.5], 40, 10).p == 0.0  # constant gain
    with pytest.raises(ValueError):
        corrected_resampled_ttest([1.0], [2.0], 40, 10)


def test_the_plain_tests_are_refused_with_a_reason() -> None:
    for name in ("ttest", "wilcoxon"):
        with pytest.raises(ConfigError, match="corrected-ttest"):
            load_settings(None, [f"test={name}"])


def test_weighted_auc_of_a_resample_matches_scikit_learn_with_sample_weights_and_ties() -> None:
    rng = np.random.default_rng(4)
    targets = rng.random(120) < 0.3
    scores = np.round(rng.random(120) + 0.3 * targets, 1)  # many ties
    weights = next(resample_weights(120, 6, seed=0))
    assert weights.shape == (6, 120) and np.all(weights.sum(axis=1) == 120)
    got = _Ranked(scores, targets).aucs(weights)
    want = [roc_auc_score(targets, scores, sample_weight=w) for w in weights]
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert _Ranked(scores, targets).aucs(np.ones((1, 120)))[0] == pytest.approx(auc(scores, targets))


def _arms(shift: float) -> tuple[dict[str, list[np.ndarray]], np.ndarray]:
    rng = np.random.default_rng(5)
    targets = (rng.random((150, 2)) < 0.4).astype(float)
    base = [rng.random((150, 2)) + 0.5 * targets for _ in range(3)]  # 3 cells (folds x seeds)
    better = [b + shift * targets for b in base]
    return {"real": base, "arm": better}, targets


def test_paired_bootstrap_is_seeded_and_zero_for_identical_arms() -> None:
    arms, targets = _arms(0.0)
    boot = bootstrap_arms(arms, targets, 300, seed=1)
    assert percentile_interval(boot["arm"] - boot["real"]) == (0.0, 0.0)  # identical arms: [0, 0]
    again = bootstrap_arms(arms, targets, 300, seed=1)
    np.testing.assert_array_equal(boot["real"], again["real"])  # seeded: the same numbers again
    other = bootstrap_arms(arms, targets, 300, seed=2)
    assert not np.array_equal(boot["real"], other["real"])
    low, high = percentile_interval(boot["real"])
    assert low < np.mean([macro_auc(s, targets) for s in arms["real"]]) < high


def test_paired_bootstrap_interval_of_a_clear_shift_excludes_zero() -> None:
    arms, targets = _arms(0.8)
    boot = bootstrap_arms(arms, targets, 500, seed=0)
    low, high = percentile_interval(boot["arm"] - boot["real"], 0.95)
    point = np.mean([macro_auc(s, targets) for s in arms["arm"]]) - np.mean([macro_auc(s, targets) for s in arms["real"]])
    assert 0 < low < point < high
    narrow = percentile_interval(boot["arm"] - boot["real"], 0.5)
    assert low < narrow[0] < narrow[1] < high


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


def _cells(setups: list[tuple[str, str, int]], shift: dict, targets: np.ndarray) -> tuple[list[dict], dict]:
    """Fake cell rows (2 folds x 2 seeds) and their test scores: each arm's scores = targets x its shift + noise."""
    rng = np.random.default_rng(7)
    rows, scores = [], {}
    for experiment, strategy, ratio in setups:
        for fold in range(2):
            for seed in range(2):
                key = f"{experiment}-{strategy}-{ratio}-{fold}-{seed}"
                scores[key] = shift[experiment] * targets + rng.random(targets.shape)
                rows.append({"regime": 20, "experiment": experiment, "strategy": strategy, "ratio": ratio,
                             "fold": fold, "seed": seed, "key": key, "auc": macro_auc(scores[key], targets),
                             "train_images": 10, "real_images": 10, "val_images": 10})
    return rows, scores


def test_each_arm_is_compared_with_the_control_of_its_count_when_the_grid_has_it() -> None:
    from dinodiff.evaluate.classify.compare import summarise

    targets = (np.random.default_rng(8).random((80, 2)) < 0.5).astype(float)
    setups = [("real", "-", 0), ("control", "-", 1), ("augmentation", "reconstruction", 1),
              ("full-synthetic", "reconstruction", 2)]
    rows, scores = _cells(setups, {"real": 0.2, "control": 0.2, "augmentation": 0.8, "full-synthetic": 0.0}, targets)
    settings = load_settings(None, ["synthetic.ratios=[1,2]", "bootstrap=200"])
    summary = {r["arm"]: r for r in summarise(rows, settings, targets, scores.__getitem__)}
    full = summary["full-synthetic reconstruction 1:2"]  # real x2 = the augmentation control 1:1: those cells
    assert full["control"].startswith("control for augmentation 1:1 (real x2) (= control for full-synthetic 1:2")
    assert full["d_vs_control"] < 0 and full["ci_vs_control_high"] < 0 and not full["beats_control"]
    aug = summary["augmentation reconstruction 1:1"]
    assert aug["d_vs_control"] > 0 and aug["ci_vs_control_low"] > 0 and aug["df"] == 3
    without = load_settings(None, ["synthetic.ratios=[1,2]", "bootstrap=200", "experiments=[augmentation]"])
    no_control = [r for r in rows if r["experiment"] != "control"]
    summary = {r["arm"]: r for r in summarise(no_control, without, targets, scores.__getitem__)}
    assert summary["augmentation reconstruction 1:1"]["control"] is None
    assert np.isnan(summary["augmentation reconstruction 1:1"]["p_vs_control"])
