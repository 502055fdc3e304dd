"""Subjects (patients) of images, and the one split rule that keeps a subject's images together.

A subject comes from the dataset (MIMIC-CXR's subject_id, a CSV's subject column) or from a pattern on ids.
Splits and cross-validation folds group by subject, so no patient has images on both sides; an image whose
subject is unknown is its own subject, and the results say so.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Protocol


class SubjectPatternMismatch(ValueError):
    """A subject pattern that does not match every id: those images would silently become their own subjects."""


class HasSubject(Protocol):
    id: str
    subject: str | None


def subject_key(ident: str, subject: str | None) -> str:
    """What a split or a fold groups by: the subject when known, else the image itself (its id)."""
    return subject if subject else ident


def subjects_from_pattern(ids: Sequence[str], pattern: str) -> list[str]:
    """Group 1 (or the whole match) of `pattern` searched in each id; every id must match.

    An id that does not match would silently count as its own subject and could put one patient on both
    sides of a split, so a partial match is an error that names the ids.
    """
    regex = re.compile(pattern)
    out, misses = [], []
    for ident in ids:
        subject = subject_in(regex, ident)
        if subject is None:
            misses.append(ident)
            continue
        out.append(subject)
    if misses:
        raise pattern_mismatch(pattern, len(ids), misses[:4], len(misses))
    return out


def subject_in(regex: re.Pattern, ident: str) -> str | None:
    """Group 1 (or the whole match) of `regex` searched in `ident`; None when it does not match."""
    match = regex.search(ident)
    if match is None:
        return None
    return match.group(1) if regex.groups else match.group(0)


def pattern_mismatch(pattern: str, total: int, first_misses: list[str], misses: int) -> SubjectPatternMismatch:
    """The error for a pattern that matched `total - misses` of `total` ids (`first_misses`: the first few)."""
    return SubjectPatternMismatch(
        f"subject pattern {pattern!r} matches {total - misses} of {total} ids (no match: "
        f"{', '.join(first_misses[:3])}{', ...' if misses > 3 else ''}); fix the pattern so that it matches "
        "every id, or prepare those sources separately.")


def apply_subject_pattern(records: Sequence[HasSubject], pattern: str) -> None:
    """Set each record's subject from its id (see subjects_from_pattern)."""
    for rec, subject in zip(records, subjects_from_pattern([r.id for r in records], pattern)):
        rec.subject = subject


def hash_split(key: str, test_fraction: float, seed: int, val_fraction: float = 0.0) -> str:
    """'test' for a stable `test_fraction` of keys (a hash of seed and key), 'val' for the next `val_fraction`,
    else 'train'; order-free, and the test keys do not depend on `val_fraction`.

    Give it the subject key (`subject_key`), so that every image of a patient lands on the same side.
    """
    h = int(hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()[:12], 16) / 16**12
    return "test" if h < test_fraction else "val" if h < test_fraction + val_fraction else "train"
