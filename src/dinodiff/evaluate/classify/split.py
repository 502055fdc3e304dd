"""Subjects (patients) of the real images and the pool/test split, so that no patient is on both sides.

A subject comes from the data (prepare's metadata key `subject`, a CSV subject column, the MIMIC adapter), else
from `data.subject_pattern` on the image id (which must match every such id), else the image is its own
subject. Which of the three applied, and to how many images, is logged and written in results.json.
The split is the data's own test split when it has one, else `dinodiff.data.subjects.hash_split` of the subject
(the rule `dinodiff prepare --test-fraction` uses), so every image of a patient lands on the same side.
"""

from __future__ import annotations

import logging
import re
from array import array
from collections.abc import Sequence

import numpy as np

from dinodiff.data.subjects import hash_split, pattern_mismatch, subject_in
from dinodiff.evaluate.classify.index import Coded, Strings

logger = logging.getLogger(__name__)

FROM_DATA, FROM_PATTERN, OWN = "from the data", "from data.subject_pattern", "none known: the image is its own subject"
EXCLUDED = "excluded"  # a pool image whose subject is in the data's own test split


def resolve_subjects(ids: Sequence[str], known: Sequence[str | None],
                     pattern: str | None) -> tuple[Coded, dict[str, int]]:
    """(subject key of each image, how many images got their subject each way).

    The keys are codes into the distinct subjects, an image that is its own subject pointing at its id: no string
    per image is made (index.Coded). Raises `SubjectPatternMismatch` (a ValueError) when `pattern` misses an id that
    has no subject from the data.
    """
    regex = re.compile(pattern) if pattern else None
    table: dict[str, int] = {}
    codes = array("i")
    counts = {FROM_DATA: 0, FROM_PATTERN: 0, OWN: 0}
    misses, missed = [], 0
    for ident, subject in zip(ids, known):
        way = FROM_DATA if subject else FROM_PATTERN if regex is not None else OWN
        if way == FROM_PATTERN:
            subject = subject_in(regex, ident)
            if subject is None:
                missed += 1
                misses.extend([ident][:4 - len(misses)])
                continue
        counts[way] += 1
        codes.append(-1 if way == OWN else table.setdefault(subject, len(table)))
    if missed:
        raise pattern_mismatch(pattern, counts[FROM_PATTERN] + missed, misses, missed)
    if counts[OWN]:
        logger.warning("%d of %d images have no known subject (no subject in the data, no data.subject_pattern): "
                       "each is its own subject, so a patient with several images may sit on both sides of a split",
                       counts[OWN], len(ids))
    logger.info("subjects: %s; %d distinct", {k: v for k, v in counts.items() if v}, len(table) + counts[OWN])
    return Coded(np.frombuffer(codes, dtype=np.int32), Strings.of(table), own=ids), counts


def split_by_subject(subjects: Sequence[str], own_split: Sequence[str] | None, test_fraction: float,
                     seed: int) -> np.ndarray:
    """'train' / 'test' per image; with the data's own split, pool images of a test subject become 'excluded'."""
    if own_split is None:
        return np.array([hash_split(s, test_fraction, seed) for s in subjects])
    split = np.array(own_split, dtype=object)
    test_subjects = {s for s, part in zip(subjects, split) if part == "test"}
    leaking = np.array([part != "test" and s in test_subjects for s, part in zip(subjects, split)], dtype=bool)
    if leaking.any():
        logger.warning("%d pool images belong to subjects of the data's own test split: they are left out of the "
                       "pool, so no patient is on both sides", int(leaking.sum()))
        split[leaking] = EXCLUDED
    return split.astype(str)
