"""UNet presets: diffusers ``UNet2DConditionModel`` configs, from SD v1.5's down to a test-sized one."""

from __future__ import annotations

import copy
from typing import Any

from diffusers import UNet2DConditionModel

from dinodiff.models.hub import pipeline_subfolder

_CROSS_DOWN, _DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
_CROSS_UP, _UP = "CrossAttnUpBlock2D", "UpBlock2D"

UNET_PRESETS: dict[str, dict[str, Any]] = {
    # Stable Diffusion v1.5 unet/config.json (runwayml/stable-diffusion-v1-5), the paper's UNet: 859.5M parameters.
    "sd15": {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": (_CROSS_DOWN, _CROSS_DOWN, _CROSS_DOWN, _DOWN),
        "up_block_types": (_UP, _CROSS_UP, _CROSS_UP, _CROSS_UP),
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,  # diffusers' legacy name: SD v1 has 8 heads per attention layer
    },
    # CPU-trainable: 3 levels, cross-attention at the two lower resolutions only (the largest maps are costly).
    "small": {
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": (_DOWN, _CROSS_DOWN, _CROSS_DOWN),
        "up_block_types": (_CROSS_UP, _CROSS_UP, _UP),
        "block_out_channels": (64, 128, 256),
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
    },
    # Tests: 32-channel blocks, one layer per block.
    "tiny": {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": (_CROSS_DOWN, _DOWN),
        "up_block_types": (_UP, _CROSS_UP),
        "block_out_channels": (32, 32),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "cross_attention_dim": 32,
        "attention_head_dim": 2,
    },
}


def unet_config(preset: str, *, in_channels: int, sample_size: int, cross_attention_dim: int, **overrides: Any) -> dict:
    """The preset's config with the data-dependent sizes and any overrides merged in (out_channels = in_channels)."""
    if preset not in UNET_PRESETS:
        raise ValueError(f"Unknown UNet preset {preset!r}; choose from {sorted(UNET_PRESETS)}.")
    config = copy.deepcopy(UNET_PRESETS[preset])
    config.update(in_channels=in_channels, out_channels=in_channels, sample_size=sample_size)
    config.update(cross_attention_dim=cross_attention_dim)
    config.update(overrides)
    return config


def build_unet(
    preset: str,
    *,
    in_channels: int,
    sample_size: int,
    cross_attention_dim: int,
    pretrained: str | None = None,
    **overrides: Any,
) -> UNet2DConditionModel:
    """A UNet2DConditionModel from a preset, randomly initialised or with weights from ``pretrained``.

    pretrained: hub id or local dir of a UNet (subfolder 'unet' of a full SD pipeline is found automatically).
    Its architecture is the checkpoint's; ``in_channels`` and ``cross_attention_dim`` must match it (use a
    ConditionProjection for other encoder widths); ``sample_size`` and config-only overrides are applied.
    """
    if pretrained is None:
        sizes = dict(in_channels=in_channels, sample_size=sample_size, cross_attention_dim=cross_attention_dim)
        config = unet_config(preset, **sizes, **overrides)
        return UNet2DConditionModel.from_config(config)
    pretrained = str(pretrained)
    subfolder = pipeline_subfolder(UNet2DConditionModel, pretrained, "unet")
    ckpt = UNet2DConditionModel.load_config(pretrained, subfolder=subfolder)
    for name, wanted in (("in_channels", in_channels), ("cross_attention_dim", cross_attention_dim)):
        if ckpt[name] != wanted:
            hint = (
                "Use an autoencoder with that many latent channels or train the UNet from scratch (pretrained=None)."
                if name == "in_channels"
                else "Keep the checkpoint's width and map the encoder tokens with a ConditionProjection."
            )
            raise ValueError(f"Pretrained UNet {pretrained!r} has {name}={ckpt[name]}, but {wanted} was asked. {hint}")
    return UNet2DConditionModel.from_pretrained(pretrained, subfolder=subfolder, sample_size=sample_size, **overrides)


def count_parameters(model) -> int:
    """Number of parameters (works on the 'meta' device too)."""
    return sum(p.numel() for p in model.parameters())
