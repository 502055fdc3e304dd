"""cpu-small conditions on the domain encoder of `pretrain-encoder --config cpu-encoder` when it exists, on the
random ViT otherwise, and a run keeps the encoder it began with."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from dinodiff.config import load_training_settings, save_config
from dinodiff.models.factory import build_encoder
from dinodiff.models.random_init import save_random_encoder

DOMAIN_ENCODER = Path("runs/cpu-encoder/encoder")  # where the cpu-encoder preset writes its encoder


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the preset's paths are relative to the working folder
    return tmp_path


def test_cpu_small_falls_back_to_the_random_vit_when_no_domain_encoder_exists(in_tmp, caplog):
    with caplog.at_level(logging.INFO, logger="dinodiff.config"):
        cfg = load_training_settings("cpu-small", [f"train.run_dir={in_tmp / 'run'}"])
    assert cfg.model.encoder.name_or_path == "random:transformers-vit"
    assert cfg.model.encoder.fallback is None  # settled: the saved config names one encoder
    assert "pretrain-encoder" in caplog.text


def test_cpu_small_uses_the_domain_encoder_when_present_and_loads_it(in_tmp):
    save_random_encoder(in_tmp / DOMAIN_ENCODER, family="transformers-vit")
    cfg = load_training_settings("cpu-small", [f"train.run_dir={in_tmp / 'run'}"])
    assert cfg.model.encoder.name_or_path == str(DOMAIN_ENCODER)
    encoder = build_encoder(cfg.model.encoder)  # the same loading path as a hub encoder
    tokens = encoder(torch.rand(2, 3, 64, 64))
    assert tokens.ndim == 3 and tokens.shape[0] == 2 and torch.isfinite(tokens).all()


def test_a_run_keeps_the_encoder_it_began_with_when_one_appears_later(in_tmp):
    run = in_tmp / "run"
    run.mkdir()
    first = load_training_settings("cpu-small", [f"train.run_dir={run}"])
    save_config(first, run / "config.yaml")  # what the trainer writes when the run starts
    save_random_encoder(in_tmp / DOMAIN_ENCODER, family="transformers-vit")  # pretrained while the run was paused
    resumed = load_training_settings("cpu-small", [f"train.run_dir={run}"])
    assert resumed.model.encoder.name_or_path == "random:transformers-vit"
    fresh = load_training_settings("cpu-small", [f"train.run_dir={in_tmp / 'other-run'}"])
    assert fresh.model.encoder.name_or_path == str(DOMAIN_ENCODER)
