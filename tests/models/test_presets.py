"""The paper's presets start from the real hub checkpoint layouts.

Every encoder a preset (or the README) names has a stand-in saved exactly as its hub checkpoint is laid out
(config class, weight names, preprocessing file), only smaller. ``facebook/dino-vitb16`` in particular has no
trained pooler (transformers' ``convert_dino_to_pytorch.py`` saves ``ViTModel(add_pooling_layer=False)``), which
used to stop ``sd15-dinov1`` (``tokens: [cls, pooler]``) at start-up.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dinodiff.config import load_training_settings
from dinodiff.models.encoders import load_encoder
from dinodiff.models.factory import build_components
from dinodiff.models.random_init import HUB_STANDINS, save_hub_standin, save_random_sd_components
from dinodiff.pipeline import save_model_folder

WIDTH = 32  # the stand-ins' hidden size (ViT-B's is 768); the only fields shrunk are sizes


def _keys(folder: Path) -> set[str]:
    with safe_open(str(next(folder.glob("*.safetensors"))), "pt") as f:
        return set(f.keys())


def _dino_v1_converted_keys(layers: int) -> set[str]:
    """Weight names that transformers' convert_dino_to_pytorch.py (base_model=True) writes."""
    keys = {"embeddings.cls_token", "embeddings.position_embeddings", "layernorm.weight", "layernorm.bias",
            "embeddings.patch_embeddings.projection.weight", "embeddings.patch_embeddings.projection.bias"}
    per_layer = ["layernorm_before", "layernorm_after", "attention.output.dense", "intermediate.dense",
                 "output.dense", "attention.attention.query", "attention.attention.key", "attention.attention.value"]
    for i in range(layers):
        keys |= {f"encoder.layer.{i}.{name}.{p}" for name in per_layer for p in ("weight", "bias")}
    return keys


@pytest.fixture(scope="module")
def standins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("standins")
    return {hub: save_hub_standin(root / layout, hub, hidden_size=WIDTH) for hub, layout in HUB_STANDINS.items()}


def test_dino_v1_standin_is_saved_as_the_hub_conversion_saves_it(standins):
    folder = standins["facebook/dino-vitb16"]
    assert _keys(folder) == _dino_v1_converted_keys(2)  # no pooler.* weights
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["ViTModel"] and config["model_type"] == "vit"
    assert config["patch_size"] == 16 and config["layer_norm_eps"] == 1e-12
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["feature_extractor_type"] == "ViTFeatureExtractor" and processor["size"] == 32


def test_dino_v1_without_trained_pooler_refuses_pooler_and_names_the_fix(standins, caplog):
    folder = standins["facebook/dino-vitb16"]
    with caplog.at_level(logging.WARNING, logger="dinodiff.models.encoders"):
        enc = load_encoder(str(folder))
    assert "no trained pooler" in caplog.text
    assert enc.tokens == ("cls",) and enc.available["pooler"] == 0
    assert enc.model.pooler is None  # never a random pooler, nor saved into model folders
    with pytest.raises(ValueError, match="patch_mean"):
        load_encoder(str(folder), tokens=["cls", "pooler"])


def test_patch_mean_is_the_mean_of_the_final_patch_tokens_for_every_layout(standins):
    images = torch.rand(2, 1, 40, 40, generator=torch.Generator().manual_seed(0))
    expected_tokens = {"facebook/dino-vitb16": ("cls",), "microsoft/rad-dino": ("cls",),
                       "facebook/dinov2-with-registers-base": ("cls", "registers"),
                       "timm/vit_base_patch14_reg4_dinov2.lvd142m": ("cls", "registers")}
    for hub, folder in standins.items():
        enc = load_encoder(str(folder))
        assert enc.tokens == expected_tokens[hub], hub
        assert enc(images).shape == (2, 5 if "registers" in enc.tokens else 1, WIDTH)
        both = load_encoder(str(folder), tokens=["cls", "patch_mean"])
        x = both.preprocess(images)
        if both.family == "timm":
            seq = both.model.forward_features(x)
            n_prefix = both.model.num_prefix_tokens
        else:
            seq = both.model(pixel_values=x).last_hidden_state
            n_prefix = 1 + both.available["registers"]
        want = torch.stack([seq[:, 0], seq[:, n_prefix:].mean(1)], 1)
        assert torch.allclose(both(images), want, atol=1e-5), hub


