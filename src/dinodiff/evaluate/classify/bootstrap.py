"""Confidence intervals of AUC differences: a paired bootstrap over test images (Efron & Tibshirani 1993, ch. 13,
percentile interval).

Each resample draws the test images with replacement (as counts per image); the same resamples serve
every arm of a regime, so a difference is paired image by image. On each resample an arm's value is its macro
AUC averaged over its cells (folds x seeds), as in the table; the interval of a difference is the percentile
interval of (arm - other) over the resamples. Resamples come from a seeded generator in fixed chunks, so
every run of a grid gives the same intervals.

One resample's AUC is the Mann-Whitney statistic with the resample counts as weights (ties count one half),
the value `sklearn.metrics.roc_auc_score(..., sample_weight=counts)` gives (the tests check it); it is computed
here for a whole chunk of resamples at once, because B x cells x labels calls of sklearn are far too slow.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

CI_NAME = ("paired bootstrap over test images (percentile interval; the same resamples for both sides; macro AUC "
           "averaged over folds x seeds on each side)")
_CHUNK_VALUES = 1 << 22  # resample weights held at once: chunk x test images


def resample_weights(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Chunks of (resamples in chunk, n) bootstrap counts: how often each test image is drawn, with replacement,
    in n draws (each row sums to n). The same chunks for the same arguments."""
    chunk = max(1, min(resamples, _CHUNK_VALUES // max(n, 1)))
    for index, start in enumerate(range(0, resamples, chunk)):
        size = min(chunk, resamples - start)
        drawn = np.random.default_rng([seed, index]).integers(0, n, size=(size, n))
        drawn += np.arange(size)[:, None] * n  # row r counts into bins r*n ... r*n + n - 1
        yield np.bincount(drawn.ravel(), minlength=size * n).reshape(size, n).astype(np.float32)


class _Ranked:
    """One label's test scores sorted once, with their tie groups, for weighted AUCs of many resamples."""

    def __init__(self, scores: np.ndarray, positive: np.ndarray) -> None:
        self.order = np.argsort(scores, kind="stable")
        ordered = scores[self.order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        self.starts = starts if len(starts) < len(ordered) else None  # None: no ties
        self.positive = positive[self.order].astype(np.float32)

    def aucs(self, weights: np.ndarray) -> np.ndarray:
        """(resamples,) weighted Mann-Whitney AUC; NaN where a resample lacks positives or negatives."""
        w = np.take(weights, self.order, axis=1)
        pos = w * self.positive
        neg = w - pos
        if self.starts is not None:  # sum each tie group: a tied negative counts one half
            pos, neg = np.add.reduceat(pos, self.starts, axis=1), np.add.reduceat(neg, self.starts, axis=1)
        below = np.cumsum(neg, axis=1, dtype=np.float64)
        below -= neg
        below += 0.5 * neg
        total_pos, total_neg = pos.sum(axis=1, dtype=np.float64), below[:, -1] + 0.5 * neg[:, -1]
        with np.errstate(invalid="ignore", divide="ignore"):
            value = np.einsum("ij,ij->i", pos, below) / (total_pos * total_neg)
        return np.where((total_pos > 0) & (total_neg > 0), value, np.nan)


def weighted_macro_auc(ranked: Sequence[_Ranked], weights: np.ndarray) -> np.ndarray:
    """(resamples,) mean AUC over the labels defined in each resample (NaN when none is)."""
    per_label = np.stack([r.aucs(weights) for r in ranked], axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "mean of empty slice": a resample with no defined label
        return np.nanmean(per_label, axis=1)


def bootstrap_arms(arms: Mapping[str, Sequence[np.ndarray]], targets: np.ndarray, resamples: int,
                   seed: int) -> dict[str, np.ndarray]:
    """Per arm, (resamples,) macro AUC averaged over its cells, on shared resamples of the test images.

    arms: name -> the per-image test scores (test images, labels) of each of its cells; targets: (test images,
    labels) 0/1, the same for every cell. Arms are done one at a time (the resamples drawn again for each,
    identical), so memory holds one arm's sorted scores and one chunk of resamples.
    """
    positive = np.asarray(targets) > 0.5
    out = {}
    for name, cells in arms.items():
        ranked = [[_Ranked(np.asarray(s)[:, j], positive[:, j]) for j in range(positive.shape[1])] for s in cells]
        out[name] = np.concatenate([np.mean([weighted_macro_auc(cell, weights) for cell in ranked], axis=0)
                                    for weights in resample_weights(len(positive), resamples, seed)])
    return out


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central `level` interval of bootstrap samples (NaN samples, resamples without both classes, left out)."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if not len(samples):
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)
