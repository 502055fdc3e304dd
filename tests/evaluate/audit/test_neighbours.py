"""Chunked nearest-neighbour search: the same answer as brute force, whatever the chunk and memory bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinodiff.evaluate.audit.neighbours import NO_GROUP, NearestSearch, nearest


def brute_force(queries: torch.Tensor, rows: torch.Tensor, k: int, query_groups: np.ndarray | None,
                row_groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The full float64 distance matrix, min over views, same-group pairs excluded, sorted."""
    q = queries.double() if queries.ndim == 3 else queries.double()[:, None]
    d = torch.cdist(q.reshape(-1, q.shape[-1]), rows.double()).reshape(len(q), q.shape[1], -1).amin(1).numpy()
    if query_groups is not None:
        same = (query_groups[:, None] == row_groups[None, :]) & (query_groups[:, None] != NO_GROUP)
        d[same] = np.inf
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), order


@pytest.mark.parametrize("chunk,memory", [(1, 256), (7, 0.01), (64, 0.5), (10_000, 256)])
def test_chunked_search_equals_brute_force(chunk, memory):
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(300, 24, generator=gen)
    queries = torch.cat([rows[:40] + 0.01 * torch.randn(40, 24, generator=gen),  # near-duplicates of rows 0..39
                         torch.randn(60, 24, generator=gen)])
    views = torch.stack([queries, queries + 0.3 * torch.randn(100, 24, generator=gen)], 1)  # two views each
    row_groups = np.arange(300) // 3  # patients of three images
    query_groups = np.concatenate([row_groups[:20], np.full(80, NO_GROUP)])  # the first 20 skip their patient
    found = nearest(views, rows, 5, query_groups, row_groups, chunk=chunk, max_memory_mb=memory)
    d, index = brute_force(views, rows, 5, query_groups, row_groups)
    np.testing.assert_array_equal(found.indices, index)
    np.testing.assert_allclose(found.distances, d, rtol=1e-5, atol=1e-5)
    assert (found.indices[:20, 0] // 3 != np.arange(20) // 3).all()  # never the query's own patient
    assert (found.indices[20:40, 0] == np.arange(20, 40)).all()  # near-duplicates found where allowed


def test_fewer_eligible_rows_than_k_are_inf_and_minus_one():
    rows = torch.tensor([[0.0], [1.0], [3.0]])
    search = NearestSearch(torch.tensor([[0.5]]), k=3, groups=np.array([7]))
    search.add(rows, np.array([7, 1, 1]))
    found = search.result()
    assert found.indices.tolist() == [[1, 2, -1]]
    assert found.distances[0, :2].tolist() == [0.5, 2.5] and np.isinf(found.distances[0, 2])
