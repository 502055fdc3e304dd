"""Subjects (patients): read from the dataset or a pattern, stored by `prepare`, and kept on one side of a split."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import pytest
from test_datasets import make_fake_mimic
from typer.testing import CliRunner

from dinodiff.cli import app
from dinodiff.data.datasets import discover
from dinodiff.data.shards import read_samples
from dinodiff.data.image_sets import iter_sources
from dinodiff.data.subjects import SubjectPatternMismatch, hash_split, subjects_from_pattern
from dinodiff.prepare import prepare


@pytest.fixture(scope="module")
def patients_csv(shared_data, tmp_path_factory) -> Path:
    """40 real CXRs as 10 patients of 4 images each (a `patient_id` column), with a 0/1 label column."""
    root = tmp_path_factory.mktemp("patients")
    images = sorted((shared_data / "cxr-covid" / "images").iterdir())[:40]
    with open(root / "table.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "patient_id", "Effusion"])
        for i, p in enumerate(images):
            w.writerow([str(p), f"P{i // 4:02d}", i % 2])
    return root / "table.csv"


def test_mimic_records_name_their_subject(tmp_path):
    make_fake_mimic(tmp_path)
    assert {r.path.stem: r.subject for r in discover(tmp_path)} == {"d1": "p10000001", "d3": "p15000002",
                                                                     "d4": "p19000003"}


def test_a_csv_subject_column_is_found_and_not_taken_for_a_label(patients_csv):
    recs = discover(patients_csv)
    assert len({r.subject for r in recs}) == 10 and all(r.subject.startswith("P") for r in recs)
    assert all(set(r.labels) == {"Effusion"} for r in recs)
    with pytest.raises(ValueError, match="subject column 'nope' not found"):
        discover(patients_csv, subject_column="nope")


def test_prepare_splits_by_subject_and_stores_it(patients_csv, tmp_path):
    manifest = prepare([patients_csv], tmp_path / "out", size=32, workers=1, progress=False, test_fraction=0.5, seed=3)
    sides: dict[str, set[str]] = defaultdict(set)
    for sample in read_samples(tmp_path / "out"):
        sides[sample["json"]["subject"]].add(sample["json"]["split"])
    assert len(sides) == 10 and all(len(s) == 1 for s in sides.values())  # no patient on both sides
    assert {next(iter(s)) for s in sides.values()} == {"train", "test"}
    # the side of each patient is the hash of the patient, not of any one image
    assert all(next(iter(s)) == hash_split(subject, 0.5, 3) for subject, s in sides.items())
    assert manifest["parameters"]["subjects"] == {"images_with_subject": 40, "distinct": 10}
    assert {s.subject for s in iter_sources(tmp_path / "out", size=32)} == set(sides)


def test_a_subject_pattern_must_match_every_id(tmp_path):
    assert subjects_from_pattern(["p1__a", "p2__b", "p1__c"], r"^(p\d+)__") == ["p1", "p2", "p1"]
    with pytest.raises(SubjectPatternMismatch, match=r"matches 2 of 3 ids \(no match: other\)"):
        subjects_from_pattern(["p1__a", "other", "p1__c"], r"^(p\d+)__")


def test_prepare_with_a_pattern_that_misses_ids_fails_with_the_fix(shared_data, tmp_path):
    result = CliRunner().invoke(app, ["prepare", str(shared_data / "lungs-shenzhen" / "CXR_png"), "--out",
                                      str(tmp_path / "out"), "--size", "32", "--subject-pattern", r"^(CHNCXR_000\d)_"])
    assert result.exit_code == 2, result.output
    assert "matches 9 of 10 ids" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_patient_named_in_two_sources_stays_one_patient(patients_csv, tmp_path):
    copy = tmp_path / "other.csv"  # the same images and patients listed again, as a second source
    copy.write_text(patients_csv.read_text())
    prepare([patients_csv, copy], tmp_path / "out", size=32, workers=1, progress=False, test_fraction=0.5)
    sides: dict[str, set[str]] = defaultdict(set)
    keys = set()
    for sample in read_samples(tmp_path / "out"):
        sides[sample["json"]["subject"]].add(sample["json"]["split"])
        keys.add(sample["__key__"])
    assert len(keys) == 80 and len(sides) == 10 and all(len(s) == 1 for s in sides.values())
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["parameters"]["subjects"]["distinct"] == 10
