"""Tiny randomly initialised models of each real architecture, saved in the real on-disk formats.

Pretrained DINO / Stable Diffusion weights cannot be downloaded here, so tests and the built-in demo save
these to a folder and load them back through the same code paths (``load_encoder``, ``load_autoencoder``,
``build_unet(pretrained=...)``) that real hub ids or local checkpoints take.
"""

from __future__ import annotations

from pathlib import Path

import torch

ENCODER_FAMILIES = ("transformers-vit", "transformers-dinov2", "timm")
# Deliberately not ImageNet values, so tests can tell that normalisation is read from the saved config.
_TEST_MEAN = [0.5, 0.4, 0.3]
_TEST_STD = [0.25, 0.2, 0.3]


def save_random_encoder(
    out_dir: str | Path,
    family: str = "transformers-vit",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    patch_size: int = 8,
    image_size: int = 64,
    num_registers: int = 4,
    seed: int = 0,
) -> Path:
    """Write a random encoder loadable by ``load_encoder(out_dir)``; returns ``out_dir``.

    'transformers-vit': ViTModel with pooler + ViTImageProcessor config (like facebook/dino-vitb16).
    'transformers-dinov2': Dinov2WithRegistersModel (Dinov2Model, like microsoft/rad-dino, when
    num_registers == 0) + BitImageProcessor config. 'timm': vit_base_patch14_reg4_dinov2's architecture
    resized, as timm's hub format (config.json with 'architecture' + model.safetensors).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if family == "transformers-vit":
        from transformers import ViTConfig, ViTImageProcessor, ViTModel

        config = ViTConfig(
            hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
            intermediate_size=4 * hidden_size, image_size=image_size, patch_size=patch_size,
        )  # fmt: skip
        ViTModel(config, add_pooling_layer=True).save_pretrained(out)
        size = {"height": image_size, "width": image_size}
        ViTImageProcessor(size=size, image_mean=_TEST_MEAN, image_std=_TEST_STD).save_pretrained(out)
    elif family == "transformers-dinov2":
        from transformers import (
            BitImageProcessor,
            Dinov2Config,
            Dinov2Model,
            Dinov2WithRegistersConfig,
            Dinov2WithRegistersModel,
        )

        common = dict(
            hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
            image_size=image_size, patch_size=patch_size,
        )  # fmt: skip
        if num_registers:
            model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=num_registers, **common))
        else:
            model = Dinov2Model(Dinov2Config(**common))
        model.save_pretrained(out)
        BitImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
            do_center_crop=True, image_mean=_TEST_MEAN, image_std=_TEST_STD,
        ).save_pretrained(out)  # fmt: skip
    elif family == "timm":
        import timm
        from timm.models import save_for_hf

        model = timm.create_model(
            "vit_base_patch14_reg4_dinov2", pretrained=False, num_classes=0, embed_dim=hidden_size, depth=num_layers,
            num_heads=num_heads, patch_size=patch_size, img_size=image_size, reg_tokens=num_registers,
        )  # fmt: skip
        save_for_hf(model, out, safe_serialization=True, data_config={"mean": _TEST_MEAN, "std": _TEST_STD})
    else:
        raise ValueError(f"family must be one of {ENCODER_FAMILIES}, got {family!r}.")
    return out


def save_random_sd_components(
    out_dir: str | Path,
    *,
    sample_size: int = 16,
    latent_channels: int = 4,
    cross_attention_dim: int = 32,
    unet_preset: str = "tiny",
    scaling_factor: float = 0.18215,
    seed: int = 0,
) -> Path:
    """Write a Stable-Diffusion-like folder: a tiny AutoencoderKL (x8 downscale) in 'vae/' and a UNet in 'unet/'.

    sample_size is the UNet's latent size; the VAE's image size is 8x that. Loadable by
    ``load_autoencoder('kl', out_dir)`` and ``build_unet(..., pretrained=out_dir)``.
    """
    from diffusers import AutoencoderKL

    from dinodiff.models.unet import build_unet

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
        sample_size=8 * sample_size, scaling_factor=scaling_factor,
    )  # fmt: skip
    vae.save_pretrained(out / "vae")
    unet = build_unet(
        unet_preset, in_channels=latent_channels, sample_size=sample_size, cross_attention_dim=cross_attention_dim
    )
    unet.save_pretrained(out / "unet")
    return out
