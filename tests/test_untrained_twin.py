"""benchmarks/make_untrained_twin.py: the untrained control of a trained model is the UNet the trainer started from,
beside the trained model's own encoder and autoencoder, in a folder `segment` reads like a run."""

from __future__ import annotations

import sys

import torch
from conftest import REPO_ROOT, tiny_config
from safetensors.torch import load_file

from dinodiff import runs
from dinodiff.train.trainer import Trainer, train

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import make_untrained_twin  # noqa: E402


def _weights(model, part: str) -> dict[str, torch.Tensor]:
    return load_file(next((model / part).glob("*.safetensors")))


def test_twin_is_the_trainers_initial_unet_beside_the_trained_encoder(tmp_path, prepared_phantoms):
    overrides = ("train.max_steps=2", "train.checkpoint_every=2", "train.sample_every=0", "train.seed=3")
    start = Trainer(tiny_config(tmp_path / "start", prepared_phantoms, *overrides))  # the weights at step 0
    initial = {k: v.detach().clone() for k, v in start.parts.unet.state_dict().items()}
    train(tiny_config(tmp_path / "run", prepared_phantoms, *overrides))
    trained = runs.latest_checkpoint(tmp_path / "run") / "model"

    twin = make_untrained_twin.make_twin(trained, tmp_path / "twin")
    assert twin == tmp_path / "twin" / "checkpoints" / "checkpoint-0" / "model"
    assert (tmp_path / "twin" / "config.yaml").read_text() == (tmp_path / "run" / "config.yaml").read_text()
    twin_unet, trained_unet = _weights(twin, "unet"), _weights(trained, "unet")
    assert twin_unet.keys() == initial.keys()
    assert all(torch.equal(twin_unet[k], initial[k].to(twin_unet[k].dtype)) for k in initial)  # weight for weight
    assert any(not torch.equal(twin_unet[k], trained_unet[k]) for k in trained_unet)  # two steps moved the UNet
    twin_encoder, trained_encoder = _weights(twin, "image_encoder"), _weights(trained, "image_encoder")
    assert twin_encoder.keys() == trained_encoder.keys()
    assert all(torch.equal(twin_encoder[k], trained_encoder[k]) for k in trained_encoder)  # the same frozen encoder