def test_rad_dino_and_dinov2_registers_standins_keep_their_config_classes_and_processors(standins):
    rad = json.loads((standins["microsoft/rad-dino"] / "config.json").read_text())
    reg = json.loads((standins["facebook/dinov2-with-registers-base"] / "config.json").read_text())
    assert rad["architectures"] == ["Dinov2Model"] and rad["model_type"] == "dinov2" and rad["patch_size"] == 14
    assert reg["model_type"] == "dinov2_with_registers" and reg["num_register_tokens"] == 4
    assert "embeddings.register_tokens" in _keys(standins["facebook/dinov2-with-registers-base"])
    enc = load_encoder(str(standins["microsoft/rad-dino"]))
    assert enc.mean.flatten().tolist() == pytest.approx([0.5307] * 3)  # read from the processor config
    timm_cfg = json.loads((standins["timm/vit_base_patch14_reg4_dinov2.lvd142m"] / "config.json").read_text())
    assert timm_cfg["architecture"] == "vit_base_patch14_reg4_dinov2"
    assert set(timm_cfg["model_args"]) == {"embed_dim", "depth", "num_heads", "img_size"}  # size fields only
    assert {"cls_token", "reg_token", "pos_embed"} <= _keys(standins["timm/vit_base_patch14_reg4_dinov2.lvd142m"])


@pytest.mark.parametrize("preset", ["sd15-dinov1", "sd15-dinov2"])
def test_paper_preset_builds_encoder_and_model_from_its_hub_standin(preset, standins, tmp_path):
    hub_id = load_training_settings(preset).model.encoder.name_or_path
    assert hub_id in HUB_STANDINS, f"{preset} names {hub_id}, a checkpoint without a stand-in of its layout"
    sd = save_random_sd_components(tmp_path / "sd", sample_size=8, cross_attention_dim=WIDTH)
    sizes = [  # size fields only: the preset's tokens, block types, layers per block and heads' width stay
        f"model.encoder.name_or_path={standins[hub_id]}", f"model.autoencoder.path={sd}", "model.resolution=64",
        "model.unet.overrides.block_out_channels=[32,32,32,32]", f"model.unet.overrides.cross_attention_dim={WIDTH}",
    ]
    cfg = load_training_settings(preset, sizes)
    parts = build_components(cfg.model)
    tokens = tuple(cfg.model.encoder.tokens)
    assert parts.encoder.tokens == tokens
    images = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    c_glb = parts.encoder(images)
    assert c_glb.shape == (2, 2 if preset == "sd15-dinov1" else 5, WIDTH)  # paper: S = 2 (v1), 5 (v2)
    latents = torch.randn(2, *parts.latent_shape)
    with torch.no_grad():
        out = parts.unet(latents, torch.tensor([10, 500]), encoder_hidden_states=parts.projection(c_glb)).sample
    assert out.shape == latents.shape and torch.isfinite(out).all()
    folder = save_model_folder(tmp_path / "model", unet=parts.unet, projection=parts.projection,
                               autoencoder=parts.autoencoder, noise_scheduler=parts.noise_scheduler,
                               model_cfg=cfg.model, encoder=parts.encoder, cond_dropout=0.0)
    saved = json.loads((folder / "image_encoder" / "global_tokens.json").read_text())
    assert saved["tokens"] == list(tokens) and set(saved["token_notes"]) >= set(tokens)
    if preset == "sd15-dinov1":
        assert "no trained pooler" in saved["token_notes"]["pooler"]
        assert not any(k.startswith("pooler.") for k in _keys(folder / "image_encoder"))
    from dinodiff.pipeline import DiNODiffusionPipeline

    reloaded = DiNODiffusionPipeline.from_pretrained(folder).image_encoder
    assert reloaded.tokens == tokens and torch.allclose(reloaded(images), c_glb, atol=1e-5)
