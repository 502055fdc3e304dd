"""Which model makes the synthetic sets of `dinodiff classify`: a run's selected best/model (else its newest
checkpoint), identified by path and weight hash, so that a changed model regenerates the sets and reruns the
synthetic cells while the real-only and control cells stay cached."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_pipeline import tiny_model_folder  # noqa: F401 - the shared tiny model fixture

import dinodiff.evaluate.classify.grid as grid
import dinodiff.runs as runs
from dinodiff.evaluate.classify import classify, load_settings
from dinodiff.evaluate.classify.synthetic import complete
from dinodiff.generate import GenerateSettings
from dinodiff.runs import model_identity, resolve_model


def _fake_model(folder: Path, weights: bytes = b"w") -> Path:
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet").mkdir()
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(weights)
    return folder


def _checkpoint(run: Path, step: int) -> Path:
    model = _fake_model(run / "checkpoints" / f"checkpoint-{step}" / "model")
    (model.parent / "trainer").mkdir()
    (model.parent / "trainer" / "state.json").write_text(json.dumps({"step": step}))
    return model


def test_resolve_model_prefers_the_runs_best_model_then_its_newest_checkpoint(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run, 10)
    newest = _checkpoint(run, 20)
    choice = resolve_model(run)
    assert choice.path == newest and "newest checkpoint" in choice.how and "checkpoint-20" in choice.how
    best = _fake_model(run / "best" / "model")
    choice = resolve_model(run)
    assert choice.path == best and "best" in choice.how  # the selected checkpoint, not merely the newest
    assert resolve_model(newest.parent).path == resolve_model(newest).path == newest
    assert resolve_model(newest.parent).how == "the model/ of checkpoint-20"
    assert resolve_model(best).path == best
    with pytest.raises(FileNotFoundError, match="model not found"):
        resolve_model(tmp_path / "missing")
    assert resolve_model("owner/name").location == "owner/name"  # a hub id passes through to the loader


def test_a_best_model_names_the_split_it_was_selected_on_and_warns_on_test(tmp_path, caplog):
    run = tmp_path / "run"
    _checkpoint(run, 10)
    _fake_model(run / "best" / "model")
    record = {"step": 10, "metric": "fid", "value": 3.0, "scores": {"split": "val"}}
    (run / "best" / "best.json").write_text(json.dumps(record))
    assert "step 10, lowest fid on the 'val' split" in resolve_model(run).how
    (run / "best" / "best.json").write_text(json.dumps({**record, "scores": {"split": "test"}}))
    with caplog.at_level("WARNING"):
        assert "TEST split" in resolve_model(run).how
    assert "selected on the TEST split" in caplog.text


def test_model_identity_follows_the_weights_and_is_hashed_once(tmp_path, monkeypatch):
    model = _fake_model(tmp_path / "m")
    first = model_identity(model)
    assert first.path == str(model.resolve()) and len(first.sha256) == 64 and len(first.key) == 12
    hashed = []
    real_sha = runs.hashlib.sha256
    monkeypatch.setattr(runs.hashlib, "sha256", lambda *a: hashed.append(1) or real_sha(*a))
    assert model_identity(model) == first and not hashed  # unchanged files: not read again
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"other weights")
    assert model_identity(model).sha256 != first.sha256
    copy = shutil.copytree(model, tmp_path / "copy")
    assert model_identity(copy).sha256 == model_identity(model).sha256 and model_identity(copy).key != first.key


def _perturbed_copy(model: Path, target: Path) -> Path:
    shutil.copytree(model, target)
    path = target / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in load_file(path).items()},
              path)
    return target


def _settings(out: Path, source: Path, model: Path):
    return load_settings(None, [
        f"out={out}", f"data.source={source}", f"synthetic.model={model}", "regimes=[12]", "folds=2",
        "synthetic.strategies=[reconstruction]", "synthetic.ratios=[1]", "synthetic.num_inference_steps=2",
        "data.test_fraction=0.3", "data.min_positives=1", "data.balance_none=true", "classifier.backbone=tiny-cnn",
        "classifier.weights=none", "classifier.image_size=16", "classifier.max_epochs=1", "classifier.batch_size=8",
        "classifier.augment=false", "bootstrap=100"])


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dinodiff.data.phantoms import write_phantoms

    return write_phantoms(tmp_path_factory.mktemp("phantoms") / "raw", 48, size=48, seed=1, progress=False)


def test_a_changed_model_regenerates_and_reruns_only_the_synthetic_cells(phantoms, tiny_model_folder, tmp_path,
                                                                         monkeypatch):  # noqa: F811
    out = tmp_path / "grid"
    first = classify(_settings(out, phantoms, tiny_model_folder), progress=False)
    assert first.provenance["synthetic model chosen"] == "the folder given"
    run = tmp_path / "run"
    shutil.copytree(tiny_model_folder, run / "checkpoints" / "checkpoint-5" / "model")
    (run / "checkpoints" / "checkpoint-5" / "trainer").mkdir()
    (run / "checkpoints" / "checkpoint-5" / "trainer" / "state.json").write_text('{"step": 5}')
    best = _perturbed_copy(tiny_model_folder, run / "best" / "model")

    trained = []
    real_fit = grid.fit_and_test
    monkeypatch.setattr(grid, "fit_and_test", lambda *a, **k: trained.append(1) or real_fit(*a, **k))
    second = classify(_settings(out, phantoms, run), progress=False)  # -m RUN, the same out folder
    assert len(trained) == 2 * 2  # 2 folds x (augmentation, full-synthetic); real-only and control stay cached
    provenance = second.provenance
    assert provenance["synthetic model"] == str(best.resolve()) and "best" in provenance["synthetic model chosen"]
    assert provenance["synthetic model sha256"] == model_identity(best).sha256 != first.provenance[
        "synthetic model sha256"]
    assert len(list((out / "synthetic").glob("m*/n12/reconstruction-x1/labels.csv"))) == 2  # a new set, made now
    rows = {r["arm"]: r for r in second.data["summary"]}
    assert rows["real only"]["auc_mean"] == {r["arm"]: r for r in first.data["summary"]}["real only"]["auc_mean"]
    assert len(second.data["summary"]) == len(first.data["summary"])  # the old model's cells are not mixed in


def test_a_complete_synthetic_set_is_reused_only_with_the_same_generation_settings(tmp_path):
    wanted = GenerateSettings(ratio=5, num_inference_steps=5, source_options={"kind": "csv", "ids": ["a", "b"]})
    saved = json.loads(json.dumps(vars(wanted), default=str))
    saved.pop("shared_label")  # a set written before GenerateSettings had this field (left at its default)
    (tmp_path / "provenance.json").write_text(json.dumps({"complete": True, "settings": saved}))
    assert complete(tmp_path, wanted)
    assert not complete(tmp_path, GenerateSettings(ratio=5, num_inference_steps=10,
                                                   source_options={"kind": "csv", "ids": ["a", "b"]}))
    (tmp_path / "provenance.json").write_text(json.dumps({"complete": False, "settings": saved}))
    assert not complete(tmp_path, wanted)
