"""The throughput sections of the GPU evidence run (issue 16): sd15 training, sampling, DiffSeg.

    python benchmarks/gpu/run_section.py train_throughput --json OUT.json [--dry-run] [--budget-s 90]

Each section writes one JSON object (its measurements, or status=failed with the error) and returns.
Weights are random: the cost of a UNet pass does not depend on their values. On a CPU (--dry-run)
the same code runs on the test-sized `tiny` UNet at toy sizes.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from dinodiff.models.unet import build_unet, count_parameters

logger = logging.getLogger("gpu-evidence")

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, matched on torch.cuda.get_device_name().
BF16_DENSE_PEAK_TFLOPS = [
    ("H200", 989.4), ("GH200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4),
    ("H800", 989.4), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L4", 121.0), ("A10G", 70.0),
]


@dataclass
class Sizes:
    """sd15 at 512 px on a GPU; the test UNet at toy sizes in the dry run."""

    preset: str
    latent: int
    cross_dim: int
    tokens: int
    train_batches: tuple[int, ...]
    sample_batch: int
    image_px: int


def sizes(dry: bool) -> Sizes:
    if dry:
        return Sizes("tiny", 8, 32, 2, (1, 2), 2, 64)
    return Sizes("sd15", 64, 768, 2, (16, 32), 16, 512)


def save_partial(args: argparse.Namespace, payload: dict) -> None:
    """Write what a section has so far, so a section killed at its time limit still reports its rows."""
    tmp = Path(args.json + ".tmp")
    tmp.write_text(json.dumps({"status": "partial", **payload}, indent=1, default=str))
    tmp.replace(args.json)


def chip_peak() -> dict:
    """The chip's dense bf16 peak (datasheet, by device name) and a measured 8192^3 bf16 matmul rate."""
    if not torch.cuda.is_available():
        return {"device": "cpu", "peak_tflops": None, "peak_source": "none (CPU dry run)"}
    name = torch.cuda.get_device_name()
    peak = next((v for key, v in BF16_DENSE_PEAK_TFLOPS if key in name), None)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    measured = 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12
    return {"device": name, "peak_tflops": peak, "matmul_bf16_tflops_measured": round(measured, 1),
            "peak_source": f"datasheet dense bf16 for '{name}'" if peak else f"unknown chip '{name}': no MFU",
            "capability": list(torch.cuda.get_device_capability())}


def make_unet(sz: Sizes, device: torch.device) -> torch.nn.Module:
    with torch.device(device):  # random init straight on the device (seconds instead of a CPU init)
        unet = build_unet(sz.preset, in_channels=4, sample_size=sz.latent, cross_attention_dim=sz.cross_dim)
    return unet.to(device)


