"""Patients never leak in `dinodiff classify`: on real chest X-rays listed in a CSV with a patient column, no
patient is in both the pool and the test set, nor in two folds of any repetition; a subject pattern that misses
ids stops the run with one clean line."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dinodiff.cli import app
from dinodiff.evaluate.classify import classify, load_settings
from dinodiff.evaluate.classify.images import cached_real
from dinodiff.evaluate.classify.split import FROM_DATA
from dinodiff.evaluate.classify.subsets import read_subset, subset_path


def _rows(shared_data: Path, count: int) -> list[dict[str, str]]:
    """`count` CXRs of cxr-covid, half COVID-19 and half not, in a stable order."""
    with open(shared_data / "cxr-covid" / "metadata.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if (shared_data / "cxr-covid" / "images" / r["filename"]).is_file()]
    covid = [r for r in rows if r["finding"] == "COVID-19"][:count // 2]
    other = [r for r in rows if r["finding"] not in ("COVID-19", "todo")][:count // 2]
    return covid + other


@pytest.fixture(scope="module")
def patients_csv(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 real CXRs, 16 patients (column 'pid') of 3 images each, every patient mixing COVID-19 and other images."""
    rows = _rows(shared_data, 48)
    path = tmp_path_factory.mktemp("patients") / "patients.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "finding", "pid"])
        for i, r in enumerate(rows):
            writer.writerow([r["filename"], r["finding"], f"patient-{(i * 7) % 16:02d}"])
    return path


def _options(shared_data: Path, csv_path: Path, out: Path, *extra: str) -> list[str]:
    return [f"out={out}", f"data.source={csv_path}", "data.kind=csv", "data.path_column=filename",
            f"data.root={shared_data / 'cxr-covid' / 'images'}", "data.label_columns=[finding]", "data.labels=[COVID-19]",
            "data.balance_none=true", "data.test_fraction=0.3", "regimes=[12]", "folds=2", "seeds=[0,1]",
            "experiments=[]", "bootstrap=100", "classifier.backbone=tiny-cnn", "classifier.weights=none",
            "classifier.image_size=16", "classifier.max_epochs=1", "classifier.batch_size=8", "classifier.augment=false",
            *extra]


def test_no_patient_is_in_both_pool_and_test_nor_in_two_folds(shared_data, patients_csv, tmp_path):
    out = tmp_path / "grid"
    results = classify(load_settings(None, _options(shared_data, patients_csv, out, "data.subject_column=pid")),
                       progress=False)
    real = cached_real(out / "cache", 16)
    with open(patients_csv, newline="") as f:
        patient = {Path(r["filename"]).stem: r["pid"] for r in csv.DictReader(f)}
    assert real.subjects == [patient[i] for i in real.ids]  # the CSV's patient column, not the image id
    sides: dict[str, set[str]] = {}
    for subject, part in zip(real.subjects, real.split):
        sides.setdefault(subject, set()).add(part)
    assert all(len(parts) == 1 for parts in sides.values()), sides  # no patient in both pool and test
    assert {"train", "test"} == set().union(*sides.values())
    for seed in (0, 1):
        subset = read_subset(subset_path(out / "subsets", 12, seed))
        assert subset.subjects == [patient[real.ids[r]] for r in subset.rows]
        folds: dict[str, set[int]] = {}
        for subject, fold in zip(subset.subjects, subset.folds):
            folds.setdefault(subject, set()).add(int(fold))
        assert all(len(f) == 1 for f in folds.values()), folds  # no patient in two folds
        assert len(folds) < len(subset.rows)  # some patients have several images in the subset: grouping matters
    assert results.data["subjects"] == {FROM_DATA: 48, "from data.subject_pattern": 0,
                                   "none known: the image is its own subject": 0}
    assert results.provenance["subjects unknown (each image its own subject)"] == 0


def test_a_subject_pattern_that_misses_ids_stops_with_one_clean_line(shared_data, tmp_path):
    csv_path = tmp_path / "no-patients.csv"
    with open(csv_path, "w", newline="") as f:  # ids like 000001-12 (patient 000001) and 000001 (no match)
        writer = csv.writer(f)
        writer.writerow(["filename", "finding"])
        for r in _rows(shared_data, 20):
            writer.writerow([r["filename"], r["finding"]])
    options = _options(shared_data, csv_path, tmp_path / "grid", r"data.subject_pattern='^(\d{6})-'")
    result = CliRunner().invoke(app, ["classify", *options])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "subject pattern" in result.output and "matches" in result.output
    assert not (tmp_path / "grid" / "cells").exists()  # nothing was trained


def test_a_subject_column_on_a_source_that_is_not_a_csv_is_refused(tmp_path):
    with pytest.raises(ValueError, match="subject_column"):
        load_settings(None, [f"data.source={tmp_path}", "data.kind=folder", "data.subject_column=pid"])
