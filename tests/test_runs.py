"""runs.py on its own: checkpoint folders, the one best-checkpoint policy (keep_best) and the one model resolver
(resolve_model / run_models), without training anything."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from dinodiff.runs import (
    MetricsLog,
    checkpoint_step,
    keep_best,
    latest_checkpoint,
    list_checkpoints,
    prune,
    read_best,
    resolve_model,
    resolve_resume,
    run_models,
)


def _model(folder: Path, weights: bytes = b"w") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet").mkdir(exist_ok=True)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(weights)
    return folder


def _checkpoint(run: Path, step: int, complete: bool = True) -> Path:
    folder = run / "checkpoints" / f"checkpoint-{step}"
    _model(folder / "model", weights=str(step).encode())
    if complete:
        (folder / "trainer").mkdir()
        (folder / "trainer" / "state.json").write_text(json.dumps({"step": step}))
    return folder


def _record(step: int, value: float, metric: str = "fid xrv on val") -> dict:
    return {"step": step, "metric": metric, "value": value, "scores": {"fid": value, "split": "val"}}


def test_only_complete_checkpoints_count_and_prune_keeps_the_newest_and_the_protected(tmp_path):
    run = tmp_path / "run"
    for step in (5, 20, 10):
        _checkpoint(run, step)
    _checkpoint(run, 30, complete=False)  # a killed save: no trainer/state.json
    assert [s for s, _ in list_checkpoints(run)] == [5, 10, 20]
    assert latest_checkpoint(run).name == "checkpoint-20" and resolve_resume(run, "auto").name == "checkpoint-20"
    assert resolve_resume(run, "none") is None
    with pytest.raises(FileNotFoundError, match="latest"):
        resolve_resume(tmp_path / "empty", "latest")
    prune(run, keep_last=1, protect=[run / "checkpoints" / "checkpoint-5"])
    assert [s for s, _ in list_checkpoints(run)] == [5, 20]


def test_keep_best_keeps_the_lowest_value_the_earlier_step_on_a_tie_and_replaces_another_metric(tmp_path, caplog):
    run = tmp_path / "run"
    c10, c20, c30 = (_checkpoint(run, s) / "model" for s in (10, 20, 30))
    assert keep_best(run, c10, _record(10, 5.0)) and read_best(run)["step"] == 10
    assert not keep_best(run, c20, _record(20, 6.0))  # worse
    assert not keep_best(run, c20, _record(20, 5.0))  # a tie: the earlier step stays
    assert keep_best(run, c30, _record(30, 4.0)) and read_best(run)["step"] == 30
    assert (run / "best" / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == b"30"
    # another metric (other features, split or sample size) is not comparable: the newest record replaces it
    assert keep_best(run, c20, _record(20, 9.0, metric="fid dinov2 on val")) and read_best(run)["step"] == 20
    with caplog.at_level(logging.WARNING):
        assert not keep_best(run, run / "gone", _record(40, 1.0, metric="fid dinov2 on val"))
    assert "pruned" in caplog.text and read_best(run)["step"] == 20


def test_resolve_model_best_then_newest_checkpoint_then_model_folder(tmp_path, caplog):
    run = tmp_path / "run"
    _checkpoint(run, 10)
    _checkpoint(run, 20)
    _checkpoint(run, 30, complete=False)
    choice = resolve_model(run)
    assert choice.path == run / "checkpoints" / "checkpoint-20" / "model" and "newest checkpoint" in choice.how
    keep_best(run, run / "checkpoints" / "checkpoint-10" / "model", _record(10, 3.0))
    choice = resolve_model(run)
    assert choice.path == run / "best" / "model" and "step 10" in choice.how and "'val' split" in choice.how
    assert resolve_model(run / "checkpoints" / "checkpoint-20").path == run / "checkpoints" / "checkpoint-20" / "model"
    assert resolve_model(run / "best").path == run / "best" / "model"
    keep_best(run, run / "checkpoints" / "checkpoint-20" / "model",
              {**_record(20, 1.0, metric="other"), "scores": {"split": "test"}})
    with caplog.at_level(logging.WARNING):
        assert "TEST split" in resolve_model(run).how
    assert "selected on the TEST split" in caplog.text


def test_resolve_model_hub_ids_components_folders_and_clear_errors(tmp_path):
    assert resolve_model("runwayml/stable-diffusion-v1-5").location == "runwayml/stable-diffusion-v1-5"
    with pytest.raises(FileNotFoundError, match="model not found"):
        resolve_model(tmp_path / "nowhere")
    (tmp_path / "sd" / "unet").mkdir(parents=True)
    (tmp_path / "sd" / "unet" / "config.json").write_text("{}")
    assert resolve_model(tmp_path / "sd").path == tmp_path / "sd"  # diffusers components without model_index.json
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="run without a complete checkpoint"):
        resolve_model(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="without complete checkpoints"):
        run_models(tmp_path / "run")


def test_run_models_lists_a_runs_checkpoints_oldest_first_and_a_step_is_read_from_any_path_in_it(tmp_path):
    run = tmp_path / "run"
    for step in (100, 20):
        _checkpoint(run, step)
    models = run_models(run)
    assert models == [run / "checkpoints" / "checkpoint-20" / "model", run / "checkpoints" / "checkpoint-100" / "model"]
    assert run_models(models[0]) == [models[0]]
    assert [checkpoint_step(m) for m in models] == [20, 100]
    assert checkpoint_step(run / "best" / "model") is None


def test_metrics_log_drops_rows_after_the_resumed_step(tmp_path):
    log = MetricsLog(tmp_path / "metrics.csv", ["step", "loss"])
    for step in (1, 2, 3):
        log.append({"step": step, "loss": 1.0 / step, "ignored": "x"})
    log.truncate_after(2)
    log.append({"step": 3, "loss": 0.5})
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["step,loss", "1,1.0", "2,0.5", "3,0.5"]
