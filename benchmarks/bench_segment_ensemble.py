"""ncut-inputs on the features of several checkpoints or training runs at once: does it cut the run-to-run spread?

    python benchmarks/bench_segment_ensemble.py --data LUNGS-COVID --data LUNGS-SHENZHEN --out ens.json \\
        --model A1=SEG-A/checkpoints/checkpoint-1000 --model A2=SEG-A/checkpoints/checkpoint-2000 \\
        --model B1=SEG-B/checkpoints/checkpoint-1000 --ensemble A1+A2 --ensemble A1+A2+B1

Each model's ncut-inputs features (the inputs of the last self-attention layer of each map side, L2-normalised
per layer, as `dinodiff segment` computes them) are captured once per image. An ensemble concatenates its members'
features, as `segment` concatenates the passes of a timestep group, so the cut's cosine affinity is the members'
mean cosine. Every single model and every ensemble then gets the same search (feature side x tau x alpha) on the
tuning split and is scored on the report split, the split `dinodiff segment` makes (the same images, seed and
training-image check), beside Otsu with a paired bootstrap. Prints a table; writes per-image Dice to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from dinodiff.evaluate.segment.attention import load_attention_model
from dinodiff.evaluate.segment.diffcut import diffcut
from dinodiff.evaluate.segment.grid import record, run_passes
from dinodiff.evaluate.segment.metrics import paired_bootstrap
from dinodiff.evaluate.segment.settings import SegmentSettings
from dinodiff.evaluate.segment.split import REPORT, TUNE, only, tag
from dinodiff.evaluate.segment.stage import (
    ModelLoader,
    evaluation_images,
    expand_models,
    model_resolution,
    run_baselines,
)


def capture(path: Path, cases, settings: SegmentSettings, sides: list[int],
            timestep: int) -> dict[int, list[torch.Tensor]]:
    """Per map side, each case's ncut-inputs features (N, C) of one model at one timestep."""
    model = load_attention_model(path, "cpu")
    feats: dict[int, list[torch.Tensor]] = {s: [] for s in sides}
    for start in range(0, len(cases), settings.batch_size):
        batch = cases[start:start + settings.batch_size]
        images = torch.from_numpy(np.stack([c.image for c in batch])).float().div(255.0)[:, None]
        passes = run_passes(model, images, (timestep,), settings, ["ncut-inputs"], torch.float32)
        for side in sides:
            feats[side] += list(passes.features["ncut-inputs"][side].float())
    return feats


def search(name: str, feats: dict[int, list[torch.Tensor]], cases, splits, args) -> dict:
    """Every (side, tau, alpha) on all images; the tuning split's best cell, scored on the report split."""
    cells = {}
    for side, per_case in feats.items():
        for tau in args.taus:
            for alpha in args.alphas:
                recs = [record(c, diffcut(f, tau, alpha, c.image.shape)[0].numpy()) for c, f in zip(cases, per_case)]
                cells[side, tau, alpha] = tag(recs, splits)
    dice = lambda recs: [r["hungarian"]["both"] for r in recs]  # noqa: E731
    best = max(cells, key=lambda k: np.mean(dice(only(cells[k], TUNE))))
    return {"name": name, "cell": {"side": best[0], "tau": best[1], "alpha": best[2]},
            "tuning": float(np.mean(dice(only(cells[best], TUNE)))), "report": dice(only(cells[best], REPORT))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="NAME=checkpoint or model folder")
    parser.add_argument("--ensemble", action="append", default=[], help="NAME+NAME+...: members' features joined")
    parser.add_argument("--data", action="append", required=True)
    parser.add_argument("--out", required=True, help="JSON with every row's per-image report Dice")
    parser.add_argument("--sides", default="8,16")
    parser.add_argument("--taus", default="0.5,0.7,0.9")
    parser.add_argument("--alphas", default="3,5,10")
    parser.add_argument("--timestep", type=int, default=50)
    args = parser.parse_args()
    args.taus = [float(t) for t in args.taus.split(",")]
    args.alphas = [float(a) for a in args.alphas.split(",")]
    sides = [int(s) for s in args.sides.split(",")]
    models = {name: expand_models([path])[0] for name, path in (m.split("=", 1) for m in args.model)}
    paths = list(models.values())
    settings = SegmentSettings(methods=("ncut-inputs",), timesteps=[args.timestep], device="cpu")
    settings = dataclasses.replace(settings, resolution=model_resolution(paths[0], ModelLoader("cpu")))
    cases, splits, seen = evaluation_images(args.data, paths, settings, Path(args.out).parent / "ensemble-work")
    print(seen["statement"])
    feats = {name: capture(path, cases, settings, sides, args.timestep) for name, path in models.items()}
    rows = [search(name, feats[name], cases, splits, args) for name in models]
    for spec in args.ensemble:
        members = spec.split("+")
        joined = {s: [torch.cat([feats[m][s][i] for m in members], dim=-1) for i in range(len(cases))] for s in sides}
        rows.append(search(spec, joined, cases, splits, args))
    otsu = [r["hungarian"]["both"] for r in only(tag(run_baselines(cases)["otsu"], splits), REPORT)]
    print(f"{sum(v == REPORT for v in splits.values())} report images, {sum(v == TUNE for v in splits.values())} "
          f"tuning; Otsu on the report split {np.mean(otsu) * 100:.1f} ± {np.std(otsu) * 100:.1f}")
    print("| features | chosen on tuning (side, tau, alpha) | tuning | report | vs Otsu (95% CI), p |")
    print("|---|---|---|---|---|")
    for row in rows:
        mean, low, high, p = paired_bootstrap(row["report"], otsu)
        row["vs_otsu"] = [mean, low, high, p]
        c = row["cell"]
        print(f"| {row['name']} | {c['side']}x{c['side']}, {c['tau']:g}, {c['alpha']:g} | {row['tuning'] * 100:.1f} "
              f"| {np.mean(row['report']) * 100:.1f} ± {np.std(row['report']) * 100:.1f} "
              f"| {mean * 100:+.1f} [{low * 100:+.1f}, {high * 100:+.1f}], p = {p:.4f} |")
    Path(args.out).write_text(json.dumps({"statement": seen["statement"], "otsu": otsu, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
