"""Chunked k-nearest-neighbour search in torch: queries held, reference rows streamed in chunks.

The reference set (the training images, up to ~10^6) is never held whole: `NearestSearch.add` takes one chunk of
rows at a time and keeps each query's k nearest rows so far. Distances are float32, computed in blocks of at most
`max_memory_mb`; a block's top-k are chosen from matrix-product distances and their distances recomputed from the
differences (exact to float32 rounding), so chunking does not change the answer. A query may be seen in several
views (its nearest row over all views counts), and rows of the query's own group (the same patient) are skipped.
Memory: O(queries x (views + k) x dim + block); time: O(queries x views x rows x dim).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

NO_GROUP = -1  # a query without a group excludes no row


@dataclass
class Neighbours:
    """Each query's k nearest rows: distances (Q, k) float32 ascending (inf where fewer rows were eligible) and
    their row indices (Q, k) int64 (-1 there)."""

    distances: np.ndarray
    indices: np.ndarray

    @property
    def nearest(self) -> tuple[np.ndarray, np.ndarray]:
        return self.distances[:, 0], self.indices[:, 0]


class NearestSearch:
    """Keeps the k nearest of the rows fed to `add` for each query (rows numbered in the order they arrive)."""

    def __init__(self, queries: torch.Tensor, k: int, groups: np.ndarray | None = None, max_memory_mb: float = 256):
        self.queries = queries if queries.ndim == 3 else queries[:, None]  # (Q, V, D)
        self.k = k
        device = self.queries.device
        n = len(self.queries)
        self.groups = torch.as_tensor(groups if groups is not None else np.full(n, NO_GROUP), dtype=torch.int64,
                                      device=device)
        self.distances = torch.full((n, k), math.inf, device=device)
        self.indices = torch.full((n, k), -1, dtype=torch.int64, device=device)
        self.seen = 0
        self.block_values = max(1, int(max_memory_mb * 2**20 / 4 / 4))  # float32, ~4 live copies of a block

    @torch.no_grad()
    def add(self, rows: torch.Tensor, groups: np.ndarray | None = None) -> None:
        """Compare every query with these rows (C, D); their indices continue from the rows added before."""
        if len(rows) == 0:
            return
        rows = rows.to(self.queries.device, torch.float32)
        row_groups = None if groups is None else torch.as_tensor(groups, dtype=torch.int64, device=rows.device)
        _, n_views, dim = self.queries.shape
        per_block = max(1, self.block_values // (n_views * (len(rows) + self.k * dim)))
        for start in range(0, len(self.queries), per_block):
            self._add_block(slice(start, start + per_block), rows, row_groups)
        self.seen += len(rows)

    def _add_block(self, block: slice, rows: torch.Tensor, row_groups: torch.Tensor | None) -> None:
        query = self.queries[block]  # (B, V, D)
        b, v, dim = query.shape
        approx = torch.cdist(query.reshape(b * v, dim), rows).reshape(b, v, len(rows)).amin(1)
        if row_groups is not None:
            own = self.groups[block]
            approx.masked_fill_((own[:, None] == row_groups[None, :]) & (own[:, None] != NO_GROUP), math.inf)
        k = min(self.k, len(rows))
        top = approx.topk(k, dim=1, largest=False)
        exact = (query[:, :, None, :] - rows[top.indices][:, None]).norm(dim=-1).amin(1)  # (B, k) over views
        exact = torch.where(torch.isinf(top.values), math.inf, exact)
        merged = torch.cat([self.distances[block], exact], 1)
        index = torch.cat([self.indices[block], top.indices + self.seen], 1)
        order = merged.argsort(dim=1, stable=True)[:, :self.k]
        self.distances[block] = merged.gather(1, order)
        self.indices[block] = torch.where(torch.isinf(self.distances[block]), -1, index.gather(1, order))

    def result(self) -> Neighbours:
        return Neighbours(self.distances.cpu().numpy(), self.indices.cpu().numpy())


def nearest(queries: torch.Tensor, rows: torch.Tensor, k: int = 1, query_groups: np.ndarray | None = None,
            row_groups: np.ndarray | None = None, chunk: int = 4096, max_memory_mb: float = 256) -> Neighbours:
    """k nearest rows of each query, the rows (N, D) taken `chunk` at a time (an in-memory NearestSearch)."""
    search = NearestSearch(queries, k, query_groups, max_memory_mb)
    for start in range(0, len(rows), chunk):
        search.add(rows[start:start + chunk], None if row_groups is None else row_groups[start:start + chunk])
    return search.result()
