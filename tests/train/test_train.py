"""The trainer: learning, checkpoints, resume after SIGKILL, NaN handling, cache, DDP on CPU."""

from __future__ import annotations

import csv
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, tiny_config
from safetensors.torch import load_file

from dinodiff.config import with_overrides
from dinodiff.runs import latest_checkpoint, list_checkpoints
from dinodiff.train.trainer import Trainer, TrainingDiverged, train


def _unet_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model" / "unet" / "diffusion_pytorch_model.safetensors")


def _run_cli(args: list[str], env_extra: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "dinodiff.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(tmp_path, prepared_phantoms):
    cfg = tiny_config(tmp_path / "run", prepared_phantoms, "train.batch_size=8", "optim.lr=2e-3")
    trainer = Trainer(cfg)
    batch = next(trainer._batches())
    losses = []
    for _ in range(40):
        trainer.generator.manual_seed(123)  # the same noise and timesteps every step: only the weights change
        loss, _ = trainer._optimizer_step(itertools.repeat(batch))
        losses.append(loss)
    assert losses[-1] < 0.7 * losses[0], losses


def test_run_writes_config_metrics_samples_and_checkpoints(tmp_path, prepared_phantoms):
    run = tmp_path / "run"
    train(tiny_config(run, prepared_phantoms, "train.max_steps=6", "train.checkpoint_every=2", "train.keep_last=2",
                      "train.sample_every=3"))
    assert (run / "config.yaml").is_file()
    with (run / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(float(r["loss"]) > 0 and float(r["images_per_s"]) > 0 for r in rows)
    assert [step for step, _ in list_checkpoints(run)] == [4, 6]  # keep-last-2
    model = latest_checkpoint(run) / "model"  # a DiNODiffusionPipeline folder
    for part in ("model_index.json", "unet", "vae", "scheduler", "image_encoder", "projection", "model_config.yaml"):
        assert (model / part).exists(), part
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step-0000003.png", "step-0000006.png"]
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, prepared_phantoms):
    common = ["--config", "tiny", f"data.shards={prepared_phantoms}", "train.max_steps=8", "train.checkpoint_every=3",
              "train.deterministic=true", "train.sample_every=100", "train.ema=true", "train.ema_decay=0.9",
              "optim.warmup_steps=2", "train.keep_last=5"]
    _run_cli(["train", *common, f"train.run_dir={tmp_path / 'straight'}"])
    killed = tmp_path / "killed"
    proc = _run_cli(["train", *common, f"train.run_dir={killed}"], env_extra={"DINODIFF_KILL_AT_STEP": "5"}, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [step for step, _ in list_checkpoints(killed)] == [3]
    _run_cli(["train", *common, f"train.run_dir={killed}"])  # resume is automatic
    straight, resumed = _unet_weights(latest_checkpoint(tmp_path / "straight")), _unet_weights(latest_checkpoint(killed))
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    with (killed / "metrics.csv").open() as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == list(range(1, 9))


def test_nan_loss_stops_with_a_clear_error_and_no_poisoned_checkpoint(tmp_path, prepared_phantoms, monkeypatch):
    run = tmp_path / "run"
    trainer = Trainer(tiny_config(run, prepared_phantoms, "train.max_steps=6", "train.checkpoint_every=2"))
    real_loss, calls = trainer._loss, itertools.count(1)

    def loss_that_turns_nan(batch):
        value = real_loss(batch)
        return value * float("nan") if next(calls) >= 3 else value

    monkeypatch.setattr(trainer, "_loss", loss_that_turns_nan)
    with pytest.raises(TrainingDiverged, match="non-finite loss"):
        trainer.run()
    assert [step for step, _ in list_checkpoints(run)] == [2]
    weights = _unet_weights(latest_checkpoint(run))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_training_from_the_cache(tmp_path, prepared_phantoms):
    from dinodiff.cache import build_cache
    from dinodiff.data.cached import read_cache_info
    from dinodiff.models.factory import model_cache_key

    cfg = tiny_config(tmp_path / "run", prepared_phantoms, "train.max_steps=3", "train.checkpoint_every=3")
    info = build_cache(cfg, tmp_path / "cache", views=2, batch_size=8, progress=False)
    assert info["views"] == 2 and info["count"] > 0
    shards_before = {p.name: p.read_bytes() for p in (tmp_path / "cache" / "shards").glob("*.tar")}
    build_cache(cfg, tmp_path / "cache", views=2, batch_size=8, progress=False)  # rerun: nothing rewritten
    assert shards_before == {p.name: p.read_bytes() for p in (tmp_path / "cache" / "shards").glob("*.tar")}
    cfg = with_overrides(cfg, [f"data.cache={tmp_path / 'cache'}"])
    train(cfg)
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-3"
    other = tiny_config(tmp_path / "other", prepared_phantoms, "model.resolution=64")
    with pytest.raises(ValueError, match="resolution"):
        read_cache_info(tmp_path / "cache", model_cache_key(other.model))


@pytest.mark.slow
def test_two_process_ddp_on_cpu_keeps_ranks_identical(tmp_path, prepared_phantoms):
    script = REPO_ROOT / "tests" / "scripts" / "ddp_train.py"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           str(script), str(prepared_phantoms), str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    digests = sorted((tmp_path / "run").glob("weights-rank*.sha256"))
    assert len(digests) == 2
    assert digests[0].read_text() == digests[1].read_text()
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-4"
