"""Ncut-inputs / DiffCut per-image cost: the product's `diffcut` against the previous implementation, same inputs.

    python benchmarks/bench_ncut.py                  # 16x16 feature maps (a 256 px gpu-seg256 model), 192 channels
    python benchmarks/bench_ncut.py --side 8 --images 40

The previous implementation (kept here as the reference) solved the generalised problem (D - W) y = lambda D y
with scipy's generalised eigh, under as many BLAS threads as the library starts, and upsampled every feature channel
to pixels before the nearest-prototype assignment. The product solves the standard normalised-Laplacian form under
one BLAS thread and upsamples only the k similarity maps (dinodiff.evaluate.segment.diffcut). Both run on the same
random features in the same process, interleaved with a torch convolution (the UNet work between two cuts in
`dinodiff segment`), and must give the same label maps. Prints a table: ms per image for each part and the ratio.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

from dinodiff.evaluate.segment import diffcut as product


def reference_fiedler(affinity: np.ndarray) -> np.ndarray:
    degree = affinity.sum(1) + 1e-12
    _, vectors = scipy.linalg.eigh(np.diag(degree) - affinity, np.diag(degree), subset_by_index=[1, 1])
    return vectors[:, 0]


def reference_assign(features: torch.Tensor, segments: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    side = product.map_side(features.shape[0])
    feats = F.normalize(features.float(), dim=1)
    seg = torch.as_tensor(segments, dtype=torch.long)
    protos = F.normalize(torch.zeros(int(seg.max()) + 1, feats.shape[1]).index_add_(0, seg, feats), dim=1)
    up = F.normalize(F.interpolate(feats.T.reshape(1, -1, side, side), size=size, mode="bilinear",
                                   align_corners=False)[0], dim=0)
    return torch.unique(torch.einsum("chw,kc->khw", up, protos).argmax(0), return_inverse=True)[1]


def reference_diffcut(features: torch.Tensor, tau: float, alpha: float, size: tuple[int, int]) -> torch.Tensor:
    original = product.fiedler_vector
    product.fiedler_vector = reference_fiedler  # recursive_ncut looks the solver up in its module
    try:
        segments = product.recursive_ncut(product.cosine_affinity(features.numpy(), alpha), tau)
    finally:
        product.fiedler_vector = original
    return reference_assign(features, segments, size)


def blob_features(images: int, side: int, channels: int) -> torch.Tensor:
    """(images, side*side, channels): a few blob-shaped regions (argmax of 4 blurred noise fields), each with its own
    feature vector plus noise, so that a cut finds a handful of segments as on real attention inputs (random
    features would give ~100)."""
    gen = torch.Generator().manual_seed(0)
    fields = F.avg_pool2d(F.pad(torch.randn(images, 4, side, side, generator=gen), (3, 3, 3, 3), mode="circular"),
                          7, stride=1)
    regions = fields.argmax(1).reshape(images, -1)
    prototypes = torch.randn(4, channels, generator=gen)
    return prototypes[regions] + 0.5 * torch.randn(images, side * side, channels, generator=gen)


def time_parts(run, features: list[torch.Tensor], args: argparse.Namespace) -> tuple[float, list[torch.Tensor]]:
    """Seconds per image of ``run`` with a convolution before each image (torch's threads busy, as in segment)."""
    conv, x = torch.nn.Conv2d(64, 64, 3, padding=1), torch.randn(4, 64, 64, 64)
    labels, spent = [], 0.0
    with torch.no_grad():
        for f in features:
            conv(x)
            start = time.perf_counter()
            labels.append(run(f, args.tau, args.alpha, (args.px, args.px)))
            spent += time.perf_counter() - start
    return spent / len(features), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=16, help="feature map side (16: a 256 px model's 16x16 layer)")
    parser.add_argument("--channels", type=int, default=192)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--px", type=int, default=256, help="label map size")
    parser.add_argument("--tau", type=float, default=0.7)
    parser.add_argument("--alpha", type=float, default=5.0)
    args = parser.parse_args()
    features = list(blob_features(args.images, args.side, args.channels))
    product_call = lambda f, tau, alpha, size: product.diffcut(f, tau, alpha, size)[0]  # noqa: E731
    ref_s, ref_labels = time_parts(reference_diffcut, features, args)
    new_s, new_labels = time_parts(product_call, features, args)
    same = sum(bool(torch.equal(a, b)) for a, b in zip(ref_labels, new_labels))
    segments = np.mean([int(lab.max()) + 1 for lab in new_labels])
    print(f"{args.images} images, {args.side}x{args.side} features x {args.channels} channels -> {args.px} px, "
          f"tau {args.tau}, alpha {args.alpha}; torch threads {torch.get_num_threads()}; "
          f"{segments:.1f} segments per image")
    print("| implementation | ms per image | label maps equal to the reference |")
    print("|---|---|---|")
    print(f"| previous (generalised eigh, default BLAS threads, all channels upsampled) | {ref_s * 1e3:.1f} | - |")
    print(f"| product (standard eigh, 1 BLAS thread, k similarity maps upsampled) | {new_s * 1e3:.1f} "
          f"| {same} of {args.images} |")
    print(f"\nratio previous / product: {ref_s / new_s:.1f}x")


if __name__ == "__main__":
    main()
