"""How good and how new sampled embeddings are: nearest-neighbour distances, k-NN precision/recall and FD.

Pure functions of (n, d) float tensors. Distances are Euclidean in whatever space the caller gives (the embedding
model's normalised space in `dinodiff train-embeddings`).

Neighbour searches and ball coverage run in float32 over blocks of `chunk` query rows x `chunk` reference rows
(torch.cdist on data centred on the reference mean, which keeps float32 accurate): memory is O(chunk^2 + n k),
never O(n m), and the cost is one block of distances per (query block, reference block). The k distances kept per
query are recomputed exactly from the row differences, so nearest-neighbour distances (and copies) do not carry
the rounding of cdist's matrix-product shortcut.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from scipy import linalg

logger = logging.getLogger(__name__)

# A sampled embedding counts as a copy when it is nearer a training embedding than COPY_FACTOR x the 5th percentile
# of the training embeddings' distances to their nearest *other* training image (of another subject when known).
COPY_FACTOR = 0.5
CHUNK = 2048  # rows per block: a block of distances is CHUNK x CHUNK float32 (16 MiB)


def _centred(query: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    reference = reference.reshape(len(reference), -1).float()
    centre = reference.mean(0, keepdim=True) if len(reference) else 0.0
    return query.reshape(len(query), -1).float() - centre, reference - centre


def _groups(groups: torch.Tensor | np.ndarray | None, n: int) -> torch.Tensor | None:
    return None if groups is None else torch.as_tensor(np.asarray(groups)).reshape(n)


def _block_topk(q: torch.Tensor, r: torch.Tensor, k: int, chunk: int, qg: torch.Tensor | None,
                rg: torch.Tensor | None) -> torch.Tensor:
    """Indices (len(q), k) of the k nearest rows of r, kept as a running top-k over reference blocks."""
    best_d = torch.empty(len(q), 0)
    best_i = torch.empty(len(q), 0, dtype=torch.long)
    for start in range(0, len(r), chunk):
        d = torch.cdist(q, r[start:start + chunk])
        if qg is not None:
            d.masked_fill_(qg[:, None] == rg[None, start:start + chunk], float("inf"))
        idx = torch.arange(start, start + d.shape[1]).expand(len(q), -1)
        cand_d, cand_i = torch.cat([best_d, d], 1), torch.cat([best_i, idx], 1)
        best_d, pos = cand_d.topk(min(k, cand_d.shape[1]), dim=1, largest=False)
        best_i = cand_i.gather(1, pos)
    return best_i


def nearest(query: torch.Tensor, reference: torch.Tensor, exclude_self: bool = False, k: int = 1,
            chunk: int = CHUNK, query_groups: torch.Tensor | np.ndarray | None = None,
            reference_groups: torch.Tensor | np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances (n, k) and indices (n, k) of the k nearest reference rows, ascending, float32 and chunked.

    Rows in the same group (query_groups[i] == reference_groups[j]) are never neighbours; exclude_self (query is
    reference) is the case of one group per row.
    """
    if exclude_self:
        query_groups = reference_groups = torch.arange(len(reference))
    q, r = _centred(query, reference)
    qg, rg = _groups(query_groups, len(q)), _groups(reference_groups, len(r))
    if k > len(r):
        raise ValueError(f"k = {k} neighbours asked of {len(r)} reference rows.")
    dists, index = [], []
    for start in range(0, len(q), chunk):
        block = q[start:start + chunk]
        idx = _block_topk(block, r, k, chunk, None if qg is None else qg[start:start + chunk], rg)
        exact = (block[:, None, :] - r[idx]).norm(dim=-1)  # exact distances of the kept neighbours
        if qg is not None:
            exact.masked_fill_(qg[start:start + chunk, None] == rg[idx], float("inf"))
        exact, order = exact.sort(dim=1)
        dists.append(exact)
        index.append(idx.gather(1, order))
    return torch.cat(dists), torch.cat(index)


