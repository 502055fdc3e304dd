"""Checkpoint sweep: FID of every checkpoint, fid.csv + plot, best checkpoint, and the trainer's eval hook."""

from __future__ import annotations

import csv
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from PIL import Image

import dinodiff.evaluate.fid.sweep as sweep_mod
from dinodiff.config import FidSettings
from dinodiff.evaluate.fid.sweep import best_row, hook_from_config, make_fid_hook, promote_best, sweep, upsert
from dinodiff.results import read_results

# A random tiny DINOv2 as the extractor keeps these tests fast; the XRV path is covered in test_fid.py.
EVAL = ["eval.extractor=dinov2", "eval.weights=random:transformers-dinov2", "eval.num_real=6", "eval.num_sources=3",
        "eval.per_source=2", "eval.sample_steps=2", "eval.batch_size=4", "eval.split=train"]
SETTINGS = FidSettings(extractor="dinov2", weights="random:transformers-dinov2", num_real=6, num_sources=3,
                       per_source=2, sample_steps=2, batch_size=4, split="train")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, prepared_phantoms: Path) -> Path:
    """A tiny run of 4 steps with checkpoints at 2 and 4, each scored by FID during training (train.eval_every=2)."""
    from dinodiff.train.trainer import train

    run = tmp_path_factory.mktemp("sweep") / "run"
    with pytest.MonkeyPatch.context() as mp:  # module fixtures run before conftest's per-test environment
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("DINODIFF_CACHE", str(tmp_path_factory.getbasetemp() / "dinodiff-cache"))
        cfg = tiny_config(run, prepared_phantoms, "train.max_steps=4", "train.checkpoint_every=2", "train.keep_last=3",
                          "train.sample_every=100", "train.eval_every=2", *EVAL)
        train(cfg, eval_hook=hook_from_config(cfg))  # the hook the CLI builds from the config's eval section
    return run


