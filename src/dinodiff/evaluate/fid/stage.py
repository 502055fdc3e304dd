"""FID and KID: pure functions on feature matrices, a real-set feature cache, and the `fid` stage.

FID = ||mu_r - mu_f||^2 + tr(S_r) + tr(S_f) - 2 tr((S_r S_f)^1/2). The trace of the matrix square root is
computed in the symmetric form tr((A S_f A)^1/2) with A = S_r^1/2 (both from `eigh`), whose eigenvalues
are real and non-negative, so no complex parts or sqrtm iterations are involved.
KID = the unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over subsets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from dinodiff.config import FidSettings
from dinodiff.evaluate.fid.features import FeatureExtractor, build_extractor
from dinodiff.evaluate.fid.images import (
    ImageRef,
    fingerprint,
    iter_images,
    list_images,
    select,
)
from dinodiff.files import atomic_path
from dinodiff.models.factory import cache_home
from dinodiff.results import Results, write_results

logger = logging.getLogger(__name__)
CACHE_VERSION = 1
REPORT_SPLIT = "test"  # what `fid` reports on when no split is named: the held-out images


# ------------------------------------------------------------------------------------------ maths
def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) of an (N, D) feature matrix, N >= 2."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need an (N, D) feature matrix with N >= 2, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _rank_clip(values: np.ndarray) -> np.ndarray:
    """Eigenvalues below the numerical-rank tolerance are rounding noise: zero them before the square root
    (sqrt turns 1e-16 noise into 1e-8 each, which adds up when N < D leaves many zero eigenvalues)."""
    tol = max(values.max(initial=0.0), 0.0) * values.size * np.finfo(np.float64).eps
    return np.where(values > tol, values, 0.0)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(sigma)
    return (vectors * np.sqrt(_rank_clip(values))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (covariances symmetric PSD)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    root = _psd_sqrt(sigma1)
    middle = root @ sigma2 @ root
    trace_sqrt = np.sqrt(_rank_clip(np.linalg.eigvalsh((middle + middle.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    """FID between two (N, D) feature matrices."""
    return frechet_distance(*gaussian_stats(real), *gaussian_stats(fake))


def polynomial_mmd2(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                    coef0: float = 1.0) -> float:
    """Unbiased MMD^2 between samples x (m, D) and y (n, D) under k(a, b) = (gamma a.b + coef0)^degree."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    k_xx, k_yy, k_xy = ((a @ b.T * gamma + coef0) ** degree for a, b in ((x, x), (y, y), (x, y)))
    m, n = len(x), len(y)
    return float((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
                 - 2.0 * k_xy.sum() / (m * n))


def kid_from_features(real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                      seed: int = 0) -> tuple[float, float]:
    """KID mean and (population) standard deviation over `subsets` random subsets of `subset_size` per set."""
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {len(real)} real and {len(fake)} fake.")
    rng = np.random.default_rng(seed)
    scores = [polynomial_mmd2(real[rng.choice(len(real), size, replace=False)],
                              fake[rng.choice(len(fake), size, replace=False)]) for _ in range(subsets)]
    return float(np.mean(scores)), float(np.std(scores))


# ------------------------------------------------------------------------------------- extraction
def extract_features(extractor: FeatureExtractor, images: Iterable[torch.Tensor], batch_size: int = 32) -> np.ndarray:
    """Run `extractor` over (1, S, S) images or (B, 1, S, S) batches; returns float32 (N, dim)."""
    out, pending, count = [], [], 0
    for item in images:
        pending.extend(item if item.ndim == 4 else [item])
        while len(pending) >= batch_size:
            out.append(extractor(torch.stack(pending[:batch_size])).cpu().numpy())
            pending, count = pending[batch_size:], count + batch_size
    if pending:
        out.append(extractor(torch.stack(pending)).cpu().numpy())
    if not out:
        raise ValueError("no images to extract features from")
    return np.concatenate(out).astype(np.float32)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def cache_key(extractor: FeatureExtractor, refs: list[ImageRef]) -> str:
    """Hash of the extractor (name, tap, weights file), its input size and the exact images (files, sizes, mtimes)."""
    weights = Path(extractor.weights)
    weights_id = f"{weights.resolve()}:{weights.stat().st_size}:{weights.stat().st_mtime_ns}" if weights.is_file() \
        else extractor.weights
    text = json.dumps([CACHE_VERSION, extractor.key, weights_id, extractor.input_size, fingerprint(refs)])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def cached_features(extractor: FeatureExtractor, refs: list[ImageRef], cache_dir: str | Path | None,
                    batch_size: int = 32) -> np.ndarray:
    """Features of `refs`: read from ``cache_dir/<extractor>-<tap>-n<N>-<key>.npz`` when present, else extracted
    and saved there (no cache when `cache_dir` is None)."""
    if cache_dir is None:
        return extract_features(extractor, iter_images(refs, extractor.input_size), batch_size)
    name = f"{_safe(extractor.name)}-{_safe(extractor.tap)}-n{len(refs)}-{cache_key(extractor, refs)}.npz"
    path = Path(cache_dir) / name
    if path.is_file():
        with np.load(path) as data:
            logger.info("real-set features from cache %s", path)
            return data["features"]
    start = time.time()
    features = extract_features(extractor, iter_images(refs, extractor.input_size), batch_size)
    mu, sigma = gaussian_stats(features) if len(features) > 1 else (features[0], None)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:  # a handle, so numpy keeps the name
        np.savez(handle, features=features, mu=mu, sigma=sigma if sigma is not None else np.zeros(0),
                 meta=np.array(json.dumps({**extractor.describe(), "images": len(refs)})))
    logger.info("extracted %d real-set features in %.1f s, cached to %s", len(refs), time.time() - start, path)
    return features


def default_cache_dir() -> Path:
    return cache_home() / "fid-stats"


def scores(real: np.ndarray, fake: np.ndarray, kid_subsets: int = 100, kid_subset_size: int = 1000,
           seed: int = 0) -> dict:
    """FID and KID of two feature matrices as one record (warns when N < D: covariances are then rank-deficient)."""
    if min(len(real), len(fake)) <= real.shape[1]:
        logger.warning("FID on %d real / %d fake images with %d-d features: covariances are rank-deficient and "
                       "FID is strongly biased upwards; compare only runs with the same sample sizes.",
                       len(real), len(fake), real.shape[1])
    kid_mean, kid_std = kid_from_features(real, fake, kid_subsets, kid_subset_size, seed)
    return {"fid": fid_from_features(real, fake), "kid_mean": kid_mean, "kid_std": kid_std,
            "n_real": len(real), "n_fake": len(fake)}


# ------------------------------------------------------------------------------------------ stage
def fid(real: str | Path, fake: str | Path, settings: FidSettings = FidSettings(),
        out: str | Path | None = None) -> dict:
    """FID and KID between two image sets (folders, shards or synthetic datasets).

    `settings.num_real` real and `settings.num_sources` fake images are drawn with `settings.seed` (all when
    fewer or None). Real-set features are cached in `settings.cache_dir` (default ``$DINODIFF_CACHE/fid-stats``;
    none when `settings.cache` is False). The result names the extractor, its tap and weights; with `out` (a
    folder, or a .json file) it is also written there as a results record (kind "fid", the result under data).
    """
    s = settings
    split = s.split or REPORT_SPLIT
    net = build_extractor(s.extractor, s.weights, s.device)
    real_refs = select(list_images(real, split), s.num_real, s.seed)
    fake_refs = select(list_images(fake, split), s.num_sources, s.seed)
    cache = (Path(s.cache_dir) if s.cache_dir else default_cache_dir()) if s.cache else None
    start = time.time()
    real_features = cached_features(net, real_refs, cache, s.batch_size)
    fake_features = cached_features(net, fake_refs, None, s.batch_size)
    result = {**scores(real_features, fake_features, s.kid_subsets, s.kid_subset_size, s.seed), **net.describe(),
              "real": str(real), "fake": str(fake), "seed": s.seed, "seconds": round(time.time() - start, 2)}
    if out is not None:
        write_results(out, fid_results(result, split))
    return result


def fid_results(result: dict, split: str) -> Results:
    """`dinodiff fid`'s results record: one row naming both sets, the features and the sample sizes."""
    features = f"{result['extractor']}:{result['tap']}"
    row = {"real": result["real"], "generated": result["fake"], "FID/FD": round(float(result["fid"]), 4),
           "KID": f"{result['kid_mean']:.4g} ± {result['kid_std']:.2g}", "features": features,
           "n real / generated": f"{result['n_real']} / {result['n_fake']}", "split": split, "seed": result["seed"]}
    return Results(kind="fid", title=f"Image quality: {Path(result['fake']).name} vs {Path(result['real']).name}",
                   provenance={k: v for k, v in result.items() if k not in ("fid", "kid_mean", "kid_std")},
                   tables={"FID/FD": [row]}, headline={f"FID ({features}) of {Path(result['fake']).name}":
                                                       round(float(result["fid"]), 4)},
                   data=result)