def knn_radii(x: torch.Tensor, k: int = 3, chunk: int = CHUNK) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row (the radius of its k-NN ball)."""
    return nearest(x, x, exclude_self=True, k=k, chunk=chunk)[0][:, -1]


def coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = CHUNK) -> float:
    """Fraction of `points` inside at least one ball (centre, radius), in blocks of chunk x chunk."""
    p, c = _centred(points, centres)
    radii = radii.float()
    inside = torch.zeros(len(p), dtype=torch.bool)
    for start in range(0, len(p), chunk):
        block = inside[start:start + chunk]  # a view: filled in place
        for c_start in range(0, len(c), chunk):
            todo = ~block
            if not bool(todo.any()):
                break
            d = torch.cdist(p[start:start + chunk][todo], c[c_start:c_start + chunk])
            block[todo] = (d <= radii[None, c_start:c_start + chunk]).any(dim=1)
    return float(inside.double().mean())


def usable_k(k: int, *sets: torch.Tensor) -> int:
    """k, or fewer when a set has no k other rows (then its k-NN balls use all of them); 0 when one has a single row."""
    return max(0, min([k, *(len(x) - 1 for x in sets)]))


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = CHUNK) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, Sec. 2): the k-NN balls of one set as its manifold.

    precision: fraction of fake samples inside the real manifold; recall: fraction of real inside the fake one.
    k is lowered to usable_k for sets of k rows or fewer (NaN for a set of one row).
    """
    k = usable_k(k, real, fake)
    if k < 1:
        return float("nan"), float("nan")
    precision = coverage(fake, real, knn_radii(real, k, chunk), chunk)
    recall = coverage(real, fake, knn_radii(fake, k, chunk), chunk)
    return precision, recall


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2), as pytorch-fid's calculate_frechet_distance."""
    x, y = a.reshape(len(a), -1).double().numpy(), b.reshape(len(b), -1).double().numpy()
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _views(train: torch.Tensor) -> torch.Tensor:
    """(M, D) or (M, K, D) training embeddings -> (M, K, D)."""
    return train[:, None] if train.ndim == 2 else train.reshape(train.shape[0], train.shape[1], -1)


def nearest_training(sampled: torch.Tensor, train_views: torch.Tensor,
                     chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sampled row's distance to the nearest training image, the minimum over ALL its K views, and which."""
    views = _views(train_views)
    m, k = views.shape[:2]
    dist, idx = nearest(sampled, views.reshape(m * k, -1), chunk=chunk)
    return dist[:, 0], idx[:, 0] // k


def own_distances(train_views: torch.Tensor, groups: torch.Tensor | np.ndarray | None = None,
                  chunk: int = CHUNK) -> torch.Tensor:
    """Each training image's (first view's) distance to the nearest view of another image (another subject when
    `groups` gives subjects): the scale a copy is judged against."""
    views = _views(train_views)
    m, k = views.shape[:2]
    groups = torch.arange(m) if groups is None else torch.as_tensor(np.asarray(groups)).reshape(m)
    return nearest(views[:, 0], views.reshape(m * k, -1), chunk=chunk, query_groups=groups,
                   reference_groups=groups.repeat_interleave(k))[0][:, 0]


def embedding_report(sampled: torch.Tensor, train_views: torch.Tensor, reference: torch.Tensor | None = None,
                     groups: torch.Tensor | np.ndarray | None = None, k: int = 3,
                     chunk: int = CHUNK) -> dict[str, float]:
    """Sampled embeddings against the training set and a reference set.

    Copies: nearest-neighbour distance of each sampled row to the training images (minimum over all K views of
    each, `train_views` (M, K, D) or (M, D)), the training set's own scale (own_distances) and the fraction of
    copies (see COPY_FACTOR). Quality: precision/recall and the Fréchet distance against `reference` (held-out
    embeddings; the training images' first views when None, which is transductive).
    """
    sampled, views = sampled.reshape(len(sampled), -1).float(), _views(train_views.float())
    reference = views[:, 0] if reference is None else reference.reshape(len(reference), -1).float()
    to_train = nearest_training(sampled, views, chunk)[0]
    own = own_distances(views, groups, chunk)
    p5 = float(torch.quantile(own.double(), 0.05))
    precision, recall = precision_recall(reference, sampled, k, chunk)
    return {
        "n_sampled": len(sampled), "n_train": len(views), "train_views": int(views.shape[1]),
        "n_reference": len(reference), "k": usable_k(k, reference, sampled),
        "nn_median": float(to_train.median()), "nn_min": float(to_train.min()),
        "train_nn_median": float(own.median()), "train_nn_p5": p5,
        "copy_threshold": COPY_FACTOR * p5, "copy_fraction": float((to_train < COPY_FACTOR * p5).float().mean()),
        "precision": precision, "recall": recall, "fd": frechet_distance(reference, sampled),
    }
