"""The demo's learning checks: measured comparisons that show the trained model learned the images.

- Samples: Fréchet distance to held-out images in two offline feature spaces (8x8 downsampled pixels, and the
  CLS token of the encoder pretrained in the demo), trained model vs the same model at initialisation
  (same conditions, same seeds); real training images give the floor.
- Reconstructions keep their source: each held-out image is reconstructed from its c_GLB; where its own source
  ranks among all N sources in 8x8 downsampled pixels (not the conditioning space): top-1, top-5 and mean rank,
  against chance (1/N, 5/N, (N-1)/2).
- Interpolation: strips c = lerp(c_A, c_B, r) from one noise; pixel distance to A rises and to B falls with r.

Everything is written to OUT/checks/results.json ("kind": "demo-checks"), with its figures, for the report.
"""

from __future__ import annotations

import copy
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dinodiff.data.image_sets import iter_sources
from dinodiff.evaluate.fid.stage import fid_from_features
from dinodiff.pipeline import DiNODiffusionPipeline
from dinodiff.pipeline.figures import interpolation_strip, save_rows
from dinodiff.pipeline.sample import generate_reconstructions, load_pipeline
from dinodiff.results import RESULTS_FILE, Results, read_results, write_results
from dinodiff.sampling import item_seed

logger = logging.getLogger(__name__)
STRIP_R = (0.0, 0.25, 0.5, 0.75, 1.0)
FD_MARGIN = 0.5  # "well below": the trained model's FD under half the untrained one's


def load_split(prepared: Path, split: str, size: int, limit: int) -> torch.Tensor:
    """(N, 1, size, size) float in [0, 1]: the first `limit` prepared images of `split`."""
    images = [torch.from_numpy(s.image).float()[None] / 255
              for s in iter_sources(prepared, size=size, split=split, limit=limit)]
    if not images:
        raise ValueError(f"{prepared} has no {split!r} images; prepare it with a test fraction > 0.")
    return torch.stack(images)


def pixels(images: torch.Tensor, side: int) -> np.ndarray:
    """Area-downsampled pixels, flattened: a feature space that needs no weights."""
    return F.adaptive_avg_pool2d(images.float(), side).flatten(1).numpy().astype(np.float64)


@torch.no_grad()
def cls_features(pipe: DiNODiffusionPipeline, images: torch.Tensor) -> np.ndarray:
    """The demo encoder's CLS token (token 0 of c_GLB)."""
    return torch.cat([pipe.encode_images(images[i:i + 32])[:, 0].cpu() for i in range(0, len(images), 32)]).numpy()


def untrained_copy(pipe: DiNODiffusionPipeline, seed: int) -> DiNODiffusionPipeline:
    """The same pipeline with its trained parts (UNet, projection) back at a fresh initialisation (step 0)."""
    torch.manual_seed(seed)
    fresh = copy.deepcopy(pipe)
    for module in (*fresh.unet.modules(), *fresh.projection.modules()):
        if module is not fresh.unet and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return fresh


def source_retrieval(recons: torch.Tensor, sources: torch.Tensor, side: int = 8) -> dict[str, float]:
    """Where each reconstruction's own source ranks among all sources by L2 in downsampled pixels:
    top-1 and top-5 rates and the mean rank (0 = nearest), with their chance values."""
    a, b = torch.from_numpy(pixels(recons, side)), torch.from_numpy(pixels(sources, side))
    d = torch.cdist(a, b)
    rank = (d < d.diag()[:, None]).sum(1).float()
    n = len(sources)
    return {"top1": float((rank == 0).float().mean()), "top5": float((rank < 5).float().mean()),
            "mean_rank": float(rank.mean()), "chance_top1": 1 / n, "chance_top5": min(5, n) / n,
            "chance_mean_rank": (n - 1) / 2, "n": n}


def strip_distances(pipe: DiNODiffusionPipeline, sources: torch.Tensor, pairs: int, seed: int, steps: int,
                    figure: Path) -> dict[str, list[float]]:
    """Mean pixel RMS distance to A and to B along r, over `pairs` (A, B) pairs of held-out images."""
    c_glb = torch.cat([pipe.encode_images(sources[i:i + 32]).cpu() for i in range(0, len(sources), 32)])
    to_a, to_b, rows = [], [], []
    for i in range(pairs):
        a, b = 2 * i, 2 * i + 1
        strip = interpolation_strip(pipe, c_glb[a], c_glb[b], rs=STRIP_R, seed=item_seed(seed, i), steps=steps)
        flat = torch.from_numpy(pixels(strip, 16))
        to_a.append(torch.cdist(flat, torch.from_numpy(pixels(sources[a:a + 1], 16)))[:, 0] / 16)
        to_b.append(torch.cdist(flat, torch.from_numpy(pixels(sources[b:b + 1], 16)))[:, 0] / 16)
        rows.append(torch.cat([sources[a:a + 1], strip, sources[b:b + 1]]))
    save_rows(figure, rows)
    return {"to_a": torch.stack(to_a).mean(0).tolist(), "to_b": torch.stack(to_b).mean(0).tolist()}


