"""Cost of FID evaluation: feature extraction images/s per extractor, and a full checkpoint sweep with the
real-set statistics uncached vs cached.

    python benchmarks/bench_fid.py --images 64 --batch-size 16 --extractors xrv,inception,dinov2
    python benchmarks/bench_fid.py --sweep-run RUN_DIR --num-real 64 --num-sources 16   # an existing run

Weights: pretrained XRV/Inception/DINOv2 weights are used when present in the libraries' caches; otherwise
randomly initialised models of the same architecture are written to a temporary cache (same FLOPs, same speed,
meaningless FID values). Without --sweep-run, a tiny run (the `tiny` preset on phantoms, 3 checkpoints) is
trained first. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from dinodiff.devices import resolve_device
from dinodiff.evaluate.fid.features import (
    MissingWeights,
    build_extractor,
    save_random_inception_weights,
    save_random_xrv_weights,
)
from dinodiff.evaluate.fid.images import iter_images, list_images, select
from dinodiff.evaluate.fid.stage import extract_features

REPO = Path(__file__).resolve().parents[1]


def make_extractor(name: str, tmp: Path, device: torch.device):
    """(extractor, weights label, `weights` argument that rebuilds it): pretrained when present, else random."""
    try:
        return build_extractor(name, None, device), "pretrained", None
    except (MissingWeights, OSError, ValueError):
        pass
    if name == "xrv":
        save_random_xrv_weights(tmp / "xrv")
        source, label = str(tmp / "xrv"), "random"
    elif name == "inception":
        source, label = str(save_random_inception_weights(tmp / "inception.pth")), "random"
    else:  # a random ViT-B/14 DINOv2 (the real model's size) so the timing is representative
        from dinodiff.models.random_init import save_random_encoder

        save_random_encoder(tmp / name, family="transformers-dinov2", hidden_size=768, num_layers=12, num_heads=12,
                            patch_size=14, image_size=224, num_registers=0)
        source, label = str(tmp / name), "random ViT-B/14"
    return build_extractor(name, source, device), label, source


def best_of(repeat: int, fn, device: torch.device) -> float:
    """Fastest of `repeat` wall-clock runs (the dev machine is shared, so the minimum is the honest figure)."""
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_extraction(args, tmp: Path, device: torch.device) -> list[tuple]:
    refs = select(list_images(args.images_from), args.images, seed=0)
    rows = []
    for name in args.extractors.split(","):
        net, weights, _ = make_extractor(name, tmp, device)
        images = torch.stack(list(iter_images(refs, net.input_size)))  # decoded up front: time the network only
        extract_features(net, images[: args.batch_size], args.batch_size)  # warm-up
        seconds = best_of(args.repeat, lambda: extract_features(net, images, args.batch_size), device)
        # decode + resize + network
        with_io = best_of(args.repeat, lambda: extract_features(net, iter_images(refs, net.input_size),
                                                                args.batch_size), device)
        rows.append((f"{net.key}", weights, net.dim, net.input_size, len(images) / seconds, len(images) / with_io))
    return rows


def tiny_run(tmp: Path) -> Path:
    from dinodiff.config import load_training_settings
    from dinodiff.data.phantoms import write_phantoms
    from dinodiff.prepare import prepare
    from dinodiff.train.trainer import train

    source = write_phantoms(tmp / "raw", 48, size=96, seed=0, progress=False)
    prepare([source], tmp / "prepared", size=64, shard_size=16, workers=1, test_fraction=0.5, seed=0, progress=False)
    cfg = load_training_settings("tiny", [f"data.shards={tmp / 'prepared'}", f"train.run_dir={tmp / 'run'}", "train.max_steps=6",
                               "train.checkpoint_every=2", "train.keep_last=3", "train.sample_every=100"])
    return train(cfg)


def bench_sweep(args, tmp: Path, device: torch.device) -> list[tuple]:
    from dinodiff.config import FidSettings
    from dinodiff.evaluate.fid.sweep import sweep
    from dinodiff.runs import list_checkpoints

    run = Path(args.sweep_run) if args.sweep_run else tiny_run(tmp / "tiny")
    work = tmp / "sweep-run"  # a copy: the sweep writes fid.csv, fid.png and best/ into the run folder
    shutil.copytree(run, work, ignore=shutil.ignore_patterns("logs", "samples"))
    _, _, weights = make_extractor(args.sweep_extractor, tmp, device)
    kw = dict(extractor=args.sweep_extractor, weights=weights, num_real=args.num_real, num_sources=args.num_sources,
              per_source=args.per_source, sample_steps=args.steps, batch_size=args.batch_size, device=str(device), split=args.split)
    if args.real:
        kw["real"] = args.real
    n_ckpt = len(list_checkpoints(work))
    rows = []
    for label in ("uncached real statistics", "cached real statistics"):
        times = []
        for attempt in range(args.repeat):
            cache = tmp / f"fid-cache-{attempt}" if label.startswith("uncached") else tmp / "fid-cache-0"
            t0 = time.perf_counter()
            summary = sweep(work, FidSettings(**kw, cache_dir=cache), force=True, update_best=False)
            times.append(time.perf_counter() - t0)
        seconds = min(times)
        rows.append((label, n_ckpt, summary["rows"][0]["n_real"], summary["rows"][0]["n_fake"], seconds,
                     seconds / n_ckpt))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images-from", default=str(REPO.parent / "shared" / "data" / "cxr-covid" / "images"))
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--extractors", default="xrv,inception,dinov2")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sweep-run", default=None, help="a run folder to sweep (copied first); default: a tiny run")
    ap.add_argument("--sweep-extractor", default="xrv")
    ap.add_argument("--real", default=None, help="real set for the sweep (default: the run's data.shards)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--num-real", type=int, default=64)
    ap.add_argument("--num-sources", type=int, default=16)
    ap.add_argument("--per-source", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="best of N wall-clock runs per measurement")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub downloads: absent weights mean random ones
    device = resolve_device(args.device)
    print(f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or 'cpu'}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = bench_extraction(args, tmp, device)
        print(f"feature extraction, {args.images} images, batch {args.batch_size}:\n")
        print("| extractor:tap | weights | dim | input | images/s (network) | images/s (decode + resize + network) |")
        print("|---|---|---|---|---|---|")
        for key, weights, dim, size, rate, rate_io in rows:
            print(f"| {key} | {weights} | {dim} | {size} | {rate:.1f} | {rate_io:.1f} |")
        if args.skip_sweep:
            return
        rows = bench_sweep(args, tmp, device)
        print(f"\nfull sweep ({args.sweep_extractor}, {args.steps} sampling steps, {args.per_source} per source):\n")
        print("| real-set statistics | checkpoints | real images | generated per checkpoint | sweep s | s per checkpoint |")
        print("|---|---|---|---|---|---|")
        for label, n_ckpt, n_real, n_fake, seconds, per in rows:
            print(f"| {label} | {n_ckpt} | {n_real} | {n_fake} | {seconds:.1f} | {per:.1f} |")


if __name__ == "__main__":
    main()
