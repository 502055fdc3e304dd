"""Subsets, folds (by subject, re-drawn per repetition seed), the pool/test split by subject and the
count-matched controls of `dinodiff classify`."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from dinodiff.data.subjects import SubjectPatternMismatch, subjects_from_pattern
from dinodiff.evaluate.classify.split import EXCLUDED, FROM_DATA, FROM_PATTERN, OWN, resolve_subjects, split_by_subject
from dinodiff.evaluate.classify.subsets import (
    NONE_STRATUM, SubsetTooLarge, balanced_draw, build_subsets, count_matched, make_folds, read_subset,
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
    paths = build_subsets(tmp_path, ids, positive, ["a", "b", "c"], [30, 90, 150], pool, ids, subset_seed=3,
                          seeds=[0, 1], folds=5)
    previous: set[int] = set()
    for n in (30, 90, 150):
        subset = read_subset(paths[(n, 0)])
        assert len(subset.rows) == n and set(subset.rows.tolist()) >= previous and subset.rows.min() >= 100
        assert set(Counter(subset.drawn_for).values()) == {n // 3}
        assert sorted(set(subset.folds.tolist())) == [0, 1, 2, 3, 4]
        again = read_subset(paths[(n, 1)])  # another repetition: the same images, other folds
        assert np.array_equal(again.rows, subset.rows) and not np.array_equal(again.folds, subset.folds)
        previous = set(subset.rows.tolist())


def test_a_regime_larger_than_a_labels_positives_names_the_label() -> None:
    positive = np.zeros((50, 2), dtype=bool)
    positive[:5, 0], positive[5:, 1] = True, True
    with pytest.raises(SubsetTooLarge, match="'rare'"):
        balanced_draw(positive, ["rare", "common"], 20, seed=0)


def test_folds_never_split_a_subject_and_are_stratified() -> None:
    ids = [f"p10__p{100 + i // 3}__s{i}__x" for i in range(60)]  # 20 subjects, 3 images each
    subjects = subjects_from_pattern(ids, r"^p\d+__(p\d+)__")
    assert len(set(subjects)) == 20
    strata = ["a", "b"] * 30
    folds = make_folds(strata, subjects, 5, seed=0)
    by_subject: dict[str, set[int]] = {}
    for s, f in zip(subjects, folds):
        by_subject.setdefault(s, set()).add(int(f))
    assert all(len(f) == 1 for f in by_subject.values())
    assert sorted(Counter(folds.tolist()).values()) == [12] * 5


def test_subjects_come_from_the_data_else_the_pattern_else_the_image_and_are_counted() -> None:
    ids = ["p1__a", "p1__b", "p2__c", "x"]
    subjects, counts = resolve_subjects(ids, ["P9", None, None, None], None)
    assert subjects == ["P9", "p1__b", "p2__c", "x"] and counts == {FROM_DATA: 1, FROM_PATTERN: 0, OWN: 3}
    subjects, counts = resolve_subjects(ids[:3], ["P9", None, None], r"^(p\d+)__")
    assert subjects == ["P9", "p1", "p2"] and counts == {FROM_DATA: 1, FROM_PATTERN: 2, OWN: 0}
    with pytest.raises(SubjectPatternMismatch, match="matches 2 of 3 ids"):
        resolve_subjects(ids, ["P9", None, None, None], r"^(p\d+)__")  # 'x' has no subject and no match


def test_split_by_subject_keeps_a_patient_on_one_side() -> None:
    subjects = [f"p{i // 4}" for i in range(400)]  # 100 patients, 4 images each
    split = split_by_subject(subjects, None, 0.3, seed=0)
    by_subject: dict[str, set[str]] = {}
    for s, part in zip(subjects, split):
        by_subject.setdefault(s, set()).add(str(part))
    assert all(len(parts) == 1 for parts in by_subject.values())
    assert 0.2 < (split == "test").mean() < 0.4
    own = ["train", "train", "test", "train"]  # the data's own split puts patient 'a' on both sides
    assert split_by_subject(["a", "b", "a", "c"], own, 0.3, seed=0).tolist() == [EXCLUDED, "train", "test", "train"]


def test_count_matched_controls_repeat_real_rows_to_the_arm_size() -> None:
    train = np.array([7, 3, 9, 4])
    for ratio in (1, 5, 10):
        control = count_matched(train, len(train) * (1 + ratio))
        assert len(control) == len(train) * (1 + ratio)
        assert set(control.tolist()) == set(train.tolist())  # only real images
        assert set(Counter(control.tolist()).values()) == {1 + ratio}  # each as often
    uneven = count_matched(train, 10)
    assert sorted(Counter(uneven.tolist()).values()) == [2, 2, 3, 3]
