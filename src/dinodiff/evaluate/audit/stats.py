"""The audit's statistics, as pure functions of distances: calibration, copy flags, confidence intervals, memorisation.

DCR (distance to closest record) of a query = its distance to the nearest *training* image (neighbours.py, and
copies.py for the pixel space). Calibration (the references a DCR is read against):
- holdout -> train: real images the model never saw, against the training set (other patients only);
- train -> train: training images (a seeded subsample) against their nearest training image of *another* patient.
A synthetic image is *closer than the reference* when its DCR is below the reference's 5th percentile (expected
for ~5% of images drawn like the reference), and *flagged as a copy* when its DCR is below COPY_FACTOR x that 5th
percentile: a near-duplicate, closer to a training record than almost any two different real patients are.

Every fraction comes with an exact (Clopper-Pearson) 95% confidence interval (scipy's binomtest): 0 flagged of 32
still allows ~11%. The 5th percentile of a reference of n distances rests on the ~n/20 smallest; below
MIN_REFERENCE (fewer than 5 below it) the reference is too small to calibrate, and its distribution-free 95%
interval (order statistics, Binomial(n, 0.05) ranks) says how loosely it is known.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy.stats import binom, binomtest

logger = logging.getLogger(__name__)

COPY_FACTOR = 0.5
REFERENCE_QUANTILE = 0.05
QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5)
CONFIDENCE = 0.95
MIN_REFERENCE = 100  # distances: at least 5 below the 5th percentile


def quantile(values: np.ndarray, q: float) -> float:
    """The q-quantile (linear interpolation, numpy's default) of the finite values; nan when there are none."""
    finite = np.asarray(values, np.float64)
    finite = finite[np.isfinite(finite)]
    return float(np.quantile(finite, q)) if len(finite) else float("nan")


def distribution(values: np.ndarray) -> dict[str, float]:
    """n, mean, the QUANTILES (min, p1, p5, p25, median) and the max of a DCR sample."""
    out = {"n": int(len(values)), "mean": float(np.mean(values)) if len(values) else float("nan")}
    out.update({("min" if q == 0 else f"p{round(q * 100)}" if q < 0.5 else "median"): quantile(values, q)
                for q in QUANTILES})
    out["max"] = quantile(values, 1.0)
    return out


def quantile_ci(values: np.ndarray, q: float = REFERENCE_QUANTILE, level: float = CONFIDENCE) -> tuple[float, float]:
    """Distribution-free interval of the q-quantile from order statistics: (X_(l), X_(u)) with
    P(l <= Binomial(n, q) < u) >= level. A bound that no order statistic reaches is -inf / inf."""
    x = np.sort(np.asarray(values, np.float64)[np.isfinite(values)])
    n, tail = len(x), (1 - level) / 2
    if n == 0:
        return -math.inf, math.inf
    below = int(binom.ppf(tail, n, q))  # smallest j with P(B <= j) >= tail
    lower_rank = below if binom.cdf(below, n, q) > tail else below + 1  # largest l with P(B <= l - 1) <= tail
    upper_rank = int(binom.ppf(1 - tail, n, q)) + 1  # smallest u with P(B <= u - 1) >= 1 - tail
    lower = float(x[lower_rank - 1]) if lower_rank >= 1 else -math.inf
    upper = float(x[upper_rank - 1]) if upper_rank <= n else math.inf
    return lower, upper


def calibration(reference: np.ndarray) -> dict:
    """The reference's 5th percentile, its 95% interval, the copy threshold, and whether n is too small."""
    n = int(np.isfinite(np.asarray(reference, np.float64)).sum())
    p5 = quantile(reference, REFERENCE_QUANTILE)
    low, high = quantile_ci(reference)
    return {"n": n, "p5": p5, "p5_ci95_low": low, "p5_ci95_high": high, "copy_threshold": COPY_FACTOR * p5,
            "too_small": n < MIN_REFERENCE}


def reference_warning(name: str, space: str, cal: dict) -> str | None:
    """A plain sentence when a reference is too small to calibrate, else None."""
    if not cal["too_small"]:
        return None
    low = "-" if not math.isfinite(cal["p5_ci95_low"]) else f"{cal['p5_ci95_low']:.3g}"
    high = "-" if not math.isfinite(cal["p5_ci95_high"]) else f"{cal['p5_ci95_high']:.3g}"
    return (f"{name} ({space}) has only {cal['n']} distances, too few to calibrate: fewer than 5 fall below its "
            f"5th percentile ({cal['p5']:.3g}; distribution-free 95% CI [{low}, {high}]), so the copy threshold and "
            f"the below-p5 fraction are loose. Use at least {MIN_REFERENCE} reference images (a larger held-out set).")


def proportion(flags: np.ndarray) -> dict:
    """k of n, the fraction and its exact (Clopper-Pearson) 95% interval; nan without data."""
    flags = np.asarray(flags, bool)
    k, n = int(flags.sum()), int(len(flags))
    if n == 0:
        return {"k": 0, "n": 0, "fraction": math.nan, "ci95_low": math.nan, "ci95_high": math.nan}
    ci = binomtest(k, n).proportion_ci(confidence_level=CONFIDENCE, method="exact")
    return {"k": k, "n": n, "fraction": k / n, "ci95_low": float(ci.low), "ci95_high": float(ci.high)}


def below(values: np.ndarray, threshold: float) -> dict:
    """`proportion` of values strictly below threshold (nan when there is no threshold)."""
    if not math.isfinite(threshold):
        return proportion(np.zeros(0, bool))
    return proportion(np.asarray(values) < threshold)


def fraction_below(values: np.ndarray, threshold: float) -> float:
    """Fraction of values strictly below threshold (nan when there are none or no threshold)."""
    return below(values, threshold)["fraction"]


def memorisation(own_distance: np.ndarray, source_index: np.ndarray, source_neighbour: np.ndarray) -> dict:
    """Per source: is one of its variations nearer it than the source's nearest real (other-patient) neighbour?

    own_distance[i]: distance of variation i to its own source; source_index[i]: which source (0..S-1);
    source_neighbour[s]: distance of source s to its nearest training image of another patient.
    """
    sources = np.unique(source_index)
    closest = np.array([own_distance[source_index == s].min() for s in sources])
    ratio = closest / np.maximum(source_neighbour[sources], 1e-12)
    memorised = proportion(ratio < 1.0)
    return {"sources": int(len(sources)), "variations": int(len(own_distance)),
            "memorised": memorised["k"], "memorised_fraction": memorised["fraction"],
            "memorised_ci95_low": memorised["ci95_low"], "memorised_ci95_high": memorised["ci95_high"],
            "median_ratio": float(np.median(ratio)) if len(sources) else math.nan,
            "min_ratio": float(ratio.min()) if len(sources) else math.nan, "ratios": ratio}
