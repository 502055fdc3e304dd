"""DiffCut (Couairon et al., NeurIPS 2024, "Zero-Shot Image Segmentation via Recursive Normalized Cut on
Diffusion Features") as pure functions: the second zero-shot method beside DiffSeg.

Features of one UNet self-attention layer (DiffCut: the output of the UNet encoder's final self-attention)
-> cosine affinity, min-max scaled to [0, 1] and raised to ``alpha`` (paper Sec. 3.2, Eq. 2) -> recursive
two-way normalised cut (Shi and Malik 2000): split a segment along the second generalised eigenvector of
(D - W) y = lambda D y, at the threshold of lowest Ncut, and keep splitting while the Ncut is below ``tau``
(Sec. 3.3) -> each segment's mean feature, then every pixel of the bilinearly upsampled feature map goes to
the most similar segment ("high-resolution concept assignment", Sec. 3.4).

`superpixel_ncut` runs the same cut with the image's superpixels as nodes (each the mean of the upsampled,
normalised features over its pixels) instead of the feature map's positions: the model's features decide which
regions go together, and the image's own edges decide where a segment ends.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from threadpoolctl import ThreadpoolController

from dinodiff.evaluate.segment.diffseg import map_side

N_SPLIT_CANDIDATES = 100  # thresholds tried along the eigenvector (as the paper's code)
# Found once: a fresh threadpool_limits looks up the loaded libraries on every call (2 ms, against 0.05 ms here).
_THREADPOOLS = ThreadpoolController()


def cosine_affinity(features: np.ndarray, alpha: float) -> np.ndarray:
    """(N, C) features -> (N, N) affinity in [0, 1]: cosine similarity min-max scaled, to the power ``alpha``.

    A larger ``alpha`` keeps only the strongest similarities (a sparser graph, finer segments).
    """
    f = np.asarray(features, np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    cos = f @ f.T
    span = cos.max() - cos.min()
    scaled = (cos - cos.min()) / span if span > 0 else np.ones_like(cos)
    return scaled ** float(alpha)


def ncut_value(affinity: np.ndarray, part: np.ndarray) -> float:
    """Normalised cut of the bipartition (part, ~part): cut/assoc(A, V) + cut/assoc(B, V) (Shi and Malik)."""
    part = np.asarray(part, bool)
    if part.all() or not part.any():
        return float("inf")
    cut = affinity[part][:, ~part].sum()
    degree = affinity.sum(1)
    return float(cut / max(degree[part].sum(), 1e-30) + cut / max(degree[~part].sum(), 1e-30))


def fiedler_vector(affinity: np.ndarray) -> np.ndarray:
    """The second smallest generalised eigenvector y of (D - W) y = lambda D y (the relaxed Ncut solution).

    Solved in its standard form: the symmetric normalised Laplacian I - D^-1/2 W D^-1/2 has the same eigenvalues
    with eigenvectors z = D^1/2 y, and a standard problem costs less than a generalised one (no Cholesky of D).
    """
    degree = affinity.sum(1) + 1e-12  # an isolated node would make D singular
    scale = 1.0 / np.sqrt(degree)
    normalised = np.eye(len(degree)) - scale[:, None] * affinity * scale[None, :]
    _, vectors = scipy.linalg.eigh(normalised, subset_by_index=[1, 1], driver="evr")
    return scale * vectors[:, 0]


def bipartition(affinity: np.ndarray, candidates: int = N_SPLIT_CANDIDATES) -> tuple[np.ndarray, float]:
    """The split of lowest Ncut among ``candidates`` thresholds on the Fiedler vector: (mask, ncut).

    All candidates at once: with indicator columns X, cut = X^T d - diag(X^T W X) and assoc(A) = X^T d.
    """
    y = fiedler_vector(affinity)
    lo, hi = float(y.min()), float(y.max())
    if hi - lo <= 1e-12 * max(abs(lo), abs(hi), 1.0):
        return np.zeros(len(y), bool), float("inf")
    masks = y[:, None] > np.linspace(lo, hi, candidates + 2)[None, 1:-1]  # (N, candidates)
    x = masks.astype(np.float64)
    degree = affinity.sum(1)
    assoc = degree @ x
    cut = assoc - np.einsum("nt,nt->t", x, affinity @ x)
    rest = degree.sum() - assoc
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.where((assoc > 0) & (rest > 0), cut / assoc + cut / rest, np.inf)
    best = int(np.argmin(values))
    return masks[:, best], float(values[best])


def recursive_ncut(affinity: np.ndarray, tau: float, min_size: int = 2, max_depth: int = 8) -> np.ndarray:
    """Labels 0..K-1 of the N nodes: split recursively while the best split's Ncut is below ``tau``.

    A segment smaller than ``2 * min_size`` nodes, or at ``max_depth``, is not split further.
    """
    labels = np.zeros(affinity.shape[0], np.int64)
    stack = [(np.arange(affinity.shape[0]), 0)]
    next_label = 1
    while stack:
        nodes, depth = stack.pop()
        if len(nodes) < 2 * min_size or depth >= max_depth:
            continue
        mask, value = bipartition(affinity[np.ix_(nodes, nodes)])
        if value >= tau or min(mask.sum(), (~mask).sum()) < min_size:
            continue
        labels[nodes[mask]] = next_label
        next_label += 1
        stack += [(nodes[mask], depth + 1), (nodes[~mask], depth + 1)]
    return np.unique(labels, return_inverse=True)[1]


def assign_pixels(features: torch.Tensor, segments: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """High-resolution concept assignment: features (N, C) on a side x side map and their segment labels (N,)
    -> (H, W) labels: each pixel of the bilinearly upsampled, L2-normalised features goes to the segment whose
    mean normalised feature is most similar (cosine).

    Computed without upsampling the C feature channels: a pixel's norm does not change which segment is most
    similar, and bilinear interpolation is linear, so upsampling the k similarity maps on the feature map gives the
    same scores (k is a few segments, C hundreds of channels: the upsampling cost ~20x less at 256 px)."""
    side = map_side(features.shape[0])
    feats = F.normalize(features.float(), dim=1)
    seg = torch.as_tensor(segments, dtype=torch.long, device=feats.device)
    k = int(seg.max()) + 1
    protos = torch.zeros(k, feats.shape[1], device=feats.device).index_add_(0, seg, feats)
    protos = F.normalize(protos, dim=1)
    scores = (feats @ protos.T).T.reshape(1, k, side, side)
    labels = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)[0].argmax(0)
    return torch.unique(labels, return_inverse=True)[1]


def diffcut(features: torch.Tensor, tau: float, alpha: float, size: tuple[int, int]) -> tuple[torch.Tensor, int]:
    """One image's features (N, C) -> (label map (H, W), number of segments found on the feature map)."""
    # One BLAS thread: the matrices are small (N <= 1024), and BLAS threads beside torch's busy ones made each
    # eigh up to 200x slower (BENCHMARKS.md "Ncut's eigensolver and BLAS threads").
    with _THREADPOOLS.limit(limits=1, user_api="blas"):
        segments = recursive_ncut(cosine_affinity(features.detach().cpu().numpy(), alpha), tau)
    return assign_pixels(features, segments, size), int(segments.max()) + 1


