"""Build the DiNO-Diffusion components from a ModelSettings (a run's `model` section).

Saving and loading an inference-ready model folder lives in `dinodiff.pipeline` (models never import the
pipeline). A model folder (what every checkpoint and `best/` hold) is a `DiNODiffusionPipeline` folder, written by its
``save_pretrained``: ``model_index.json`` + ``unet/``, ``vae/``, ``scheduler/`` (DPM-Solver++), ``image_encoder/``
(the frozen encoder with its preprocessing, so the folder is self-contained), ``projection/``, plus
``model_config.yaml``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from dinodiff.config import AutoencoderSettings, EncoderSettings, ModelSettings, NoiseSettings, TrainingSettings
from dinodiff.data.cached import cache_key
from dinodiff.data.loader import first_images
from dinodiff.files import temporary_sibling
from dinodiff.models.autoencoders import (
    LatentAutoencoder,
    estimate_latent_stats,
    load_autoencoder,
)
from dinodiff.models.encoders import GlobalTokenEncoder, load_encoder
from dinodiff.models.projection import ConditionProjection
from dinodiff.models.random_init import save_random_encoder
from dinodiff.models.unet import UNET_PRESETS, build_unet

logger = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"
# The frozen encoder and autoencoder run in this precision on every path, so c_GLB and latents are the same
# numbers in training and generation: on-the-fly training and the cache call them inside frozen_precision
# (autocast off, whatever train.mixed_precision says: only the UNet uses autocast); generation, DiffSeg and
# FID reconstructions load them in fp32 and run no autocast.
FROZEN_DTYPE = torch.float32


class ModelNotFound(FileNotFoundError):
    """A model path that names no model folder; the message says what to give instead."""


@contextlib.contextmanager
def frozen_precision(device: torch.device | str) -> Iterator[None]:
    """Run the frozen models in FROZEN_DTYPE (fp32): autocast off, whatever the caller enabled."""
    with torch.autocast(device_type=torch.device(device).type, enabled=False):
        yield


def enable_tf32() -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions on CUDA (the fp32 frozen models, the fp32 parts of a
    step): ~8x the fp32 rate on A100/H100 at a 10-bit mantissa, which the frozen models' outputs tolerate
    (their values then differ from a strict-fp32 run by ~1e-3 relative). A no-op on CPUs."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def _looks_like_path(name: str) -> bool:
    """Not shaped like a hub id `owner/name`: a folder path, or a bare name (no hub pipeline is named so)."""
    return name.startswith(("/", ".", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", name)


def check_model_source(name_or_path: str | Path) -> str:
    """A model folder that exists, or a hub id (`owner/name`); otherwise ModelNotFound naming the path.

    Without this, a mistyped folder reaches diffusers as a hub id and fails with a repo-id error.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ModelNotFound(f"model not found: {path} is a file; give a model folder (RUN/best/model, "
                            "RUN/checkpoints/checkpoint-N, a run folder) or a hub id.")
    if _looks_like_path(name):
        raise ModelNotFound(f"model not found: no folder {path}; give a model folder (RUN/best/model, "
                            "RUN/checkpoints/checkpoint-N, a run folder) or a hub id (owner/name).")
    _check_hub_model(name)
    return name


def _check_hub_model(repo_id: str) -> None:
    """A hub id must be in the local hub cache, or (online) on the hub; else ModelNotFound."""
    import huggingface_hub as hub
    from huggingface_hub import constants

    if isinstance(hub.try_to_load_from_cache(repo_id, "model_index.json"), str):
        return
    hint = (f"no folder {repo_id} here, and the hub model {repo_id} is not in the local hub cache; "
            "give a model folder (RUN/best/model, RUN/checkpoints/checkpoint-N, a run folder)")
    # the env var too: huggingface_hub reads it once, at import, which may precede the caller's setting
    if constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise ModelNotFound(f"model not found: {hint} (offline: HF_HUB_OFFLINE is set).")
    try:
        found = hub.file_exists(repo_id, "model_index.json")
    except Exception as err:  # noqa: BLE001 - network, auth and validation errors: all mean "cannot get it"
        raise ModelNotFound(f"model not found: {hint}, and the hub could not be asked ({type(err).__name__}).") from None
    if not found:
        raise ModelNotFound(f"model not found: {hint}, and the hub has no pipeline {repo_id}.")


@dataclass
class Components:
    encoder: GlobalTokenEncoder
    autoencoder: LatentAutoencoder
    unet: UNet2DConditionModel
    projection: ConditionProjection
    noise_scheduler: DDPMScheduler

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)


