"""The frozen encoder and autoencoder give the same c_GLB and latents on every path (issue 10, item 5).

Training on the fly runs them inside the trainer's autocast (bf16 on GPUs); the cache, generation and
DiffSeg run them without. They must run in one precision (fp32, `models.factory.FROZEN_DTYPE`) everywhere.
Stated tolerance: the cache stores float16 (relative rounding 2**-11), so cached and on-the-fly values
may differ by max|a - b| <= 2**-9 * max|b| (a 4x margin for the latent sampling from rounded moments).
Measured on TAEF2 + a random ViT: 0.0008 (c_GLB) and 0.0010 (latents) with the frozen models in fp32;
0.015 and 0.057 when they ran under bf16 autocast (the old code), above the bounds 0.0045 and 0.0054.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

from dinodiff.cache import _augmented_views, build_cache
from dinodiff.config import with_overrides
from dinodiff.data.shards import list_shards, read_samples
from dinodiff.models.factory import FROZEN_DTYPE, build_components, frozen_precision
from dinodiff.train.data import TrainData

TOLERANCE = 2.0**-9  # of the tensor's largest magnitude: float16 storage rounding with margin


def _within_fp16_rounding(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= TOLERANCE * b.abs().max())


@pytest.fixture(scope="module")
def cached(prepared_phantoms, shared_data, tmp_path_factory) -> tuple:
    """A cache (1 augmented view per image) of the phantoms through TAEF2 and a random ViT, and its config."""
    root = tmp_path_factory.mktemp("precision")
    cfg = tiny_config(root / "run", prepared_phantoms, "model.resolution=64", "model.autoencoder.kind=taef2",
                      f"model.autoencoder.path={shared_data / 'weights' / 'taef2'}", "data.augment=true")
    build_cache(cfg, root / "cache", views=1, batch_size=8, progress=False)
    return cfg, root / "cache"


def test_on_the_fly_c_glb_and_latents_under_bf16_autocast_equal_the_cached_ones(cached):
    cfg, cache_dir = cached
    sample = next(read_samples(list_shards(cfg.data.shards, "train")))
    key = sample["__key__"]
    stored = next(s for s in read_samples(list_shards(cache_dir)) if s["__key__"] == key)
    moments = torch.from_numpy(np.load(io.BytesIO(stored["moments.npy"]))).float()
    c_cached = torch.from_numpy(np.load(io.BytesIO(stored["c_glb.npy"]))).float()

    # the same image and augmentation seed as the cache's view 0
    pixels = _augmented_views(sample["image"], key, 1, cfg.model.resolution, True, cfg.train.seed)
    parts = build_components(cfg.model)
    fly = TrainData(cfg, parts)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what the trainer's acc.autocast() is with bf16 on CPU
        latents_fly, c_fly = fly.latents_and_condition({"pixel_values": pixels}, torch.Generator().manual_seed(0))
    assert c_fly.dtype == FROZEN_DTYPE and latents_fly.dtype == FROZEN_DTYPE

    cfg = with_overrides(cfg, [f"data.cache={cache_dir}"])
    from_cache = TrainData(cfg, parts)
    latents_cache, c_cache = from_cache.latents_and_condition({"moments": moments, "c_glb": c_cached},
                                                              torch.Generator().manual_seed(0))
    assert c_fly.shape == c_cache.shape and latents_fly.shape == latents_cache.shape
    assert _within_fp16_rounding(c_fly, c_cache), (c_fly - c_cache).abs().max()
    assert _within_fp16_rounding(latents_fly, latents_cache), (latents_fly - latents_cache).abs().max()


def test_frozen_precision_turns_an_enclosing_autocast_off():
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
        with frozen_precision("cpu"):
            inside = layer(x)
    assert inside.dtype == torch.float32 and torch.equal(inside, layer(x))


def test_cache_json_states_the_frozen_precision(cached):
    info = json.loads((Path(cached[1]) / "cache.json").read_text())
    assert info["frozen_dtype"] == "float32" and info["skipped_shards"] == []
