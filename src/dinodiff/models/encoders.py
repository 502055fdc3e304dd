"""Frozen DINO-family image encoders that return only their *global* tokens, ``c_glb`` (B, S, N).

Patch tokens are never returned: conditioning on them lets the UNet copy the image. Supported layouts:

- ``transformers-vit`` (``ViTModel``, e.g. ``facebook/dino-vitb16``): CLS = ``last_hidden_state[:, 0]``,
  pooler = ``pooler_output`` (only when the checkpoint holds trained pooler weights: ``facebook/dino-vitb16``
  does not, transformers' DINO conversion saves ``ViTModel(add_pooling_layer=False)``).
- ``transformers-dinov2`` (``Dinov2Model`` e.g. ``microsoft/rad-dino``, ``Dinov2WithRegistersModel`` e.g.
  ``facebook/dinov2-with-registers-base``): sequence ``[CLS, reg_1..reg_R, patches]``.
- ``timm`` (e.g. ``timm/vit_base_patch14_reg4_dinov2.lvd142m``): ``forward_features(x)[:, :num_prefix_tokens]``
  = CLS + registers.

Every family also offers ``patch_mean``: the mean of the final (layer-normed) patch tokens, one global vector
(DINO's own ViT-B linear-evaluation descriptor is CLS concatenated with it, ``eval_linear.py --avgpool_patchtokens``).
It is spatially pooled, so it cannot let the UNet copy the image.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from torch import nn

from dinodiff.models.training_images import (
    TrainingImages,
    read_training_images,
    write_training_images,
)

logger = logging.getLogger(__name__)

TOKEN_NAMES = ("cls", "pooler", "registers", "patch_mean")
TOKEN_SOURCES = {
    "cls": "CLS token of the last layer (after the final norm)",
    "pooler": "pooler_output: the checkpoint's trained pooling layer",
    "registers": "register tokens of the last layer",
    "patch_mean": "mean of the last layer's patch tokens (after the final norm)",
}
NO_POOLER_NOTE = (
    "this checkpoint has no trained pooler (transformers converts facebook/dino-vitb16 without a pooling "
    "layer), so the paper's 'CLS + pooler' cannot be reproduced: a pooler made at load time would be random "
    "(tanh of a random projection of CLS, different at every load). Use tokens cls + patch_mean (the "
    "sd15-dinov1 preset's choice: two global tokens like the paper, the second DINO's own ViT-B descriptor) "
    "or cls alone."
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_DINOV2_TYPES = ("dinov2", "dinov2_with_registers")
GLOBAL_TOKENS_FILE = "global_tokens.json"


def parse_tokens(tokens: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """'cls+registers' / 'cls,pooler' / ['cls', 'pooler'] -> ('cls', ...); None stays None (model default)."""
    if tokens is None:
        return None
    names = tokens.replace(",", "+").split("+") if isinstance(tokens, str) else list(tokens)
    names = [n.strip().lower() for n in names if n.strip()]
    bad = [n for n in names if n not in TOKEN_NAMES]
    if bad or not names:
        raise ValueError(f"Unknown global token(s) {bad or tokens!r}; choose from {TOKEN_NAMES}.")
    if len(set(names)) != len(names):
        raise ValueError(f"Global tokens repeated in {names}.")
    return tuple(names)


def is_timm_source(name_or_path: str) -> bool:
    """True for 'timm/...', 'hf-hub:timm/...', 'local-dir:...' ids or a folder whose config.json has 'architecture'."""
    if name_or_path.startswith(("timm/", "hf-hub:", "local-dir:")):
        return True
    config = Path(name_or_path) / "config.json"
    if config.is_file():
        return "architecture" in json.loads(config.read_text())
    return False


class GlobalTokenEncoder(ModelMixin):
    """Wraps a frozen encoder; ``forward`` maps images in [0, 1] to the selected global tokens (B, S, N).

    A diffusers ModelMixin only so that a DiffusionPipeline can save/load it as a component: ``save_pretrained``
    writes the encoder in its own library's format plus ``global_tokens.json`` (tokens, image size, mean/std).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        family: str,
        available: dict[str, int],
        tokens: tuple[str, ...],
        hidden_size: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        name_or_path: str,
        native_image_size: int | None = None,
        processor_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        missing = [t for t in tokens if available.get(t, 0) == 0]
        if missing:
            have = {k: v for k, v in available.items() if v} or "none"
            raise ValueError(
                f"Encoder {name_or_path!r} ({family}) has no {missing} token(s); it has {have}. "
                f"Pick tokens from those, e.g. tokens={'+'.join(k for k, v in available.items() if v)!r}."
                + (" (DINOv2's pooler_output is the CLS token itself.)" if family == "transformers-dinov2" else "")
                + (f" Note: {NO_POOLER_NOTE}" if "pooler" in missing and family == "transformers-vit" else "")
            )
        self.model = model
        self.family = family
        self.available = dict(available)
        self.tokens = tuple(tokens)
        self.hidden_size = int(hidden_size)
        self.num_tokens = sum(available[t] for t in tokens)
        self.image_size = int(image_size)
        self.native_image_size = native_image_size or self.image_size
        self.name_or_path = name_or_path
        self.processor_config = processor_config
        # The images it was fitted to (`pretrain-encoder`'s training_images.json), kept through save/load; None
        # when unknown (a hub model).
        self.training_images: TrainingImages | None = None
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.model.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "GlobalTokenEncoder":
        """The encoder stays in eval mode whatever the caller asks (it is frozen, dropout off)."""
        return super().train(False)

    def token_notes(self) -> dict[str, str]:
        """What each selected token is, as written to the model folder's global_tokens.json."""
        notes = {t: TOKEN_SOURCES[t] for t in self.tokens}
        if self.family == "transformers-vit" and not self.available.get("pooler"):
            notes["pooler"] = "unavailable: " + NO_POOLER_NOTE
        return notes

    def to_config(self) -> dict[str, Any]:
        """What ``load_encoder`` needs to rebuild this encoder (saved with trained models)."""
        return {
            "name_or_path": self.name_or_path,
            "library": "timm" if self.family == "timm" else "transformers",
            "tokens": list(self.tokens),
            "image_size": self.image_size,
        }

    def save_pretrained(self, save_directory: str | Path, **_: Any) -> None:
        """Write the encoder (transformers or timm format) + global_tokens.json; reload with ``from_pretrained``."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        if self.family == "timm":
            from timm.models import save_for_hf

            save_for_hf(self.model, folder, safe_serialization=True)
        else:
            self.model.save_pretrained(folder)
            if self.processor_config is not None:
                (folder / "preprocessor_config.json").write_text(json.dumps(self.processor_config, indent=2))
        settings = {
            **self.to_config(),
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
            "token_notes": self.token_notes(),
        }
        (folder / GLOBAL_TOKENS_FILE).write_text(json.dumps(settings, indent=2))
        if self.training_images is not None:
            write_training_images(folder, self.training_images)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> "GlobalTokenEncoder":
        """Reload a folder written by ``save_pretrained`` (same tokens, image size and normalisation)."""
        folder = Path(pretrained_model_name_or_path)
        if kwargs.get("subfolder"):
            folder = folder / kwargs["subfolder"]
        settings = json.loads((folder / GLOBAL_TOKENS_FILE).read_text())
        enc = load_encoder(str(folder), settings["library"], settings["tokens"], settings["image_size"])
        enc.mean.copy_(torch.tensor(settings["mean"]).view(1, 3, 1, 1))
        enc.std.copy_(torch.tensor(settings["std"]).view(1, 3, 1, 1))
        if kwargs.get("torch_dtype") is not None:
            enc.model.to(kwargs["torch_dtype"])
        return enc

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1|3, H, W) in [0, 1] -> normalised (B, 3, image_size, image_size)."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Expected images (B, 1 or 3, H, W) in [0, 1], got shape {tuple(images.shape)}.")
        x = images.to(device=self.mean.device, dtype=torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bicubic", antialias=True, align_corners=False)
            x = x.clamp(0, 1)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        dtype = next(self.model.parameters()).dtype
        parts = self._global_tokens(x.to(dtype))
        return torch.cat([parts[t] for t in self.tokens], dim=1).float()

    def _global_tokens(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every available global token group as (B, k, N), before selection."""
        n_reg = self.available.get("registers", 0)
        if self.family == "timm":
            n_prefix = self.model.num_prefix_tokens
            features = self.model.forward_features(x)
            prefix = features[:, :n_prefix]
            n_cls = n_prefix - n_reg
            return {"cls": prefix[:, :n_cls], "registers": prefix[:, n_cls:],
                    "patch_mean": features[:, n_prefix:].mean(1, keepdim=True)}
        kwargs = {}
        if self.family == "transformers-vit" and self.image_size != self.native_image_size:
            kwargs["interpolate_pos_encoding"] = True  # Dinov2 always interpolates; ViT needs asking
        out = self.model(pixel_values=x, **kwargs)
        hidden = out.last_hidden_state
        parts = {"cls": hidden[:, :1], "registers": hidden[:, 1 : 1 + n_reg],
                 "patch_mean": hidden[:, 1 + n_reg :].mean(1, keepdim=True)}
        if self.available.get("pooler"):
            parts["pooler"] = out.pooler_output[:, None]
        return parts


