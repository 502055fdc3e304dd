"""The tuning / report split of the segmentation images: the configuration (method parameters, timesteps,
checkpoint) is chosen on the tuning split, and every reported number is measured on the report split.

Images are split by subject (patient), so a patient's images stay on one side; an image whose dataset names no
subject is its own subject. Within each dataset the subjects are ordered by a hash of (seed, subject) and the
first ``round(report_fraction * n)`` (at least one, at most n - 1) go to the report split: unlike a per-subject
coin (`dinodiff.data.subjects.hash_split`), this gives a 10-image dataset both splits at any seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence

from dinodiff.data.subjects import subject_key
from dinodiff.evaluate.segment.data import SegCase

TUNE, REPORT = "tune", "report"


def assign_splits(cases: Sequence[SegCase], report_fraction: float, seed: int) -> dict[tuple[str, str], str]:
    """(dataset, id) -> 'tune' or 'report', by subject within each dataset; both splits must be non-empty."""
    subjects: dict[str, list[str]] = {}
    for case in cases:
        subjects.setdefault(case.dataset, []).append(subject_key(case.id, case.subject))
    report = set()
    for dataset, keys in subjects.items():
        order = sorted(set(keys), key=lambda k: hashlib.sha1(f"{seed}:{dataset}/{k}".encode()).hexdigest())
        n = len(order)
        take = min(max(round(report_fraction * n), 1), n - 1) if n > 1 else round(report_fraction)
        report |= {(dataset, k) for k in order[:take]}
    splits = {(c.dataset, c.id): REPORT if (c.dataset, subject_key(c.id, c.subject)) in report else TUNE
              for c in cases}
    missing = {TUNE, REPORT} - set(splits.values())
    if missing:
        raise ValueError(f"the {len(cases)} images give an empty {' and '.join(sorted(missing))} split at "
                         f"--report-fraction {report_fraction}: use more images or another fraction.")
    return splits


def subjects_by_split(cases: Sequence[SegCase], splits: Mapping[tuple[str, str], str]) -> dict[str, set[str]]:
    """{'tune' | 'report': the subjects in it} (a check that no subject is on both sides)."""
    out: dict[str, set[str]] = {TUNE: set(), REPORT: set()}
    for case in cases:
        out[splits[case.dataset, case.id]].add(f"{case.dataset}/{subject_key(case.id, case.subject)}")
    return out


def tag(records: Iterable[dict], splits: Mapping[tuple[str, str], str]) -> list[dict]:
    """The records with their split under 'split'."""
    return [{**r, "split": splits[r["dataset"], r["id"]]} for r in records]


def only(records: Iterable[dict], split: str) -> list[dict]:
    """The records of one split (records tagged by `tag`)."""
    return [r for r in records if r["split"] == split]
