"""DiffSeg (Tian et al. 2023, "Diffuse, Attend, and Segment") as pure tensor functions.

Self-attention maps of one UNet pass -> one aggregated 4-D attention tensor -> anchors on an MxM grid ->
iterative merging by symmetric KL divergence -> label map. Layout conventions: a map of side ``s`` holds
``s*s`` query rows and ``s*s`` key columns, both flattened row-major (``index = row * s + col``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from dinodiff.evaluate.segment.settings import THRESHOLD_MODES

# How merging iterations after the first group maps: "reference" as google/diffseg ``DiffSeg.mask_merge``
# (each map not yet matched, in order, is averaged with *every* map within the threshold, matched or not, and
# marks them matched: groups may share maps); "partition" (dinodiff <= 0.1): only maps not yet matched join a
# group, so each map is in exactly one group.
LATER_MERGES = ("reference", "partition")


def map_side(n_tokens: int) -> int:
    """Side of the square token grid of an attention map with ``n_tokens`` queries."""
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"attention over {n_tokens} tokens is not a square grid; DiffSeg needs square latents.")
    return side


def resolution_weights(sides: Sequence[int]) -> dict[int, float]:
    """DiffSeg's aggregation weights, one per *resolution*: proportional to its side, summing to 1.

    As google/diffseg ``DiffSeg.get_weight_rato``: the weights come from the distinct resolutions
    (SD 1.5: 64, 32, 16, 8 -> 64/120, 32/120, 16/120, 8/120), however many layers each resolution has.
    """
    distinct = sorted(set(int(s) for s in sides), reverse=True)
    total = float(sum(distinct))
    return {s: s / total for s in distinct}


def layer_weights(sides: Sequence[int]) -> torch.Tensor:
    """The weight each *layer* ends up with: its resolution's weight shared equally by that resolution's layers.

    SD 1.5 (5 maps at 64, 32 and 16, 1 at 8): the mid block's map gets 8/120 = 0.067 and each 64 map 64/600.
    """
    per_res = resolution_weights(sides)
    counts = {s: list(sides).count(s) for s in per_res}
    return torch.tensor([per_res[s] / counts[s] for s in sides], dtype=torch.float64)


def aggregate_attention(maps: Sequence[torch.Tensor], weights: Mapping[int, float] | None = None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Head-averaged maps (B, N_i, N_i) of several resolutions -> (B, N, N) at the largest side S (N = S*S).

    As google/diffseg (``third_party/keras-cv/diffusion_model.py`` sums ``temp/5`` per resolution, then
    ``DiffSeg.aggregate_weights``): the maps of the layers at each resolution are first averaged; each
    resolution's mean then has its keys bilinearly upsampled to S x S and renormalised to sum to 1, its
    queries repeated (each coarse query stands for the ratio x ratio block of fine queries it covers), and
    the resolutions are summed with ``weights`` (side -> weight; default proportional to the side, see
    ``resolution_weights``). Rows of the result sum to 1.
    """
    if not maps:
        raise ValueError("no attention maps to aggregate (did the UNet run any self-attention?)")
    sides = [map_side(m.shape[-1]) for m in maps]
    size = max(sides)
    if any(size % s for s in sides):
        raise ValueError(f"attention sides {sorted(set(sides))} do not divide the largest ({size}).")
    w = resolution_weights(sides) if weights is None else {int(k): float(v) for k, v in weights.items()}
    missing = sorted(set(sides) - set(w))
    if missing:
        raise ValueError(f"no aggregation weight for attention side(s) {missing}; weights given for {sorted(w)}.")
    batch = maps[0].shape[0]
    out = torch.zeros(batch, size * size, size * size, dtype=dtype, device=maps[0].device)
    for s in sorted(set(sides), reverse=True):
        group = [m for m, side in zip(maps, sides) if side == s]
        mean = group[0].to(dtype).clone() if len(group) > 1 else group[0].to(dtype)
        for m in group[1:]:
            mean.add_(m.to(dtype))
        if len(group) > 1:
            mean.div_(len(group))
        out.add_(_to_finest(mean, s, size), alpha=w[s])
    return out


