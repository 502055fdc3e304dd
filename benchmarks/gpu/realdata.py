"""(d) of the GPU evidence run: the `gpu-cxr256` preset trained on the real CXRs of the bundle for a fixed
wall-clock budget, then evaluated: reconstructions and interpolation strips (`generate`), the
reconstruction source-retrieval rate and a Frechet distance in downsampled-pixel space, DiffSeg lung
segmentation with the prior and Otsu baselines (`segment`), the loss curve and sample grids.

Only the project's public functions are called (build_cache, train, generate_dataset, segment).
"""

from __future__ import annotations

import argparse
import csv
import logging
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dinodiff.cache import build_cache
from dinodiff.config import load_training_settings, with_overrides
from dinodiff.data.image_sets import iter_sources
from dinodiff.evaluate.fid.stage import fid_from_features
from dinodiff.evaluate.segment.stage import expand_models, segment
from dinodiff.generate import GenerateSettings
from dinodiff.generate.stage import generate_dataset
from dinodiff.train.trainer import train

logger = logging.getLogger("gpu-evidence")
PRESET = Path(__file__).resolve().parents[2] / "src" / "dinodiff" / "configs" / "gpu-cxr256.yaml"
PART_BYTES = 15 * 2**20  # < 16 MiB per returned file
MAX_PARTS = 3  # results.json, summary.md, evidence.log, training.png, evaluation.png + 3 parts = 8 files
# Toy sizes for the CPU dry run: 64 px, a 3-level 32-channel UNet, batches of 4, a few steps.
DRY_OVERRIDES = ["model.resolution=64", "train.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=8",
                 "data.num_holdout=2", "train.sample_steps=2", "model.unet.overrides.block_out_channels=[32,32,32]",
                 "model.unet.overrides.layers_per_block=1", "model.unet.overrides.norm_num_groups=8",
                 "model.unet.overrides.cross_attention_dim=32", "train.mixed_precision='no'"]


def make_config(args: argparse.Namespace, work: Path, checkpoint_every: int):
    bundle = Path(args.bundle).resolve()
    overrides = [f"data.shards={bundle / 'data' / 'cxr-covid'}", f"model.autoencoder.path={bundle / 'weights' / 'taef2'}",
                 f"train.run_dir={work / 'run'}", f"train.checkpoint_every={checkpoint_every}",
                 f"train.sample_every={checkpoint_every}", "train.keep_last=2", "train.log_every=10"]
    return load_training_settings(PRESET, overrides + (DRY_OVERRIDES if args.dry_run else []))


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.csv"
    return list(csv.DictReader(path.open())) if path.is_file() else []


def train_for(cfg, seconds: float, probe_steps: int, max_steps: int) -> dict:
    """Train `probe_steps`, measure the speed, then resume up to the step count that fills `seconds`."""
    start = time.time()
    train(with_overrides(cfg, [f"train.max_steps={probe_steps}"]))
    probe_wall = time.time() - start
    rows = read_metrics(Path(cfg.train.run_dir))
    loop_s = float(rows[-1]["elapsed_s"]) if rows else probe_wall
    # The loop's clock stops before the step's sample grid + checkpoint; half of the rest of the probe's wall
    # time (start-up, that grid and checkpoint) is charged to the loop as the per-checkpoint cost.
    rate = probe_steps / max(loop_s + 0.5 * max(probe_wall - loop_s, 0.0), 1e-6)
    left = seconds - probe_wall - 20  # 20 s: a second start-up and the final checkpoint
    total = int(min(max_steps, probe_steps + max(0, left) * rate))
    if total > probe_steps:
        train(with_overrides(cfg, [f"train.max_steps={total}"]))  # resumes from checkpoint-<probe_steps> (exact data stream, see dinodiff.train)
    rows = read_metrics(Path(cfg.train.run_dir))
    return {"probe_steps": probe_steps, "probe_wall_s": round(probe_wall, 1), "steps_per_s_probe": round(rate, 2),
            "steps": int(rows[-1]["step"]) if rows else 0, "train_wall_s": round(time.time() - start, 1),
            "final_loss": float(rows[-1]["loss"]) if rows else None,
            "images_per_s_last": float(rows[-1]["images_per_s"]) if rows else None}


def loss_curve(rows: list[dict]) -> tuple[list[int], list[float]]:
    return [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]


def pixel_features(images: np.ndarray, side: int) -> np.ndarray:
    """uint8 (N, H, W) -> area-downsampled grey pixels (N, side*side) in [0, 1]."""
    x = torch.from_numpy(images).float().div(255.0)[:, None]
    return F.adaptive_avg_pool2d(x, side).flatten(1).numpy()


def read_generated(folder: Path) -> tuple[np.ndarray, list[str]]:
    rows = list(csv.DictReader((folder / "labels.csv").open()))
    images = np.stack([np.array(Image.open(folder / r["path"]).convert("L")) for r in rows])
    return images, [r["source_a"] for r in rows]


