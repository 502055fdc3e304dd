"""Tiny randomly initialised models of each real architecture, saved in the real on-disk formats.

Pretrained DINO / Stable Diffusion weights cannot be downloaded here, so tests and the built-in demo save
these to a folder and load them back through the same code paths (``load_encoder``, ``load_autoencoder``,
``build_unet(pretrained=...)``) that real hub ids or local checkpoints take.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dinodiff.models.unet import build_unet

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

    'transformers-vit': ViTModel with a pooler + ViTImageProcessor config (a generic transformers ViT; the
    DINO v1 hub checkpoint has no pooler: use ``save_hub_standin('facebook/dino-vitb16')`` for its layout).
    'transformers-dinov2': Dinov2WithRegistersModel (Dinov2Model, like microsoft/rad-dino, when
    num_registers == 0) + BitImageProcessor config. 'timm': vit_base_patch14_reg4_dinov2's architecture
    resized, as timm's hub format (config.json with 'architecture' + model.safetensors).
    """
    if family not in _RANDOM_WRITERS:
        raise ValueError(f"family must be one of {ENCODER_FAMILIES}, got {family!r}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    size = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                image_size=image_size, patch_size=patch_size)
    _RANDOM_WRITERS[family](out, size, num_registers)
    return out


def _random_vit(out: Path, size: dict, num_registers: int) -> None:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    ViTModel(ViTConfig(**size, intermediate_size=4 * size["hidden_size"]), add_pooling_layer=True).save_pretrained(out)
    crop = {"height": size["image_size"], "width": size["image_size"]}
    ViTImageProcessor(size=crop, image_mean=_TEST_MEAN, image_std=_TEST_STD).save_pretrained(out)


def _random_dinov2(out: Path, size: dict, num_registers: int) -> None:
    from transformers import (
        BitImageProcessor,
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    if num_registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=num_registers, **size))
    else:
        model = Dinov2Model(Dinov2Config(**size))
    model.save_pretrained(out)
    image_size = size["image_size"]
    BitImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=True, image_mean=_TEST_MEAN, image_std=_TEST_STD,
    ).save_pretrained(out)  # fmt: skip


def _random_timm(out: Path, size: dict, num_registers: int) -> None:
    import timm
    from timm.models import save_for_hf

    model = timm.create_model(
        "vit_base_patch14_reg4_dinov2", pretrained=False, num_classes=0, embed_dim=size["hidden_size"],
        depth=size["num_hidden_layers"], num_heads=size["num_attention_heads"], patch_size=size["patch_size"],
        img_size=size["image_size"], reg_tokens=num_registers,
    )  # fmt: skip
    save_for_hf(model, out, safe_serialization=True, data_config={"mean": _TEST_MEAN, "std": _TEST_STD})


_RANDOM_WRITERS = {"transformers-vit": _random_vit, "transformers-dinov2": _random_dinov2, "timm": _random_timm}


# Hub checkpoints of the paper's encoders (and RAD-DINO) -> the stand-in layout that mirrors each one.
HUB_STANDINS = {
    "facebook/dino-vitb16": "dino-v1",  # preset sd15-dinov1
    "timm/vit_base_patch14_reg4_dinov2.lvd142m": "timm-dinov2-reg4",  # preset sd15-dinov2
    "facebook/dinov2-with-registers-base": "dinov2-registers",
    "microsoft/rad-dino": "rad-dino",
}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
RAD_DINO_MEAN = [0.5307, 0.5307, 0.5307]  # microsoft/rad-dino preprocessor_config.json (a CXR mean, grey)
RAD_DINO_STD = [0.2583, 0.2583, 0.2583]