def _to_finest(m: torch.Tensor, s: int, size: int) -> torch.Tensor:
    """(B, s*s, s*s) -> (B, size*size, size*size): keys bilinearly upsampled + renormalised, queries repeated."""
    batch, r = m.shape[0], size // s
    keys = m.reshape(batch * s * s, 1, s, s)
    if r > 1:
        keys = F.interpolate(keys, size=(size, size), mode="bilinear", align_corners=False)
        keys = keys / keys.sum(dim=(-2, -1), keepdim=True)
    keys = keys.reshape(batch, s, 1, s, 1, size * size)
    # repeat queries along both spatial axes: coarse query (i, j) -> fine queries (i*r.., j*r..);
    # expand is a view, so the only full-size copy is the reshape (none at all when r == 1)
    return keys.expand(batch, s, r, s, r, size * size).reshape(batch, size * size, size * size)


def anchor_grid(size: int, points: int) -> torch.Tensor:
    """(points^2, 2) (row, col) anchors evenly spaced and centred on a size x size map (DiffSeg's grid)."""
    if points < 1 or points > size:
        raise ValueError(f"anchor grid {points}x{points} does not fit a {size}x{size} attention map; "
                         f"use a grid size between 1 and {size}.")
    if points == 1:
        coords = torch.tensor([(size - 1) // 2])
    else:
        step = (size - 1) // (points - 1)
        start = (size - 1 - step * (points - 1)) // 2
        coords = start + step * torch.arange(points)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1)


@contextlib.contextmanager
def _exact_matmul() -> Iterator[None]:
    # TF32 keeps 10 mantissa bits, too few for KL differences of 1e-2 out of terms of ~10.
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def symmetric_kl(p: torch.Tensor, q: torch.Tensor, *, chunk: int = 256, eps: float = 1e-12) -> torch.Tensor:
    """0.5 KL(p||q) + 0.5 KL(q||p) for every row pair: p (K, N), q (M, N) distributions -> (K, M).

    Uses sum (p - q)(log p - log q) = H(p) + H(q) - p.log q - log p.q (H(x) = sum x log x), so the K x M
    table costs two matmuls instead of a K x M x N tensor; fp32 (no TF32) keeps it exact to ~1e-5.
    Rows of ``p`` are processed ``chunk`` at a time to bound memory.
    """
    q32 = q.float().clamp_min(eps)
    log_q = q32.log()
    h_q = (q32 * log_q).sum(-1)
    out = torch.empty(p.shape[0], q.shape[0], dtype=torch.float32, device=q.device)
    with _exact_matmul():
        for i in range(0, p.shape[0], chunk):
            pc = p[i:i + chunk].to(q.device).float().clamp_min(eps)
            log_p = pc.log()
            h_p = (pc * log_p).sum(-1)
            out[i:i + chunk] = 0.5 * (h_p[:, None] + h_q[None, :] - pc @ log_q.T - log_p @ q32.T)
    return out.clamp_min_(0.0)  # rounding can leave -1e-7 on identical rows


def resolve_threshold(pairwise_kl: torch.Tensor, value: float, mode: str) -> float:
    """An absolute threshold passes through; a relative one is that quantile of the off-diagonal KLs."""
    if mode not in THRESHOLD_MODES:
        raise ValueError(f"threshold mode must be one of {THRESHOLD_MODES}, got {mode!r}.")
    if mode == "absolute":
        return float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"relative thresholds are quantiles in [0, 1]; got {value}.")
    k = pairwise_kl.shape[0]
    if k < 2:
        return 0.0  # a single map: nothing left to merge
    off = pairwise_kl[~torch.eye(k, dtype=torch.bool, device=pairwise_kl.device)]
    return float(torch.quantile(off.double().cpu(), float(value)))


