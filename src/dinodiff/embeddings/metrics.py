"""How good and how new sampled embeddings are: nearest-neighbour distances, k-NN precision/recall and FD.

Pure functions of (n, d) float tensors. Distances are Euclidean in whatever space the caller gives (the embedding
model's normalised space in `dinodiff train-embeddings`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from scipy import linalg

logger = logging.getLogger(__name__)

# A sampled embedding counts as a copy when it is nearer a training embedding than COPY_FACTOR x the 5th percentile
# of the training embeddings' distances to their nearest *other* training embedding.
COPY_FACTOR = 0.5


def nearest(query: torch.Tensor, reference: torch.Tensor, exclude_self: bool = False, k: int = 1,
            chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances (n, k) and indices (n, k) of the k nearest reference rows; exclude_self: query is reference."""
    query, reference = query.double(), reference.double()
    dists, index = [], []
    for start in range(0, len(query), chunk):
        d = torch.cdist(query[start:start + chunk], reference)
        if exclude_self:
            rows = torch.arange(start, start + len(d))
            d[torch.arange(len(d)), rows] = float("inf")
        values, idx = d.topk(k, dim=1, largest=False)
        dists.append(values)
        index.append(idx)
    return torch.cat(dists).float(), torch.cat(index)


def knn_radii(x: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row (the radius of its k-NN ball)."""
    return nearest(x, x, exclude_self=True, k=k)[0][:, -1]


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Fraction of `points` inside at least one ball (centre, radius)."""
    inside = []
    for start in range(0, len(points), chunk):
        d = torch.cdist(points[start:start + chunk].double(), centres.double())
        inside.append((d <= radii.double()[None]).any(dim=1))
    return torch.cat(inside).float().mean()


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, Sec. 2): the k-NN balls of one set as its manifold.

    precision: fraction of fake samples inside the real manifold; recall: fraction of real inside the fake one.
    """
    precision = _coverage(fake, real, knn_radii(real, k))
    recall = _coverage(real, fake, knn_radii(fake, k))
    return float(precision), float(recall)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2), as pytorch-fid's calculate_frechet_distance."""
    x, y = a.double().numpy(), b.double().numpy()
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def copy_threshold(train: torch.Tensor) -> float:
    """COPY_FACTOR x the 5th percentile of the training rows' distances to their nearest other training row."""
    own = nearest(train, train, exclude_self=True)[0][:, 0]
    return COPY_FACTOR * float(torch.quantile(own.double(), 0.05))


def embedding_report(sampled: torch.Tensor, train: torch.Tensor, k: int = 3) -> dict[str, float]:
    """Nearest-neighbour distances of sampled to training rows (and the training set's own, for scale),
    the fraction of copies (see COPY_FACTOR), precision/recall and the Fréchet distance."""
    sampled, train = sampled.reshape(len(sampled), -1).float(), train.reshape(len(train), -1).float()
    to_train = nearest(sampled, train)[0][:, 0]
    own = nearest(train, train, exclude_self=True)[0][:, 0]
    threshold = COPY_FACTOR * float(torch.quantile(own.double(), 0.05))
    precision, recall = precision_recall(train, sampled, k)
    return {
        "n_sampled": len(sampled), "n_train": len(train), "k": k,
        "nn_median": float(to_train.median()), "nn_min": float(to_train.min()),
        "train_nn_median": float(own.median()), "train_nn_p5": float(torch.quantile(own.double(), 0.05)),
        "copy_threshold": threshold, "copy_fraction": float((to_train < threshold).float().mean()),
        "precision": precision, "recall": recall, "fd": frechet_distance(train, sampled),
    }