def _fd_rows(real_fd: dict, trained: dict, untrained: dict) -> list[dict]:
    rows = []
    for space in trained:
        rows.append({"check": f"samples: FD to held-out ({space})", "trained": round(trained[space], 4),
                     "untrained (step 0)": round(untrained[space], 4), "real train images": round(real_fd[space], 4),
                     "holds": bool(trained[space] < FD_MARGIN * untrained[space])})
    return rows


def sample_quality(pipe: DiNODiffusionPipeline, fresh: DiNODiffusionPipeline, train_src: torch.Tensor,
                   held_out: torch.Tensor, seed: int, steps: int, figure: Path) -> list[dict]:
    """FD of samples (conditioned on training images) to held-out images, trained vs untrained, + a grid."""
    samples = generate_reconstructions(pipe, train_src, 1, seed, 32, num_inference_steps=steps)
    noise = generate_reconstructions(fresh, train_src, 1, seed, 32, num_inference_steps=steps)
    spaces = {"8x8 pixels": lambda x: pixels(x, 8), "demo encoder CLS": lambda x: cls_features(pipe, x)}
    ref = {name: f(held_out) for name, f in spaces.items()}
    fd = lambda x: {name: fid_from_features(ref[name], f(x)) for name, f in spaces.items()}  # noqa: E731
    k = min(8, len(train_src), len(held_out))
    save_rows(figure, [held_out[:k], train_src[:k], samples[:k], noise[:k]])
    return _fd_rows(fd(train_src), fd(samples), fd(noise))


def learning_checks(model: Path, prepared: Path, out: Path, *, size: int, eval_images: int, pairs: int, seed: int,
                    steps: int, provenance: dict[str, Any], sampler: str = "dpm") -> dict[str, Any]:
    """Measure every check, write OUT/results.json and the figures; returns the results."""
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(model, sampler, "cpu")
    pipe.set_progress_bar_config(disable=True)
    held_out = load_split(prepared, "test", size, eval_images)
    train_src = load_split(prepared, "train", size, eval_images)
    fresh = untrained_copy(pipe, seed)
    rows = sample_quality(pipe, fresh, train_src, held_out, seed, steps, out / "samples.png")
    recons = generate_reconstructions(pipe, held_out, 1, seed + 1, 32, num_inference_steps=steps)
    ret = source_retrieval(recons, held_out)
    rows.append({"check": f"reconstructions: own source is the nearest (8x8 pixels) of {ret['n']} held-out sources",
                 "trained": round(ret["top1"], 4), "chance": round(ret["chance_top1"], 4),
                 "holds": bool(ret["top1"] >= 3 * ret["chance_top1"])})
    rows.append({"check": f"reconstructions: own source among the 5 nearest (8x8 pixels) of {ret['n']}",
                 "trained": round(ret["top5"], 4), "chance": round(ret["chance_top5"], 4),
                 "holds": bool(ret["top5"] >= 1.5 * ret["chance_top5"])})
    rows.append({"check": "reconstructions: mean rank of the own source (0 = nearest)",
                 "trained": round(ret["mean_rank"], 2), "chance": ret["chance_mean_rank"],
                 "holds": bool(ret["mean_rank"] <= 0.75 * ret["chance_mean_rank"])})
    k = min(8, len(held_out))
    save_rows(out / "reconstructions.png", [held_out[:k], recons[:k]])
    dist = strip_distances(pipe, held_out, min(pairs, len(held_out) // 2), seed, steps, out / "interpolation.png")
    moves = dist["to_a"][-1] > dist["to_a"][0] and dist["to_b"][-1] < dist["to_b"][0]
    rows.append({"check": "interpolation: RMS distance to A / to B at r = " + ", ".join(f"{r:g}" for r in STRIP_R),
                 "trained": " ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(dist["to_a"], dist["to_b"])),
                 "holds": bool(moves)})
    return write_checks(out, rows, dist, ret, provenance)


def write_checks(out: Path, rows: list[dict], dist: dict, ret: dict, provenance: dict[str, Any]) -> Results:
    """OUT/results.json: the learning checks as a results record (the report's "demo-checks" section)."""
    results = Results(
        kind="demo-checks", title="Demo: what the model learned (measured against baselines)",
        provenance={**provenance, "command": " ".join(["dinodiff", *sys.argv[1:]]) if sys.argv else "dinodiff demo"},
        headline={"checks that hold": f"{sum(r['holds'] for r in rows)}/{len(rows)}",
                  "reconstruction top-1 (8x8 pixels)": f"{ret['top1']:.2f} (chance {ret['chance_top1']:.2f})"},
        tables={"learning checks": rows},
        figures={"samples (rows: held-out, training sources, trained model, untrained model)": "samples.png",
                 "reconstructions (top: held-out sources, bottom: reconstructions)": "reconstructions.png",
                 "interpolation strips (A, r = 0 ... 1, B)": "interpolation.png"},
        data={"interpolation": dist, "retrieval": ret})
    write_results(out, results)
    return read_results(out / RESULTS_FILE)  # JSON-plain, as a reader sees it


def all_hold(results: Results) -> Sequence[str]:
    """The checks that do not hold (empty when all do)."""
    return [r["check"] for r in results.tables["learning checks"] if not r["holds"]]
