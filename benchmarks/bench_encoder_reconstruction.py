"""Does reconstruction keep its source? The same measurement for several diffusion models (issue 12).

For each model (a run, checkpoint or model folder), every held-out source is reconstructed from its own
c_GLB; a reconstruction counts as a hit when, among all the held-out sources, its own is the nearest in
area-downsampled pixels, a feature space the diffusion model is never conditioned on. Run it on models
trained the same way but for the encoder (e.g. `cpu-small` with the pretrained and with the random encoder):

    python benchmarks/bench_encoder_reconstruction.py --prepared PREP --split test \
        pretrained=runs/small-pretrained random=runs/small-random

Prints a markdown table (top-1, top-5, mean rank, with chance) and writes it with the numbers as JSON
(`--out`). Same images, same seeds and same sampler for every model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from dinodiff.demo.checks import load_split, source_retrieval
from dinodiff.pipeline.sample import generate_reconstructions, load_pipeline
from dinodiff.runs import resolve_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="LABEL=PATH: a run, checkpoint or model folder")
    parser.add_argument("--prepared", required=True, help="prepared folder with the held-out sources")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=200, help="held-out sources used (the first N)")
    parser.add_argument("--steps", type=int, default=25, help="DPM-Solver++ steps")
    parser.add_argument("--side", type=int, default=8, help="side of the downsampled pixels compared")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--out", type=Path, default=None, help="write the table and numbers as JSON here")
    return parser.parse_args()


def run_encoder(path: Path) -> str:
    """The encoder a run was trained with, from its config.yaml ('' for a bare model folder)."""
    config = path / "config.yaml"
    return str(yaml.safe_load(config.read_text())["model"]["encoder"]["name_or_path"]) if config.is_file() else ""


def measure(label: str, path: str, args: argparse.Namespace) -> dict:
    folder = resolve_model(path).location
    pipeline = load_pipeline(folder, "dpm", "cpu")
    pipeline.set_progress_bar_config(disable=True)
    sources = load_split(Path(args.prepared), args.split, pipeline.resolution, args.limit)
    start = time.perf_counter()
    recons = generate_reconstructions(pipeline, sources, 1, args.seed, args.batch_size,
                                      num_inference_steps=args.steps)
    scores = source_retrieval(recons, sources, side=args.side)
    return {"label": label, "model": folder, "encoder": run_encoder(Path(path)),
            "seconds": round(time.perf_counter() - start, 1), **scores}


def table(rows: list[dict]) -> str:
    lines = ["| model | encoder | held-out sources | top-1 (chance) | top-5 (chance) | mean rank (chance) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | `{r['encoder']}` | {r['n']} | {r['top1']:.3f} ({r['chance_top1']:.3f}) | "
                     f"{r['top5']:.3f} ({r['chance_top5']:.3f}) | {r['mean_rank']:.1f} ({r['chance_mean_rank']:.1f}) |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for spec in args.models:
        label, sep, path = spec.partition("=")
        if not sep:
            raise SystemExit(f"give each model as LABEL=PATH, got {spec!r}")
        rows.append(measure(label, path, args))
        print(f"{label}: top-1 {rows[-1]['top1']:.3f} in {rows[-1]['seconds']} s", flush=True)
    text = table(rows)
    print(text)
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "table": text, "settings": {
            k: str(v) for k, v in vars(args).items() if k != "models"}}, indent=2))


if __name__ == "__main__":
    main()
