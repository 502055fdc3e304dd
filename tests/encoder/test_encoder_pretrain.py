"""DINO encoder pretraining: learning, EMA teacher, the saved encoder folder, resume after SIGKILL, collapse."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT
from safetensors.torch import load_file

from dinodiff.config import EncoderSettings
from dinodiff.data.image_sets import iter_sources
from dinodiff.encoder.augment import MultiCrop, random_crops
from dinodiff.encoder.export import read_provenance
from dinodiff.encoder.monitor import CollapseMonitor, EncoderCollapsed
from dinodiff.encoder.pretrain import EncoderPretrainer
from dinodiff.encoder.settings import AugmentSettings, load_encoder_settings
from dinodiff.models.encoders import GlobalTokenEncoder, load_encoder
from dinodiff.models.factory import build_encoder
from dinodiff.models.training_images import read_training_images
from dinodiff.runs import latest_checkpoint, list_checkpoints

TINY = ["backbone.image_size=16", "backbone.patch_size=8", "backbone.hidden_size=32", "backbone.num_layers=1",
        "backbone.num_heads=2", "backbone.num_registers=2", "head.hidden_dim=32", "head.bottleneck_dim=16",
        "head.output_dim=64", "augment.local_size=8", "augment.local_crops=1", "data.load_size=32",
        "data.num_workers=0", "run.batch_size=8", "run.log_every=1", "optim.warmup_steps=1"]


def tiny_settings(run_dir: Path, shards: Path, *overrides: str):
    return load_encoder_settings("cpu-encoder", [f"data.shards={shards}", f"run.run_dir={run_dir}", *TINY, *overrides])


def _fixed_batch(trainer: EncoderPretrainer) -> list[torch.Tensor]:
    return next(iter(trainer._batches()))


def test_dino_loss_falls_on_a_tiny_fixed_batch(tmp_path, prepared_phantoms):
    trainer = EncoderPretrainer(tiny_settings(tmp_path / "run", prepared_phantoms, "optim.lr=3e-3", "run.max_steps=40",
                                              "loss.warmup_teacher_temp_steps=0", "run.stop_on_collapse=false"))
    batch = _fixed_batch(trainer)
    losses = []
    for _ in range(25):
        losses.append(trainer._optimizer_step(batch)["loss"])
        trainer.step += 1
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_teacher_follows_the_student_by_ema(tmp_path, prepared_phantoms):
    trainer = EncoderPretrainer(tiny_settings(tmp_path / "run", prepared_phantoms, "run.max_steps=10",
                                              "run.momentum_start=0.9"))
    before = {k: v.clone() for k, v in trainer.teacher.named_parameters()}
    row = trainer._optimizer_step(_fixed_batch(trainer))
    student = dict(trainer.accelerator.unwrap_model(trainer.student).named_parameters())
    m = row["momentum"]
    assert 0.9 <= m < 1.0
    changed = 0
    for name, value in trainer.teacher.named_parameters():  # (BatchNorm running stats are not EMA'd: unused)
        expected = m * before[name] + (1 - m) * student[name]
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
        changed += not torch.equal(value, before[name])
    assert changed > 0  # the student moved and the teacher moved a fraction of the way


def test_saved_folder_loads_through_the_encoder_loader_with_identical_tokens(tmp_path, prepared_phantoms):
    run = tmp_path / "run"
    trainer = EncoderPretrainer(tiny_settings(run, prepared_phantoms, "run.max_steps=2", "run.checkpoint_every=2"))
    out = trainer.run()
    assert out == run / "encoder"
    encoder = build_encoder(EncoderSettings(name_or_path=str(out)))  # what model.encoder.name_or_path=ENC does
    assert encoder.family == "transformers-dinov2" and encoder.tokens == ("cls", "registers")
    assert encoder.image_size == 16 and encoder.num_tokens == 3
    images = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trainer.teacher.embed(images)
    tokens = encoder(images)
    assert tokens.shape == (3, 3, 32)
    torch.testing.assert_close(tokens[:, 0], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(load_encoder(str(out))(images), tokens)  # loading twice: same tokens
    grey = trainer.images.float() / 255
    torch.testing.assert_close(encoder.mean.flatten(), torch.full((3,), float(grey.mean())))
    record = read_provenance(out)
    assert record["step"] == 2 and record["data"]["num_images"] == len(trainer.images)
    assert record["settings"]["backbone"]["hidden_size"] == 32
    assert (run / "encoder-init" / "model.safetensors").is_file() and read_provenance(run / "encoder-init")["step"] == 0
    with (run / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(float(r["embedding_std"]) > 0 and float(r["teacher_entropy"]) > 0 for r in rows)
    assert list((run / "logs").rglob("events.out.tfevents*"))


def test_every_encoder_folder_records_its_training_images_and_keeps_them_through_save_and_load(
        tmp_path, prepared_phantoms):
    run = tmp_path / "run"
    out = EncoderPretrainer(tiny_settings(run, prepared_phantoms, "run.max_steps=2", "run.checkpoint_every=2")).run()
    train = [s for s in iter_sources(prepared_phantoms, size=8, split="train")]
    test_ids = {s.id for s in iter_sources(prepared_phantoms, size=8, split="test")}
    assert train and test_ids
    for folder, step in ((out, 2), (run / "encoder-init", 0), (latest_checkpoint(run) / "encoder", 2)):
        record = read_training_images(folder)
        assert record is not None and record.step == step and record.split == "train"
        assert list(record.ids) == [s.id for s in train] and not test_ids & set(record.ids)
        assert list(record.paths) == [s.path for s in train] and all(record.paths)
        assert record.shards == str(prepared_phantoms.resolve())
    encoder = load_encoder(str(out))
    assert encoder.training_images == read_training_images(out)
    encoder.save_pretrained(tmp_path / "model" / "image_encoder")  # as a diffusion model folder stores it
    again = GlobalTokenEncoder.from_pretrained(tmp_path / "model", subfolder="image_encoder")
    assert again.training_images == encoder.training_images
    assert read_training_images(tmp_path / "model" / "image_encoder").ids == encoder.training_images.ids


def _run_cli(args: list[str], env_extra: dict[str, str] | None = None, check: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "dinodiff.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _weights(run: Path) -> dict[str, torch.Tensor]:
    checkpoint = latest_checkpoint(run)
    return {**load_file(checkpoint / "model.safetensors"), **load_file(checkpoint / "trainer" / "teacher.safetensors")}


def test_resume_after_sigkill_is_bit_identical(tmp_path, prepared_phantoms):
    common = ["pretrain-encoder", "--config", "cpu-encoder", f"data.shards={prepared_phantoms}", *TINY,
              "run.max_steps=5", "run.checkpoint_every=2", "run.deterministic=true", "run.keep_last=5",
              "backbone.drop_path=0.1"]
    _run_cli([*common, f"run.run_dir={tmp_path / 'straight'}"])
    killed = tmp_path / "killed"
    proc = _run_cli([*common, f"run.run_dir={killed}"], env_extra={"DINODIFF_KILL_AT_STEP": "4"}, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [step for step, _ in list_checkpoints(killed)] == [2]
    _run_cli([*common, f"run.run_dir={killed}"])  # resumes from checkpoint-2 by itself
    straight, resumed = _weights(tmp_path / "straight"), _weights(killed)
    assert straight.keys() == resumed.keys() and "loss.center" in straight
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    with (killed / "metrics.csv").open() as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == [1, 2, 3, 4, 5]


def test_a_collapsed_run_is_detected_and_stopped(tmp_path, prepared_phantoms):
    trainer = EncoderPretrainer(tiny_settings(tmp_path / "run", prepared_phantoms, "run.max_steps=6",
                                              "run.collapse_patience=2", "optim.lr=0"))
    for net in (trainer.accelerator.unwrap_model(trainer.student), trainer.teacher):
        with torch.no_grad():  # a constant final norm: every image gets the same CLS, the one-point collapse
            net.backbone.layernorm.weight.zero_()
            net.backbone.layernorm.bias.fill_(0.5)
    with pytest.raises(EncoderCollapsed, match="collapsed at step 2.*embedding std 0.000"):
        trainer.run()
    assert not list_checkpoints(tmp_path / "run")


def test_collapse_monitor_tells_spread_from_collapsed_outputs():
    monitor = CollapseMonitor(std_ratio=0.1, entropy=0.5, patience=2, output_dim=64)
    healthy = {"embedding_std": 0.8, "teacher_marginal_entropy": 3.9}
    one_prototype = {"embedding_std": 0.8, "teacher_marginal_entropy": 0.01}
    assert monitor.check(healthy, 1) is None
    assert monitor.check(one_prototype, 2) is None  # patience: one bad check is not enough
    assert "collapsed at step 3" in monitor.check(one_prototype, 3)
    assert monitor.check(healthy, 4) is None and monitor.count == 0


def test_multicrop_is_a_pure_function_of_its_seed_and_keeps_left_and_right():
    images = (torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    crops = MultiCrop(AugmentSettings(local_crops=3, local_size=8), 16)
    a, b = crops(images, torch.Generator().manual_seed(7)), crops(images, torch.Generator().manual_seed(7))
    assert [tuple(c.shape) for c in a] == [(4, 1, 16, 16)] * 2 + [(4, 1, 8, 8)] * 3
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(float(c.min()) >= 0 and float(c.max()) <= 1 for c in a)
    # A left-to-right ramp stays left-to-right (no flip by default) and is mirrored only when asked.
    still = dict(global_scale=(1.0, 1.0), rotation=0, translate=0, brightness=0, contrast=0, gamma=(1.0, 1.0),
                 blur_p=(0, 0, 0), sharpen_p=0)
    ramp = torch.linspace(0, 255, 32).round().to(torch.uint8).expand(1, 1, 32, 32)
    for hflip_p, sign in ((0.0, 1), (1.0, -1)):
        a = AugmentSettings(hflip_p=hflip_p, **still)
        row = random_crops(ramp, 16, a, a.global_scale, 0.0, torch.Generator().manual_seed(0))[0, 0, 8]
        assert bool((sign * row.diff() > 0).all()), row


@pytest.mark.parametrize("family", ["transformers-vit", "timm"])
def test_continues_from_an_existing_encoder_and_saves_it_in_its_own_format(tmp_path, prepared_phantoms, family):
    from dinodiff.models.random_init import save_random_encoder

    src = save_random_encoder(tmp_path / "src", family, hidden_size=32, num_layers=1, num_heads=2, patch_size=8,
                              image_size=16, num_registers=2)
    settings = tiny_settings(tmp_path / "run", prepared_phantoms, f"backbone.name_or_path={src}", "run.max_steps=2",
                             "run.checkpoint_every=2")
    out = EncoderPretrainer(settings).run()  # the run itself checks that the folder reloads to the same CLS
    before, after = load_encoder(str(src)), load_encoder(str(out))
    assert after.family == family and after.tokens == before.tokens
    torch.testing.assert_close(after.mean, before.mean)  # the source encoder's normalisation is kept
    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(after(images), before(images))  # and its weights were trained
