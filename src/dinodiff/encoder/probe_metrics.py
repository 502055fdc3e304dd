"""The probe's measures, as pure functions of features: cross-validated label AUCs and view retrieval.

Folds are stratified by label and grouped by subject when subjects repeat (scikit-learn's
StratifiedGroupKFold), so that no patient has images on both sides of a fold (DESIGN.md, protocol rules);
with one image per subject (or no subjects) they are plain StratifiedKFold folds.
"""

from __future__ import annotations

import logging

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import (
    StratifiedGroupKFold,
    StratifiedKFold,
    cross_val_score,
)
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

logger = logging.getLogger(__name__)


def knn_auc(features: np.ndarray, y: np.ndarray, k: int = 10, folds: int = 5, seed: int = 0,
            groups: np.ndarray | None = None) -> tuple[float, float]:
    """Cross-validated ROC AUC (mean, SD over folds) of a cosine, distance-weighted k-NN on standardised features."""
    model = make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="distance"))
    return cv_auc(model, features, y, folds, seed, groups)


def linear_auc(features: np.ndarray, y: np.ndarray, C: float = 0.1, folds: int = 5, seed: int = 0,
               groups: np.ndarray | None = None) -> tuple[float, float]:
    """Cross-validated ROC AUC (mean, SD over folds) of L2 logistic regression on standardised features."""
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000))
    return cv_auc(model, features, y, folds, seed, groups)


def grouped(groups: np.ndarray | None) -> bool:
    """True when some subject has more than one image (the folds are then grouped by subject)."""
    return groups is not None and len(np.unique(groups)) < len(groups)


def cv_auc(model: Pipeline, features: np.ndarray, y: np.ndarray, folds: int, seed: int,
           groups: np.ndarray | None = None) -> tuple[float, float]:
    if grouped(groups):
        cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    else:
        cv, groups = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed), None
    scores = cross_val_score(model, features, y.astype(int), cv=cv, scoring="roc_auc", groups=groups)
    return float(scores.mean()), float(scores.std())


def retrieval_top1(view_a: np.ndarray, view_b: np.ndarray) -> float:
    """Fraction of the 2N views whose nearest other view (cosine, features centred on the 2N mean) is their pair."""
    feats = np.concatenate([view_a, view_b]).astype(np.float64)
    feats = feats - feats.mean(axis=0, keepdims=True)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True).clip(1e-12)
    sim = feats @ feats.T
    np.fill_diagonal(sim, -np.inf)
    n = len(view_a)
    partner = np.concatenate([np.arange(n, 2 * n), np.arange(n)])
    return float((sim.argmax(axis=1) == partner).mean())
