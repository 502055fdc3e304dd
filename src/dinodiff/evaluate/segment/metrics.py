"""Scoring label maps against lung masks, and the non-diffusion baselines (numpy, scipy and scikit-image; pure
functions).

Primary score: one segment per lung by Hungarian matching on Dice. Secondary ("union"): the union of the
segments lying mostly inside a structure; it rewards over-segmentation, so it always travels with the
number of segments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from skimage.segmentation import felzenszwalb

BOTH = "both"


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """2|A n B| / (|A| + |B|) of two boolean masks; 1.0 when both are empty."""
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    total = int(pred.sum()) + int(target.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, target).sum()) / total


def dice_matrix(labels: np.ndarray, masks: Sequence[np.ndarray]) -> np.ndarray:
    """(L, K) Dice of every mask against every segment 0..K-1 of ``labels`` (one bincount per mask)."""
    labels = np.asarray(labels).ravel()
    k = int(labels.max()) + 1
    sizes = np.bincount(labels, minlength=k)
    out = np.zeros((len(masks), k))
    for i, m in enumerate(masks):
        m = np.asarray(m, bool).ravel()
        inter = np.bincount(labels[m], minlength=k)
        out[i] = 2.0 * inter / np.maximum(sizes + m.sum(), 1)
    return out


def hungarian_scores(labels: np.ndarray, lungs: Mapping[str, np.ndarray]) -> dict:
    """One distinct segment per lung, maximising total Dice; Dice per lung and for both lungs together.

    A lung left without a segment (fewer segments than lungs) scores 0. ``both`` compares the union of the
    matched segments with the union of the lungs.
    """
    names = list(lungs)
    masks = [np.asarray(lungs[n], bool) for n in names]
    table = dice_matrix(labels, masks)
    rows, cols = linear_sum_assignment(table, maximize=True)
    match = {names[r]: int(c) for r, c in zip(rows, cols)}
    out: dict = {n: float(table[i, match[n]]) if n in match else 0.0 for i, n in enumerate(names)}
    union_pred = np.isin(labels, list(match.values()))
    out[BOTH] = dice(union_pred, np.logical_or.reduce(masks))
    out["segments"] = match
    return out


def union_scores(labels: np.ndarray, lungs: Mapping[str, np.ndarray], inside: float = 0.5) -> dict:
    """Dice of the union of segments with more than ``inside`` of their pixels in the structure.

    Structures: each lung and both lungs together. ``n_segments`` is reported with it: 256 one-pixel
    segments would reach a near-perfect union score.
    """
    labels = np.asarray(labels)
    k = int(labels.max()) + 1
    sizes = np.bincount(labels.ravel(), minlength=k)
    structures = {**{n: np.asarray(m, bool) for n, m in lungs.items()}, BOTH: np.logical_or.reduce(
        [np.asarray(m, bool) for m in lungs.values()])}
    out: dict = {}
    for name, mask in structures.items():
        frac = np.bincount(labels[mask], minlength=k) / np.maximum(sizes, 1)
        out[name] = dice(np.isin(labels, np.flatnonzero(frac > inside)), mask)
    out["n_segments"] = int(len(np.unique(labels)))
    return out


def score_labels(labels: np.ndarray, lungs: Mapping[str, np.ndarray]) -> dict:
    """Every score of one label map: {'hungarian', 'union', 'single', 'n_segments'}.

    'single' (a diagnostic) is the best Dice of any one segment against both lungs together: high when a
    model separates lung from non-lung but not the left lung from the right.
    """
    union = union_scores(labels, lungs)
    both = np.logical_or.reduce([np.asarray(m, bool) for m in lungs.values()])
    single = float(dice_matrix(labels, [both]).max())
    return {"hungarian": hungarian_scores(labels, lungs), "union": union, "single": {BOTH: single},
            "n_segments": union["n_segments"]}


def split_lungs(mask: np.ndarray) -> dict[str, np.ndarray]:
    """A two-lung mask -> {'right': image-left lung, 'left': image-right lung} (patient's sides).

    The two largest connected components, ordered by column; a single component is cut at the
    image's vertical midline.
    """
    mask = np.asarray(mask, bool)
    comp, n = ndimage.label(mask)
    if n >= 2:
        sizes = ndimage.sum(mask, comp, index=np.arange(1, n + 1))
        a, b = (np.argsort(sizes)[::-1][:2] + 1).tolist()
        cols = np.nonzero(mask)[1]
        ca, cb = (cols[comp[mask] == a].mean(), cols[comp[mask] == b].mean())
        first, second = (comp == a, comp == b) if ca < cb else (comp == b, comp == a)
        return {"right": first, "left": second}
    half = np.zeros_like(mask)
    half[:, : mask.shape[1] // 2] = True
    return {"right": mask & half, "left": mask & ~half}


# -- baselines -----------------------------------------------------------------------------------------------

def mean_mask_prior(masks: Mapping[str, np.ndarray], threshold: float = 0.5) -> np.ndarray:
    """Label map from mean training masks {lung: (H, W) mean in [0, 1]}: 0 background, i+1 for lung i."""
    names = list(masks)
    stack = np.stack([np.asarray(masks[n], float) for n in names])
    labels = stack.argmax(0) + 1
    labels[stack.max(0) < threshold] = 0
    return labels


def position_kmeans(shape: tuple[int, int], k: int, seed: int = 0, fit_side: int = 64) -> np.ndarray:
    """Position-only control: k-means on pixel coordinates alone (no image), k segments.

    Fitted on a fit_side x fit_side grid of normalised coordinates, then every pixel goes to its nearest centre.
    """
    from sklearn.cluster import KMeans

    h, w = shape
    k = max(1, int(k))
    gy, gx = np.meshgrid(np.linspace(0, 1, min(h, fit_side)), np.linspace(0, 1, min(w, fit_side)), indexing="ij")
    grid = np.stack([gy.ravel(), gx.ravel()], 1)
    km = KMeans(n_clusters=min(k, len(grid)), n_init=3, random_state=seed).fit(grid)
    py, px = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    labels = km.predict(np.stack([py.ravel(), px.ravel()], 1).astype(km.cluster_centers_.dtype))
    return np.unique(labels, return_inverse=True)[1].reshape(h, w)


def otsu_threshold(image: np.ndarray) -> float:
    """Otsu's threshold of a uint8 image (the level maximising between-class variance)."""
    hist = np.bincount(np.asarray(image, np.uint8).ravel(), minlength=256).astype(float)
    levels = np.arange(256)
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * levels)
    mean0 = m0 / np.maximum(w0, 1e-12)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1e-12)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(np.argmax(between))


