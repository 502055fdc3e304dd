"""DiffSeg speed: seconds per image at 256 and 512 px, split into capture, aggregation and merging.

    python benchmarks/bench_segment.py --threads 1              # CPU: the cpu-small architecture
    python benchmarks/bench_segment.py --cases sd15 --sizes 512  # the paper's UNet + SD VAE + ViT-B/16 (GPU)

Models are random-initialised copies of the real architectures (speed does not depend on the weights).
Images are the real Shenzhen CXRs of ../shared/data/lungs-shenzhen. Per image: "capture" = encoder +
autoencoder + one UNet pass recording every self-attention map; "aggregate" = DiffSeg's 4-D attention
tensor; "merge" = anchors, KL merging (3 iterations) and the label map, for one grid-search cell.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DINODIFF_TEST_DATA", REPO.parent / "shared" / "data"))

# name -> (config preset, frozen models: 'preset' keeps the preset's, 'paper' = SD VAE + ViT-B/16)
CASES = {"small": ("cpu-small", "preset"), "sd15": ("sd15-dinov1", "paper")}


def build_model(name: str, size: int, workdir: Path, device: str):
    import torch

    from dinodiff.config import load_training_settings
    from dinodiff.evaluate.segment.attention import dinodiff_model
    from dinodiff.models.factory import build_components

    preset, frozen = CASES[name]
    overrides = [f"model.resolution={size}"]
    if frozen == "paper":
        sys.path.insert(0, str(REPO / "benchmarks"))
        from bench_train import paper_frozen_models

        vae, vit = paper_frozen_models(workdir)
        overrides += [f"model.encoder.name_or_path={vit}", "model.encoder.tokens=[cls,pooler]",
                      f"model.autoencoder.path={vae}", "model.autoencoder.scaling_factor=0.18215"]
    torch.manual_seed(0)
    parts = build_components(load_training_settings(preset, overrides).model)
    for module in (parts.encoder, parts.autoencoder, parts.unet, parts.projection):
        module.to(device).eval()
    return dinodiff_model(parts.encoder, parts.autoencoder, parts.unet, parts.projection, parts.noise_scheduler)


def run_case(name: str, size: int, args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from dinodiff.evaluate.segment.attention import capture_attention
    from dinodiff.evaluate.segment.data import load_cases
    from dinodiff.evaluate.segment.diffseg import aggregate_attention, diffseg, map_side

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    model = build_model(name, size, Path(args.workdir), device)
    cases = load_cases(DATA / "lungs-shenzhen", size, limit=args.images)
    images = torch.from_numpy(np.stack([c.image for c in cases])).float().div(255)[:, None]
    dtype = torch.float16 if cuda else torch.float32

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    if args.warmup:
        capture_attention(model, images[:1], timestep=300, dtype=dtype)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = {"capture": 0.0, "aggregate": 0.0, "merge": 0.0, "cpu": 0.0}
    segments, side = [], 0
    for start in range(0, len(images), args.batch_size):
        batch = images[start:start + args.batch_size]
        t0, c0 = time.perf_counter(), time.process_time()
        maps = capture_attention(model, batch, timestep=300, dtype=dtype)
        sync()
        t1 = time.perf_counter()
        agg = aggregate_attention(maps, dtype=dtype)
        sync()
        t2 = time.perf_counter()
        side = map_side(agg.shape[-1])
        for b in range(len(batch)):
            labels, _ = diffseg(agg[b], min(args.grid, side), [args.threshold] * 3, (size, size), mode="relative")
            segments.append(int(labels.max()) + 1)
        sync()
        t3 = time.perf_counter()
        times["cpu"] += time.process_time() - c0  # CPU seconds: the cost when other jobs share the cores
        times["capture"] += t1 - t0
        times["aggregate"] += t2 - t1
        times["merge"] += t3 - t2
    n = len(images)
    per = {k: v / n for k, v in times.items()}
    per["total"] = per["capture"] + per["aggregate"] + per["merge"]
    where = torch.cuda.get_device_name() if cuda else f"cpu x{torch.get_num_threads()} threads"
    return {"case": name, "px": size, "device": where,
            "map": f"{side}x{side}", "grid": min(args.grid, side), **per,
            "segments": sum(segments) / n,
            "peak_GB": (torch.cuda.max_memory_allocated() if cuda else
                        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="small", help=f"comma list of {sorted(CASES)}")
    parser.add_argument("--sizes", default="256,512", help="comma list of image sizes in px")
    parser.add_argument("--images", type=int, default=4, help="Shenzhen images timed per case")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--grid", type=int, default=16, help="anchor grid M (capped at the largest map side)")
    parser.add_argument("--threshold", type=float, default=0.3, help="relative merging threshold (quantile)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up passes (0 or 1)")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "dinodiff-bench-segment"))
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    rows = [run_case(c, int(s), args) for c in args.cases.split(",") for s in args.sizes.split(",")]
    print("| case | px | device | largest map | grid | capture s/img | aggregate s/img | merge s/img/cell "
          "| total s/img | CPU s/img | segments | peak GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['px']} | {r['device']} | {r['map']} | {r['grid']}x{r['grid']} "
              f"| {r['capture']:.3f} | {r['aggregate']:.3f} | {r['merge']:.3f} | {r['total']:.3f} | {r['cpu']:.3f} "
              f"| {r['segments']:.1f} | {r['peak_GB']:.2f} |")


if __name__ == "__main__":
    main()
