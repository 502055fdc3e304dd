"""The trainer's GPU settings, exercised on the CPU: channels-last weights, torch.compile, fused AdamW, SDPA backend."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from safetensors.torch import load_file

from dinodiff.config import ConfigError, load_training_settings, with_overrides
from dinodiff.runs import latest_checkpoint
from dinodiff.train.performance import make_optimizer, sdpa_backend
from dinodiff.train.trainer import Trainer


def _conv_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d)]


def test_channels_last_weights_train_save_contiguous_and_resume(tmp_path, prepared_phantoms):
    run = tmp_path / "run"
    cfg = tiny_config(run, prepared_phantoms, "train.channels_last=true", "train.max_steps=2",
                      "train.checkpoint_every=2", "train.sample_every=100")
    trainer = Trainer(cfg)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(trainer.parts.unet))
    trainer.run()
    saved = load_file(latest_checkpoint(run) / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    live = trainer.accelerator.unwrap_model(trainer.model).unet.state_dict()
    assert all(torch.equal(saved[k], live[k]) for k in saved)  # written as plain NCHW, same values
    cfg = with_overrides(cfg, ["train.max_steps=3"])
    resumed = Trainer(cfg)
    resumed.run()
    assert resumed.step == 3 and latest_checkpoint(run).name == "checkpoint-3"


def test_compile_option_compiles_the_unet_in_place(tmp_path, prepared_phantoms, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append((type(self).__name__, kw)))
    trainer = Trainer(tiny_config(tmp_path / "run", prepared_phantoms, "train.compile=max-autotune-no-cudagraphs"))
    assert compiled == [("UNet2DConditionModel", {"mode": "max-autotune-no-cudagraphs"})]
    assert all(not k.startswith("_orig_mod") for k in trainer.parts.unet.state_dict())
    with pytest.raises(ConfigError, match="train.compile"):
        load_training_settings("tiny", ["train.compile=reduce-overhead"])  # CUDA graphs: not offered


def test_adamw_is_fused_on_cuda_only_and_8bit_falls_back_without_bitsandbytes():
    params = [torch.nn.Parameter(torch.zeros(3))]
    optim = load_training_settings("tiny").optim
    assert make_optimizer(params, optim, on_cuda=True).defaults["fused"] is True
    assert not make_optimizer(params, optim, on_cuda=False).defaults.get("fused")
    optim = replace(optim, fused=False)
    assert not make_optimizer(params, optim, on_cuda=True).defaults.get("fused")
    optim = replace(optim, use_8bit_adam=True)  # no CUDA here: plain AdamW, logged
    assert type(make_optimizer(params, optim, on_cuda=False)) is torch.optim.AdamW


def test_sdpa_backend_context_restricts_attention_to_the_chosen_kernel():
    q = torch.randn(1, 2, 4, 8)
    with sdpa_backend("math"):
        reference = F.scaled_dot_product_attention(q, q, q)
    with sdpa_backend("auto"):
        torch.testing.assert_close(F.scaled_dot_product_attention(q, q, q), reference)
    with pytest.raises(RuntimeError), sdpa_backend("cudnn"):  # no cuDNN kernel on a CPU: refused, not replaced
        F.scaled_dot_product_attention(q, q, q)
    with pytest.raises(ValueError, match="sdpa_backend"), sdpa_backend("fastest"):
        pass