def _processor_settings(name_or_path: str) -> tuple[int | None, Sequence[float], Sequence[float], dict | None]:
    """(image size, mean, std, raw config) from a transformers image-processor config; ImageNet when absent."""
    from transformers.image_processing_utils import ImageProcessingMixin

    try:
        cfg, _ = ImageProcessingMixin.get_image_processor_dict(name_or_path)
    except OSError:
        logger.warning("No image-processor config for %s: using ImageNet mean/std.", name_or_path)
        return None, IMAGENET_MEAN, IMAGENET_STD, None
    size = cfg.get("crop_size") if cfg.get("do_center_crop") else cfg.get("size")
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge")
    return size, cfg.get("image_mean") or IMAGENET_MEAN, cfg.get("image_std") or IMAGENET_STD, cfg


def _load_transformers(name_or_path: str, tokens: tuple[str, ...] | None, image_size: int | None) -> GlobalTokenEncoder:
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type == "vit":
        family = "transformers-vit"
    elif config.model_type in _DINOV2_TYPES:
        family = "transformers-dinov2"
    else:
        raise ValueError(
            f"{name_or_path!r} is a transformers '{config.model_type}' model; "
            f"supported: vit, {', '.join(_DINOV2_TYPES)} "
            "(or pass a timm model with library='timm')."
        )
    # fp32 explicitly: transformers >= 5 defaults to the checkpoint's dtype (fp16 would be slow and lossy on CPU)
    model, info = AutoModel.from_pretrained(name_or_path, output_loading_info=True, dtype=torch.float32)
    n_reg = int(getattr(config, "num_register_tokens", 0) or 0)
    available = {"cls": 1, "pooler": 0, "registers": n_reg, "patch_mean": 1}
    if family == "transformers-vit" and getattr(model, "pooler", None) is not None:
        if any(k.startswith("pooler.") for k in info["missing_keys"]):
            # A pooler missing from the checkpoint is freshly random at every load, so c_glb would differ between
            # training and generation: drop it (nor is it saved into model folders) rather than condition on noise.
            model.pooler = None
            logger.warning("%s: no 'pooler' token: %s", name_or_path, NO_POOLER_NOTE)
        else:
            available["pooler"] = 1
    if tokens is None:
        tokens = ("cls", "pooler") if available["pooler"] else ("cls", "registers") if n_reg else ("cls",)
    logger.info("%s: c_GLB = %s", name_or_path, " + ".join(f"{t} ({TOKEN_SOURCES[t]})" for t in tokens))
    proc_size, mean, std, proc_cfg = _processor_settings(name_or_path)
    native = int(config.image_size)
    return GlobalTokenEncoder(
        model, family=family, available=available, tokens=tokens, hidden_size=config.hidden_size,
        image_size=image_size or proc_size or native, mean=mean, std=std, name_or_path=name_or_path,
        native_image_size=native, processor_config=proc_cfg,
    )  # fmt: skip


