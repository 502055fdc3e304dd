"""The privacy audit end to end on real CXRs: every disguised copy flagged and no unrelated image, patients in the
references, an untruncated training set, intervals and warnings in results.json / audit.md, the train->train
subsample, and chunking that changes nothing. The references go through the same search as the synthetic images."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import binomtest
from typer.testing import CliRunner

from dinodiff.cli import app
from dinodiff.results import read_results
from dinodiff.evaluate.audit import AuditSettings, audit, copies, search

from audit_data import COPIES, DISGUISES, SIZE, TWIN_PATIENT, disguise, row, write_prepared, write_synthetic
from audit_data import cxr, cxr_audit  # noqa: F401  (fixtures)


def _calibration(results: dict, reference: str, space: str = "pixels") -> dict:
    return next(r for r in results.tables["calibration"] if r["reference"] == reference and r["space"] == space)


# ------------------------------------------------------------------------------------- disguised copies (item 8)
@pytest.mark.parametrize("name", list(DISGUISES))
def test_every_disguised_copy_is_flagged(cxr_audit, name):
    found = row(cxr_audit["results"], name)
    assert found["dcr_n"] == COPIES * (2 if name == "all" else 1)
    assert found["flagged_copies_k"] == found["dcr_n"], found  # every copy below half the reference's p5
    assert found["dcr_max"] < found["copy_threshold"]


def test_unrelated_real_images_are_not_flagged(cxr_audit):
    found = row(cxr_audit["results"], "unrelated")
    assert found["dcr_n"] == 60
    assert found["flagged_copies_k"] == 0, found  # 0 of 60 false positives
    # new real images look like held-out ones: about 5% fall under the held-out 5th percentile, not many more
    assert found["below_reference_p5_k"] <= 8, found
    assert found["dcr_min"] > found["copy_threshold"]


# ------------------------------------------------------------------------------------------- patients (item 7)
def test_train_reference_is_against_another_patient(cxr_audit):
    twins = [s for s in cxr_audit["train"] if s.subject == TWIN_PATIENT]
    work = copies.working(torch.from_numpy(np.stack([s.image for s in twins])))
    pairwise = copies.register(work.repeat_interleave(len(twins), 0), work.repeat(len(twins), 1, 1, 1)[:, None])[0]
    pairwise = pairwise.reshape(len(twins), len(twins)).fill_diagonal_(float("inf"))
    assert (pairwise.min(1).values < 0.2).sum() >= 8  # the data: this patient's images come in near-identical pairs
    train_ref = _calibration(cxr_audit["results"], "train->train")
    assert train_ref["dcr_n"] == 151 and cxr_audit["results"].provenance["train"]["patient_ids"] == 151
    # no training image is matched with its own patient's twin: every reference distance is a different patient's
    assert train_ref["dcr_min"] > 10 * float(pairwise.min()) and train_ref["dcr_min"] > train_ref["copy_threshold"]


def test_memorisation_neighbour_of_a_source_is_another_patient(cxr_audit):
    memo = next(r for r in cxr_audit["results"].tables["memorisation"] if r["space"] == "pixels")
    assert memo["sources"] == 12 and memo["variations"] == 12
    # 8 sources have a JPEG copy as their variation, 4 of them the twice-published patient's (whose nearest image
    # of the same patient is nearer than the copy): all 8 memorised; the 4 given unrelated images are not
    assert memo["memorised"] == cxr_audit["copied"] == 8, memo
    assert "8/12" in memo["memorised (95% CI)"]


# ------------------------------------------------------------------------------- honesty and outputs (item 9)
def test_results_carry_exact_intervals_and_say_the_held_out_reference_is_too_small(cxr_audit):
    results, out = cxr_audit["results"], cxr_audit["out"]
    saved = read_results(out / "results.json")
    found = row(saved, "unrelated")
    ci = binomtest(found["flagged_copies_k"], found["dcr_n"]).proportion_ci(method="exact")
    assert (found["flagged_copies_ci95_low"], found["flagged_copies_ci95_high"]) == pytest.approx((ci.low, ci.high))
    assert found["flagged_copies_ci95_high"] > 0.05  # 0 of 60 still allows ~6%
    below = binomtest(found["below_reference_p5_k"], found["dcr_n"]).proportion_ci(method="exact")
    assert found["below_reference_p5_ci95_high"] == pytest.approx(below.high)
    assert found["reference"] == "holdout->train" and found["reference_n"] == 60 and found["reference_too_small"]
    holdout_ref = _calibration(saved, "holdout->train")
    assert holdout_ref["too_small"] and holdout_ref["p5_ci95_low"] is None and holdout_ref["p5_ci95_high"] > 0
    assert any("holdout->train (pixels) has only 60 distances" in w for w in saved.warnings)
    assert "Clopper-Pearson" in saved.note and "rotation" in saved.note
    assert saved.headline["flagged copies, unrelated (pixels)"].startswith("0/60 = 0.0% [0.0, 6.0]")
    markdown = (out / "audit.md").read_text()
    assert "| unrelated |" in markdown and "0/60 = 0.0% [0.0, 6.0]" in markdown and "too few to calibrate" in markdown
    status = {r["space"]: r["status"] for r in saved.tables["spaces"]}
    assert status["pixels"] == "available" and status["xrv"].startswith("unavailable")
    for name in saved.figures.values():
        assert Image.open(out / name).size[0] > 100
    assert results.tables["dcr"] == saved.tables["dcr"]


@pytest.fixture(scope="module")
def small_audit(cxr, tmp_path_factory) -> dict:
    """40 training images, 30 held out; copies of the last 5 training images (JPEG q50) and 5 unrelated images.
    Audited with --limit 8 (and a train->train subsample of 10) in chunks of 7, and again in one chunk; and with a
    max_memory_mb so small that each query's candidates are fetched and registered alone, and a large one."""
    root = tmp_path_factory.mktemp("small-audit")
    train, test, unrelated = cxr[:40], cxr[40:70], cxr[70:75]
    prep = write_prepared(root / "prep", train, test)
    late = [disguise(s.image, jpeg=50) for s in train[35:]] + [s.image for s in unrelated]
    syn = write_synthetic(root / "late", late, "interpolation")
    runs = {}
    for chunk in (7, 1000):
        settings = AuditSettings(train=str(prep), size=SIZE, spaces=["pixels"], limit=8, pairs=2, chunk=chunk,
                                 calibration_queries=10, max_memory_mb=4)
        runs[chunk] = audit([syn], root / f"out-{chunk}", settings)
    for mb in (0.05, 512):
        settings = AuditSettings(train=str(prep), size=SIZE, spaces=["pixels"], limit=8, pairs=2,
                                 calibration_queries=10, max_memory_mb=mb)
        runs[f"{mb} MB"] = audit([syn], root / f"out-{mb}-mb", settings)
    return runs


