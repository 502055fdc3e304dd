"""Training throughput: images/s, cache vs on-the-fly, peak memory, and MFU of the UNet on a GPU.

    python benchmarks/bench_train.py                      # CPU cases: tiny and small presets
    python benchmarks/bench_train.py --cases sd15 --batch-size 32   # the paper's model at 512 px (GPU)

Each case runs in its own subprocess (clean peak-memory reading) and times real trainer steps
(`Trainer._optimizer_step` on the real data stream) after warm-up, once streaming prepared shards
with the frozen autoencoder and encoder running on the fly ("fly") and once from `dinodiff cache`
("cache"). Frozen models of the paper's size are random-initialised copies of the real
architectures (SD v1 AutoencoderKL, ViT-B/16), since pretrained weights are not downloadable here;
speed does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
H100_BF16_DENSE_FLOPS = 989.4e12  # NVIDIA H100 SXM, dense bf16 tensor-core peak

# name -> (preset, resolution, frozen models, per-device batch)
CASES = {
    "tiny": ("tiny", 32, "preset", 8),  # the test preset: unshuffle AE + tiny random ViT
    "small": ("cpu-small", 64, "preset", 32),  # the CPU preset as trained in BENCHMARKS.md
    "small-paperfrozen": ("cpu-small", 128, "paper", 8),  # small UNet, SD-VAE + ViT-B/16 frozen models
    "sd15": ("sd15-dinov1", 512, "paper", 16),  # the paper's model
}


def paper_frozen_models(folder: Path) -> tuple[str, str]:
    """Random-initialised SD v1 VAE and DINO ViT-B/16 (CLS + pooler) saved where the real loaders read them."""
    from diffusers import AutoencoderKL

    from dinodiff.models.random_init import save_random_encoder

    vae_dir, vit_dir = folder / "sd-vae", folder / "vit-b16"
    if not vae_dir.is_dir():
        AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
                      down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                      block_out_channels=[128, 256, 512, 512], layers_per_block=2, scaling_factor=0.18215,
                      ).save_pretrained(vae_dir)
    if not vit_dir.is_dir():
        save_random_encoder(vit_dir, "transformers-vit", hidden_size=768, num_layers=12, num_heads=12,
                            patch_size=16, image_size=224)
    return str(vae_dir), str(vit_dir)


def prepared_data(folder: Path, size: int) -> Path:
    from dinodiff.data.phantoms import write_phantoms
    from dinodiff.prepare import prepare

    out = folder / f"prepared-{size}"
    if not (out / "manifest.json").is_file():
        raw = write_phantoms(folder / "phantoms", 64, size=max(size, 128), seed=0, progress=False)
        prepare([raw], out, size=size, shard_size=16, workers=1, progress=False)
    return out


def unet_flops_per_image(trainer) -> float:
    """Forward + backward FLOPs of the trained module for one image (torch's FLOP counter)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = trainer.accelerator.unwrap_model(trainer.model)
    unet = model.unet
    lat = torch.randn(1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size,
                      device=trainer.accelerator.device)
    cond = torch.randn(1, trainer.parts.encoder.num_tokens, trainer.parts.encoder.hidden_size, device=lat.device)
    with FlopCounterMode(display=False) as counter, trainer.accelerator.autocast():
        model(lat, torch.tensor([500], device=lat.device), cond).float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def run_case(name: str, mode: str, args: argparse.Namespace) -> dict:
    import torch

    from dinodiff.cache import build_cache
    from dinodiff.config import load_training_settings, with_overrides
    from dinodiff.train.trainer import Trainer

    preset, resolution, frozen, batch = CASES[name]
    batch = args.batch_size or batch
    work = Path(args.workdir)
    overrides = [f"model.resolution={resolution}", f"train.batch_size={batch}", "train.grad_accum=1",
                 f"train.run_dir={work / f'run-{name}-{mode}'}", "train.resume=none", f"data.num_workers={args.workers}",
                 f"data.shuffle_buffer={4 * batch}", "optim.use_8bit_adam=true", f"train.mixed_precision={args.precision}"]
    if frozen == "paper":
        vae, vit = paper_frozen_models(work)
        overrides += [f"model.encoder.name_or_path={vit}", "model.encoder.tokens=[cls,pooler]",
                      "model.autoencoder.kind=kl", f"model.autoencoder.path={vae}", "model.autoencoder.scaling_factor=0.18215"]
        if name != "sd15":
            overrides += ["model.unet.overrides={cross_attention_dim: 768}"]
    if name == "sd15":
        overrides += ["train.gradient_checkpointing=false"]
    overrides.append(f"data.shards={prepared_data(work, max(resolution, 64))}")
    cfg = load_training_settings(preset, overrides)
    if mode == "cache":
        cache_dir = work / f"cache-{name}"
        start = time.time()
        build_cache(cfg, cache_dir, views=1, batch_size=batch, progress=False)
        cfg = with_overrides(cfg, [f"data.cache={cache_dir}"])
    trainer = Trainer(cfg)
    cuda = trainer.accelerator.device.type == "cuda"
    batches = trainer._batches()
    for _ in range(args.warmup):
        trainer._optimizer_step(batches)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    for _ in range(args.steps):
        trainer._optimizer_step(batches)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.time() - start) / args.steps
    result = {"case": name, "mode": mode, "device": str(trainer.accelerator.device), "batch": batch,
              "resolution": resolution, "precision": trainer.accelerator.mixed_precision,
              "unet_params_M": sum(p.numel() for p in trainer.parts.unet.parameters()) / 1e6,
              "s_per_step": seconds, "images_per_s": batch / seconds,
              "peak_mem_GB": (torch.cuda.max_memory_allocated() if cuda else
                              resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9}
    if cuda:
        flops = unet_flops_per_image(trainer)
        result["unet_tflops_per_image"] = flops / 1e12
        result["mfu"] = flops * result["images_per_s"] / H100_BF16_DENSE_FLOPS
        result["gpu"] = torch.cuda.get_device_name()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="tiny,small,small-paperfrozen", help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--modes", default="fly,cache")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=0, help="override the case's per-device batch")
    parser.add_argument("--workers", type=int, default=1, help="data-loader workers")
    parser.add_argument("--precision", default="auto", help="train.mixed_precision (auto = bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json-out", default=None, help="also write the rows as JSON here")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: one case in a subprocess
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print("RESULT " + json.dumps(run_case(args.case, args.mode, args)), flush=True)
        return
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="bench-train-")
    rows = []
    for case in args.cases.split(","):
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--case", case, "--mode", mode, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
                   "--precision", args.precision, "--workdir", args.workdir]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(f"{case}/{mode} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(lines[-1][7:]))
            print(f"  done {case}/{mode}: {rows[-1]['images_per_s']:.2f} images/s", file=sys.stderr, flush=True)
    print("\n| case | mode | device | precision | UNet M params | res | batch | s/step | images/s | cache speed-up | peak mem GB | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    fly = {r["case"]: r for r in rows if r["mode"] == "fly"}
    for r in rows:
        speedup = f"{fly[r['case']]['s_per_step'] / r['s_per_step']:.2f}x" if r["mode"] == "cache" and r["case"] in fly else ""
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a"
        print(f"| {r['case']} | {r['mode']} | {r.get('gpu', r['device'])} | {r['precision']} | {r['unet_params_M']:.1f} | "
              f"{r['resolution']} | {r['batch']} | {r['s_per_step']:.3f} | {r['images_per_s']:.2f} | {speedup} | "
              f"{r['peak_mem_GB']:.2f} | {mfu} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
