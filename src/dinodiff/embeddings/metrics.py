"""How good and how new sampled embeddings are: nearest-neighbour distances, k-NN precision/recall and FD.

Pure functions of (n, d) float tensors. Distances are Euclidean in whatever space the caller gives (the embedding
model's normalised space in `dinodiff train-embeddings`).

Neighbour searches and ball coverage run in float32 over blocks of `chunk` query rows x `chunk` reference rows
(torch.cdist on blocks centred on the reference mean, which keeps float32 accurate): memory is O(chunk^2 + n k),
never O(n m) nor a copy of the reference, and the cost is one block of distances per (query block, reference
block). The k distances kept per query are recomputed exactly from the row differences, so nearest-neighbour
distances (and copies) do not carry the rounding of cdist's matrix-product shortcut.

Cost in the training set size M (issue 22): every search of `embedding_report` is linear in M. The two that
would compare the training set with itself are subsampled, seeded: the copy scale (`own_distances`) from at most
`calibration_queries` training images (each against every view of every other image), and precision/recall from
at most `max_rows` rows of each set (k-NN radii are quadratic in a set's size). The Fréchet distance reads its
sets in row chunks (float64 sums), never a float64 copy of a whole set.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from scipy import linalg

from dinodiff.embeddings.settings import CHUNK

logger = logging.getLogger(__name__)

# A sampled embedding counts as a copy when it is nearer a training embedding than COPY_FACTOR x the 5th percentile
# of the training embeddings' distances to their nearest *other* training image (of another subject when known).
COPY_FACTOR = 0.5


CALIBRATION_QUERIES = 2000  # training images whose nearest other image sets the copy scale (all when fewer)
MAX_ROWS = 10_000  # rows of each set precision/recall are computed on (a seeded subsample when larger)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(len(x), -1).float()


def _centre(reference: torch.Tensor) -> torch.Tensor:
    """(1, D) mean of the reference rows (0 when empty), computed in row chunks (no copy of the reference)."""
    if not len(reference):
        return torch.zeros(1, reference.shape[1])
    total = torch.zeros(reference.shape[1], dtype=torch.float64)
    for start in range(0, len(reference), CHUNK):
        total += reference[start:start + CHUNK].double().sum(0)
    return (total / len(reference)).float()[None]


def subsample(n: int, rows: int | None, seed: int = 0) -> np.ndarray | None:
    """Sorted seeded positions of min(n, rows) of n rows; None (every row) when n <= rows or rows is None."""
    if rows is None or n <= rows:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=rows, replace=False))


def _rows(x: torch.Tensor, index: np.ndarray | None) -> torch.Tensor:
    return x if index is None else x[torch.from_numpy(index)]


def _groups(groups: torch.Tensor | np.ndarray | None, n: int) -> torch.Tensor | None:
    return None if groups is None else torch.as_tensor(np.asarray(groups)).reshape(n)


def _block_topk(q: torch.Tensor, r: torch.Tensor, centre: torch.Tensor, k: int, chunk: int,
                qg: torch.Tensor | None, rg: torch.Tensor | None) -> torch.Tensor:
    """Indices (len(q), k) of the k nearest rows of r, kept as a running top-k over reference blocks.
    q is centred already; each block of r is centred here."""
    best_d = torch.empty(len(q), 0)
    best_i = torch.empty(len(q), 0, dtype=torch.long)
    for start in range(0, len(r), chunk):
        d = torch.cdist(q, r[start:start + chunk] - centre)
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
    r = _flat(reference)
    centre = _centre(r)
    qg, rg = _groups(query_groups, len(query)), _groups(reference_groups, len(r))
    if k > len(r):
        raise ValueError(f"k = {k} neighbours asked of {len(r)} reference rows.")
    dists, index = [], []
    for start in range(0, len(query), chunk):
        block = _flat(query[start:start + chunk]) - centre
        idx = _block_topk(block, r, centre, k, chunk, None if qg is None else qg[start:start + chunk], rg)
        exact = (block[:, None, :] - (r[idx] - centre)).norm(dim=-1)  # exact distances of the kept neighbours
        if qg is not None:
            exact.masked_fill_(qg[start:start + chunk, None] == rg[idx], float("inf"))
        exact, order = exact.sort(dim=1)
        dists.append(exact)
        index.append(idx.gather(1, order))
    if not dists:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
    return torch.cat(dists), torch.cat(index)


def knn_radii(x: torch.Tensor, k: int = 3, chunk: int = CHUNK) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row (the radius of its k-NN ball)."""
    return nearest(x, x, exclude_self=True, k=k, chunk=chunk)[0][:, -1]


def coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = CHUNK) -> float:
    """Fraction of `points` inside at least one ball (centre, radius), in blocks of chunk x chunk."""
    c = _flat(centres)
    mean = _centre(c)
    radii = radii.float()
    inside = torch.zeros(len(points), dtype=torch.bool)
    for start in range(0, len(points), chunk):
        block = inside[start:start + chunk]  # a view: filled in place
        p = _flat(points[start:start + chunk]) - mean
        for c_start in range(0, len(c), chunk):
            todo = ~block
            if not bool(todo.any()):
                break
            d = torch.cdist(p[todo], c[c_start:c_start + chunk] - mean)
            block[todo] = (d <= radii[None, c_start:c_start + chunk]).any(dim=1)
    return float(inside.double().mean())


