"""Subjects (patients) of the real images and the pool/test split, so that no patient is on both sides.

A subject comes from the data (prepare's metadata key `subject`, a CSV subject column, the MIMIC adapter), else
from `data.subject_pattern` on the image id (which must match every such id), else the image is its own
subject. Which of the three applied, and to how many images, is logged and written in results.json.
The split is the data's own test split when it has one, else `dinodiff.data.subjects.hash_split` of the subject
(the rule `dinodiff prepare --test-fraction` uses), so every image of a patient lands on the same side.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from dinodiff.data.subjects import hash_split, subject_key, subjects_from_pattern

logger = logging.getLogger(__name__)

FROM_DATA, FROM_PATTERN, OWN = "from the data", "from data.subject_pattern", "none known: the image is its own subject"
EXCLUDED = "excluded"  # a pool image whose subject is in the data's own test split


def resolve_subjects(ids: Sequence[str], known: Sequence[str | None],
                     pattern: str | None) -> tuple[list[str], dict[str, int]]:
    """(subject key of each image, how many images got their subject each way).

    Raises `SubjectPatternMismatch` (a ValueError) when `pattern` misses an id that has no subject from the data.
    """
    missing = [i for i, s in enumerate(known) if not s]
    from_pattern = subjects_from_pattern([ids[i] for i in missing], pattern) if pattern and missing else []
    subjects = [subject_key(ident, s) for ident, s in zip(ids, known)]
    for i, subject in zip(missing, from_pattern):
        subjects[i] = subject
    counts = {FROM_DATA: len(ids) - len(missing), FROM_PATTERN: len(from_pattern),
              OWN: len(missing) - len(from_pattern)}
    if counts[OWN]:
        logger.warning("%d of %d images have no known subject (no subject in the data, no data.subject_pattern): "
                       "each is its own subject, so a patient with several images may sit on both sides of a split",
                       counts[OWN], len(ids))
    logger.info("subjects: %s; %d distinct", {k: v for k, v in counts.items() if v}, len(set(subjects)))
    return subjects, counts


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