def _timm_model_name(name_or_path: str) -> str:
    if name_or_path.startswith(("hf-hub:", "local-dir:")):
        return name_or_path
    if Path(name_or_path).is_dir():
        return f"local-dir:{Path(name_or_path).resolve()}"
    if name_or_path.startswith("timm/"):
        return f"hf-hub:{name_or_path}"
    return name_or_path  # a registry name with a pretrained tag, e.g. 'vit_small_patch14_reg4_dinov2.lvd142m'


def _load_timm(name_or_path: str, tokens: tuple[str, ...] | None, image_size: int | None) -> GlobalTokenEncoder:
    import timm
    from timm.data import resolve_data_config

    kwargs: dict[str, Any] = {"num_classes": 0}
    if image_size:
        kwargs["img_size"] = image_size  # timm resamples the position embeddings on load
    model = timm.create_model(_timm_model_name(name_or_path), pretrained=True, **kwargs)
    n_prefix = int(getattr(model, "num_prefix_tokens", 0))
    n_cls = 1 if getattr(model, "has_class_token", getattr(model, "cls_token", None) is not None) else 0
    if n_prefix == 0:
        raise ValueError(f"timm model {name_or_path!r} has no prefix (CLS/register) tokens: no global tokens to use.")
    available = {"cls": n_cls, "pooler": 0, "registers": n_prefix - n_cls, "patch_mean": 1}
    if tokens is None:
        tokens = tuple(t for t in ("cls", "registers") if available[t])
    data = resolve_data_config({}, model=model)
    return GlobalTokenEncoder(
        model, family="timm", available=available, tokens=tokens, hidden_size=model.embed_dim,
        image_size=image_size or data["input_size"][-1], mean=data["mean"], std=data["std"],
        name_or_path=name_or_path,
    )  # fmt: skip