def _rows(run: Path) -> list[dict]:
    with open(run / "fid.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def test_training_with_eval_every_writes_fid_csv_plot_and_best(trained_run: Path) -> None:
    rows = _rows(trained_run)
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert {(r["extractor"], r["tap"], r["n_real"], r["n_fake"]) for r in rows} == {("dinov2", "cls", "6", "6")}
    assert all(math.isfinite(float(r["fid"])) and float(r["fid"]) > 0 for r in rows)
    best = min(rows, key=lambda r: float(r["fid"]))
    import json

    record = json.loads((trained_run / "best" / "best.json").read_text())
    assert record["step"] == int(best["step"]) and record["metric"].startswith("fid dinov2:cls on ")
    assert record["scores"]["extractor"] == "dinov2:cls" and record["value"] == float(best["fid"])
    results = read_results(trained_run / "results.json")  # the sweep's record, which the report shows
    assert results.kind == "fid" and [row["step"] for row in results.tables[next(iter(results.tables))]] == [2, 4]
    assert results.figures and "★" in str(results.tables)
    assert (trained_run / "best" / "model" / "unet").is_dir()
    assert Image.open(trained_run / "fid.png").size[0] > 100
    assert len(list((trained_run / "fid-cache").glob("dinov2-cls-n6-*.npz"))) == 1  # real set extracted once


def test_sweep_skips_scored_checkpoints_and_rescoring_is_deterministic(trained_run: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    run = _copy(trained_run, tmp_path)
    before = {r["step"]: float(r["fid"]) for r in _rows(run)}
    calls = []
    original = sweep_mod.CheckpointScorer.score
    monkeypatch.setattr(sweep_mod.CheckpointScorer, "score",
                        lambda self, folder, step: calls.append(step) or original(self, folder, step))
    summary = sweep(run, SETTINGS)
    assert calls == [] and len(summary["rows"]) == 2  # everything already scored with these settings
    summary = sweep(run, SETTINGS, force=True)
    assert calls == [2, 4]
    # same sources, same noise seeds, same real set: the numbers reproduce exactly
    assert {r["step"]: float(r["fid"]) for r in _rows(run)} == pytest.approx(before, rel=1e-6)
    assert int(summary["best"]["step"]) == int(min(_rows(run), key=lambda r: float(r["fid"]))["step"])


def test_every_checkpoint_reconstructs_the_same_sources_with_the_same_seeds(trained_run: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    run = _copy(trained_run, tmp_path)
    (run / "fid.csv").unlink()
    seen = []
    original = sweep_mod.reconstruct

    def spy(pipe, sources, **kw):
        seen.append((sources.clone(), kw["seed"], kw["per_source"]))
        return original(pipe, sources, **kw)

    monkeypatch.setattr(sweep_mod, "reconstruct", spy)
    summary = sweep(run, SETTINGS)
    assert len(seen) == 2 and len(summary["rows"]) == 2
    for sources, seed, per_source in seen[1:]:
        assert torch.equal(sources, seen[0][0]) and seed == seen[0][1] and per_source == 2
    assert seen[0][0].shape == (3, 1, 32, 32)  # sources at the model's resolution


def test_sweep_command_writes_table_plot_and_copies_the_best_model(trained_run: Path, tmp_path: Path,
                                                                   prepared_phantoms: Path) -> None:
    from typer.testing import CliRunner

    from dinodiff.cli import app

    run = _copy(trained_run, tmp_path)
    for name in ("fid.csv", "fid.png", "best"):
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    args = ["sweep", str(run), "--real", str(prepared_phantoms), "--split", "train", "--extractor", "dinov2",
            "--weights", "random:transformers-dinov2", "--num-real", "6", "--num-sources", "3", "--per-source", "2",
            "--steps", "2", "--batch-size", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = _rows(run)
    best = min(rows, key=lambda r: float(r["fid"]))
    assert f"best: step {best['step']}" in result.output and "dinov2:cls" in result.output
    assert (run / "fid.png").is_file()
    copied = (run / "best" / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    source = Path(best["checkpoint"], "unet", "diffusion_pytorch_model.safetensors").read_bytes()
    assert copied == source
    empty = CliRunner().invoke(app, ["sweep", str(tmp_path / "nothing")])
    assert empty.exit_code == 2 and "No complete checkpoints" in empty.output


def test_fid_hook_returns_named_scores_and_leaves_the_global_rng_alone(trained_run: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    run = _copy(trained_run, tmp_path)
    original = sweep_mod.build_extractor

    def drawing(*args, **kwargs):  # XRV's and Inception's constructors random-initialise before loading weights
        torch.rand(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(sweep_mod, "build_extractor", drawing)
    hook = make_fid_hook(run, replace(SETTINGS, cache_dir=tmp_path / "fresh-cache"))
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    result = hook(run / "checkpoints" / "checkpoint-4" / "model", 4)
    assert torch.equal(torch.rand(4), expected)  # training's random stream is not shifted by evaluation
    assert list(result)[0] == "fid" and result["extractor"] == "dinov2:cls"  # the first score decides best/
    assert {"kid_mean", "kid_std", "n_real", "n_fake", "split", "metric"} <= set(result)
    assert result["metric"] == "fid dinov2:cls on train (6 real vs 6 generated, 2 per source, 2 steps, seed 0)"
    assert result["fid"] == pytest.approx(float(_rows(trained_run)[-1]["fid"]), rel=1e-6)


def test_best_row_upsert_and_pruned_best(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = dict(extractor="xrv-densenet121-res224-all", tap="features2", n_real=10, n_fake=10, per_source=1,
                    sample_steps=25, seed=0, kid_mean=0.1, kid_std=0.0)
    rows = [dict(step=s, fid=f, checkpoint=str(tmp_path / f"c{s}"), **settings)
            for s, f in [(100, 9.0), (200, 4.0), (300, float("nan")), (400, 4.0)]]
    assert best_row(rows)["step"] == 200  # lowest finite FID, earliest on ties
    assert best_row([]) is None
    replaced = upsert(rows, dict(rows[0], fid=1.0))
    assert len(replaced) == 4 and best_row(replaced)["step"] == 100
    other = upsert(rows, dict(rows[0], extractor="inception-v3-torchvision", fid=0.5))
    assert len(other) == 5  # a row under other settings never overwrites
    with caplog.at_level("WARNING"):
        assert promote_best(tmp_path, best_row(rows)) is None  # its checkpoint is gone
    assert "pruned" in caplog.text and not (tmp_path / "best").exists()


def test_the_config_eval_section_is_the_one_fid_settings_object() -> None:
    from dinodiff.config import ConfigError, load_training_settings

    cfg = load_training_settings("tiny", EVAL + ["eval.real=somewhere", "eval.kid_subsets=7"])
    assert cfg.eval == replace(SETTINGS, real="somewhere", kid_subsets=7)  # every field, one list
    assert load_training_settings("tiny", []).eval == FidSettings()  # the defaults the CLI uses too
    with pytest.raises(ConfigError, match="num_reals"):
        load_training_settings("tiny", ["eval.num_reals=5"])  # a misspelt or renamed field fails instead of being dropped


def test_eval_every_without_real_images_fails_with_the_fix(tmp_path: Path) -> None:
    from dinodiff.config import load_training_settings
    from dinodiff.evaluate.fid.sweep import hook_from_config

    cfg = load_training_settings("tiny", [f"train.run_dir={tmp_path}", "train.eval_every=10", "data.cache=somewhere"])
    with pytest.raises(ValueError, match="eval.real="):
        hook_from_config(cfg)


@pytest.fixture(scope="module")
def prepared_with_val(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 phantoms prepared with a test and a validation split."""
    from dinodiff.data.phantoms import write_phantoms
    from dinodiff.prepare import prepare

    root = tmp_path_factory.mktemp("val")
    source = write_phantoms(root / "raw", 30, size=64, seed=1, progress=False)
    prepare([source], root / "prepared", size=32, shard_size=8, workers=1, test_fraction=0.3, val_fraction=0.3,
            seed=0, progress=False)
    return root / "prepared"


def _split_keys(prepared: Path, split: str) -> set[str]:
    from dinodiff.data.shards import list_shards, read_samples

    return {s["__key__"] for s in read_samples(list_shards(prepared, split))}


def test_checkpoints_are_selected_on_the_validation_split_never_on_test(prepared_with_val: Path, tmp_path: Path,
                                                                         prepared_phantoms: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    settings = replace(SETTINGS, split=None, num_real=None, num_sources=None, real=str(prepared_with_val))
    scorer = sweep_mod.CheckpointScorer(tmp_path, settings)
    val, test = _split_keys(prepared_with_val, "val"), _split_keys(prepared_with_val, "test")
    assert val and test and scorer.split == "val" and scorer.source_split == "val"
    assert {ref.key for ref in scorer.real_refs()} == val  # every validation image, no test image
    assert scorer.expected_settings()["split"] == "val"
    with caplog.at_level("WARNING"):  # no val split: training images, said so; the test split is never taken
        scorer = sweep_mod.CheckpointScorer(tmp_path, replace(settings, real=str(prepared_phantoms)))
    assert scorer.split == "train" and "no 'val' split" in caplog.text
    assert not {ref.key for ref in scorer.real_refs()} & _split_keys(prepared_phantoms, "test")
    with caplog.at_level("WARNING"):
        assert sweep_mod.selection_split(prepared_with_val, "test") == "test"
    assert "TEST split" in caplog.text
    with pytest.raises(FileNotFoundError, match="has no 'val' split"):
        sweep_mod.selection_split(prepared_phantoms, "val")


def test_the_validation_split_is_drawn_by_subject_and_leaves_the_test_split_alone(tmp_path: Path) -> None:
    from dinodiff.data.subjects import hash_split

    keys = [f"patient-{i}" for i in range(2000)]
    without = [hash_split(k, 0.2, 0) for k in keys]
    with_val = [hash_split(k, 0.2, 0, val_fraction=0.1) for k in keys]
    assert [a == "test" for a in without] == [b == "test" for b in with_val]  # same test subjects
    assert 150 < with_val.count("val") < 250 and set(with_val) == {"train", "val", "test"}


@pytest.mark.slow
def test_fid_hook_spread_over_two_processes_scores_like_one(trained_run: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO_ROOT

    run, model = _copy(trained_run, tmp_path), trained_run / "checkpoints" / "checkpoint-2" / "model"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29561",
           str(REPO_ROOT / "tests" / "scripts" / "ddp_fid.py"), str(run), str(model), str(tmp_path / "out.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.json.rank{r}").read_text()) for r in (0, 1)]
    assert ranks[0]["chunks"] == [0, 2] and ranks[1]["chunks"] == [1]  # every source chunk made once, shared out
    assert ranks[1]["scores"] == {}  # only the main process scores
    monkeypatch.setattr(sweep_mod, "SOURCE_CHUNK", 1)
    row = sweep_mod.CheckpointScorer(run, replace(SETTINGS, cache=False)).score(model, 2)  # one process
    assert ranks[0]["scores"]["fid"] == pytest.approx(row["fid"], rel=1e-5)