def retrieval_and_fd(source: Path, recon: Path, resolution: int, limit: int | None) -> dict:
    """Own-source retrieval of reconstructions (nearest source in 32x32 pixels) and FD in 8x8 pixels (64-d)."""
    sources = list(iter_sources(source, size=resolution, limit=limit))
    test_ids = {s.id for s in iter_sources(source, size=resolution, split="test")}
    ids = [s.id for s in sources]
    real = np.stack([s.image for s in sources])
    fake, own = read_generated(recon)
    dist = torch.cdist(torch.from_numpy(pixel_features(fake, 32)), torch.from_numpy(pixel_features(real, 32)))
    nearest = [ids[i] for i in dist.argmin(dim=1).tolist()]
    hits = np.array([n == o for n, o in zip(nearest, own)])
    is_test = np.array([o in test_ids for o in own])
    real8, fake8 = pixel_features(real, 8), pixel_features(fake, 8)
    train_mask = np.array([i not in test_ids for i in ids])
    ref = (fid_from_features(real8[train_mask], real8[~train_mask])
           if train_mask.sum() > 2 and (~train_mask).sum() > 2 else None)
    return {"n_sources": len(ids), "n_reconstructions": len(own), "chance": round(1 / len(ids), 4),
            "retrieval_rate": round(float(hits.mean()), 4),
            "retrieval_rate_train_sources": round(float(hits[~is_test].mean()), 4) if (~is_test).any() else None,
            "retrieval_rate_test_sources": round(float(hits[is_test].mean()), 4) if is_test.any() else None,
            "retrieval_space": "32x32 area-downsampled grey pixels, L2, among all sources",
            "fd_pixels8": round(fid_from_features(real8, fake8), 4),
            "fd_reference_real_train_vs_real_test": None if ref is None else round(ref, 4),
            "fd_space": "Frechet distance of 8x8 area-downsampled grey pixels (64-d), reconstructions vs their "
                        "real sources (offline: no XRV/Inception weights on the device)"}


def run_generate(model: Path, source: Path, out: Path, strategy: str, limit: int | None, split: str | None,
                 steps: int, batch: int) -> Path:
    settings = GenerateSettings(strategy=strategy, ratio=1, seed=0, num_inference_steps=steps, shared_label=False,
                                r_values=[0.0, 0.25, 0.5, 0.75, 1.0] if strategy == "interpolation" else None,
                                source_options={"kind": "auto", "split": split, "limit": limit})
    return generate_dataset(model, source, out, settings, batch_size=batch, preview_rows=4, progress=False)


def fp16_model_tar(model: Path, out: Path, work: Path, name: str = "model-fp16") -> dict:
    """The model folder with every safetensors tensor in fp16, as NAME.tar holding NAME/ (split in < 16 MiB parts
    NAME.tar.partNN if needed)."""
    from safetensors.torch import load_file, save_file

    copy = work / name
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(model, copy)
    for path in copy.rglob("*.safetensors"):
        tensors = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(path).items()}
        save_file(tensors, path, metadata={"format": "pt"})
    tar_path = work / f"{name}.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(copy, arcname=name)
    size = tar_path.stat().st_size
    if size > MAX_PARTS * PART_BYTES:
        return {"files": [], "bytes": size, "skipped": f"over {MAX_PARTS} parts of {PART_BYTES} bytes: not returned"}
    if size <= PART_BYTES:
        shutil.copy(tar_path, out / tar_path.name)
        names = [tar_path.name]
    else:
        names, data = [], tar_path.read_bytes()
        for i in range(0, len(data), PART_BYTES):
            names.append(f"{name}.tar.part{i // PART_BYTES:02d}")
            (out / names[-1]).write_bytes(data[i:i + PART_BYTES])
    unet_params = sum(t.numel() for p in (copy / "unet").glob("*.safetensors") for t in load_file(p).values())
    return {"files": names, "bytes": size, "unet_params_M": round(unet_params / 1e6, 2),
            "join": f"cat {name}.tar.part* > {name}.tar; tar xf {name}.tar" if len(names) > 1 else f"tar xf {name}.tar",
            "load": f"dinodiff generate|segment {name} ... or DiNODiffusionPipeline.from_pretrained('{name}') "
                    "(fp16 weights load into fp32 modules)"}