def save_hub_standin(out_dir: str | Path, hub_id: str, *, hidden_size: int = 32, num_layers: int = 2,
                     num_heads: int = 2, image_size: int | None = None, seed: int = 0) -> Path:
    """Write a small random model laid out *exactly* like the hub checkpoint ``hub_id`` (see ``HUB_STANDINS``).

    Same config class, weight names, token layout and preprocessing file as the hub's; only the size fields
    (width, depth, heads, input size) are shrunk. ``facebook/dino-vitb16`` is saved as transformers'
    ``convert_dino_to_pytorch.py`` saves it: ``ViTModel(config, add_pooling_layer=False)`` (no ``pooler.*``
    weights) + a legacy ``ViTFeatureExtractor`` preprocessor config. The timm stand-in's config.json is the
    hub's plus timm's own ``model_args`` (the size fields), which ``timm.create_model`` reads.
    """
    layout = HUB_STANDINS.get(hub_id)
    if layout is None:
        raise ValueError(f"no stand-in for {hub_id!r}; known: {sorted(HUB_STANDINS)}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    size = {"hidden_size": hidden_size, "num_hidden_layers": num_layers, "num_attention_heads": num_heads}
    if layout == "dino-v1":
        _save_dino_v1(out, size, image_size or 32)
    elif layout == "timm-dinov2-reg4":
        _save_timm_reg4(out, hidden_size, num_layers, num_heads, image_size or 28)
    else:
        _save_dinov2(out, size, image_size or 28, registers=layout == "dinov2-registers")
    return out


def _save_dino_v1(out: Path, size: dict, image_size: int) -> None:
    from transformers import ViTConfig, ViTModel

    # facebook/dino-vitb16 config.json: ViT-B/16 defaults, layer_norm_eps 1e-12, no dropout, architectures ViTModel
    config = ViTConfig(**size, intermediate_size=4 * size["hidden_size"], image_size=image_size, patch_size=16,
                       layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                       architectures=["ViTModel"])
    ViTModel(config, add_pooling_layer=False).save_pretrained(out)
    processor = {"do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
                 "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "resample": 2, "size": image_size}
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))


def _save_dinov2(out: Path, size: dict, image_size: int, *, registers: bool) -> None:
    from transformers import (
        BitImageProcessor,
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    common = dict(size, patch_size=14, layerscale_value=1.0, mlp_ratio=4, layer_norm_eps=1e-6)
    if registers:  # facebook/dinov2-with-registers-base: config image 518, processor 256 -> centre crop 224
        config = Dinov2WithRegistersConfig(**common, image_size=2 * image_size, num_register_tokens=4,
                                           architectures=["Dinov2WithRegistersModel"])
        Dinov2WithRegistersModel(config).save_pretrained(out)
        mean, std, short = IMAGENET_MEAN, IMAGENET_STD, image_size + image_size // 7
    else:  # microsoft/rad-dino: a Dinov2Model; processor 518 -> 518, CXR mean/std
        config = Dinov2Config(**common, image_size=image_size, architectures=["Dinov2Model"])
        Dinov2Model(config).save_pretrained(out)
        mean, std, short = RAD_DINO_MEAN, RAD_DINO_STD, image_size
    BitImageProcessor(
        size={"shortest_edge": short}, crop_size={"height": image_size, "width": image_size}, do_center_crop=True,
        resample=3, image_mean=mean, image_std=std,
    ).save_pretrained(out)  # fmt: skip


def _save_timm_reg4(out: Path, width: int, depth: int, heads: int, image_size: int) -> None:
    import timm
    from safetensors.torch import save_file

    args = {"embed_dim": width, "depth": depth, "num_heads": heads, "img_size": image_size}
    model = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, num_classes=0, **args)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    config = {  # timm/vit_base_patch14_reg4_dinov2.lvd142m config.json, size fields shrunk
        "architecture": "vit_base_patch14_reg4_dinov2", "num_classes": 0, "num_features": width,
        "global_pool": "token", "model_args": args,
        "pretrained_cfg": {
            "tag": "lvd142m", "custom_load": False, "input_size": [3, image_size, image_size],
            "fixed_input_size": True, "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
            "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "num_classes": 0, "pool_size": None,
            "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0",
        },
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2))


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
