"""interpolate.py on its own: the mixes as maths, and the paper's pairing rules with the label balance of issue 20."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from dinodiff.interpolate import lerp, mix, nearer_source, pairing_classes, plan_interpolations, slerp


def test_lerp_and_slerp_meet_their_sources_at_the_ends_and_slerp_keeps_the_norm():
    g = torch.Generator().manual_seed(0)
    c1, c2 = torch.randn(3, 5, 16, generator=g), torch.randn(3, 5, 16, generator=g)
    c2 = c2 / c2.norm(dim=-1, keepdim=True) * c1.norm(dim=-1, keepdim=True)  # equal norms per token
    for fn in (lerp, slerp):
        assert torch.allclose(fn(c1, c2, 0.0), c1, atol=1e-5) and torch.allclose(fn(c1, c2, 1.0), c2, atol=1e-5)
    assert torch.allclose(lerp(c1, c2, 0.25), 0.75 * c1 + 0.25 * c2, atol=1e-6)
    middle = slerp(c1, c2, 0.5)
    assert torch.allclose(middle.norm(dim=-1), c1.norm(dim=-1), rtol=1e-4)  # on the sphere, unlike lerp
    assert (lerp(c1, c2, 0.5).norm(dim=-1) < c1.norm(dim=-1) + 1e-6).all()
    r = torch.tensor([0.0, 0.5, 1.0]).view(3, 1, 1)  # one r per item
    assert torch.allclose(mix(c1, c2, r)[2], c2[2]) and torch.allclose(mix(c1, c2, r)[0], c1[0])
    with pytest.raises(ValueError, match="Unknown interpolation"):
        mix(c1, c2, 0.5, "cubic")


def test_labels_come_from_the_nearer_source_and_unlabelled_sources_have_their_own_class():
    assert (nearer_source(0.5), nearer_source(0.51), nearer_source(0.0)) == (0, 1, 0)
    classes = pairing_classes(np.array([[1, 0], [0, 0], [1, 1]]))
    assert classes.tolist() == [[True, False, False], [False, False, True], [True, True, False]]


def test_a_plan_has_the_exact_count_shares_a_class_and_keeps_the_label_distribution():
    rng = np.random.default_rng(3)
    positive = rng.random((40, 3)) < 0.3  # several all-negative sources among them
    count = 5 * len(positive)
    plan = plan_interpolations(positive, count, seed=7, r_range=(0.2, 0.8))
    assert len(plan) == count and plan == plan_interpolations(positive, count, seed=7, r_range=(0.2, 0.8))
    classes = pairing_classes(positive)
    assert all((classes[p.a] & classes[p.b]).any() and p.a != p.b for p in plan)  # partners share a class
    assert all(0.2 <= p.r <= 0.8 for p in plan)
    anchors = Counter(p.a if nearer_source(p.r) == 0 else p.b for p in plan)
    assert set(anchors.values()) <= {count // len(positive), count // len(positive) + 1}  # every source anchors 5
    labels = np.array([positive[p.a if nearer_source(p.r) == 0 else p.b] for p in plan])
    assert np.allclose(labels.mean(axis=0), positive.mean(axis=0))  # the synthetic labels are the real ones'
    assert (~labels.any(axis=1)).mean() == pytest.approx((~positive.any(axis=1)).mean())  # all-negative kept
    pairs = [tuple(sorted((p.a, p.b))) for p in plan[: len(positive)]]
    assert len(set(pairs)) == len(pairs)  # no pair twice while new pairs remain


def test_a_plan_fails_clearly_when_nothing_can_be_paired():
    with pytest.raises(ValueError, match="No pair of sources"):
        plan_interpolations(np.array([[1, 0], [0, 1]]), 4)
    assert len(plan_interpolations(np.array([[1, 0], [0, 1]]), 4, shared_label=False)) == 4
    with pytest.raises(ValueError, match="r_range"):
        plan_interpolations(np.ones((4, 1)), 2, r_range=(0.6, 0.4))
