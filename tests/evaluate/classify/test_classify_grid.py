"""The classification grid end to end on phantoms with a tiny random model: synthetic sets from each regime's
subset only, cached cells, resuming an interrupted grid, and the report files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from test_pipeline import tiny_model_folder  # noqa: F401 - the shared tiny model fixture
from typer.testing import CliRunner

import dinodiff.evaluate.classify.grid as grid
from dinodiff.cli import app
from dinodiff.evaluate.classify import classify, load_settings
from dinodiff.evaluate.classify.stage import GridMismatch
from dinodiff.evaluate.classify.subsets import read_subset


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dinodiff.data.phantoms import write_phantoms

    return write_phantoms(tmp_path_factory.mktemp("classify") / "raw", 60, size=48, seed=0, progress=False)


def _settings(out: Path, source: Path, model: Path, *extra: str):
    return load_settings(None, [
        f"out={out}", f"data.source={source}", f"synthetic.model={model}", "regimes=[12]", "folds=2",
        "synthetic.strategies=[reconstruction]", "synthetic.ratios=[1]", "synthetic.num_inference_steps=2",
        "data.test_fraction=0.3", "data.min_positives=1", "data.balance_none=true", "classifier.backbone=tiny-cnn",
        "classifier.weights=none", "classifier.image_size=32", "classifier.max_epochs=2", "classifier.batch_size=8",
        "classifier.augment=false", *extra])


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
    assert len(done) == 3

    counted = []
    monkeypatch.setattr(grid, "fit_and_test", lambda *a, **k: counted.append(1) or real_fit(*a, **k))
    results = classify(settings, progress=False)
    assert len(counted) == 8 - 3  # 2 folds x (real, control, augmentation, full-synthetic) cells, 3 cached
    assert all((tmp_path / "grid" / "cells" / name).read_bytes() == data for name, data in done.items())

    out = tmp_path / "grid"
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["experiment"] for r in rows} == {"real", "control", "augmentation", "full-synthetic"}
    for r in rows:
        assert 0.0 <= float(r["auc"]) <= 1.0
        train_real = 12 - int(r["val_images"])
        expected = {"real": train_real, "control": 2 * train_real, "augmentation": 2 * train_real,
                    "full-synthetic": train_real}[r["experiment"]]
        assert int(r["train_images"]) == expected  # synthetic only from the fold's training images; control matched
    assert (out / "table.md").read_text().startswith("| setup | n = 12 |")
    assert (out / "figure4.png").stat().st_size > 1000
    saved = json.loads((out / "results.json").read_text())
    assert saved["classifier"]["weights"] == ["scratch"] and len(saved["summary"]) == 4
    assert results["cells"] == 8

    # the synthetic set was made from that regime's subset and nothing else
    subset_rows, _, _ = read_subset(out / "subsets" / "n12.csv")
    real_ids = json.loads((out / "cache" / "real-32.json").read_text())["ids"]
    with open(out / "synthetic" / "n12" / "reconstruction-x1" / "labels.csv", newline="") as f:
        sources = {r["source_a"] for r in csv.DictReader(f)}
    assert sources == {real_ids[r] for r in subset_rows}


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
    assert classify(more_workers, progress=False)["cells"] == 4  # all cached: nothing retrained


def test_cli_help_and_a_bad_preset_give_one_clean_line():
    runner = CliRunner()
    help_text = runner.invoke(app, ["classify", "--help"]).output
    assert "count-matched control" in help_text and "--model" in help_text
    result = runner.invoke(app, ["classify", "--config", "no-such-preset"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_presets_load():
    for name in ("classify-phantoms", "classify-cxr-covid", "classify-mimic"):
        settings = load_settings(name)
        assert settings.regimes and np.all(np.diff(settings.regimes) > 0)
    assert load_settings("classify-mimic").data.subject_pattern


def test_a_complete_synthetic_set_is_reused_only_with_the_same_generation_settings(tmp_path):
    from dinodiff.evaluate.classify.stage import _complete
    from dinodiff.generate.plan import GenerateSettings

    wanted = GenerateSettings(ratio=5, num_inference_steps=5, source_options={"kind": "csv", "ids": ["a", "b"]})
    saved = json.loads(json.dumps(vars(wanted), default=str))
    saved.pop("shared_label")  # a set written before GenerateSettings had this field (left at its default)
    (tmp_path / "provenance.json").write_text(json.dumps({"complete": True, "settings": saved}))
    assert _complete(tmp_path, wanted)
    assert not _complete(tmp_path, GenerateSettings(ratio=5, num_inference_steps=10,
                                                    source_options={"kind": "csv", "ids": ["a", "b"]}))
    (tmp_path / "provenance.json").write_text(json.dumps({"complete": False, "settings": saved}))
    assert not _complete(tmp_path, wanted)
