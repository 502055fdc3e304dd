"""Issue 22's sections of the GPU evidence run: the real `Trainer` at sd15/512, and generation precision.

(e) `trainer_steps`: `Trainer._optimizer_step` (the real loop: cached moments + c_GLB read by the WebDataset
loader, bf16 autocast, fused AdamW, channels-last, TF32, no host sync) at sd15 / 512 px, with the bare-UNet step
beside it in the same process; the SDPA backends (train.sdpa_backend); batch and gradient checkpointing up to the
card's memory, from which the batch / accumulation for 80 GB and 141 GB cards is chosen; bitsandbytes 8-bit AdamW
(the paper's); torch.compile (mode default) when the budget allows.

(f) `generate_precision`: the trained `gpu-cxr256` model of (d) samples the same seeds in fp32 and in bf16
(UNet + VAE decode; encoder fp32): pixel differences and images/s of both.

Weights are random in (e) (the cost does not depend on them). The CPU dry run runs the same code on the test-sized
`tiny` UNet at 64 px.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from sections import (
    Sizes,
    chip_peak,
    count_train_flops,
    save_partial,
    sizes,
    sync,
    time_train,
    timed_steps,
    train_scheduler,
)

from dinodiff.config import load_training_settings, with_overrides
from dinodiff.data.shards import write_shard
from dinodiff.models.random_init import save_random_encoder
from dinodiff.pipeline import to_uint8_array
from dinodiff.pipeline.sample import load_pipeline, sample_batches
from dinodiff.runs import resolve_model
from dinodiff.sampling import item_seed
from dinodiff.train.performance import make_optimizer
from dinodiff.train.trainer import Trainer

logger = logging.getLogger("gpu-evidence")
CACHE_SAMPLES = 256  # random cached samples the trainer streams (4 shards)
EFFECTIVE_BATCH_PER_GPU = 128  # the paper's 512 images per optimizer step over 4 GPUs
CARDS_GIB = {"80 GB (H100/A100)": 80, "141 GB (H200)": 141}


# ------------------------------------------------------------------------------------------- set-up
def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def random_model_parts(work: Path, sz: Sizes) -> tuple[Path, Path]:
    """A random ViT (only its width matters: training reads c_GLB from the cache) and an SD-v1-shaped-latent KL VAE
    (4 latent channels, /8; small widths: training reads latent moments from the cache, the VAE never runs)."""
    from diffusers import AutoencoderKL

    vit = save_random_encoder(work / "vit", hidden_size=sz.cross_dim, num_layers=1, num_heads=2, patch_size=16,
                              image_size=224)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=8, scaling_factor=0.18215)
    vae.save_pretrained(work / "vae")
    return vit, work / "vae"


def random_cache(folder: Path, cfg, sz: Sizes) -> Path:
    """A `dinodiff cache` folder of random KL moments (8, h, w) and c_GLB (2, N), in the cache's own format."""
    rng = np.random.default_rng(0)
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    per_shard = CACHE_SAMPLES // 4
    for shard in range(4):
        samples = [{"__key__": f"s{i:06d}", "json": {"id": f"s{i:06d}"},
                    "moments.npy": _npy(rng.standard_normal((1, 8, sz.latent, sz.latent)).astype(np.float16)),
                    "c_glb.npy": _npy(rng.standard_normal((1, sz.tokens, sz.cross_dim)).astype(np.float16))}
                   for i in range(shard * per_shard, (shard + 1) * per_shard)]
        write_shard(folder / "shards" / f"train-{shard:06d}.tar", samples)
    info = {"version": 1, "source_shards": str(folder), "views": 1, "resolution": sz.image_px, "augment": False,
            "seed": 0, "encoder": asdict(cfg.model.encoder),
            "autoencoder": asdict(cfg.model.autoencoder), "scaling_factor": 0.18215,
            "shift_factor": 0.0, "count": CACHE_SAMPLES, "latent_channels": 4, "hidden_size": sz.cross_dim,
            "num_tokens": sz.tokens, "frozen_dtype": "float32", "skipped_shards": []}
    (folder / "cache.json").write_text(json.dumps(info))
    return folder