def merge_attention(attn: torch.Tensor, grid: torch.Tensor, thresholds: Sequence[float], *,
                    mode: str = "absolute", chunk: int = 256,
                    later_merges: str = "reference") -> tuple[torch.Tensor, list[float]]:
    """Iterative attention merging for one image: attn (N, N) aggregated, grid (K, 2) anchors.

    Iteration 0 (google/diffseg ``mask_merge(iter=0)``): each anchor's map becomes the mean of the maps of
    every location within ``thresholds[0]`` (symmetric KL) of it. Iteration i > 0: greedily, in order, each
    map not yet matched is replaced by the mean of the maps within ``thresholds[i]``; ``later_merges``
    says which maps may join (see ``LATER_MERGES``; "reference" is google/diffseg's rule).
    ``mode='relative'``: each threshold is that quantile of this image's anchor-to-anchor KL (off-diagonal),
    which makes it invariant to how sharp the model's attention is. (Re-reading the quantile from the maps
    entering each iteration was tried and rejected: it forces merges down to a handful of maps whatever
    the image holds.) KLs are computed in fp32 (google/diffseg: fp16 in iteration 0). Returns the merged
    maps (K', N) and the absolute thresholds used.
    """
    if not thresholds:
        raise ValueError("need at least one merging threshold.")
    if later_merges not in LATER_MERGES:
        raise ValueError(f"later_merges must be one of {LATER_MERGES}, got {later_merges!r}.")
    side = map_side(attn.shape[-1])
    index = (grid[:, 0] * side + grid[:, 1]).to(attn.device)
    kl = symmetric_kl(attn[index], attn, chunk=chunk)  # (K, N)
    used = [resolve_threshold(kl[:, index], t, mode) for t in thresholds]
    near = kl < used[0]
    near[torch.arange(len(index)), index] = True  # an anchor always keeps its own map (threshold <= 0)
    near = near.to(attn.dtype)
    merged = (near @ attn) / near.sum(1, keepdim=True)
    for threshold in used[1:]:
        merged = _merge_once(merged, symmetric_kl(merged, merged, chunk=chunk).cpu(), threshold,
                             overlap=later_merges == "reference")
    return merged, used


def _merge_once(maps: torch.Tensor, kl: torch.Tensor, threshold: float, overlap: bool = True) -> torch.Tensor:
    """One later merging iteration; ``overlap``: google/diffseg's rule (a group takes matched maps too)."""
    free = torch.ones(maps.shape[0], dtype=torch.bool)
    groups = []
    for i in range(maps.shape[0]):
        if not free[i]:
            continue
        members = kl[i] < threshold
        if not overlap:
            members &= free
        members[i] = True
        free &= ~members
        groups.append(maps[members.to(maps.device)].mean(0))
    return torch.stack(groups)


def label_map(merged: torch.Tensor, size: tuple[int, int], chunk: int = 64) -> torch.Tensor:
    """Merged maps (K', N) -> (H, W) int64 labels 0..K''-1: bilinear upsampling, arg-max, consecutive ids.

    Maps are upsampled ``chunk`` at a time with a running max, so memory is O(chunk * H * W).
    """
    side = map_side(merged.shape[-1])
    best = torch.full(size, -float("inf"), device=merged.device)
    labels = torch.zeros(size, dtype=torch.long, device=merged.device)
    for i in range(0, merged.shape[0], chunk):
        part = merged[i:i + chunk].float().reshape(-1, 1, side, side)
        up = F.interpolate(part, size=size, mode="bilinear", align_corners=False)[:, 0]
        value, arg = up.max(0)
        better = value > best
        best = torch.where(better, value, best)
        labels = torch.where(better, arg + i, labels)
    return torch.unique(labels, return_inverse=True)[1]


def diffseg(attn: torch.Tensor, grid_size: int, thresholds: Sequence[float], size: tuple[int, int], *,
            mode: str = "absolute", chunk: int = 256,
            later_merges: str = "reference") -> tuple[torch.Tensor, list[float]]:
    """One image's aggregated attention (N, N) -> (label map (H, W), absolute thresholds used)."""
    grid = anchor_grid(map_side(attn.shape[-1]), grid_size)
    merged, used = merge_attention(attn, grid, thresholds, mode=mode, chunk=chunk, later_merges=later_merges)
    return label_map(merged, size), used


def attention_entropy(attn: torch.Tensor) -> tuple[float, float]:
    """(mean row entropy, maximum possible entropy log N) in nats: how far from uniform the maps are."""
    p = attn.float().clamp_min(1e-12)
    return float(-(p * p.log()).sum(-1).mean()), math.log(attn.shape[-1])
