"""The audit's statistics on known inputs: exact intervals, order-statistic intervals, calibration, memorisation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dinodiff.evaluate.audit import stats


def test_fraction_intervals_are_exact_clopper_pearson():
    none = stats.proportion(np.zeros(32, bool))
    assert none["fraction"] == 0.0 and none["ci95_low"] == 0.0
    assert none["ci95_high"] == pytest.approx(1 - 0.025 ** (1 / 32))  # 0 of 32 still allows 10.9%
    assert 0.10 < none["ci95_high"] < 0.12
    every = stats.proportion(np.ones(12, bool))
    assert every["ci95_low"] == pytest.approx(0.025 ** (1 / 12)) and every["ci95_high"] == 1.0
    some = stats.below(np.arange(100.0), 10.0)
    assert some["k"] == 10 and some["ci95_low"] < 0.1 < some["ci95_high"]
    assert math.isnan(stats.below(np.arange(5.0), math.nan)["fraction"])


def test_percentile_interval_from_order_statistics_covers_and_is_open_when_n_is_small():
    rng = np.random.default_rng(0)
    true_p5 = -math.log(0.95)  # Exp(1)
    covered = [lo <= true_p5 <= hi for lo, hi in (stats.quantile_ci(rng.exponential(size=200)) for _ in range(400))]
    assert np.mean(covered) >= 0.93
    low, high = stats.quantile_ci(np.arange(1.0, 30.0))  # 29 distances: no order statistic is a lower bound
    assert low == -math.inf and high == 5.0  # P(Binomial(29, 0.05) <= 4) >= 0.975
    low, high = stats.quantile_ci(np.arange(1.0, 101.0))
    assert (low, high) == (1.0, 11.0)  # P(B <= 0) = 0.006 <= 0.025; P(B <= 9) = 0.972 < 0.975 <= P(B <= 10)


def test_calibration_says_when_the_reference_is_too_small():
    small, large = stats.calibration(np.arange(1.0, 61.0)), stats.calibration(np.arange(1.0, 201.0))
    assert small["too_small"] and not large["too_small"]
    assert large["p5"] == pytest.approx(np.quantile(np.arange(1.0, 201.0), 0.05))
    assert large["copy_threshold"] == pytest.approx(stats.COPY_FACTOR * large["p5"])
    message = stats.reference_warning("holdout->train", "pixels", small)
    assert "60 distances" in message and "too few to calibrate" in message
    assert stats.reference_warning("holdout->train", "pixels", large) is None


def test_distribution_quantiles_on_known_values():
    summary = stats.distribution(np.arange(1.0, 101.0))
    assert summary["min"] == 1.0 and summary["median"] == 50.5 and summary["max"] == 100.0 and summary["n"] == 100


def test_memorisation_compares_each_source_with_its_real_neighbour():
    own = np.array([0.5, 2.0, 3.0, 0.1])  # variations of sources 0, 0, 1, 1
    result = stats.memorisation(own, np.array([0, 0, 1, 1]), np.array([1.0, 0.05]))
    assert result["memorised_fraction"] == 0.5 and result["memorised"] == 1  # 0.5 < 1.0; 0.1 > 0.05
    assert result["ratios"].tolist() == pytest.approx([0.5, 2.0])
    assert result["memorised_ci95_low"] < 0.5 < result["memorised_ci95_high"]