def make_trainer(args: argparse.Namespace, sz: Sizes) -> Trainer:
    work = Path(args.work)
    vit, vae = random_model_parts(work, sz)
    overrides = [f"model.resolution={sz.image_px}", f"model.encoder.name_or_path={vit}", "model.autoencoder.kind=kl",
                 f"model.autoencoder.path={vae}", f"model.unet.preset={sz.preset}", f"train.run_dir={work / 'run'}",
                 f"data.cache={work / 'cache'}", f"data.num_workers={0 if args.dry_run else 6}",
                 "data.shuffle_buffer=32", "train.grad_accum=1", "train.ema=false", "optim.warmup_steps=0",
                 "optim.use_8bit_adam=false", "train.log_every=1000000", "train.checkpoint_every=1000000",
                 "train.sample_every=1000000", f"train.batch_size={sz.train_batches[0]}"]
    cfg = load_training_settings(None, overrides + (["train.mixed_precision='no'"] if args.dry_run else []))
    random_cache(work / "cache", cfg, sz)
    return Trainer(cfg)


# ------------------------------------------------------------------------------------------ timing
def reconfigure(trainer: Trainer, overrides: list[str]) -> None:
    """Give a built trainer (and its data stream) other settings between rows, without rebuilding its models."""
    trainer.cfg = trainer.data.cfg = with_overrides(trainer.cfg, overrides)


def time_trainer(trainer: Trainer, batch: int, steps: int, seconds: float) -> dict:
    """Steps of the real loop (data included) after warm-up; nothing in a step waits for the GPU."""
    reconfigure(trainer, [f"train.batch_size={batch}"])
    batches = trainer._batches()
    return timed_steps(lambda: trainer._optimizer_step(batches)[0], batch, trainer.accelerator.device, steps, seconds)


class Rows:
    """Measured rows of the section, each guarded: an error or out-of-memory is recorded and the next row runs."""

    def __init__(self, args: argparse.Namespace, info: dict, flops: float, peak_tflops: float | None):
        self.args, self.info, self.flops, self.peak = args, info, flops, peak_tflops
        self.deadline = time.time() + args.budget_s
        self.rows: list[dict] = info["rows"]

    def left(self) -> float:
        return self.deadline - time.time()

    def measure(self, row: dict, run, need_s: float = 8.0) -> dict:
        if self.left() < need_s:
            row["status"] = "skipped: section time budget spent"
        else:
            try:
                row.update(run())
            except torch.cuda.OutOfMemoryError as err:
                row["status"] = f"out of memory: {str(err)[:160]}"
            except Exception as err:  # noqa: BLE001 - evidence records and goes on
                logger.exception("row %s failed", row)
                row["status"] = f"failed: {type(err).__name__}: {str(err)[:300]}"
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if "images_per_s" in row and self.peak:
            row["model_tflops_per_s"] = round(self.flops * row["images_per_s"] / 1e12, 1)
            row["mfu"] = round(self.flops * row["images_per_s"] / (self.peak * 1e12), 4)
        self.rows.append(row)
        logger.info("trainer row %s", row)
        save_partial(self.args, self.info)
        return row


def recommend(rows: list[dict], optimizer: str) -> dict:
    """Per card: the fastest trainer configuration whose peak memory leaves 10% free, and its accumulation for the
    paper's 128 images per GPU per optimizer step."""
    out = {}
    fits = [r for r in rows if r.get("kind") == "trainer" and r.get("sdpa_backend") == "auto"
            and r.get("peak_mem_GiB") and r.get("images_per_s") and r.get("optimizer") == optimizer]
    for card, gib in CARDS_GIB.items():
        ok = [r for r in fits if r["peak_mem_GiB"] <= 0.9 * gib]
        best = max(ok, key=lambda r: r["images_per_s"], default=None)
        out[card] = None if best is None else {
            "batch_size": best["batch"], "gradient_checkpointing": best["gradient_checkpointing"],
            "grad_accum": max(1, math.ceil(EFFECTIVE_BATCH_PER_GPU / best["batch"])),
            "images_per_s": best["images_per_s"], "peak_mem_GiB": best["peak_mem_GiB"]}
    return out


