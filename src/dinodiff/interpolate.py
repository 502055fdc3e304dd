"""Interpolation of global tokens and the paper's pairing rules, as pure functions.

`c = lerp(c1, c2, r)` (or `slerp`) mixes two sources' c_GLB; pairs share at least one positive label, no
pair is used twice until every eligible pair has been used, and an interpolated image takes the labels of
the source nearer in r (r <= 0.5: the first source, r > 0.5: the second).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

MIXES = ("lerp", "slerp")


def _ratio(r: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    r = torch.as_tensor(r, dtype=like.dtype, device=like.device)
    return r.view(-1, *([1] * (like.ndim - 1))) if r.ndim == 1 else r  # one r per batch item


def lerp(c1: torch.Tensor, c2: torch.Tensor, r: float | torch.Tensor) -> torch.Tensor:
    """(1 - r) c1 + r c2; r is a scalar or one value per item of the leading dimension."""
    return c1 + _ratio(r, c1) * (c2 - c1)


def slerp(c1: torch.Tensor, c2: torch.Tensor, r: float | torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Spherical interpolation of each token vector (last dimension); lerp where the two are (anti)parallel."""
    r = _ratio(r, c1)
    a, b = c1.double(), c2.double()
    cos = (a * b).sum(-1, keepdim=True) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1, keepdim=True)).clamp_min(eps)
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(omega)
    rd = r.double()
    mixed = (torch.sin((1 - rd) * omega) * a + torch.sin(rd * omega) * b) / sin.clamp_min(eps)
    straight = a + rd * (b - a)
    return torch.where(sin.abs() < eps, straight, mixed).to(c1.dtype)


def mix(c1: torch.Tensor, c2: torch.Tensor, r: float | torch.Tensor, method: str = "lerp") -> torch.Tensor:
    if method not in MIXES:
        raise ValueError(f"Unknown interpolation {method!r}; use one of {MIXES}.")
    return lerp(c1, c2, r) if method == "lerp" else slerp(c1, c2, r)


def nearer_source(r: float) -> int:
    """0 when c = mix(c1, c2, r) is nearer c1 (r <= 0.5; the tie goes to the first source), else 1."""
    return 0 if r <= 0.5 else 1


@dataclass(frozen=True)
class Interpolation:
    a: int  # index of the first source (r = 0)
    b: int  # index of the second source (r = 1)
    r: float


def unique_pairs(positive: np.ndarray, count: int, rng: np.random.Generator,
                 shared_label: bool = True) -> list[tuple[int, int]]:
    """Up to `count` distinct unordered pairs (a, b), a != b, sharing a positive label when `shared_label`.

    Sources take turns in shuffled rounds, each picking one new partner per round, so every source is used
    about equally. A partner is drawn label-first (a label of `a`, then a source with it), which balances
    labels; when random draws keep hitting used pairs the exact candidate set is computed instead.
    positive: (N, L) bool, positive[i, l] = source i has label l.
    """
    positive = np.asarray(positive, dtype=bool)
    n = len(positive)
    members = [np.flatnonzero(positive[:, j]) for j in range(positive.shape[1])]
    labels_of = [np.flatnonzero(row) for row in positive]
    partners: list[set[int]] = [set() for _ in range(n)]
    exhausted = np.zeros(n, dtype=bool)
    pairs: list[tuple[int, int]] = []

    def pick(a: int) -> Optional[int]:
        for _ in range(16):
            if shared_label:
                if len(labels_of[a]) == 0:
                    return None
                b = int(rng.choice(members[int(rng.choice(labels_of[a]))]))
            else:
                b = int(rng.integers(n))
            if b != a and b not in partners[a]:
                return b
        eligible = (positive @ positive[a]) > 0 if shared_label else np.ones(n, dtype=bool)
        eligible[a] = False
        eligible[list(partners[a])] = False
        left = np.flatnonzero(eligible)
        return int(rng.choice(left)) if len(left) else None

    while len(pairs) < count:
        progressed = False
        for a in rng.permutation(n):
            if len(pairs) == count:
                break
            if exhausted[a]:
                continue
            b = pick(int(a))
            if b is None:
                exhausted[a] = True
                continue
            partners[a].add(b)
            partners[b].add(int(a))
            pairs.append((int(a), b))
            progressed = True
        if not progressed:
            break  # every eligible pair is used
    return pairs


def plan_interpolations(positive: np.ndarray, count: int, *, seed: int = 0, r_range: tuple[float, float] = (0.0, 1.0),
                        r_values: Optional[Sequence[float]] = None, shared_label: bool = True) -> list[Interpolation]:
    """`count` interpolations: unique pairs first; when they run out, pairs again, each with an r it has not had.

    r is drawn uniformly from `r_range`, or from `r_values` when given (then a pair can be used at most
    len(r_values) times). Raises ValueError when no pair is eligible or the (pair, r) combinations run out.
    """
    rng = np.random.default_rng([seed, 0x1A7E])
    lo, hi = r_range
    if r_values is None and not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"r_range must satisfy 0 <= low <= high <= 1, got {r_range}.")
    pairs = unique_pairs(positive, count, rng, shared_label)
    if count and not pairs:
        raise ValueError("No pair of sources shares a positive label, so nothing can be interpolated. Give labelled "
                         "sources (a CSV with label columns, or shards prepared from one) or allow any pair "
                         "(--any-pair, shared_label=False).")
    used_r: dict[tuple[int, int], set[float]] = {}
    plan: list[Interpolation] = []
    while len(plan) < count:
        before = len(plan)
        for a, b in pairs:
            if len(plan) == count:
                break
            r = _new_r(rng, used_r.setdefault((a, b), set()), lo, hi, r_values)
            if r is not None:
                used_r[(a, b)].add(r)
                plan.append(Interpolation(a, b, r))
        if len(plan) == before:
            raise ValueError(f"Asked for {count} interpolations, but the {len(pairs)} eligible pairs, each with a "
                             f"different r per use, give only {len(plan)}: widen r_range, give more r_values or "
                             "more sources, or lower the ratio.")
    return plan


def _new_r(rng: np.random.Generator, used: set[float], lo: float, hi: float,
           r_values: Optional[Sequence[float]]) -> Optional[float]:
    if r_values is not None:
        left = [float(v) for v in r_values if float(v) not in used]
        return float(rng.choice(left)) if left else None
    for _ in range(100):
        r = float(rng.uniform(lo, hi))
        if r not in used:
            return r
    return None  # lo == hi: a pair cannot get a second, different r
