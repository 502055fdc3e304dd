"""UNet presets, build_unet(pretrained=...) and the condition projection."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from dinodiff.models.projection import ConditionProjection
from dinodiff.models.random_init import save_random_sd_components
from dinodiff.models.unet import UNET_PRESETS, build_unet, count_parameters, unet_config

# runwayml/stable-diffusion-v1-5 unet/config.json, as published.
SD15_UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_UNET_PARAMS = 859_520_964


def _as_lists(cfg: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def test_sd15_preset_is_the_published_sd15_unet():
    assert _as_lists(UNET_PRESETS["sd15"]) == SD15_UNET_CONFIG
    with torch.device("meta"):  # no 860M-parameter allocation
        unet = build_unet("sd15", in_channels=4, sample_size=64, cross_attention_dim=768)
    assert count_parameters(unet) == SD15_UNET_PARAMS
    resolved = unet.config
    for key, value in SD15_UNET_CONFIG.items():
        assert _as_lists({key: resolved[key]})[key] == value, key


@pytest.mark.parametrize(("in_channels", "cross_attention_dim"), [(4, 768), (32, 768), (4, 384), (16, 1024)])
def test_small_preset_has_15_to_40m_parameters_and_three_levels(in_channels, cross_attention_dim):
    with torch.device("meta"):
        unet = build_unet("small", in_channels=in_channels, sample_size=32, cross_attention_dim=cross_attention_dim)
    assert 15e6 <= count_parameters(unet) <= 40e6
    assert len(unet.config.block_out_channels) == 3
    assert unet.config.down_block_types[0] == "DownBlock2D"  # no attention at the largest resolution


@pytest.mark.parametrize("in_channels", [4, 32])
def test_tiny_preset_forward_shapes(in_channels):
    unet = build_unet("tiny", in_channels=in_channels, sample_size=8, cross_attention_dim=64)
    assert count_parameters(unet) < 1_000_000
    assert unet.config.out_channels == in_channels
    x = torch.randn(2, in_channels, 8, 8)
    c_glb = torch.randn(2, 5, 64)  # e.g. CLS + 4 registers
    with torch.no_grad():
        out = unet(x, torch.tensor([10, 500]), encoder_hidden_states=c_glb).sample
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_overrides_merge_into_the_preset_and_unknown_preset_fails():
    cfg = unet_config("tiny", in_channels=4, sample_size=8, cross_attention_dim=32, layers_per_block=2)
    assert cfg["layers_per_block"] == 2 and cfg["block_out_channels"] == (32, 32)
    assert UNET_PRESETS["tiny"]["layers_per_block"] == 1  # the preset itself is untouched
    with pytest.raises(ValueError, match="Unknown UNet preset 'huge'"):
        build_unet("huge", in_channels=4, sample_size=8, cross_attention_dim=32)


def test_build_unet_pretrained_loads_weights_from_sd_dir_and_unet_dir(tmp_path):
    sd_dir = save_random_sd_components(tmp_path / "sd", sample_size=8, cross_attention_dim=32, seed=3)
    saved = build_unet("tiny", in_channels=4, sample_size=8, cross_attention_dim=32, pretrained=str(sd_dir / "unet"))
    from_pipeline_dir = build_unet(
        "tiny", in_channels=4, sample_size=16, cross_attention_dim=32, pretrained=str(sd_dir)
    )
    fresh = build_unet("tiny", in_channels=4, sample_size=8, cross_attention_dim=32)
    assert from_pipeline_dir.config.sample_size == 16
    sd_a, sd_b, sd_fresh = saved.state_dict(), from_pipeline_dir.state_dict(), fresh.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert not all(torch.equal(sd_a[k], sd_fresh[k]) for k in sd_a)  # weights came from disk, not a re-init


def test_build_unet_pretrained_refuses_other_in_channels_or_width(tmp_path):
    sd_dir = save_random_sd_components(tmp_path / "sd", sample_size=8, cross_attention_dim=32)
    with pytest.raises(ValueError, match="in_channels=4, but 32 was asked"):
        build_unet("sd15", in_channels=32, sample_size=8, cross_attention_dim=32, pretrained=str(sd_dir))
    with pytest.raises(ValueError, match="cross_attention_dim=32, but 768.*ConditionProjection"):
        build_unet("sd15", in_channels=4, sample_size=8, cross_attention_dim=768, pretrained=str(sd_dir))


def test_projection_is_parameter_free_identity_when_widths_match():
    proj = ConditionProjection(768, 768)
    assert proj.is_identity and count_parameters(proj) == 0
    c_glb = torch.randn(2, 2, 768)
    assert torch.equal(proj(c_glb), c_glb)


def test_projection_is_linear_otherwise_and_round_trips(tmp_path):
    proj = ConditionProjection(384, 768)
    assert not proj.is_identity and count_parameters(proj) == 384 * 768 + 768
    c_glb = torch.randn(2, 5, 384)
    assert proj(c_glb).shape == (2, 5, 768)
    with torch.no_grad():
        proj.proj.weight.normal_()
    proj.save_pretrained(tmp_path / "proj")
    again = ConditionProjection.from_pretrained(tmp_path / "proj")
    assert (again.config.in_dim, again.config.out_dim) == (384, 768)
    torch.testing.assert_close(again(c_glb), proj(c_glb))
    with pytest.raises(ValueError, match="width 768, projection expects 384"):
        proj(torch.randn(2, 5, 768))


def test_identity_projection_round_trips(tmp_path):
    ConditionProjection(64, 64).save_pretrained(tmp_path / "proj")
    again = ConditionProjection.from_pretrained(tmp_path / "proj")
    assert again.is_identity and again.config.in_dim == 64
