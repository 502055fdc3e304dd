"""Samplers on one trained model: 8x8-pixel Fréchet distance of reconstructions to held-out images, per scheduler,
with diffusers' `clip_sample` as dinodiff sets it for latent models (off) and forced back on (issue 20, item 12).

    python benchmarks/bench_samplers.py demo-output          # a `dinodiff demo` folder: run/ and prepared/
    python benchmarks/bench_samplers.py demo-output --images 64 --threads 1

Prints a Markdown table (sampler, steps, clip_sample, skip_prk_steps, FD) and the real-image floor (held-out vs
training images in the same space). The same seeds and conditions for every sampler.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dinodiff.demo.checks import load_split, pixels
from dinodiff.evaluate.fid.stage import fid_from_features
from dinodiff.pipeline.sample import generate_reconstructions, load_pipeline
from dinodiff.runs import resolve_model

SAMPLERS = ("dpm", "ddim", "ddim-clipped", "ddpm", "ddpm-clipped", "pndm")


def main(argv: list[str] | None = None) -> list[tuple]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="a `dinodiff demo` output folder (run/, prepared/)")
    parser.add_argument("--images", type=int, default=64, help="held-out and source images (each)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = resolve_model(args.root / "run").location
    rows = []
    for name in SAMPLERS:
        base = name.split("-")[0]
        pipe = load_pipeline(model, base, "cpu")
        if name.endswith("clipped"):  # diffusers' default: what dinodiff used before issue 20
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, clip_sample=True)
        pipe.set_progress_bar_config(disable=True)
        train = load_split(args.root / "prepared", "train", pipe.resolution, args.images)
        held = load_split(args.root / "prepared", "test", pipe.resolution, args.images)
        steps = 50 if base == "ddpm" else 20
        samples = generate_reconstructions(pipe, train, 1, 0, 32, num_inference_steps=steps)
        config = pipe.scheduler.config
        rows.append((name, steps, config.get("clip_sample"), config.get("skip_prk_steps"),
                     fid_from_features(pixels(held, 8), pixels(samples, 8))))
        print(rows[-1], flush=True)
    floor = fid_from_features(pixels(held, 8), pixels(train, 8))
    print(f"\n| sampler | steps | clip_sample | skip_prk_steps | FD (8x8 px) to {len(held)} held-out |\n|---|---|---|---|---|")
    for name, steps, clip, skip, fd in rows:
        print(f"| {name} | {steps} | {clip} | {skip} | {fd:.3f} |")
    print(f"| real training images (floor) | | | | {floor:.4f} |")
    return rows


if __name__ == "__main__":
    main()