def usable_k(k: int, *sets: torch.Tensor) -> int:
    """k, or fewer when a set has no k other rows (then its k-NN balls use all of them); 0 when one has a single row."""
    return max(0, min([k, *(len(x) - 1 for x in sets)]))


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = CHUNK,
                     max_rows: int | None = None, seed: int = 0) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, Sec. 2): the k-NN balls of one set as its manifold.

    precision: fraction of fake samples inside the real manifold; recall: fraction of real inside the fake one.
    k is lowered to usable_k for sets of k rows or fewer (NaN for a set of one row). max_rows: each set larger
    than that is replaced by a seeded subsample of max_rows rows (the radii cost O(rows^2)); None: every row.
    """
    real, fake = _rows(real, subsample(len(real), max_rows, seed)), _rows(fake, subsample(len(fake), max_rows, seed))
    k = usable_k(k, real, fake)
    if k < 1:
        return float("nan"), float("nan")
    precision = coverage(fake, real, knn_radii(real, k, chunk), chunk)
    recall = coverage(real, fake, knn_radii(fake, k, chunk), chunk)
    return precision, recall


def _moments(x: torch.Tensor, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (ddof 1, as np.cov) of the rows, from float64 sums over row chunks about a shift."""
    shift = x[:chunk].reshape(min(len(x), chunk), -1).double().mean(0)
    total, outer = torch.zeros_like(shift), torch.zeros(len(shift), len(shift), dtype=torch.float64)
    for start in range(0, len(x), chunk):
        block = x[start:start + chunk].reshape(-1, len(shift)).double() - shift
        total += block.sum(0)
        outer += block.T @ block
    n = len(x)
    mean = total / n
    cov = (outer - n * torch.outer(mean, mean)) / (n - 1)
    return (shift + mean).numpy(), cov.numpy()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2), as pytorch-fid's calculate_frechet_distance."""
    (mu1, s1), (mu2, s2) = _moments(a), _moments(b)
    s1, s2 = np.atleast_2d(s1), np.atleast_2d(s2)
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
                  chunk: int = CHUNK, queries: int | None = None, seed: int = 0) -> torch.Tensor:
    """Each training image's (first view's) distance to the nearest view of another image (another subject when
    `groups` gives subjects): the scale a copy is judged against. queries: only a seeded subsample of that many
    images is measured (each still against every view of every image; the cost is O(queries x M), not O(M^2));
    None: every image."""
    views = _views(train_views)
    m, k = views.shape[:2]
    groups = torch.arange(m) if groups is None else torch.as_tensor(np.asarray(groups)).reshape(m)
    chosen = subsample(m, queries, seed)
    picked = slice(None) if chosen is None else torch.from_numpy(chosen)
    return nearest(views[picked, 0], views.reshape(m * k, -1), chunk=chunk, query_groups=groups[picked],
                   reference_groups=groups.repeat_interleave(k))[0][:, 0]


def embedding_report(sampled: torch.Tensor, train_views: torch.Tensor, reference: torch.Tensor | None = None,
                     groups: torch.Tensor | np.ndarray | None = None, k: int = 3, chunk: int = CHUNK,
                     calibration_queries: int | None = CALIBRATION_QUERIES, max_rows: int | None = MAX_ROWS,
                     seed: int = 0) -> dict[str, float]:
    """Sampled embeddings against the training set and a reference set.

    Copies: nearest-neighbour distance of each sampled row to the training images (minimum over all K views of
    each, `train_views` (M, K, D) or (M, D)), the training set's own scale (own_distances, from at most
    `calibration_queries` training images) and the fraction of copies (see COPY_FACTOR). Quality:
    precision/recall (on at most `max_rows` rows of each set) and the Fréchet distance (every row) against
    `reference` (held-out embeddings; the training images' first views when None, which is transductive).
    Subsamples are seeded (`seed`); None uses every row. Cost linear in M (see the module's docstring).
    """
    sampled, views = sampled.reshape(len(sampled), -1).float(), _views(train_views.float())
    reference = views[:, 0] if reference is None else reference.reshape(len(reference), -1).float()
    to_train = nearest_training(sampled, views, chunk)[0]
    own = own_distances(views, groups, chunk, calibration_queries, seed)
    p5 = float(torch.quantile(own.double(), 0.05))
    precision, recall = precision_recall(reference, sampled, k, chunk, max_rows, seed)
    return {
        "n_sampled": len(sampled), "n_train": len(views), "train_views": int(views.shape[1]),
        "n_reference": len(reference), "k": usable_k(k, *(x[:max_rows] for x in (reference, sampled))),
        "train_nn_queries": len(own), "pr_rows": [min(len(x), max_rows or len(x)) for x in (reference, sampled)],
        "nn_median": float(to_train.median()), "nn_min": float(to_train.min()),
        "train_nn_median": float(own.median()), "train_nn_p5": p5,
        "copy_threshold": COPY_FACTOR * p5, "copy_fraction": float((to_train < COPY_FACTOR * p5).float().mean()),
        "precision": precision, "recall": recall, "fd": frechet_distance(reference, sampled),
    }