# ----------------------------------------------------------------------------------------- sections
def trainer_steps(args: argparse.Namespace) -> dict:
    """(e) the real trainer at sd15 / 512 px beside the bare UNet step; SDPA backends; memory; 8-bit Adam; compile."""
    sz, device = sizes(args.dry_run), args.device
    t0 = time.time()
    trainer = make_trainer(args, sz)
    unet = trainer.parts.unet
    peak = chip_peak()
    flops = count_train_flops(unet, sz, device)
    info = {"unet": sz.preset, "image_px": sz.image_px, "latents": [4, sz.latent, sz.latent],
            "c_glb": [sz.tokens, sz.cross_dim], "setup_s": round(time.time() - t0, 1), "flops_per_image_fwd_bwd": flops,
            "trainer": "Trainer._optimizer_step on cached random moments + c_GLB (WebDataset loader, 6 workers), "
                       "bf16 autocast, channels-last, TF32, no host sync; AdamW fused unless said",
            **peak, "rows": []}
    rows = Rows(args, info, flops, peak["peak_tflops"])
    big, seconds = sz.train_batches[-1], (1.0 if args.dry_run else 3.0)
    fused = "adamw-fused" if device.type == "cuda" else "adamw"
    base = {"kind": "trainer", "sdpa_backend": "auto", "gradient_checkpointing": False, "optimizer": fused}
    # In order of what matters most, so that a short budget drops the least useful rows.
    for batch in sz.train_batches:  # the real loop, and the bare UNet step beside it
        rows.measure({**base, "batch": batch}, lambda b=batch: time_trainer(trainer, b, 12, seconds))
        bare = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=device.type == "cuda")
        rows.measure({"kind": "bare UNet (sections.train_step)", "batch": batch},
                     lambda b=batch, o=bare: time_train(unet, o, train_scheduler(), sz, b, device, 12, seconds))
        del bare
    memory_plan = [(True, b) for b in ((2,) if args.dry_run else (32, 64))]
    memory_plan += [(False, b) for b in ((3,) if args.dry_run else (48, 64))] + ([] if args.dry_run else [(True, 96)])
    for checkpointing, batch in memory_plan:
        unet.enable_gradient_checkpointing() if checkpointing else unet.disable_gradient_checkpointing()
        rows.measure({**base, "gradient_checkpointing": checkpointing, "batch": batch},
                     lambda b=batch: time_trainer(trainer, b, 12, seconds))
    unet.disable_gradient_checkpointing()
    info["recommended"] = recommend(rows.rows, fused)
    eight_bit(trainer, rows, base, big, seconds, args.dry_run)
    for backend in ("math",) if args.dry_run else ("flash", "efficient", "cudnn", "math"):
        reconfigure(trainer, [f"train.sdpa_backend={backend}"])
        rows.measure({**base, "sdpa_backend": backend, "batch": big, "optimizer": optimizer_name(trainer)},
                     lambda: time_trainer(trainer, big, 12, seconds))
    reconfigure(trainer, ["train.sdpa_backend=auto"])
    compiled(trainer, rows, base, big, seconds, args.dry_run)
    return info


def optimizer_name(trainer: Trainer) -> str:
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    if type(inner).__name__ == "AdamW8bit":
        return "bitsandbytes AdamW8bit"
    return "adamw-fused" if inner.defaults.get("fused") else "adamw"


def eight_bit(trainer: Trainer, rows: Rows, base: dict, batch: int, seconds: float, dry: bool) -> None:
    """bitsandbytes AdamW8bit (the paper's optimizer) in place of fused AdamW, on the same trainer."""
    row = {**base, "optimizer": "bitsandbytes AdamW8bit", "batch": batch}
    if dry or not torch.cuda.is_available():
        rows.rows.append({**row, "status": "skipped: needs CUDA"})
        return
    try:
        import bitsandbytes  # optional: from the bundle's slimmed wheel

        rows.info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError as err:
        rows.rows.append({**row, "status": f"skipped: bitsandbytes not importable ({err})"})
        return
    reconfigure(trainer, ["optim.use_8bit_adam=true"])
    acc = trainer.accelerator
    old = trainer.optimizer
    trainer.optimizer = acc.prepare_optimizer(make_optimizer(trainer.model.parameters(), trainer.cfg.optim, True))
    acc._optimizers.remove(old)  # drop fused AdamW's fp32 states so the row's memory is the 8-bit optimizer's
    del old
    rows.measure(row, lambda: time_trainer(trainer, batch, 12, seconds))