def pool_superpixels(features: torch.Tensor, superpixels: np.ndarray) -> np.ndarray:
    """Features (N, C) on a side x side map -> (K, C): per superpixel 0..K-1 of the (H, W) label map, the sum of
    the bilinearly upsampled, L2-normalised features over its pixels (the cut's affinity is a cosine, so the sum
    is the mean's direction)."""
    side = map_side(features.shape[0])
    grid = features.float().T.reshape(1, -1, side, side)
    up = F.interpolate(grid, size=superpixels.shape, mode="bilinear", align_corners=False)[0]
    pixels = F.normalize(up.reshape(up.shape[0], -1), dim=0).T  # (H*W, C)
    index = torch.as_tensor(superpixels.ravel(), dtype=torch.long, device=pixels.device)
    k = int(superpixels.max()) + 1
    return torch.zeros(k, pixels.shape[1], device=pixels.device).index_add_(0, index, pixels).cpu().numpy()


def superpixel_ncut(pooled: np.ndarray, superpixels: np.ndarray, tau: float,
                    alpha: float) -> tuple[torch.Tensor, int]:
    """One image's superpixels (H, W, labels 0..K-1) and their pooled features (K, C, `pool_superpixels`) ->
    (label map (H, W), segments): the recursive Ncut of ``diffcut`` on the superpixels; every pixel takes its
    superpixel's segment. A superpixel may be a segment of its own (min_size 1): a node is already a region of
    many pixels."""
    superpixels = np.asarray(superpixels)
    if superpixels.max() == 0:
        return torch.zeros(superpixels.shape, dtype=torch.long), 1
    with _THREADPOOLS.limit(limits=1, user_api="blas"):  # as in diffcut
        segments = recursive_ncut(cosine_affinity(np.asarray(pooled), alpha), tau, min_size=1)
    return torch.from_numpy(segments[superpixels]), int(segments.max()) + 1
