"""Interpolation of global tokens and the paper's pairing rules, as pure functions.

`c = lerp(c1, c2, r)` (or `slerp`) mixes two sources' c_GLB; pairs share at least one positive label, no
pair is used twice until unique pairs run out (then again with an r it has not had), and an interpolated
image takes the labels of the source nearer in r (r <= 0.5: the first source, r > 0.5: the second)
(DiNO-Diffusion, Section 3, "Interpolation").

Two additions keep the synthetic label distribution equal to the real one (`plan_interpolations`):

- Sources positive for no label share one more class, "no positive label" (`pairing_classes`): they pair
  with each other, never with a labelled source. The paper's rule alone never uses them, so a synthetic
  set would hold no all-negative image although the real set it comes from does.
- Every source *anchors* the same number of interpolations (count / sources): it is the source nearer in
  r, so it gives their labels, and its partner is a source sharing a class with it. Labels are then
  distributed exactly as in the sources, times the ratio (the paper's global rule, "unique pairs first",
  gives far more pairs to sources with many partners: multi-label images, common labels). "No pair
  twice until unique pairs run out" holds per anchor: an anchor repeats a pair only when every pair it
  could make has been used.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

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


def pairing_classes(positive: np.ndarray) -> np.ndarray:
    """(N, L + 1) bool: the labels, then the class "no positive label" (true where a row has no positive)."""
    positive = np.asarray(positive, dtype=bool).reshape(len(positive), -1)
    return np.hstack([positive, ~positive.any(axis=1, keepdims=True)])


class _Pairs:
    """Partners of each source (sharing a class), and the mixes each unordered pair has had."""

    def __init__(self, classes: np.ndarray, rng: np.random.Generator, r_range: tuple[float, float],
                 r_values: Sequence[float] | None) -> None:
        self.classes, self.rng, self.r_range, self.r_values = classes, rng, r_range, r_values
        self.members = [np.flatnonzero(classes[:, j]) for j in range(classes.shape[1])]
        self.used: dict[tuple[int, int], set[float]] = {}  # (low, high) -> weights on `high` already made
        self._own: dict[int, list[np.ndarray]] = {}

    def classes_of(self, a: int) -> list[np.ndarray]:
        """The member lists of `a`'s classes that hold another source."""
        if a not in self._own:
            self._own[a] = [self.members[j] for j in np.flatnonzero(self.classes[a]) if len(self.members[j]) >= 2]
        return self._own[a]

    def partners(self, a: int) -> np.ndarray:
        eligible = (self.classes.astype(np.int64) @ self.classes[a].astype(np.int64)) > 0
        eligible[a] = False
        return np.flatnonzero(eligible)

    def new_partner(self, a: int) -> int | None:
        """A partner `a` has no pair with yet: drawn class first (balances classes), else from the exact set."""
        own = self.classes_of(a)
        for _ in range(16):
            members = own[int(self.rng.integers(len(own)))]
            b = int(members[int(self.rng.integers(len(members)))])
            if b != a and _key(a, b) not in self.used:
                return b
        left = [int(b) for b in self.partners(a) if _key(a, int(b)) not in self.used]
        return int(self.rng.choice(left)) if left else None

    def anchored(self, a: int, b: int) -> Interpolation | None:
        """An interpolation of (a, b) nearer `a` (so labelled by `a`) with a mix the pair has not had, or None."""
        low, high = _key(a, b)
        had = self.used.setdefault((low, high), set())
        for r in _r_candidates(self.rng, *self.r_range, self.r_values):
            item = Interpolation(a, b, r) if nearer_source(r) == 0 else Interpolation(b, a, r)
            weight_high = item.r if item.b == high else 1.0 - item.r
            if weight_high not in had:
                had.add(weight_high)
                return item
        return None

    def next_for(self, a: int) -> Interpolation | None:
        """An interpolation anchored at `a`: a new pair first; else an old pair with a new mix; None when none is left."""
        b = self.new_partner(a)
        if b is not None:
            return self.anchored(a, b)
        for b in self.rng.permutation(self.partners(a)):
            item = self.anchored(a, int(b))
            if item is not None:
                return item
        return None


