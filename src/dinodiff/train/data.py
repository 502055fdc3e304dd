"""What the trainer feeds on: prepared shards (frozen models run on the fly) or the latent cache.

Both paths give the same thing to the loss: normalised latents (B, C, h, w) and c_GLB (B, S, N).
The frozen encoder and autoencoder run in fp32 on both (`models.factory.frozen_precision`), never in the
trainer's bf16/fp16 autocast, so on-the-fly values match the cache's and generation's.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from dinodiff.config import TrainingSettings
from dinodiff.data.cached import build_cache_loader, read_cache_info
from dinodiff.data.loader import build_train_loader, first_images
from dinodiff.data.shards import list_shards
from dinodiff.models.factory import (
    FROZEN_DTYPE,
    Components,
    ensure_latent_stats,
    frozen_precision,
    model_cache_key,
)

logger = logging.getLogger(__name__)


def _stream_seed(seed: int, segment: int, rank: int) -> int:
    return (seed * 1_000_003 + segment * 7919 + rank * 104_729) % (2**31)


def check_data_config(cfg: TrainingSettings) -> None:
    """Fail before any model is built when the run has no data to read."""
    if not cfg.data.cache and not cfg.data.shards:
        raise ValueError("No training data: set data.shards=<prepared folder or shard pattern> "
                         "(from `dinodiff prepare`) or data.cache=<folder from `dinodiff cache`>.")
    if cfg.data.cache:
        if not (Path(cfg.data.cache) / "cache.json").is_file():
            raise FileNotFoundError(f"latent cache not found at {cfg.data.cache} (no cache.json); run `dinodiff cache "
                                    f"--config ... --out {cfg.data.cache}`, or drop data.cache to read data.shards.")
        return
    missing = _missing_shards(str(cfg.data.shards))
    if missing is not None:
        raise FileNotFoundError(f"prepared shards not found at {missing}; run `dinodiff prepare SOURCES --out "
                                f"{missing}` (or point data.shards at a prepared folder or shard files).")


def _missing_shards(shards: str) -> str | None:
    """The local path of `shards` that holds no shards (a folder, a file or a brace pattern); None if fine or remote."""
    import webdataset as wds

    if "://" in shards or shards.startswith("pipe:"):
        return None  # a URL: only webdataset can tell
    path = Path(shards).expanduser()
    if path.is_dir():
        return None if list_shards(path) else str(path)
    for url in wds.shardlists.expand_urls(shards):
        if not Path(url).expanduser().is_file():
            return url
    return None


class TrainData:
    def __init__(self, cfg: TrainingSettings, parts: Components, *, process_index: int = 0, num_processes: int = 1):
        self.cfg, self.parts = cfg, parts
        self.rank, self.world = process_index, num_processes
        self.device = next(parts.unet.parameters()).device
        self._holdout: torch.Tensor | None = None
        self.cache_info: dict | None = None
        if cfg.data.cache:
            self.cache_info = read_cache_info(cfg.data.cache, model_cache_key(cfg.model))
            parts.autoencoder.set_latent_stats(self.cache_info["scaling_factor"], self.cache_info["shift_factor"])
        else:
            ensure_latent_stats(parts.autoencoder, cfg, self.device)
        logger.info("frozen encoder and autoencoder run in %s, outside the UNet's autocast", FROZEN_DTYPE)

    # -------------------------------------------------------------------------------- streams
    def batches(self, *, segment: int, skip: int = 0) -> Iterator[dict]:
        """An endless stream of micro-batches for this rank, deterministic in (seed, segment, rank)."""
        seed = _stream_seed(self.cfg.train.seed, segment, self.rank)
        if self.cache_info is not None:
            loader = build_cache_loader(self.cfg.data.cache, batch_size=self.cfg.train.batch_size,
                                        num_workers=self.cfg.data.num_workers, seed=seed,
                                        shuffle_buffer=self.cfg.data.shuffle_buffer, on_corrupt=self.cfg.data.on_corrupt)
        else:
            loader = build_train_loader(self.cfg.data.shards, batch_size=self.cfg.train.batch_size,
                                        num_workers=self.cfg.data.num_workers, size=self.cfg.model.resolution,
                                        augment=self.cfg.data.augment, resampled=True, seed=seed,
                                        shuffle_buffer=self.cfg.data.shuffle_buffer, split_by_node=True,
                                        on_corrupt=self.cfg.data.on_corrupt)
        return itertools.islice(iter(loader), skip, None)

    def latents_and_condition(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        ae = self.parts.autoencoder
        with torch.no_grad(), frozen_precision(self.device):  # fp32 whatever the UNet's autocast
            if self.cache_info is not None:
                # non_blocking: from pinned loader memory the copy overlaps the GPU's work instead of waiting for it
                moments = batch["moments"].to(self.device, torch.float32, non_blocking=True)
                c_glb = batch["c_glb"].to(self.device, torch.float32, non_blocking=True)
                return ae.moments_to_latents(moments, generator=generator), c_glb
            pixels = batch["pixel_values"].to(self.device, torch.float32, non_blocking=True)
            return ae.encode(pixels, generator=generator), self.parts.encoder(pixels)

    # ---------------------------------------------------------------------- held-out images
    def holdout_images(self) -> torch.Tensor:
        """The first `data.num_holdout` images of the test split (else train), un-augmented, (N,1,H,W) in [0,1]."""
        if self._holdout is None:
            self._holdout = first_images(self._source_shards(), self.cfg.data.num_holdout, self.cfg.model.resolution,
                                         on_corrupt=self.cfg.data.on_corrupt)
        return self._holdout

    def _source_shards(self) -> str:
        if self.cfg.data.shards:
            return str(self.cfg.data.shards)
        return str(self.cache_info["source_shards"])
