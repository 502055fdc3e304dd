"""Why DiffSeg sees flat attention: entropy and locality of every self-attention layer of trained models.

    python benchmarks/bench_attention.py --model cpu-seg=RUN [--model other=RUN ...] --out OUT \
        [--timesteps 50,300,700] [--raw] [--untrained] [--resolutions 128] [--images 16]

For each model (a run = each of its checkpoints; a checkpoint; a model folder), weights (the EMA weights of
the model folder; with --raw also the raw weights of the checkpoint's training state; with --untrained the
same architecture at initialisation, step 0), image size (the model's own and any --resolutions: a larger
input gives larger attention maps to the same convolutional UNet, out of its training distribution) and
timestep, one UNet pass over the first --images lung images (clean latent, the image's own c_GLB) records
every self-attention map; `dinodiff.evaluate.segment.locality.layer_locality` summarises each layer:
entropy / log N (1 = uniform) and mean attention distance in map pixels, as a fraction of the side and
against uniform attention (1 = no locality). Prints the table (per layer and averaged per map side) and
writes OUT/attention.csv, OUT/attention.md and OUT/attention.png.
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from dinodiff import runs
from dinodiff.config import load_training_settings
from dinodiff.evaluate.segment.attention import AttentionModel, capture_pass, dinodiff_model
from dinodiff.evaluate.segment.data import load_cases
from dinodiff.evaluate.segment.locality import layer_locality
from dinodiff.models.factory import build_components
from dinodiff.pipeline import load_model_folder

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DINODIFF_TEST_DATA", REPO.parent / "shared" / "data"))
FIELDS = ["model", "step", "weights", "px", "timestep", "layer", "side", "entropy_ratio", "distance_px",
          "distance_frac", "distance_ratio", "logit_sd"]
STATS = ("entropy_ratio", "distance_px", "distance_frac", "distance_ratio", "logit_sd")


def step_of(model_dir: Path) -> int:
    step = runs.checkpoint_step(model_dir)
    return -1 if step is None else step


def load(model_dir: Path, weights: str) -> AttentionModel:
    """The model folder with its EMA weights, the checkpoint's raw weights, or re-initialised (step 0)."""
    parts = load_model_folder(model_dir)
    if weights == "raw":
        from safetensors.torch import load_file

        state = load_file(model_dir.parent / "model.safetensors")  # accelerate's copy of the trained module
        parts.unet.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("unet.")})
        parts.projection.load_state_dict({k[11:]: v for k, v in state.items() if k.startswith("projection.")})
    elif weights == "untrained":
        cfg = load_training_settings(model_dir.parent.parent.parent / "config.yaml")
        torch.manual_seed(int(cfg.train.seed))
        fresh = build_components(cfg.model)
        parts.unet.load_state_dict(fresh.unet.state_dict())
        parts.projection.load_state_dict(fresh.projection.state_dict())
    return dinodiff_model(parts.encoder, parts.autoencoder, parts.unet.eval(), parts.projection,
                          parts.noise_scheduler)


def measure(model: AttentionModel, images: torch.Tensor, timestep: int) -> list[dict]:
    maps = capture_pass(model, images, timestep=timestep).maps
    return [{"layer": name, **layer_locality(m)} for name, m in maps.items()]


def model_runs(args: argparse.Namespace) -> list[tuple[str, Path, str]]:
    """(label, model folder, weights) to measure."""
    todo = []
    for spec in args.model:
        label, path = spec.split("=", 1)
        folders = runs.run_models(path)
        if args.last:
            folders = folders[-1:]
        if args.untrained:
            todo.append((label, folders[0], "untrained"))
        for folder in folders:
            todo.append((label, folder, "ema"))
            if args.raw and (folder.parent / "model.safetensors").is_file():
                todo.append((label, folder, "raw"))
    return todo


def collect(args: argparse.Namespace) -> list[dict]:
    rows = []
    for label, folder, weights in model_runs(args):
        model = load(folder, weights)
        own = model.resolution
        for px in [own, *[r for r in args.resolutions if r != own]]:
            cases = load_cases(args.data, px, limit=args.images)
            images = torch.from_numpy(np.stack([c.image for c in cases])).float().div(255)[:, None]
            for t in args.timesteps:
                started = time.perf_counter()
                step = 0 if weights == "untrained" else step_of(folder)
                for stats in measure(model, images, t):
                    rows.append({"model": label, "step": step, "weights": weights, "px": px, "timestep": t, **stats})
                print(f"{label} step {step} {weights} {px}px t={t}: {time.perf_counter() - started:.1f} s", flush=True)
    return rows