def train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def train_step(unet, opt, sched, batch: dict, device: torch.device) -> float:
    noisy = sched.add_noise(batch["latents"], batch["noise"], batch["t"])
    with autocast(device):
        pred = unet(noisy, batch["t"], encoder_hidden_states=batch["cond"]).sample
    loss = F.mse_loss(pred.float(), batch["noise"])
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def random_batch(sz: Sizes, n: int, device: torch.device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(n)
    shape = (n, 4, sz.latent, sz.latent)
    return {"latents": torch.randn(shape, generator=g).to(device), "noise": torch.randn(shape, generator=g).to(device),
            "t": torch.randint(0, 1000, (n,), generator=g).to(device),
            "cond": torch.randn(n, sz.tokens, sz.cross_dim, generator=g).to(device)}


def count_train_flops(unet, sz: Sizes, device: torch.device) -> float:
    """Forward + backward FLOPs per image (torch FlopCounterMode, batch 2, bf16 autocast, math SDPA so the
    attention matmuls are counted; no recomputation counted, no optimizer)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    batch = random_batch(sz, 2, device)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        train_step(unet, None, train_scheduler(), batch, device)
    unet.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_steps(step, batch_size: int, device: torch.device, steps: int, seconds: float) -> dict:
    """Time `step()` (one training step, returning its loss) after warm-up (allocator, cuDNN/SDPA kernel choice):
    at least 3 steps on a GPU (1 on a CPU), then until `steps` or `seconds`; speed, peak memory and the last loss."""
    for _ in range(2 if device.type == "cuda" else 1):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    done, start = 0, time.perf_counter()
    least = 3 if device.type == "cuda" else 1
    while done < steps and (done < least or time.perf_counter() - start < seconds):
        loss = step()
        done += 1
    sync(device)
    elapsed = (time.perf_counter() - start) / done
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"batch": batch_size, "steps_timed": done, "s_per_step": round(elapsed, 4),
            "images_per_s": round(batch_size / elapsed, 2), "peak_mem_GiB": None if peak is None else round(peak, 2),
            "loss": round(float(loss), 4)}


def time_train(unet, opt, sched, sz: Sizes, batch_size: int, device: torch.device, steps: int, seconds: float) -> dict:
    batch = random_batch(sz, batch_size, device)
    return timed_steps(lambda: train_step(unet, opt, sched, batch, device), batch_size, device, steps, seconds)


def train_throughput(args: argparse.Namespace) -> dict:
    """(a) sd15 training steps (AdamW, bf16 autocast, SDPA) with and without gradient checkpointing."""
    device, sz, deadline = args.device, sizes(args.dry_run), time.time() + args.budget_s
    unet = make_unet(sz, device).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=device.type == "cuda")
    peak = chip_peak()
    flops = count_train_flops(unet, sz, device)
    rows: list[dict] = []
    info = {"unet": sz.preset, "unet_params_M": round(count_parameters(unet) / 1e6, 1),
            "latents": [4, sz.latent, sz.latent], "image_px": sz.image_px, "c_glb": [sz.tokens, sz.cross_dim],
            "precision": "bf16 autocast, fp32 master weights, torch AdamW (fused on CUDA)" if device.type == "cuda"
            else "fp32 (CPU)", "attention": "PyTorch SDPA (diffusers AttnProcessor2_0)",
            "flops_per_image_fwd_bwd": flops, "flop_count": "torch.utils.flop_counter.FlopCounterMode, one fwd+bwd "
            "at batch 2 / 2, math SDPA; recomputation under checkpointing not counted (model FLOPs)",
            "data": "random latents/noise/timesteps on the device (UNet + optimizer only)", **peak, "rows": rows}
    plan = [(checkpointing, batch) for checkpointing in (False, True) for batch in sz.train_batches]
    for done, (checkpointing, batch) in enumerate(plan):
        unet.enable_gradient_checkpointing() if checkpointing else unet.disable_gradient_checkpointing()
        row = {"gradient_checkpointing": checkpointing, "batch": batch}
        left = deadline - time.time()
        if left < 8:
            rows.append({**row, "status": "skipped: section time budget spent"})
            continue
        # Share what is left between the rows still to come (the 2026-11-26 run spent it all on the first two).
        seconds = min(4.0, max(1.0, left / (len(plan) - done) - 4.0))
        try:
            row.update(time_train(unet, opt, train_scheduler(), sz, batch, device, steps=20, seconds=seconds))
        except torch.cuda.OutOfMemoryError as err:
            row["status"] = f"out of memory: {str(err)[:200]}"
            torch.cuda.empty_cache()
        if "images_per_s" in row and peak["peak_tflops"]:
            row["model_tflops_per_s"] = round(flops * row["images_per_s"] / 1e12, 1)
            row["mfu"] = round(flops * row["images_per_s"] / (peak["peak_tflops"] * 1e12), 4)
        rows.append(row)
        logger.info("train %s", row)
        save_partial(args, info)
    return info


def sampling_throughput(args: argparse.Namespace) -> dict:
    """(b) DPM-Solver++ 20 steps vs PNDM 50 steps, batch 16, UNet + scheduler (no VAE decode)."""
    from dinodiff.sampling import inference_scheduler, sample_latents

    device, sz = args.device, sizes(args.dry_run)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    unet = make_unet(sz, device).to(dtype).eval()
    calls = {"n": 0}
    unet.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    rows: list[dict] = []
    info = {"unet": sz.preset, "image_px": sz.image_px, "dtype": str(dtype).replace("torch.", ""),
            "includes": "UNet + scheduler; no VAE decode, no encoder", "rows": rows}
    plan = (("dpm", 3), ("pndm", 4)) if args.dry_run else (("dpm", 20), ("pndm", 50))
    for name, steps in plan:
        sched = inference_scheduler(train_scheduler(), name)
        g = torch.Generator(device="cpu").manual_seed(0)
        cond = torch.randn(sz.sample_batch, sz.tokens, sz.cross_dim, generator=g).to(device)
        run = lambda c: sample_latents(unet, sched, c, latent_shape=(4, sz.latent, sz.latent),  # noqa: E731
                                       num_inference_steps=steps, generator=g)
        if not rows:  # warm-up at the timed shapes (cuDNN autotuning, SDPA kernel choice)
            sample_latents(unet, inference_scheduler(train_scheduler(), "dpm"), cond, num_inference_steps=2,
                           latent_shape=(4, sz.latent, sz.latent), generator=g)
        sync(device)
        calls["n"], start = 0, time.perf_counter()
        latents = run(cond)
        sync(device)
        seconds = time.perf_counter() - start
        rows.append({"scheduler": sched.__class__.__name__, "steps": steps, "unet_calls": calls["n"],
                     "batch": sz.sample_batch, "seconds": round(seconds, 3),
                     "images_per_s": round(sz.sample_batch / seconds, 2), "finite": bool(torch.isfinite(latents).all())})
        logger.info("sample %s", rows[-1])
        save_partial(args, info)
    return info


def diffseg_speed(args: argparse.Namespace) -> dict:
    """(c) DiffSeg through the project's segment code path on the sd15 UNet (random), seconds per image."""
    from diffusers import AutoencoderKL

    from dinodiff.evaluate.segment.attention import dinodiff_model
    from dinodiff.evaluate.segment.data import load_cases
    from dinodiff.evaluate.segment.grid import segment_cases
    from dinodiff.evaluate.segment.settings import Cell, SegmentSettings
    from dinodiff.models.autoencoders import LatentAutoencoder
    from dinodiff.models.encoders import load_encoder
    from dinodiff.models.projection import ConditionProjection
    from dinodiff.models.random_init import save_random_encoder

    device, sz = args.device, sizes(args.dry_run)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    width = (64, 64, 128, 128) if args.dry_run else (128, 256, 512, 512)  # the SD v1 VAE's widths
    with torch.device(device):
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=width,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, norm_num_groups=32, scaling_factor=0.18215)
    # VAE and encoder stay fp32 (encode_moments feeds fp32 pixels, as in `dinodiff segment`); UNet + projection in dtype.
    autoencoder = LatentAutoencoder("kl", model=vae, scaling_factor=0.18215).to(device)
    enc_dir = save_random_encoder(Path(args.work) / "vit", hidden_size=sz.cross_dim, num_layers=2 if args.dry_run else 12,
                                  num_heads=2 if args.dry_run else 12, patch_size=16, image_size=224)
    encoder = load_encoder(str(enc_dir)).to(device).eval()
    unet = make_unet(sz, device).to(dtype).eval()
    projection = ConditionProjection(encoder.hidden_size, sz.cross_dim).to(device, dtype)
    model = dinodiff_model(encoder, autoencoder, unet, projection, train_scheduler(), "sd15-random")
    n, warm = args.limit or (2 if args.dry_run else 24), 2 if args.dry_run else 8
    cases = load_cases(Path(args.bundle) / "data" / "lungs-covid", sz.image_px, limit=n + warm)
    cell = Cell("sd15-random", "diffseg", (300,), 16 if not args.dry_run else 4, 0.05)
    settings = SegmentSettings(threshold_mode="absolute", merge_iterations=3, condition="image", batch_size=8)
    segment_cases(model, cases[:warm], [cell], settings)  # warm-up at the timed batch size (cuDNN autotuning)
    sync(device)
    start = time.perf_counter()
    out = segment_cases(model, cases[warm:], [cell], settings)[cell]
    sync(device)
    seconds = time.perf_counter() - start
    segs = [len(set(labels.ravel().tolist())) for labels, _ in out]
    return {"unet": sz.preset, "image_px": sz.image_px, "dtype": str(dtype).replace("torch.", ""),
            "images": len(out), "batch": 8, "precision": f"UNet + projection {str(dtype).replace('torch.', '')}, VAE + ViT fp32", "seconds": round(seconds, 3), "s_per_image": round(seconds / len(out), 4),
            "cell": settings.describe(cell), "mean_segments": round(sum(segs) / len(segs), 2),
            "includes": "VAE encode (SD-v1-shaped KL VAE, random) + ViT-B/16 c_GLB + one UNet pass at t=300 with "
            "self-attention capture + aggregation + KL merging + label map (evaluate.segment.grid.segment_cases)",
            "images_from": "lungs-covid (bundle, shrunk to 256 px short side, upsampled to 512 by preprocessing)"}


SECTIONS = {"train_throughput": train_throughput, "sampling": sampling_throughput, "diffseg": diffseg_speed}
