"""Images/s of one classifier training epoch (`dinodiff classify`'s inner loop) at 64 and 224 px.

    python benchmarks/bench_classify.py                      # DenseNet-121 and tiny-cnn, 64 and 224 px, CPU
    python benchmarks/bench_classify.py --images 256 --device cuda   # the GPU row (bf16 autocast, 4 workers)

Random uint8 images with the paper's augmentation, batch 64 (or --batch-size), AdamW; the first batch is a
warm-up and not timed. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from dinodiff.evaluate.classify.classifier import ImageTable, Part, _loader, build_classifier, train_one_epoch
from dinodiff.evaluate.classify.settings import ClassifierSettings


def epoch_rate(backbone: str, size: int, images: int, batch_size: int, device: str) -> float:
    settings = ClassifierSettings(backbone=backbone, weights="none", image_size=size, batch_size=batch_size,
                                  device=device)
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (images + batch_size, size, size), dtype=np.uint8)
    targets = (rng.random((images + batch_size, 3)) < 0.3).astype(np.float32)
    dev = torch.device(device)
    amp = settings.amp and dev.type == "cuda"
    model, _ = build_classifier(settings, 3)
    model.to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)

    def part(rows: np.ndarray) -> Part:
        return Part(np.zeros(len(rows), dtype=np.int64), rows, targets[rows])

    warm = _loader(ImageTable([array], part(np.arange(batch_size)), True), settings, dev, True, 0)
    train_one_epoch(model, warm, optimizer, dev, amp)
    loader = _loader(ImageTable([array], part(np.arange(batch_size, images + batch_size)), True), settings, dev, True, 0)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    train_one_epoch(model, loader, optimizer, dev, amp)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="images in the timed epoch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sizes", default="64,224")
    parser.add_argument("--backbones", default="tiny-cnn,densenet121")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"device: {args.device} ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads); {args.images} images, batch {args.batch_size}, paper augmentation")
    print("| backbone | px | images/s | s/epoch of 1000 images |")
    print("|---|---|---|---|")
    for backbone in args.backbones.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            rate = epoch_rate(backbone, size, args.images, args.batch_size, args.device)
            print(f"| {backbone} | {size} | {rate:.1f} | {1000 / rate:.0f} |", flush=True)


if __name__ == "__main__":
    main()