def by_side(rows: list[dict]) -> list[dict]:
    """The layers of each map side averaged (per model, step, weights, px, timestep)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["step"], r["weights"], r["px"], r["timestep"], r["side"])].append(r)
    out = []
    for key, members in groups.items():
        out.append({**dict(zip(["model", "step", "weights", "px", "timestep", "side"], key)), "layers": len(members),
                    **{f: float(np.mean([m[f] for m in members])) for f in STATS}})
    return sorted(out, key=lambda r: (r["model"], r["weights"], r["px"], r["timestep"], r["step"], -r["side"]))


def markdown(summary: list[dict]) -> str:
    head = ("| model | step | weights | px | t | map | layers | entropy / log N | distance (map px) | distance / side "
            "| distance / uniform | logit SD |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['model']} | {r['step']} | {r['weights']} | {r['px']} | {r['timestep']} | {r['side']}x{r['side']} "
             f"| {r['layers']} | {r['entropy_ratio']:.3f} | {r['distance_px']:.2f} | {r['distance_frac']:.3f} "
             f"| {r['distance_ratio']:.3f} | {r['logit_sd']:.3f} |" for r in summary]
    return "\n".join([head, *lines]) + "\n"


def plot(summary: list[dict], path: Path, timestep: int) -> None:
    """Entropy ratio and distance ratio against training step (EMA, native size, ``timestep``) and against
    the timestep (each model's last step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    native = {r["model"]: min(s["px"] for s in summary if s["model"] == r["model"]) for r in summary}
    curves: dict[tuple, list] = defaultdict(list)
    for r in summary:
        if r["px"] == native[r["model"]] and r["timestep"] == timestep and r["weights"] in ("ema", "untrained"):
            curves[(r["model"], r["side"])].append((r["step"], r["entropy_ratio"], r["distance_ratio"]))
    for (model, side), points in sorted(curves.items()):
        points.sort()
        steps, ent, dist = zip(*points)
        axes[0].plot(steps, ent, marker="o", label=f"{model} {side}x{side}")
        axes[1].plot(steps, dist, marker="o", label=f"{model} {side}x{side}")
    axes[0].set(xlabel="training step", ylabel="entropy / log N", title=f"entropy (t={timestep}, EMA)")
    axes[1].set(xlabel="training step", ylabel="distance / uniform", title=f"mean attention distance (t={timestep})")
    last = {m: max(r["step"] for r in summary if r["model"] == m and r["weights"] == "ema") for m in native}
    by_t: dict[tuple, list] = defaultdict(list)
    for r in summary:
        if r["weights"] == "ema" and r["step"] == last[r["model"]] and r["px"] == native[r["model"]]:
            by_t[(r["model"], r["side"])].append((r["timestep"], r["distance_ratio"]))
    for (model, side), points in sorted(by_t.items()):
        ts, dist = zip(*sorted(points))
        axes[2].plot(ts, dist, marker="o", label=f"{model} {side}x{side}")
    axes[2].set(xlabel="timestep", ylabel="distance / uniform", title="locality vs timestep (last step)")
    for ax in axes:
        ax.axhline(1.0, color="grey", lw=0.6, ls="--")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="LABEL=PATH (a run, checkpoint or model)")
    parser.add_argument("--data", default=str(DATA / "lungs-covid"))
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--timesteps", default="300", help="comma list")
    parser.add_argument("--resolutions", default="", help="extra image sizes (comma list)")
    parser.add_argument("--raw", action="store_true", help="also the checkpoints' raw (non-EMA) weights")
    parser.add_argument("--untrained", action="store_true", help="also the architecture at initialisation")
    parser.add_argument("--last", action="store_true", help="only each run's last checkpoint")
    parser.add_argument("--plot-timestep", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    args.timesteps = [int(t) for t in args.timesteps.split(",") if t]
    args.resolutions = [int(r) for r in args.resolutions.split(",") if r]
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(args)
    with (out / "attention.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    summary = by_side(rows)
    text = markdown(summary)
    (out / "attention.md").write_text(text)
    plot(summary, out / "attention.png", args.plot_timestep)
    print(text)
    print(f"wrote {out / 'attention.csv'}, {out / 'attention.md'}, {out / 'attention.png'}")


if __name__ == "__main__":
    main()