def load_encoder(
    name_or_path: str,
    library: str = "auto",
    tokens: str | Sequence[str] | None = None,
    image_size: int | None = None,
) -> GlobalTokenEncoder:
    """Load a frozen global-token encoder from a hub id or local folder.

    library: 'transformers', 'timm' or 'auto' (timm for 'timm/...', 'hf-hub:...' ids or a folder whose
    config.json has timm's 'architecture' key; transformers otherwise). tokens: None for the model's default
    (ViT: cls+pooler when the checkpoint has a pooler, else cls; DINOv2 with registers and timm: cls+registers).
    image_size: encoder input resolution; default from the image-processor config / timm pretrained_cfg.
    'patch_mean' (mean of the final patch tokens) is available for every family but never a default.
    A local folder's `training_images.json` (see dinodiff.models.training_images) becomes `.training_images`.
    """
    name_or_path = str(name_or_path)
    wanted = parse_tokens(tokens)
    if library == "auto":
        library = "timm" if is_timm_source(name_or_path) else "transformers"
    if library == "timm":
        encoder = _load_timm(name_or_path, wanted, image_size)
    elif library == "transformers":
        encoder = _load_transformers(name_or_path, wanted, image_size)
    else:
        raise ValueError(f"library must be 'auto', 'transformers' or 'timm', got {library!r}.")
    if Path(name_or_path).is_dir():
        encoder.training_images = read_training_images(name_or_path)
    return encoder
