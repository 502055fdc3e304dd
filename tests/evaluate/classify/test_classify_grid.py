"""The classification grid end to end on phantoms with a tiny random model: exact synthetic counts per fold for
both strategies and both experiments, the two controls, synthetic sets from each fold's training images only,
label prevalence kept, cached cells, resuming an interrupted grid, and the report files."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from test_pipeline import tiny_model_folder  # noqa: F401 - the shared tiny model fixture
from typer.testing import CliRunner

import dinodiff.evaluate.classify.grid as grid
from dinodiff.cli import app
from dinodiff.results import read_results
from dinodiff.evaluate.classify import classify, load_settings
from dinodiff.evaluate.classify.images import cached_real
from dinodiff.evaluate.classify.stage import GridMismatch
from dinodiff.evaluate.classify.subsets import read_subset, subset_path
from dinodiff.interpolate import pairing_classes

LABELS = ["Cardiomegaly", "Consolidation", "Pleural Effusion"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dinodiff.data.phantoms import write_phantoms

    return write_phantoms(tmp_path_factory.mktemp("classify") / "raw", 60, size=48, seed=0, progress=False)


def _settings(out: Path, source: Path, model: Path, *extra: str):
    return load_settings(None, [
        f"out={out}", f"data.source={source}", f"synthetic.model={model}", "regimes=[12]", "folds=2",
        "synthetic.strategies=[reconstruction]", "synthetic.ratios=[1]", "synthetic.num_inference_steps=2",
        "data.test_fraction=0.3", "data.min_positives=1", "data.balance_none=true", "classifier.backbone=tiny-cnn",
        "classifier.weights=none", "classifier.image_size=16", "classifier.max_epochs=2", "classifier.batch_size=8",
        "classifier.augment=false", "bootstrap=200", *extra])


@pytest.fixture(scope="module")
def full_grid(phantoms, tiny_model_folder, tmp_path_factory) -> tuple[Path, dict]:  # noqa: F811
    """Both strategies, ratios 1 and 3, every experiment, 2 folds x 2 repetition seeds, regime 16."""
    out = tmp_path_factory.mktemp("full") / "grid"
    settings = _settings(out, phantoms, tiny_model_folder, "regimes=[16]", "seeds=[0,1]", "classifier.max_epochs=1",
                         "synthetic.strategies=[reconstruction,interpolation]", "synthetic.ratios=[1,3]")
    return out, classify(settings, progress=False)


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def _synthetic_sets(out: Path, strategy: str, ratio: int) -> list[Path]:
    return sorted((out / "synthetic").glob(f"m*/n16/{strategy}-x{ratio}/**/labels.csv"))


def test_every_synthetic_arm_sees_ratio_times_its_real_training_images_in_every_fold(full_grid):
    out, results = full_grid
    rows = _rows(out)
    synthetic = [r for r in rows if r["experiment"] in ("augmentation", "full-synthetic")]
    assert {(r["experiment"], r["strategy"], r["ratio"]) for r in synthetic} == {
        (e, s, str(k)) for e in ("augmentation", "full-synthetic") for s in ("reconstruction", "interpolation")
        for k in (1, 3)}
    for r in synthetic:
        train_real = 16 - int(r["val_images"])
        assert int(r["synthetic_images"]) == int(r["ratio"]) * train_real, r  # exactly ratio x |train real|
        own = train_real if r["experiment"] == "augmentation" else 0
        assert int(r["real_images"]) == own and int(r["train_images"]) == own + int(r["ratio"]) * train_real
    # interpolation: one set per repetition seed and fold, made from that fold's training images only
    real_ids = cached_real(out / "cache", 16).ids
    for ratio in (1, 3):
        sets = _synthetic_sets(out, "interpolation", ratio)
        assert [p.parent.name for p in sets] == ["s0-f0", "s0-f1", "s1-f0", "s1-f1"]
        for path in sets:
            seed, fold = int(path.parent.name[1]), int(path.parent.name[-1])
            train, _ = read_subset(subset_path(out / "subsets", 16, seed)).split(fold)
            with open(path, newline="") as f:
                made_from = {s for r in csv.DictReader(f) for s in (r["source_a"], r["source_b"])}
            assert made_from <= {real_ids[i] for i in train}  # no validation image reaches training
    assert results.data["cells"] == len(rows) == 2 * 2 * (1 + 2 + 1 + 8)  # real, 2 controls, control-full 1:3, 8 arms


def test_each_synthetic_arm_is_compared_with_the_control_of_its_own_count(full_grid):
    out, results = full_grid
    rows = _rows(out)
    for r in rows:
        train_real, ratio = 16 - int(r["val_images"]), int(r["ratio"])
        if r["experiment"] == "control":
            assert int(r["train_images"]) == (1 + ratio) * train_real
        if r["experiment"] == "control-full":
            assert int(r["train_images"]) == ratio * train_real
    assert {r["ratio"] for r in rows if r["experiment"] == "control-full"} == {"3"}  # 1:1 is real only: not retrained
    summary = {r["arm"]: r for r in results.data["summary"]}
    assert summary["augmentation interpolation 1:3"]["control"] == "control for augmentation 1:3 (real x4)"
    assert summary["full-synthetic reconstruction 1:3"]["control"] == "control for full-synthetic 1:3 (real x3)"
    at_one = summary["full-synthetic reconstruction 1:1"]
    assert at_one["control"].startswith("real only") and at_one["control_auc_mean"] == summary["real only"]["auc_mean"]
    assert at_one["d_vs_control"] == at_one["d_vs_real"] and at_one["p_vs_control_adj"] == at_one["p_vs_real_adj"]
    control = summary["control for full-synthetic 1:3 (real x3)"]
    arm = summary["full-synthetic reconstruction 1:3"]
    assert arm["control_auc_mean"] == pytest.approx(control["auc_mean"])
    table = (out / "table.md").read_text()
    assert "control for full-synthetic 1:3 (real x3)" in table and "control for augmentation 1:1 (real x2)" in table
    assert "corrected resampled t-test" in table and "paired bootstrap" in table


def test_interpolation_sets_keep_the_label_prevalence_of_their_folds_training_images(full_grid):
    out, _ = full_grid
    cache = cached_real(out / "cache", 16)
    names, real_positive = cache.names, cache.positive
    for ratio in (1, 3):
        for path in _synthetic_sets(out, "interpolation", ratio):
            seed, fold = int(path.parent.name[1]), int(path.parent.name[-1])
            train, _ = read_subset(subset_path(out / "subsets", 16, seed)).split(fold)
            with open(path, newline="") as f:
                made = np.array([[float(r[n] or 0) == 1.0 for n in names] for r in csv.DictReader(f)])
            # every class has >= 2 training sources here, so each source labels exactly `ratio` images: tolerance 0
            np.testing.assert_allclose(pairing_classes(made).mean(axis=0),
                                       pairing_classes(real_positive[train]).mean(axis=0), atol=1e-12)
            assert pairing_classes(made)[:, -1].any()  # the '(none)' stratum is interpolated too


def test_results_json_names_the_test_the_interval_and_the_subjects(full_grid):
    out, results = full_grid
    record = read_results(out / "results.json")
    assert record == results  # what the stage returned is what it wrote
    saved = record.data
    assert record.kind == "classify" and "corrected resampled t-test" in saved["test"]["description"]
    assert "corrected resampled t-test" in record.provenance["test"] and "bootstrap" in record.provenance[
        "confidence intervals"]
    assert saved["ci"]["level"] == 0.95 and saved["ci"]["resamples"] == 200 and "bootstrap" in saved["ci"]["method"]
    n_images = sum(saved["subjects"].values())
    assert record.provenance["subjects unknown (each image its own subject)"] == n_images  # phantoms: no subjects
    for row in saved["summary"]:
        if row["experiment"] != "real":
            assert row["ci_vs_real_low"] <= row["d_vs_real"] + 1e-9 and row["d_vs_real"] <= row["ci_vs_real_high"] + 1e-9
            assert row["df"] == 3  # J = 2 folds x 2 seeds
    for key in (r["key"] for r in _rows(out)):
        assert np.load(out / "cells" / f"{key}.npy").shape == (saved["test_images"], len(saved["labels"]))


def test_folds_are_redrawn_per_repetition_seed_on_the_same_subset(full_grid):
    out, _ = full_grid
    first, second = (read_subset(subset_path(out / "subsets", 16, s)) for s in (0, 1))
    assert np.array_equal(first.rows, second.rows)  # the regime's subset is fixed
    assert not np.array_equal(first.folds, second.folds)  # its folds are re-drawn
    assert Counter(first.folds.tolist()) == Counter(second.folds.tolist()) == {0: 8, 1: 8}


def test_a_control_that_would_repeat_another_cell_is_not_trained_again(phantoms, tmp_path):
    settings = _settings(tmp_path, phantoms, tmp_path, "synthetic.ratios=[1,2,5]")
    controls = {(c.experiment, c.ratio) for c in grid.plan_cells(settings, "abc") if c.experiment.startswith("control")}
    # real x1 is real only, real x2 is the control for augmentation 1:1: neither control-full 1:1 nor 1:2 is trained
    assert controls == {("control", 1), ("control", 2), ("control", 5), ("control-full", 5)}
    alone = _settings(tmp_path, phantoms, tmp_path, "synthetic.ratios=[1,2]", "experiments=[full-synthetic,control-full]")
    assert {(c.experiment, c.ratio) for c in grid.plan_cells(alone, "abc") if c.experiment == "control-full"} == {
        ("control-full", 2)}  # without the augmentation control, real x2 is trained as control-full 1:2


def test_interrupted_grid_resumes_only_missing_cells(phantoms, tiny_model_folder, tmp_path, monkeypatch):  # noqa: F811
    settings = _settings(tmp_path / "grid", phantoms, tiny_model_folder)
    real_fit, calls = grid.fit_and_test, []

    def interrupted(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt  # the grid is killed while training its fourth cell
        calls.append(1)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(grid, "fit_and_test", interrupted)
    with pytest.raises(KeyboardInterrupt):
        classify(settings, progress=False)
    done = {p.name: p.read_bytes() for p in (tmp_path / "grid" / "cells").glob("*.json")}
    assert len(done) == 3 and len(list((tmp_path / "grid" / "cells").glob("*.npy"))) == 3

    counted = []
    monkeypatch.setattr(grid, "fit_and_test", lambda *a, **k: counted.append(1) or real_fit(*a, **k))
    results = classify(settings, progress=False)
    assert len(counted) == 8 - 3  # 2 folds x (real, control, augmentation, full-synthetic) cells, 3 cached
    assert all((tmp_path / "grid" / "cells" / name).read_bytes() == data for name, data in done.items())

    out = tmp_path / "grid"
    rows = _rows(out)
    assert len(rows) == 8 and {r["experiment"] for r in rows} == {"real", "control", "augmentation", "full-synthetic"}
    assert all(0.0 <= float(r["auc"]) <= 1.0 for r in rows)
    assert (out / "table.md").read_text().startswith("| arm | n = 12 |")
    assert (out / "figure4.png").stat().st_size > 1000
    saved = read_results(out / "results.json").data
    assert saved["classifier"]["weights"] == ["scratch"] and len(saved["summary"]) == 4
    assert results.data["cells"] == 8


def test_rerun_with_other_settings_is_refused(phantoms, tmp_path):
    settings = _settings(tmp_path / "g", phantoms, tmp_path / "no-model", "experiments=[control]",
                         "synthetic.model=null")
    classify(settings, progress=False)
    assert len(list((tmp_path / "g" / "cells").glob("*.json"))) == 4
    other = _settings(tmp_path / "g", phantoms, tmp_path / "no-model", "experiments=[control]", "synthetic.model=null",
                      "classifier.lr=0.5")
    with pytest.raises(GridMismatch, match="classifier"):
        classify(other, progress=False)
    more_workers = _settings(tmp_path / "g", phantoms, tmp_path / "no-model", "experiments=[control]",
                             "synthetic.model=null", "workers=2")
    assert classify(more_workers, progress=False).data["cells"] == 4  # all cached: nothing retrained
    grid_file = tmp_path / "g" / "grid.json"
    older = {k: v for k, v in json.loads(grid_file.read_text()).items() if k != "protocol"}
    grid_file.write_text(json.dumps(older))  # cells of the protocol before issue 20
    with pytest.raises(GridMismatch, match="older classify protocol"):
        classify(settings, progress=False)


def test_cli_help_and_a_bad_preset_give_one_clean_line():
    runner = CliRunner()
    help_text = runner.invoke(app, ["classify", "--help"]).output
    assert "control" in help_text and "--model" in help_text
    result = runner.invoke(app, ["classify", "--config", "no-such-preset"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_presets_load():
    for name in ("classify-phantoms", "classify-cxr-covid", "classify-mimic"):
        settings = load_settings(name)
        assert settings.regimes and np.all(np.diff(settings.regimes) > 0)
        assert settings.test == "corrected-ttest" and "control-full" in settings.experiments
    assert load_settings("classify-mimic").data.subject_pattern
