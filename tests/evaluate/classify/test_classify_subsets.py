"""Subsets, folds and the count-matched control of `dinodiff classify`."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from dinodiff.evaluate.classify.subsets import (
    NONE_STRATUM, SubsetTooLarge, balanced_draw, build_subsets, count_matched, make_folds, read_subset, subject_ids,
)


def _pool(n: int = 400, labels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, labels)) < 0.3


def test_balanced_draw_takes_n_over_L_positives_per_label_without_replacement() -> None:
    positive = _pool()
    rows, drawn_for = balanced_draw(positive, ["a", "b", "c"], 60, seed=1)
    assert len(set(rows.tolist())) == 60  # no image twice
    assert Counter(drawn_for) == {"a": 20, "b": 20, "c": 20}
    for row, name in zip(rows, drawn_for):
        assert positive[row, "abc".index(name)]  # drawn for a label it is positive for


def test_balanced_draw_with_none_stratum_adds_all_negative_images() -> None:
    positive = _pool()
    rows, drawn_for = balanced_draw(positive, ["a", "b", "c"], 40, seed=0, balance_none=True)
    assert Counter(drawn_for)[NONE_STRATUM] == 10
    assert not positive[rows[np.array(drawn_for) == NONE_STRATUM]].any()


def test_regimes_are_nested_and_each_is_balanced(tmp_path) -> None:
    positive = _pool(500)
    ids = [f"img{i:04d}" for i in range(500)]
    pool = np.arange(100, 500)  # rows 0-99 are the test set: never drawn
    paths = build_subsets(tmp_path, ids, positive, ["a", "b", "c"], [30, 90, 150], pool, seed=3, folds=5)
    previous: set[int] = set()
    for n in (30, 90, 150):
        rows, drawn_for, folds = read_subset(paths[n])
        assert len(rows) == n and set(rows.tolist()) >= previous and rows.min() >= 100
        assert set(Counter(drawn_for).values()) == {n // 3}
        assert sorted(set(folds.tolist())) == [0, 1, 2, 3, 4]
        previous = set(rows.tolist())


def test_a_regime_larger_than_a_labels_positives_names_the_label() -> None:
    positive = np.zeros((50, 2), dtype=bool)
    positive[:5, 0], positive[5:, 1] = True, True
    with pytest.raises(SubsetTooLarge, match="'rare'"):
        balanced_draw(positive, ["rare", "common"], 20, seed=0)


def test_folds_never_split_a_subject_and_are_stratified() -> None:
    ids = [f"p10__p{100 + i // 3}__s{i}__x" for i in range(60)]  # 20 subjects, 3 images each
    subjects = subject_ids(ids, r"^p\d+__(p\d+)__")
    assert len(set(subjects)) == 20
    strata = ["a", "b"] * 30
    folds = make_folds(strata, subjects, 5, seed=0)
    by_subject: dict[str, set[int]] = {}
    for s, f in zip(subjects, folds):
        by_subject.setdefault(s, set()).add(int(f))
    assert all(len(f) == 1 for f in by_subject.values())
    assert sorted(Counter(folds.tolist()).values()) == [12] * 5


def test_without_subject_ids_each_image_is_its_own_subject() -> None:
    assert subject_ids(["a", "b"], None) == ["a", "b"]


def test_count_matched_control_repeats_real_rows_to_the_augmented_size() -> None:
    train = np.array([7, 3, 9, 4])
    for ratio in (1, 5, 10):
        control = count_matched(train, len(train) * (1 + ratio))
        assert len(control) == len(train) * (1 + ratio)
        assert set(control.tolist()) == set(train.tolist())  # only real images
        assert set(Counter(control.tolist()).values()) == {1 + ratio}  # each as often
    uneven = count_matched(train, 10)
    assert sorted(Counter(uneven.tolist()).values()) == [2, 2, 3, 3]
