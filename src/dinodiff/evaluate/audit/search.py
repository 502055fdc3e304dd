"""The audit's pass over the training set: every query set's nearest training image, in every feature space.

The training set is decoded once, `chunk` images at a time; each chunk's features are compared with every query
(synthetic images, held-out images, the calibration subsample of training images, reconstruction sources) and
each query keeps its k nearest rows (neighbours.NearestSearch; rows of the query's own patient skipped). In the
copy space the k candidates of each query are then fetched (only those images are decoded again) and registered
(copies.register), one block of queries at a time; the DCR is the smallest registered distance. Nothing grows with
the training set but its (N,) int64 patient groups: time is linear in N, memory bounded by `chunk` and `max_memory_mb`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from dinodiff.evaluate.audit import copies
from dinodiff.evaluate.audit.data import TrainingSet
from dinodiff.evaluate.audit.neighbours import NearestSearch
from dinodiff.evaluate.audit.spaces import FeatureSpace

logger = logging.getLogger(__name__)

# The share of `max_memory_mb` held by one block's candidate working images (the registration block's working
# memory is the rest); 64 MB (16k images of 32 x 32 float32) by default.
CANDIDATE_SHARE = 1 / 8


@dataclass
class QuerySet:
    """Images compared with the training set; groups: each one's patient (its own patient's rows are skipped)."""

    name: str
    images: np.ndarray  # uint8 (Q, size, size)
    groups: np.ndarray | None = None  # (Q,) int64, or None: nothing skipped


@dataclass
class Found:
    """Each query's DCR and the position of that nearest training image (-1 when none was eligible)."""

    dcr: np.ndarray
    index: np.ndarray


def calibration_positions(n: int, queries: int, seed: int) -> np.ndarray:
    """A seeded, sorted subsample of min(n, queries) training positions (all of them when n <= queries)."""
    if n <= queries:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=queries, replace=False))


def search(spaces: list[FeatureSpace], query_sets: list[QuerySet], train: TrainingSet, chunk: int,
           max_memory_mb: float) -> dict[str, dict[str, Found]]:
    """{space name: {query set name: Found}} from one decoding pass over the training set."""
    searches = {sp.name: {qs.name: NearestSearch(sp.queries(qs.images), sp.candidates, qs.groups, max_memory_mb)
                          for qs in query_sets} for sp in spaces}
    for start, images in train.chunks(chunk):
        groups = train.groups[start:start + len(images)]
        for sp in spaces:
            rows = sp.rows(images)
            for s in searches[sp.name].values():
                s.add(rows, groups)
        logger.debug("compared %d of %d training images", start + len(images), len(train))
    found = {}
    for sp in spaces:
        results = {name: s.result() for name, s in searches[sp.name].items()}
        if sp.registers:
            found[sp.name] = _registered(sp, query_sets, results, train, chunk, max_memory_mb)
        else:
            found[sp.name] = {name: Found(*r.nearest) for name, r in results.items()}
    return found


def _registered(sp: FeatureSpace, query_sets: list[QuerySet], results: dict, train: TrainingSet, chunk: int,
                max_memory_mb: float) -> dict[str, Found]:
    """DCR in the copy space: each query registered onto its k candidates, the smallest distance kept.

    The candidates' working images are held for one block of queries at a time, and a block's distinct candidates
    fit in CANDIDATE_SHARE of `max_memory_mb` (one fetch pass over the training set per block): memory is bounded
    by the setting, not by queries x candidates (3000 x 16 working images, 197 MB, at 100k training images).
    Each query's distances do not depend on its block, so the blocks change no result.
    """
    indices = np.concatenate([results[qs.name].indices for qs in query_sets])  # (every query of every set, k)
    offsets = np.cumsum([0, *(len(qs.images) for qs in query_sets)])
    dcr, index = np.full(len(indices), math.inf), np.full(len(indices), -1, dtype=np.int64)
    per_block = max(1, int(max_memory_mb * 2**20 / (len(copies.GRID) * copies.CROP**2 * 4 * 4)))
    held = max(1, int(max_memory_mb * 2**20 * CANDIDATE_SHARE / (copies.WORK**2 * 4)))  # float32 working images
    for first, stop in candidate_blocks(indices, held):
        wanted = np.unique(indices[first:stop])
        cache: dict[int, torch.Tensor] = {}
        for positions, images in (train.fetch(wanted[wanted >= 0], chunk) if wanted.max() >= 0 else ()):
            cache.update(zip(positions.tolist(), sp.working(images)))
        for qs, offset in zip(query_sets, offsets):
            for start in range(max(first, offset), min(stop, offset + len(qs.images)), per_block):
                block = slice(start, min(start + per_block, stop, offset + len(qs.images)))
                d = registered_distances(sp, qs.images[block.start - offset:block.stop - offset], indices[block],
                                         cache)
                best = d.argmin(1)
                dcr[block] = d[np.arange(len(d)), best]
                index[block] = np.where(np.isfinite(dcr[block]), indices[block][np.arange(len(d)), best], -1)
        del cache  # before the next block's fetch
    logger.debug("registered %d queries", len(indices))
    return {qs.name: Found(dcr[offset:offset + len(qs.images)], index[offset:offset + len(qs.images)])
            for qs, offset in zip(query_sets, offsets)}


def candidate_blocks(indices: np.ndarray, held: int) -> Iterator[tuple[int, int]]:
    """[first, stop) runs of consecutive query rows of `indices` (Q, k) whose distinct candidates (-1: none) number
    at most `held`; a row alone may exceed it (its candidates are all needed at once)."""
    first, seen = 0, set()
    for row, candidates in enumerate(indices.tolist()):
        new = {c for c in candidates if c >= 0} - seen
        if new and seen and len(seen) + len(new) > held:
            yield first, row
            first, seen = row, set()
            new = {c for c in candidates if c >= 0}
        seen |= new
    if len(indices):
        yield first, len(indices)


def registered_distances(sp: FeatureSpace, images: np.ndarray, candidates: np.ndarray,
                         cache: dict[int, torch.Tensor]) -> np.ndarray:
    """(Q, k) distances of each image to its candidate training images once aligned (inf for no candidate)."""
    query = sp.working(images)
    blank = torch.zeros_like(query[0])
    stack = torch.stack([torch.stack([cache.get(int(c), blank) for c in row]) for row in candidates])
    distances, _ = copies.register(query, stack)
    return np.where(candidates >= 0, distances.cpu().numpy(), math.inf)


def pair_distances(sp: FeatureSpace, a: np.ndarray, b: np.ndarray, batch: int = 256) -> np.ndarray:
    """Distance of each image of `a` to the image of `b` at the same row, as the space measures it."""
    out = []
    for i in range(0, len(a), batch):
        x, y = a[i:i + batch], b[i:i + batch]
        if sp.registers:
            out.append(copies.register(sp.working(x), sp.working(y)[:, None])[0][:, 0].cpu().numpy())
        else:
            out.append((sp.rows(x) - sp.rows(y)).norm(dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)