def cache_home() -> Path:
    return Path(os.environ.get("DINODIFF_CACHE", Path.home() / ".cache" / "dinodiff"))


def resolve_encoder_path(name_or_path: str) -> str:
    """``random:<family>`` -> a folder holding a small random ViT of that family (made once, seed 0).

    Pretrained DINO weights need the internet; the random encoder lets demos and tests run the real
    loading code offline. Its tokens are a fixed random function of the image, not DINO features.
    """
    if not name_or_path.startswith(RANDOM_PREFIX):
        return name_or_path
    family = name_or_path[len(RANDOM_PREFIX):] or "transformers-vit"
    folder = cache_home() / "random-encoders" / family
    if not (folder / "config.json").is_file():
        # Several processes may race here: each writes a private folder, the first rename wins.
        # (atomic_folder would replace a winner's folder while another process reads it.)
        tmp = temporary_sibling(folder)
        with torch.random.fork_rng(devices=[]):  # making it must not shift the caller's RNG (UNet init)
            save_random_encoder(tmp, family=family)
        try:
            tmp.rename(folder)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def build_encoder(cfg: EncoderSettings) -> GlobalTokenEncoder:
    tokens = list(cfg.tokens) if cfg.tokens is not None else None
    return load_encoder(resolve_encoder_path(cfg.name_or_path), library=cfg.library, tokens=tokens,
                        image_size=cfg.image_size)


def build_autoencoder(cfg: AutoencoderSettings) -> LatentAutoencoder:
    return load_autoencoder(cfg.kind, cfg.path, scaling_factor=cfg.scaling_factor,
                            shift_factor=cfg.shift_factor, unshuffle_factor=cfg.unshuffle_factor)


def build_noise_scheduler(cfg: NoiseSettings) -> DDPMScheduler:
    return DDPMScheduler(**asdict(cfg))


def build_components(model_cfg: ModelSettings, autoencoder: LatentAutoencoder | None = None) -> Components:
    """Encoder, autoencoder, a freshly initialised (or SD-initialised) UNet and the projection."""
    encoder = build_encoder(model_cfg.encoder)
    autoencoder = autoencoder or build_autoencoder(model_cfg.autoencoder)
    if model_cfg.resolution % autoencoder.downscale:
        raise ValueError(f"model.resolution={model_cfg.resolution} is not a multiple of the autoencoder's "
                         f"downscale factor {autoencoder.downscale}.")
    overrides: dict[str, Any] = dict(model_cfg.unet.overrides)
    cross_dim = overrides.pop("cross_attention_dim", None)
    unet = build_unet(
        model_cfg.unet.preset,
        in_channels=autoencoder.latent_channels,
        sample_size=model_cfg.resolution // autoencoder.downscale,
        # The paper keeps SD's 768, equal to ViT-B's width, so the projection is the identity.
        cross_attention_dim=cross_dim or _preset_cross_dim(model_cfg.unet.preset, encoder.hidden_size),
        pretrained=model_cfg.unet.pretrained,
        **overrides,
    )
    projection = ConditionProjection(encoder.hidden_size, unet.config.cross_attention_dim)
    return Components(encoder, autoencoder, unet, projection, build_noise_scheduler(model_cfg.noise))


def _preset_cross_dim(preset: str, encoder_width: int) -> int:
    return int(UNET_PRESETS[preset].get("cross_attention_dim", encoder_width))


def ensure_latent_stats(ae, cfg: TrainingSettings, device: torch.device | str) -> None:
    """Estimate the latent scale/shift from the corpus when neither the config nor the autoencoder gives them."""
    ae_cfg = cfg.model.autoencoder
    if ae_cfg.scaling_factor is not None or ae.kind in ("kl", "tiny"):
        return  # given, or read from the autoencoder's own config
    images = first_images(str(cfg.data.shards), ae_cfg.estimate_stats_images, cfg.model.resolution, prefer_test=False,
                          on_corrupt=cfg.data.on_corrupt)
    scale, shift = estimate_latent_stats(ae, images.to(device).split(16), max_images=len(images))
    ae.set_latent_stats(scale, shift)
    logger.info("latent stats estimated on %d images: scaling_factor=%.4f shift_factor=%.4f", len(images), scale, shift)


def model_cache_key(model_cfg: ModelSettings) -> dict[str, Any]:
    """What a cache made for this model records (see dinodiff.data.cached.cache_key)."""
    return cache_key(model_cfg.resolution, asdict(model_cfg.encoder),
                     model_cfg.autoencoder.kind, model_cfg.autoencoder.path)