def figures(out: Path, rows: list[dict], run_dir: Path, recon: Path, interp: Path, overlays: dict) -> list[str]:
    """training.png (loss curve + the last sample grid) and evaluation.png (reconstructions, interpolation
    strips, DiffSeg overlays)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    grids = sorted((run_dir / "samples").glob("step-*.png"))
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [1, 1.4]})
    steps, losses = loss_curve(rows)
    axes[0].plot(steps, losses)
    axes[0].set(xlabel="step", ylabel="loss (v-pred MSE)", title="training loss", yscale="log")
    if grids:
        axes[1].imshow(Image.open(grids[-1]), cmap="gray")
        axes[1].set_title(f"EMA reconstructions, {grids[-1].stem}")
    axes[1].axis("off")
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=90)
    plt.close(fig)
    written.append("training.png")
    panels = [(p, t) for p, t in ((recon / "preview.png", "reconstructions (sources | samples)"),
                                  (interp / "preview.png", "interpolation strips (A, r=0..1, B)")) if p.is_file()]
    panels += [(Path(p), f"DiffSeg {k}") for k, p in sorted(overlays.items())]
    if panels:  # one figure: 8 files at most come back, and the model may need 3 of them
        fig, axes = plt.subplots(len(panels), 1, figsize=(12, 5 * len(panels)), squeeze=False)
        for ax, (path, title) in zip(axes[:, 0], panels):
            ax.imshow(Image.open(path), cmap="gray")
            ax.set_title(title)
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out / "evaluation.png", dpi=80)
        plt.close(fig)
        written.append("evaluation.png")
    return written


def evaluate(args: argparse.Namespace, cfg, model: Path, work: Path) -> dict:
    bundle, dry = Path(args.bundle).resolve(), args.dry_run
    cxr, res = bundle / "data" / "cxr-covid", int(cfg.model.resolution)
    limit = 6 if dry else None
    result: dict = {"model": str(model)}
    t0 = time.time()
    recon, interp = work / "recon", work / "interp"
    attempt(result, "generate_reconstruction", lambda: str(run_generate(
        model, cxr, recon, "reconstruction", limit, None, 2 if dry else 25, 4 if dry else 100)))
    attempt(result, "generate_interpolation", lambda: str(run_generate(
        model, cxr, interp, "interpolation", 4 if dry else 8, None if dry else "test", 2 if dry else 25, 4 if dry else 32)))
    result["generate_s"] = round(time.time() - t0, 1)
    attempt(result, "reconstruction", lambda: retrieval_and_fd(cxr, recon, res, limit))
    t0 = time.time()
    seg = attempt(result, "segment", lambda: segment(
        [model], [bundle / "data" / "lungs-covid", bundle / "data" / "lungs-shenzhen"], work / "segment",
        thresholds=[0.05, 0.1, 0.2], grid_sizes=[4 if dry else 16], batch_size=16, limit=3 if dry else None,
        n_overlay=1 if dry else 2)) or {}
    if seg:
        result["segment"] = {"table_md": Path(seg["tables"]["markdown"]).read_text(),
                             **{k: v for k, v in seg.items() if k not in ("tables", "overlays", "per_image", "records")}}
    result["segment_s"] = round(time.time() - t0, 1)
    attempt(result, "figures", lambda: figures(Path(args.out), read_metrics(Path(cfg.train.run_dir)),
                                               Path(cfg.train.run_dir), recon, interp, seg.get("overlays", {})))
    return result


def attempt(result: dict, key: str, func):
    """result[key] = func(), or the error under result[key + '_error'] (the later steps still run)."""
    try:
        result[key] = func()
        return result[key]
    except Exception as err:  # noqa: BLE001 - evidence records failures and goes on
        logger.exception("%s failed", key)
        result[f"{key}_error"] = f"{type(err).__name__}: {err}"[:1500]
        return None


def real_data(args: argparse.Namespace) -> dict:
    """Cache, train for the time left (minus the evaluation's reserve), evaluate, pack the model."""
    work, dry = Path(args.work), args.dry_run
    start, eval_reserve = time.time(), 20 if dry else 85
    cfg = make_config(args, work, checkpoint_every=2 if dry else 250)
    result: dict = {"preset": str(PRESET.name), "encoder": "random ViT (random:transformers-vit; no hub weights offline)",
                    "autoencoder": "TAEF2 (pretrained, bundle)", "dry_run": dry}
    t0 = time.time()
    views = 2 if dry else 8
    info = build_cache(cfg, work / "cache", views=views, batch_size=64, progress=False)
    cfg = with_overrides(cfg, [f"data.cache={work / 'cache'}"])
    result["cache"] = {"images": info.get("count"), "views": views, "seconds": round(time.time() - t0, 1)}
    args.save_partial(result)
    train_seconds = args.budget_s - (time.time() - start) - eval_reserve
    result["train"] = train_for(cfg, train_seconds, probe_steps=2 if dry else 250, max_steps=6 if dry else 20000)
    result["train"]["budget_s"] = round(train_seconds, 1)
    model = expand_models([cfg.train.run_dir])[-1]
    result["loss_curve"] = [[s, round(v, 5)] for s, v in zip(*loss_curve(read_metrics(Path(cfg.train.run_dir))))]
    result["model_tar"] = fp16_model_tar(model, Path(args.out), work)
    args.save_partial(result)  # a kill during the evaluation keeps the training figures
    result["eval"] = evaluate(args, cfg, model, work)
    return result