def _key(a: int, b: int) -> tuple[int, int]:
    return (a, b) if a < b else (b, a)


def _r_candidates(rng: np.random.Generator, lo: float, hi: float,
                  r_values: Sequence[float] | None) -> Iterator[float]:
    """r values to try in turn: the r_values in a random order, or up to 100 uniform draws from [lo, hi]."""
    if r_values is not None:
        yield from (float(v) for v in rng.permutation(np.asarray(r_values, dtype=np.float64)))
        return
    for _ in range(100):
        yield float(rng.uniform(lo, hi))


def _quotas(anchors: np.ndarray, count: int, rng: np.random.Generator) -> dict[int, int]:
    """count / len(anchors) interpolations per anchor; the remainder to a seeded random few."""
    order = rng.permutation(anchors)
    return {int(a): count // len(order) + (i < count % len(order)) for i, a in enumerate(order)}


def plan_interpolations(positive: np.ndarray, count: int, *, seed: int = 0, r_range: tuple[float, float] = (0.0, 1.0),
                        r_values: Sequence[float] | None = None, shared_label: bool = True) -> list[Interpolation]:
    """`count` interpolations, each anchored at (nearer to, labelled by) a source, every source anchoring as many.

    Partners share a class (`pairing_classes`) when `shared_label`, else any source. An anchor takes a partner
    it has no pair with yet (any anchor's pair counts); only when none is left does it reuse a pair, with a mix
    (r) that pair has not had. r is drawn uniformly from `r_range`, or from `r_values` when given, and the
    pair is ordered so that the anchor is the source nearer in r. A source with no possible partner anchors
    nothing (logged); an anchor that runs out of new mixes hands its share to the others (logged). Raises
    ValueError when no pair is eligible or the (pair, r) combinations run out.
    """
    rng = np.random.default_rng([seed, 0x1A7E])
    lo, hi = r_range
    if r_values is None and not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"r_range must satisfy 0 <= low <= high <= 1, got {r_range}.")
    positive = np.asarray(positive, dtype=bool).reshape(len(positive), -1)
    classes = pairing_classes(positive) if shared_label else np.ones((len(positive), 1), dtype=bool)
    anchors = np.flatnonzero((classes & (classes.sum(axis=0) >= 2)).any(axis=1))
    if count and not len(anchors):
        raise ValueError("No pair of sources shares a positive label (or has none on both sides), so nothing can "
                         "be interpolated. Give more sources, or allow any pair (--any-pair, shared_label=False).")
    if count and len(anchors) < len(positive):
        logger.warning("%d of %d sources share no class with any other source: they anchor no interpolation",
                       len(positive) - len(anchors), len(positive))
    pairs = _Pairs(classes, rng, (lo, hi), r_values)
    left = _quotas(anchors, count, rng) if count else {}
    exhausted: set[int] = set()
    plan: list[Interpolation] = []
    while any(left.values()):
        for a in rng.permutation([a for a, k in left.items() if k]):
            item = pairs.next_for(int(a))
            if item is not None:
                plan.append(item)
                left[int(a)] -= 1
            else:
                exhausted.add(int(a))
                _hand_on(left, int(a), exhausted, rng, count, len(plan))
    return plan


def _hand_on(left: dict[int, int], source: int, exhausted: set[int], rng: np.random.Generator, count: int,
             made: int) -> None:
    """Give an exhausted anchor's remaining share to the anchors not exhausted yet, spread evenly."""
    share, left[source] = left[source], 0
    others = rng.permutation([a for a in left if a not in exhausted])
    if not len(others):
        raise ValueError(f"Asked for {count} interpolations, but the eligible pairs, each with a different r per use, "
                         f"give only {made}: widen r_range, give more r_values or more sources, or lower the ratio.")
    logger.warning("source %d has no new (pair, r) left: %d of its interpolations go to other sources", source, share)
    for i in range(share):
        left[int(others[i % len(others)])] += 1