def compiled(trainer: Trainer, rows: Rows, base: dict, batch: int, seconds: float, dry: bool) -> None:
    """train.compile=default: torch.compile of the UNet's forward (the first steps compile; timed after them)."""
    row = {**base, "optimizer": optimizer_name(trainer), "compile": "default", "batch": batch}
    if dry:
        rows.rows.append({**row, "status": "skipped in the dry run (a C++ toolchain compile on the CPU)"})
        return

    def run() -> dict:
        start = time.time()
        trainer.parts.unet.compile(mode="default")
        result = time_trainer(trainer, batch, 20, seconds)
        result["with_compile_s"] = round(time.time() - start, 1)
        return result

    rows.measure(row, run, need_s=75.0)


def generate_precision(args: argparse.Namespace) -> dict:
    """(f) the same seeds in fp32 and bf16 (UNet + projection + VAE decode; the encoder stays fp32)."""
    from dinodiff.data.image_sets import iter_sources

    device = args.device
    run = Path(args.work).parent / "real_data" / "run"
    model = resolve_model(run).location if (run / "checkpoints").is_dir() else random_cxr_model(args)
    batch, batches = (1, 1) if args.dry_run else (16, 2)
    sources = [s.image for s in iter_sources(Path(args.bundle) / "data" / "cxr-covid", size=64 if args.dry_run else 256,
                                             split="test", limit=batch * batches)]
    out: dict = {"model": str(model), "trained": "random-model" not in str(model), "steps": 2 if args.dry_run else 25,
                 "batch": batch, "rows": []}
    images: dict[str, np.ndarray] = {}
    for precision in ("fp32", "bf16"):
        pipe = load_pipeline(model, "dpm", device, precision)
        pipe.set_progress_bar_config(disable=True)
        c_glb = pipe.encode_images(sources)
        seeds = [item_seed(0, i) for i in range(len(c_glb))]
        next(sample_batches(pipe, c_glb[:batch], seeds[:batch], batch_size=batch, num_inference_steps=2))  # warm-up
        sync(device)
        start = time.perf_counter()
        made = torch.cat(list(sample_batches(pipe, c_glb, seeds, batch_size=batch, num_inference_steps=out["steps"])))
        sync(device)
        seconds = time.perf_counter() - start
        images[precision] = to_uint8_array(made[:, 0]).astype(np.float32)
        out["rows"].append({"precision": precision, "unet_dtype": str(pipe.unet.dtype), "images": len(made),
                            "images_per_s": round(len(made) / seconds, 2),
                            "includes": "UNet + scheduler + VAE decode"})
        del pipe
    diff = np.abs(images["bf16"] - images["fp32"])
    mse = float((diff**2).mean())
    out["bf16_vs_fp32"] = {"mean_abs_diff_u8": round(float(diff.mean()), 3),
                           "p99_abs_diff_u8": round(float(np.percentile(diff, 99)), 2),
                           "psnr_db": round(10 * math.log10(255**2 / mse), 2) if mse > 0 else None,
                           "mean_u8": {p: round(float(v.mean()), 2) for p, v in images.items()},
                           "std_u8": {p: round(float(v.std()), 2) for p, v in images.items()}}
    return out


def random_cxr_model(args: argparse.Namespace) -> Path:
    """Without (d)'s trained model: a random model of the same `gpu-cxr256` architecture (TAEF2 from the bundle)."""
    from realdata import DRY_OVERRIDES, PRESET

    from dinodiff.models.factory import build_components
    from dinodiff.pipeline import save_model_folder

    overrides = [f"model.autoencoder.path={Path(args.bundle).resolve() / 'weights' / 'taef2'}"]
    cfg = load_training_settings(PRESET, overrides + (DRY_OVERRIDES if args.dry_run else []))
    parts = build_components(cfg.model)
    folder = Path(args.work) / "random-model"
    save_model_folder(folder, unet=parts.unet, projection=parts.projection, autoencoder=parts.autoencoder,
                      noise_scheduler=parts.noise_scheduler, model_cfg=cfg.model, encoder=parts.encoder)
    return folder


SECTIONS = {"trainer_steps": trainer_steps, "generate_precision": generate_precision}