def split_components(labels: np.ndarray) -> np.ndarray:
    """Each segment of a label map split into its 4-connected components: (H, W) -> (H, W) labels 0..K-1."""
    labels = np.asarray(labels)
    out = np.zeros(labels.shape, np.int64)
    count = 0
    for value in np.unique(labels):
        comp, n = ndimage.label(labels == value)
        inside = comp > 0
        out[inside] = comp[inside] - 1 + count
        count += n
    return out


def otsu_segments(image: np.ndarray) -> np.ndarray:
    """Otsu baseline: dark (air) pixels at or below Otsu's threshold split into connected components, one
    segment each; everything brighter is segment 0."""
    dark = np.asarray(image) <= otsu_threshold(image)
    comp, _ = ndimage.label(dark)
    return np.unique(comp, return_inverse=True)[1].reshape(comp.shape)


def superpixel_segments(image: np.ndarray, scale: float, sigma: float = 0.5, min_size: int = 20) -> np.ndarray:
    """Image-only control: Felzenszwalb and Huttenlocher's graph-based segmentation of the grey levels
    (scikit-image), every region one segment. Larger ``scale``, larger regions. Like the zero-shot methods, it
    over-segments and lets the Hungarian matching pick one region per lung, so it measures what the matching gets
    from the image's intensities alone, without any model."""
    grey = np.asarray(image, np.float64) / 255.0
    labels = felzenszwalb(grey, scale=float(scale), sigma=sigma, min_size=min_size, channel_axis=None)
    return np.unique(labels, return_inverse=True)[1].reshape(labels.shape)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample SD (0 for a single value)."""
    arr = np.asarray(values, float)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 5000,
                     seed: int = 0) -> tuple[float, float, float, float]:
    """Mean of a - b over paired items, its 95% percentile-bootstrap interval (items resampled with
    replacement) and a two-sided bootstrap p-value for 'no difference': (mean, low, high, p)."""
    diff = np.asarray(a, float) - np.asarray(b, float)
    if diff.size == 0:
        return float("nan"), float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, (n_boot, diff.size))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    p = min(1.0, 2 * min((means <= 0).mean(), (means >= 0).mean()))
    return float(diff.mean()), float(low), float(high), float(p)
