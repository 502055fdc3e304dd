"""The tuning / report split of the segmentation images: the configuration (method parameters, timesteps,
checkpoint) is chosen on the tuning split, and every reported number is measured on the report split.

Images are split by subject (patient), so a patient's images stay on one side; an image whose dataset names no
subject is its own subject. Within each dataset the subjects are ordered by a hash of (seed, subject) and the
first ``round(report_fraction * n)`` (at least one, at most n - 1) go to the report split: unlike a per-subject
coin (`dinodiff.data.subjects.hash_split`), this gives a 10-image dataset both splits at any seed.

Subjects with an image the model trained on (``seen``) go to the tuning split before the others are split: they
may choose a configuration, never score one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping, Sequence

from dinodiff.data.subjects import subject_key
from dinodiff.evaluate.segment.data import SegCase

TUNE, REPORT = "tune", "report"


def assign_splits(cases: Sequence[SegCase], report_fraction: float, seed: int,
                  seen: Collection[tuple[str, str]] = ()) -> dict[tuple[str, str], str]:
    """(dataset, id) -> 'tune' or 'report', by subject within each dataset; the subjects of the ``seen`` (dataset,
    id) keys tune only; both splits must be non-empty."""
    subjects: dict[str, list[str]] = {}
    held = {(c.dataset, subject_key(c.id, c.subject)) for c in cases if (c.dataset, c.id) in seen}
    for case in cases:
        subjects.setdefault(case.dataset, []).append(subject_key(case.id, case.subject))
    report = set()
    for dataset, keys in subjects.items():
        free = [k for k in dict.fromkeys(keys) if (dataset, k) not in held]
        order = sorted(free, key=lambda k: hashlib.sha1(f"{seed}:{dataset}/{k}".encode()).hexdigest())
        n, total = len(order), len(set(keys))
        if total == 1:
            take = round(report_fraction) if n else 0
        else:  # the share of the whole dataset, from the unseen subjects; one left to tune when none is held
            take = min(max(round(report_fraction * total), 1), n if n < total else n - 1)
        report |= {(dataset, k) for k in order[:take]}
    splits = {(c.dataset, c.id): REPORT if (c.dataset, subject_key(c.id, c.subject)) in report else TUNE
              for c in cases}
    missing = {TUNE, REPORT} - set(splits.values())
    if missing:
        why = (f" ({len(held)} subjects hold images the model trained on; they only tune: --transductive lets them "
               "report)") if held else ""
        raise ValueError(f"the {len(cases)} images give an empty {' and '.join(sorted(missing))} split at "
                         f"--report-fraction {report_fraction}{why}: use more images or another fraction.")
    return splits


def limit_cases(cases: Sequence[SegCase], splits: Mapping[tuple[str, str], str], limit: int | None,
                report_fraction: float) -> list[SegCase]:
    """At most ``limit`` images of each dataset, in order: the first ``round(report_fraction * limit)`` (at least
    one) of its report split and the first of its tuning split for the rest; all of them when ``limit`` is None.

    Limiting after the split, not before, keeps a small run's report split on images the model never saw."""
    if limit is None:
        return list(cases)
    keep: set[tuple[str, str]] = set()
    for dataset in dict.fromkeys(c.dataset for c in cases):
        keys = [(c.dataset, c.id) for c in cases if c.dataset == dataset]
        report = [k for k in keys if splits[k] == REPORT]
        tune = [k for k in keys if splits[k] == TUNE]
        n_report = min(len(report), max(round(report_fraction * limit), 1), limit)
        keep |= set(report[:n_report]) | set(tune[:limit - n_report])
    return [c for c in cases if (c.dataset, c.id) in keep]


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
