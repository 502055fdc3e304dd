"""(g) of the GPU evidence run (issue 23): the segmentation recipe (`gpu-seg256`: self-attention at every
UNet level) trained on the real CXRs of the bundle for the section's budget, then zero-shot lung segmentation
on both lung sets: DiffSeg, ncut-inputs and ncut-superpixels chosen on the tuning split and reported on the
report split beside the leave-one-out mean-mask prior, Otsu, image-only superpixels, position-only k-means and the
whole image (`dinodiff segment`).

The encoder is the bundle's pretrained domain encoder (.gpu/weights/encoder, written by `make gpu-bundle`
when BUNDLE_ENCODER names a `pretrain-encoder` output) when present, else a random ViT; results say which.
Only the project's public functions are called (build_cache, train, segment).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

from realdata import fp16_model_tar, read_metrics, train_for  # benchmarks/gpu/realdata.py, beside this file

from dinodiff.cache import build_cache
from dinodiff.config import load_training_settings, with_overrides
from dinodiff.evaluate.segment.stage import expand_models, segment

logger = logging.getLogger("gpu-evidence")
PRESET = Path(__file__).resolve().parents[2] / "src" / "dinodiff" / "configs" / "gpu-seg256.yaml"
# Toy sizes for the CPU dry run: 64 px (TAEF2 -> 8x8 latents), a 3-level 32-channel UNet, a few steps.
DRY_OVERRIDES = ["model.resolution=64", "train.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=8",
                 "data.num_holdout=2", "train.sample_steps=2", "model.unet.overrides.block_out_channels=[32,32,32]",
                 "model.unet.overrides.norm_num_groups=8", "train.mixed_precision='no'"]
# The grid searched on the tuning split: faithful DiffSeg, ncut-inputs and ncut-superpixels (the best zero-shot
# method on the CPU models: BENCHMARKS.md "Ncut over superpixels"), each also with connected components.
# The cuts read the 16x16 map: scipy's dense eigh on the 32x32 map (1024 nodes) costs ~40x more per cut.
# Node scales 50 and 100, as on the CPU: at 256 px they give ~186 and ~102 superpixels whose best grouping reaches
# 91.1 and 84.8 Dice; larger scales with the 64 px node counts (400, 800) leak across the lung edges (49.6, 22.6;
# benchmarks/superpixel_ceiling.py). Superpixels and pooled features are computed once per image and scale.
# The training images among the lung sets (the bundle's cxr-covid holds 37 of them) only tune: segment finds them.
GRID = dict(methods=("diffseg", "ncut-inputs", "ncut-superpixels"), refinements=("none", "components"),
            thresholds=[0.1, 0.2, 0.3], threshold_mode="relative", grid_sizes=[8, 16], taus=[0.5, 0.7, 0.9],
            alphas=[5.0, 10.0], feature_sides=[16], node_scales=[50.0, 100.0], timesteps=[(50,), (50, 150, 300)],
            batch_size=16)
DRY_GRID = dict(GRID, thresholds=[0.2], grid_sizes=[4], taus=[0.5], feature_sides=[0], node_scales=[50.0],
                timesteps=[(50,)], limit=3, batch_size=4)


def make_config(args: argparse.Namespace, work: Path, checkpoint_every: int):
    bundle = Path(args.bundle).resolve()
    encoder = bundle / "weights" / "encoder"
    overrides = [f"data.shards={bundle / 'data' / 'cxr-covid'}", f"model.autoencoder.path={bundle / 'weights' / 'taef2'}",
                 f"train.run_dir={work / 'run'}", f"train.checkpoint_every={checkpoint_every}",
                 f"train.sample_every={checkpoint_every}", "train.keep_last=2", "train.log_every=10",
                 f"model.encoder.name_or_path={encoder if encoder.is_dir() else 'random:transformers-vit'}"]
    return load_training_settings(PRESET, overrides + (DRY_OVERRIDES if args.dry_run else []))


def segment_recipe(args: argparse.Namespace) -> dict:
    """Cache, train for the budget minus the evaluation's reserve, segment both lung sets. With --return-model the
    model comes back as seg-model-fp16.tar (before segment starts, so an overrun keeps it) with one overlay."""
    work, dry = Path(args.work), args.dry_run
    # The evaluation's reserve: segment of the 110 images with GRID's 48 DiffSeg and ncut-inputs cells took 76.6 s
    # on an H200 (2026-12-04); ncut-superpixels adds 48 cells (not yet timed on a GPU: ~10 s of Felzenszwalb on the
    # host, then cuts of ~100-350 nodes), plus the overlays and the model export.
    start, eval_reserve = time.time(), 40 if dry else 240
    cfg = make_config(args, work, checkpoint_every=2 if dry else 500)
    result: dict = {"preset": PRESET.name, "encoder": str(cfg.model.encoder.name_or_path),
                    "autoencoder": "TAEF2 (pretrained, bundle)", "dry_run": dry}
    t0 = time.time()
    info = build_cache(cfg, work / "cache", views=2 if dry else 8, batch_size=64, progress=False)
    cfg = with_overrides(cfg, [f"data.cache={work / 'cache'}"])
    result["cache"] = {"images": info.get("count"), "seconds": round(time.time() - t0, 1)}
    args.save_partial(result)
    seconds = args.budget_s - (time.time() - start) - eval_reserve
    result["train"] = train_for(cfg, seconds, probe_steps=2 if dry else 250, max_steps=6 if dry else 30000)
    result["train"]["budget_s"] = round(seconds, 1)
    result["loss_curve"] = [[int(r["step"]), round(float(r["loss"]), 5)] for r in read_metrics(Path(cfg.train.run_dir))]
    args.save_partial(result)
    model = expand_models([cfg.train.run_dir])[-1]
    if args.return_model:
        result["model_tar"] = fp16_model_tar(model, Path(args.out), work, name="seg-model-fp16")
        args.save_partial(result)
    bundle = Path(args.bundle).resolve()
    t0 = time.time()
    seg = segment([model], [bundle / "data" / "lungs-covid", bundle / "data" / "lungs-shenzhen"], work / "segment",
                  n_overlay=2 if args.return_model else 0, **(DRY_GRID if dry else GRID))
    result["segment"] = {"table_md": Path(seg["tables"]["markdown"]).read_text(), "leader": seg["leader"],
                         "training_images": seg["training_images"]["statement"],
                         "dice": {m: v["summary"]["combined"]["hungarian_both"] for m, v in seg["methods"].items()},
                         "tuning_dice": {m: v["tuning_dice"] for m, v in seg["methods"].items() if v["tuning_dice"]},
                         "best": seg["best_by_method"], "splits": {k: len(v) for k, v in seg["splits"].items()},
                         "seconds": round(time.time() - t0, 1)}
    overlay = seg.get("overlays", {}).get(f"{seg['leader']}-lungs-covid")
    if overlay:  # the leader's best and worst report images (one file: 8 come back)
        name = f"seg-overlay-{Path(overlay).name}"
        shutil.copy(overlay, Path(args.out) / name)
        result["segment"]["overlay"] = name
    return result
