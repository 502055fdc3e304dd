"""The audit's statistics, as pure functions of feature matrices: DCR, its calibration, copy flags, memorisation.

DCR (distance to closest record) of a query row = its Euclidean distance to the nearest *training* row.
Calibration (the references a DCR is read against):
- holdout -> train: real images the model never saw, against the training set;
- train -> train: each training image against its nearest *other* training image (of another patient when
  patient ids are known).
A synthetic image is *closer than the reference* when its DCR is below the reference's 5th percentile (expected
for ~5% of images drawn like the reference), and *flagged as a copy* when its DCR is below COPY_FACTOR x that 5th
percentile: a near-duplicate, closer to a training record than almost any two different real images are.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

COPY_FACTOR = 0.5
REFERENCE_QUANTILE = 0.05
QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5)


def distance_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) Euclidean distances, in float64."""
    return torch.cdist(torch.from_numpy(np.asarray(a, np.float64)), torch.from_numpy(np.asarray(b, np.float64))).numpy()


def dcr(query: np.ndarray, train: np.ndarray, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Distance of each query row to its closest training row, and that row's index."""
    dists, index = [], []
    for start in range(0, len(query), chunk):
        d = distance_matrix(query[start:start + chunk], train)
        index.append(d.argmin(axis=1))
        dists.append(d[np.arange(len(d)), index[-1]])
    return np.concatenate(dists) if dists else np.zeros(0), np.concatenate(index) if index else np.zeros(0, int)


def dcr_views(views: Sequence[np.ndarray], train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DCR of a query seen in several variants (jitters): the smallest over its variants, and that record's index."""
    found = [dcr(v, train) for v in views]
    d = np.stack([f[0] for f in found])
    best = d.argmin(axis=0)
    cols = np.arange(d.shape[1])
    return d[best, cols], np.stack([f[1] for f in found])[best, cols]


def train_self_dcr(train: np.ndarray, patients: Sequence[str | None] | None = None, chunk: int = 2048,
                   query: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each training row's distance to its nearest other training row (of another patient when ids are given).

    query: the training rows seen otherwise (a jitter of them), compared with the unjittered `train`.
    """
    query = train if query is None else query
    groups = np.asarray([p if p is not None else f"__row{i}" for i, p in enumerate(patients)], dtype=object) \
        if patients is not None else None
    dists, index = [], []
    for start in range(0, len(train), chunk):
        d = distance_matrix(query[start:start + chunk], train)
        rows = np.arange(start, start + len(d))
        d[np.arange(len(d)), rows] = np.inf
        if groups is not None:
            d[groups[rows][:, None] == groups[None, :]] = np.inf
        index.append(d.argmin(axis=1))
        dists.append(d[np.arange(len(d)), index[-1]])
    return np.concatenate(dists), np.concatenate(index)


def train_self_dcr_views(views: Sequence[np.ndarray], train: np.ndarray,
                         patients: Sequence[str | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """train_self_dcr, smallest over the variants (views) of each training row."""
    found = [train_self_dcr(train, patients, query=v) for v in views]
    d = np.stack([f[0] for f in found])
    best = d.argmin(axis=0)
    cols = np.arange(d.shape[1])
    return d[best, cols], np.stack([f[1] for f in found])[best, cols]


def quantile(values: np.ndarray, q: float) -> float:
    """The q-quantile (linear interpolation, numpy's default); nan for an empty array."""
    finite = np.asarray(values, np.float64)
    finite = finite[np.isfinite(finite)]
    return float(np.quantile(finite, q)) if len(finite) else float("nan")


def distribution(values: np.ndarray) -> dict[str, float]:
    """n, mean and the QUANTILES (min, p1, p5, p25, median) of a DCR sample."""
    out = {"n": int(len(values)), "mean": float(np.mean(values)) if len(values) else float("nan")}
    out.update({("min" if q == 0 else f"p{round(q * 100)}" if q < 0.5 else "median"): quantile(values, q)
                for q in QUANTILES})
    return out


def calibration(reference: np.ndarray) -> dict[str, float]:
    """The reference's 5th percentile and the copy threshold derived from it."""
    p5 = quantile(reference, REFERENCE_QUANTILE)
    return {"p5": p5, "copy_threshold": COPY_FACTOR * p5}


def fraction_below(values: np.ndarray, threshold: float) -> float:
    """Fraction of values strictly below threshold (nan when there are none or no threshold)."""
    if not len(values) or not np.isfinite(threshold):
        return float("nan")
    return float(np.mean(np.asarray(values) < threshold))


def memorisation(own_distance: np.ndarray, source_index: np.ndarray, source_neighbour: np.ndarray) -> dict:
    """Per source: is one of its variations nearer it than the source's nearest real (other-patient) neighbour?

    own_distance[i]: distance of variation i to its own source; source_index[i]: which source (0..S-1);
    source_neighbour[s]: distance of source s to its nearest other real training image.
    """
    sources = np.unique(source_index)
    closest = np.array([own_distance[source_index == s].min() for s in sources])
    ratio = closest / np.maximum(source_neighbour[sources], 1e-12)
    return {"sources": int(len(sources)), "variations": int(len(own_distance)),
            "memorised_fraction": float(np.mean(ratio < 1.0)) if len(sources) else float("nan"),
            "median_ratio": float(np.median(ratio)) if len(sources) else float("nan"),
            "min_ratio": float(ratio.min()) if len(sources) else float("nan"), "ratios": ratio}