def test_limit_caps_synthetic_and_held_out_images_never_the_training_set(small_audit):
    results = small_audit[7]
    assert results.provenance["train"]["images"] == 40
    assert results.provenance["holdout"]["images"] == 8
    found = row(results, "late")
    assert found["dcr_n"] == 8  # 5 copies and 3 unrelated images
    assert found["flagged_copies_k"] == 5, found  # copies of the last training images are still found


def test_train_reference_is_a_stated_seeded_subsample(small_audit):
    train_ref = _calibration(small_audit[7], "train->train")
    assert train_ref["dcr_n"] == 10 and train_ref["queries"] == "10 of 40 training images (seed 0)"


def test_chunking_and_memory_bound_do_not_change_the_audit(small_audit):
    for table in ("dcr", "calibration"):
        assert small_audit[7].tables[table] == small_audit[1000].tables[table]


def test_a_tiny_memory_bound_registers_query_by_query_with_the_same_results(small_audit):
    for table in ("dcr", "calibration"):
        assert small_audit["0.05 MB"].tables[table] == small_audit["512 MB"].tables[table]
    assert row(small_audit["0.05 MB"], "late")["flagged_copies_k"] == 5


def test_candidate_blocks_hold_at_most_the_budget_of_distinct_candidates():
    indices = np.array([[0, 1], [1, 2], [3, 4], [-1, -1], [5, 6], [5, 6]])
    assert list(search.candidate_blocks(indices, 3)) == [(0, 2), (2, 4), (4, 6)]
    assert list(search.candidate_blocks(indices, 1)) == [(0, 1), (1, 2), (2, 4), (4, 6)]  # a row alone may exceed
    assert list(search.candidate_blocks(indices, 100)) == [(0, 6)]


def test_cli_help_says_limit_never_caps_the_training_set():
    result = CliRunner().invoke(app, ["audit", "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "Never caps the training set" in text and "--calibration-queries" in text and "--max-memory-mb" in text


def test_held_out_duplicates_of_training_images_are_named():
    """The same radiograph under two patient ids (cxr-covid's eurorad/radiopaedia case) sits in train and held
    out at distance ~0: it pulls the held-out reference down until nothing can be flagged. The audit says so."""
    from types import SimpleNamespace

    from dinodiff.evaluate.audit.tables import HOLDOUT_REFERENCE, TRAIN_REFERENCE, Space, duplicate_warning

    rng = np.random.default_rng(0)
    train_ref, held = rng.uniform(4.0, 8.0, 300), rng.uniform(4.0, 8.0, 107)
    space = Space(SimpleNamespace(name="pixels"), {TRAIN_REFERENCE: train_ref, HOLDOUT_REFERENCE: held})
    assert duplicate_warning(space) == ""
    space.references[HOLDOUT_REFERENCE] = np.concatenate([held, np.full(7, 0.01)])
    warning = duplicate_warning(space)
    assert warning.startswith("7 of 114 held-out images are nearer a training image (pixels)") and "--holdout" in warning
