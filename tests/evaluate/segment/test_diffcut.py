"""DiffCut's normalised cuts, the attention-locality measures, the tuning / report split and the paired bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinodiff.evaluate.segment.data import SegCase
from dinodiff.evaluate.segment.diffcut import (
    fiedler_vector,
    assign_pixels,
    bipartition,
    cosine_affinity,
    diffcut,
    ncut_value,
    pool_superpixels,
    recursive_ncut,
    superpixel_ncut,
)
from dinodiff.evaluate.segment.locality import (
    attention_distance,
    layer_locality,
    logit_spread,
    row_entropy,
    uniform_attention_distance,
)
from dinodiff.evaluate.segment.metrics import paired_bootstrap, split_components
from dinodiff.evaluate.segment.report import best_cells
from dinodiff.evaluate.segment.settings import Cell, SegmentSettings
from dinodiff.evaluate.segment.split import REPORT, TUNE, assign_splits, subjects_by_split, tag


def _blocks(sizes: list[int], inside: float = 1.0, between: float = 0.02, seed: int = 0) -> np.ndarray:
    """A symmetric affinity matrix with planted blocks (strong inside, weak between), nodes shuffled."""
    n = sum(sizes)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    rng = np.random.default_rng(seed)
    a = np.where(labels[:, None] == labels[None, :], inside, between) * rng.uniform(0.8, 1.0, (n, n))
    return (a + a.T) / 2, labels


def test_bipartition_separates_two_planted_blocks_at_a_low_ncut():
    affinity, truth = _blocks([30, 50])
    mask, value = bipartition(affinity)
    assert set(map(tuple, [np.unique(truth[mask]), np.unique(truth[~mask])])) == {(0,), (1,)}
    assert value == pytest.approx(ncut_value(affinity, mask)) and value < 0.1
    wrong = np.zeros(80, bool)
    wrong[:40] = True  # any other split costs more
    assert ncut_value(affinity, truth == 0) < ncut_value(affinity, wrong)


def test_recursive_ncut_finds_every_planted_block_and_stops_at_tau():
    affinity, truth = _blocks([20, 35, 25])
    labels = recursive_ncut(affinity, tau=0.3)
    assert len(np.unique(labels)) == 3
    for block in range(3):  # each block is one segment, and segments do not mix blocks
        assert len(np.unique(labels[truth == block])) == 1
    assert len(np.unique(recursive_ncut(affinity, tau=1e-6))) == 1  # no cut is cheap enough: one segment
    uniform = np.ones((40, 40))
    assert len(np.unique(recursive_ncut(uniform, tau=0.5))) == 1  # a structureless graph is not cut


def test_cosine_affinity_is_scaled_to_unit_range_and_sharpened_by_alpha():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(50, 8))
    a1, a10 = cosine_affinity(feats, 1.0), cosine_affinity(feats, 10.0)
    assert a1.min() == pytest.approx(0.0) and a1.max() == pytest.approx(1.0)
    assert np.allclose(a10, a1 ** 10) and np.allclose(a1, a1.T)


def test_diffcut_on_features_of_two_halves_labels_each_half_at_full_resolution():
    side = 8
    feats = torch.zeros(side * side, 4)
    cols = torch.arange(side * side) % side
    feats[cols < 3, 0] = 1.0  # the left three columns share one feature, the rest another
    feats[cols >= 3, 1] = 1.0
    feats += 0.01 * torch.randn(feats.shape, generator=torch.Generator().manual_seed(0))
    labels, found = diffcut(feats, tau=0.5, alpha=10.0, size=(32, 32))
    assert found == 2 and labels.shape == (32, 32)
    assert len(torch.unique(labels[:, :10])) == 1 and len(torch.unique(labels[:, 14:])) == 1
    assert labels[0, 0] != labels[0, -1]
    # high-resolution assignment follows the (bilinearly upsampled) features, not the coarse grid
    segs = (cols >= 3).long().numpy()
    assert torch.equal(assign_pixels(feats, segs, (32, 32)), labels)


def test_superpixel_ncut_joins_superpixels_by_feature_and_cuts_along_their_edges():
    side, size, edge = 4, 32, 13  # the image's edge at column 13, off the 8 px feature grid (cells end at 8, 16)
    feats = torch.zeros(side * side, 3)
    cols = torch.arange(side * side) % side
    feats[cols < 2, 0] = 1.0  # feature cells centred left of the edge (columns 4, 12) share one feature
    feats[cols >= 2, 1] = 1.0
    feats += 0.01 * torch.randn(feats.shape, generator=torch.Generator().manual_seed(0))
    columns = np.arange(size)[None, :].repeat(size, 0)
    rows = np.arange(size)[:, None].repeat(size, 1)
    left = columns < edge
    superpixels = 2 * (~left) + (rows >= size // 2)  # four superpixels: each side of the edge cut in two
    pooled = pool_superpixels(feats, superpixels)
    counts = np.bincount(superpixels.ravel())  # 208 pixels left of the edge per superpixel, 304 right
    norms = np.linalg.norm(pooled, axis=1)  # a sum of unit vectors: its pixel count when they all agree
    assert pooled.shape == (4, 3) and np.all(norms <= counts + 1e-3) and np.allclose(norms[:2], counts[:2], rtol=1e-3)

    labels, found = superpixel_ncut(pooled, superpixels, tau=0.5, alpha=10.0)
    assert found == 2 and labels.shape == (size, size)
    assert torch.equal(labels == labels[0, 0], torch.from_numpy(left))  # exactly the image's edge, both halves joined
    coarse, _ = diffcut(feats, tau=0.5, alpha=10.0, size=(size, size))  # the cut on the feature map's positions
    assert not torch.equal(coarse == coarse[0, 0], torch.from_numpy(left))  # its edge follows the feature grid
    whole = np.zeros((size, size), int)
    one, n = superpixel_ncut(pool_superpixels(feats, whole), whole, tau=0.5, alpha=10.0)
    assert n == 1 and int(one.max()) == 0  # a single superpixel is a single segment


def test_cells_of_one_image_and_scale_share_its_superpixels_and_give_the_maps_computed_alone(monkeypatch):
    from dinodiff.evaluate.segment import grid

    calls, felzenszwalb = [], grid.superpixel_segments

    def counted(image: np.ndarray, scale: float) -> np.ndarray:
        calls.append(scale)
        return felzenszwalb(image, scale)

    monkeypatch.setattr(grid, "superpixel_segments", counted)
    gen = torch.Generator().manual_seed(0)
    image = (np.add.outer(np.arange(32), np.arange(32)) * 4 % 256).astype(np.uint8)  # diagonal bands: edges
    passes = grid.Passes(torch.empty(0), {"ncut-superpixels": {4: torch.randn(1, 16, 8, generator=gen)}})
    refinements = ("none", "components")
    cells = [Cell("m", "ncut-superpixels", (50,), 4, tau, alpha, refine, scale)
             for scale in (20.0, 80.0) for tau in (0.5, 0.9) for alpha in (3.0, 10.0) for refine in refinements]
    settings = SegmentSettings()
    done, nodes = {}, {}
    shared = [grid.label_cell(c, passes, 0, image, settings, done, nodes)[0] for c in cells]
    assert calls == [20.0, 80.0]  # once per scale for 16 cells
    alone = [grid.label_cell(c, passes, 0, image, settings)[0] for c in cells]
    assert len(calls) == 2 + 16  # without the image's caches: once per cell
    assert all(torch.equal(a, b) for a, b in zip(shared, alone))
    superpixels, pooled = nodes[(4, 20.0)]
    assert set(nodes) == {(4, 20.0), (4, 80.0)} and pooled.shape == (int(superpixels.max()) + 1, 8)


def test_fiedler_vector_solves_the_generalised_ncut_eigenproblem():
    """(D - W) y = lambda_2 D y, with lambda_2 the second smallest generalised eigenvalue (scipy's generalised
    solver as the reference), although fiedler_vector solves the standard normalised-Laplacian form."""
    import scipy.linalg

    affinity = cosine_affinity(np.random.default_rng(2).normal(size=(120, 16)), 5.0)
    degree = np.diag(affinity.sum(1) + 1e-12)
    values, vectors = scipy.linalg.eigh(degree - affinity, degree)
    y = fiedler_vector(affinity)
    residual = (degree - affinity) @ y - values[1] * degree @ y
    assert np.linalg.norm(residual) < 1e-8 * np.linalg.norm(degree @ y)
    cosine = abs(y @ degree @ vectors[:, 1]) / np.sqrt((y @ degree @ y) * (vectors[:, 1] @ degree @ vectors[:, 1]))
    assert cosine == pytest.approx(1.0, abs=1e-8)


def test_assign_pixels_equals_upsampling_the_normalised_features_then_the_nearest_prototype():
    """The reference DiffCut assignment: upsample every feature channel, L2-normalise each pixel, take the most
    similar segment mean (cosine); assign_pixels upsamples the k similarity maps instead and must agree."""
    side, channels, size = 16, 96, (256, 256)
    feats = torch.randn(side * side, channels, generator=torch.Generator().manual_seed(1))
    segments = np.random.default_rng(1).integers(0, 5, side * side)
    normed = torch.nn.functional.normalize(feats, dim=1)
    protos = torch.stack([normed[torch.from_numpy(segments == k)].sum(0) for k in range(5)])
    protos = torch.nn.functional.normalize(protos, dim=1)
    grid = normed.T.reshape(1, channels, side, side)
    up = torch.nn.functional.interpolate(grid, size=size, mode="bilinear", align_corners=False)[0]
    reference = torch.einsum("chw,kc->khw", torch.nn.functional.normalize(up, dim=0), protos).argmax(0)
    labels = assign_pixels(feats, segments, size)
    assert labels.shape == size and len(torch.unique(labels)) == 5
    assert float((labels == reference).float().mean()) == 1.0


def test_attention_distance_and_entropy_of_identity_local_and_uniform_maps():
    side = 6
    n = side * side
    uniform = torch.full((1, n, n), 1.0 / n)
    identity = torch.eye(n)[None]
    assert attention_distance(identity).abs().max() == 0
    assert float(attention_distance(uniform).mean()) == pytest.approx(uniform_attention_distance(side))
    assert float(row_entropy(uniform).mean()) == pytest.approx(np.log(n))
    coords = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(n, 2)
    local = torch.exp(-torch.cdist(coords.float(), coords.float()) ** 2)  # a Gaussian neighbourhood
    local = (local / local.sum(-1, keepdim=True))[None]
    stats = {name: layer_locality(m) for name, m in (("uniform", uniform), ("local", local), ("id", identity))}
    assert stats["uniform"]["entropy_ratio"] == pytest.approx(1.0)
    assert stats["uniform"]["distance_ratio"] == pytest.approx(1.0)
    assert 0 < stats["local"]["distance_ratio"] < 0.3 and stats["local"]["entropy_ratio"] < 0.6
    assert stats["id"]["distance_px"] == 0 and stats["id"]["entropy_ratio"] < 1e-6
    logits = torch.randn(1, n, n, generator=torch.Generator().manual_seed(0)) * 0.3  # small logits: near-uniform
    spread = logit_spread(torch.softmax(logits, -1))
    assert torch.allclose(spread, logits.double().std(-1), atol=1e-6)  # the softmax only shifts each row
    assert float(logit_spread(uniform).max()) < 1e-9


def _cases(n: int, dataset: str = "a", per_subject: int = 1) -> list[SegCase]:
    return [SegCase(f"{dataset}{i}", dataset, np.zeros((4, 4), np.uint8),
                    subject=f"p{i // per_subject}" if per_subject > 1 else None) for i in range(n)]


def test_split_keeps_each_subject_on_one_side_and_gives_every_dataset_both_splits():
    cases = _cases(12, "a", per_subject=3) + _cases(10, "b") + _cases(2, "c")
    for seed in range(5):
        splits = assign_splits(cases, 0.5, seed)
        by_subject = {}
        for case in cases[:12]:
            by_subject.setdefault(case.subject, set()).add(splits[case.dataset, case.id])
        assert all(len(sides) == 1 for sides in by_subject.values())
        for dataset in "abc":
            assert {v for (d, _), v in splits.items() if d == dataset} == {TUNE, REPORT}
        sides = subjects_by_split(cases, splits)
        assert not sides[TUNE] & sides[REPORT]
    assert sum(v == REPORT for v in assign_splits(_cases(10), 0.5, 0).values()) == 5
    with pytest.raises(ValueError, match="empty"):
        assign_splits(_cases(1), 0.5, 0)


def test_subjects_with_a_training_image_only_tune_and_the_report_keeps_its_share():
    cases = _cases(12, "a", per_subject=2) + _cases(10, "b")
    seen = {("a", "a0"), ("a", "a5"), ("b", "b3")}  # subjects p0 and p2 of a, image b3 of b
    for seed in range(5):
        splits = assign_splits(cases, 0.5, seed, seen)
        assert all(splits[key] == TUNE for key in seen)
        assert splits["a", "a1"] == splits["a", "a4"] == TUNE  # the other images of p0 and p2
        assert sum(v == REPORT for (d, _), v in splits.items() if d == "a") == 6  # 3 of 6 subjects, as unseen
        assert sum(v == REPORT for (d, _), v in splits.items() if d == "b") == 5
    with pytest.raises(ValueError, match="--transductive"):  # every image seen: nothing left to report
        assign_splits(_cases(4), 0.5, 0, {("a", f"a{i}") for i in range(4)})


def test_best_cell_is_chosen_on_the_tuning_split_only():
    cases = _cases(8)
    splits = assign_splits(cases, 0.5, 0)

    def records(tune_dice: float, report_dice: float) -> list[dict]:
        return tag([{"id": c.id, "dataset": c.dataset, "n_segments": 2,
                     "hungarian": {"both": tune_dice if splits[c.dataset, c.id] == TUNE else report_dice}}
                    for c in cases], splits)

    good_on_tune = Cell("m", "diffseg", (300,), 4, 0.1)
    good_on_report = Cell("m", "diffseg", (300,), 4, 0.2)
    table = {good_on_tune: records(0.8, 0.3), good_on_report: records(0.5, 0.9)}
    assert best_cells(table, ["a"])["combined"] == good_on_tune
    assert best_cells(table, ["a"], split=REPORT)["combined"] == good_on_report


def test_paired_bootstrap_interval_covers_a_planted_difference():
    rng = np.random.default_rng(0)
    b = rng.uniform(0.4, 0.8, 60)
    a = b + 0.05 + rng.normal(0, 0.02, 60)
    diff, lo, hi, p = paired_bootstrap(a, b)
    assert lo < 0.05 < hi and diff == pytest.approx(float(np.mean(a - b)))
    assert p < 0.01
    _, lo0, hi0, p0 = paired_bootstrap(b + rng.normal(0, 0.02, 60), b)
    assert lo0 < 0 < hi0 and p0 > 0.05


def test_split_components_gives_each_blob_of_a_segment_its_own_label():
    labels = np.zeros((10, 12), int)
    labels[2:5, 1:4] = 1  # one segment, two blobs (the two lungs of a lungs-vs-rest map)
    labels[2:5, 8:11] = 1
    labels[7:9, 5:7] = 2
    out = split_components(labels)
    assert len(np.unique(out)) == 4  # background, two blobs of 1, the blob of 2
    assert out[3, 2] != out[3, 9] and len(np.unique(out[2:5, 1:4])) == 1
    assert np.array_equal(split_components(out), out)  # already connected: unchanged
