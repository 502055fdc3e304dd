"""How structured a self-attention map is: its entropy and how far each query looks (pure tensor functions).

DiffSeg needs attention that is *local and image-dependent*: each query attends to a compact region that
follows the image's structure. Two numbers per map say whether a model has it:

- entropy of each query's distribution over keys, against log N (uniform attention);
- mean attention distance: the expected distance, in map pixels, from a query to the keys it attends to,
  against the same quantity under uniform attention (``uniform_attention_distance``);
- the spread of the attention logits: the SD over keys of log p (= of q.k / sqrt(d), the softmax removes only
  a constant per query). Below ~0.5 the softmax is close to uniform, whatever the logits encode.

A map of side ``s`` holds ``s*s`` query rows and ``s*s`` key columns, flattened row-major (as in diffseg).
"""

from __future__ import annotations

import math

import torch

from dinodiff.evaluate.segment.diffseg import map_side


def map_coordinates(side: int) -> torch.Tensor:
    """(side*side, 2) float (row, col) of each token of a side x side map, row-major."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1).double()


def pairwise_distance(side: int) -> torch.Tensor:
    """(N, N) Euclidean distance in map pixels between every pair of tokens."""
    coords = map_coordinates(side)
    return torch.cdist(coords, coords)


def row_entropy(attn: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each query's distribution: (..., N, N) -> (..., N)."""
    p = attn.double().clamp_min(1e-30)
    return -(p * p.log()).sum(-1)


def logit_spread(attn: torch.Tensor) -> torch.Tensor:
    """SD over keys of each query's log-probabilities (its attention logits up to a constant): (..., N, N) -> (..., N).

    Of head-averaged maps this is the spread of the averaged distribution's log, a lower bound for the heads'.
    """
    return attn.double().clamp_min(1e-30).log().std(-1)


def attention_distance(attn: torch.Tensor) -> torch.Tensor:
    """Expected distance (map pixels) from each query to the keys it attends to: (..., N, N) -> (..., N)."""
    side = map_side(attn.shape[-1])
    dist = pairwise_distance(side).to(attn.device)
    p = attn.double()
    return (p * dist).sum(-1) / p.sum(-1).clamp_min(1e-30)


def uniform_attention_distance(side: int) -> float:
    """The mean attention distance of uniform attention on a side x side map (the no-locality reference)."""
    return float(pairwise_distance(side).mean())


def layer_locality(attn: torch.Tensor) -> dict[str, float]:
    """Summary of one layer's head-averaged maps (B, N, N), averaged over images and queries.

    ``entropy_ratio`` = entropy / log N (1 = uniform); ``distance_px`` in map pixels; ``distance_frac`` =
    distance / side; ``distance_ratio`` = distance / the uniform map's distance (1 = no locality, 0 = each
    query attends only to itself); ``logit_sd`` = the spread of the logits (see ``logit_spread``).
    """
    n = attn.shape[-1]
    side = map_side(n)
    entropy = float(row_entropy(attn).mean())
    distance = float(attention_distance(attn).mean())
    uniform = uniform_attention_distance(side)
    return {"side": side, "entropy": entropy, "max_entropy": math.log(n), "entropy_ratio": entropy / math.log(n),
            "distance_px": distance, "distance_frac": distance / side, "uniform_distance_px": uniform,
            "distance_ratio": distance / uniform, "logit_sd": float(logit_spread(attn).mean())}
