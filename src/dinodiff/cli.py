"""The `dinodiff` command: one sub-command per stage, each a thin layer over a Python function.

prepare -> cache -> train -> generate -> evaluate (fid | classify | segment) -> report
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    help=(
        "DiNO-Diffusion: latent diffusion for chest X-rays conditioned on frozen DINO global tokens.\n\n"
        "Stages: prepare -> cache -> train -> generate -> fid | classify | segment -> report. "
        "Run `dinodiff demo` for the whole chain on built-in synthetic phantoms."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _load(config: Optional[str], overrides: Optional[List[str]]):
    from dinodiff.config import ConfigError, load_config

    try:
        return load_config(config, overrides or [])
    except ConfigError as err:
        _fail(str(err), 2)


@app.command()
def prepare(
    sources: List[Path] = typer.Argument(..., help="Image folders, a CSV, or a dataset root (MIMIC-CXR-JPG, Montgomery, Shenzhen, JSRT/SCR)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: shards/, manifest.json and rejects.csv go here."),
    kind: str = typer.Option("auto", help="Dataset layout: auto, folder, csv, mimic-cxr, montgomery, shenzhen or jsrt."),
    size: int = typer.Option(512, help="Side of the square output images in pixels."),
    min_size: int = typer.Option(64, help="Reject images whose content (after border removal) has a shorter side below this."),
    remove_borders: bool = typer.Option(True, help="Strip constant black/white frames and letterboxing before cropping."),
    intensity: str = typer.Option("minmax", help="How >8-bit images become uint8: minmax or percentile (0.5-99.5%)."),
    shard_size: int = typer.Option(1000, help="Input images per shard."),
    workers: Optional[int] = typer.Option(None, help="Parallel worker processes (default: all cores)."),
    seed: int = typer.Option(0, help="Seed of the train/test assignment when the dataset has no split."),
    test_fraction: float = typer.Option(0.0, help="Fraction of images put in the test split when the dataset has none."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Turn raw chest X-rays into WebDataset shards of square, border-free uint8 grey PNGs.

    Unusable files (zero-byte, truncated, not an image, DICOM without pixels, too small) are
    listed with their reason in OUT/rejects.csv; the run stops only when nothing is usable.
    Re-running skips finished shards and gives byte-identical output.
    """
    from dinodiff.prepare import NothingUsable, prepare as run_prepare

    try:
        manifest = run_prepare(
            sources, out, kind=kind, size=size, min_size=min_size, remove_borders=remove_borders,
            intensity=intensity, shard_size=shard_size, workers=workers, seed=seed,
            test_fraction=test_fraction, progress=progress,
        )
    except NothingUsable as err:
        _fail(str(err))
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err), 2)
    counts = manifest["counts"]
    typer.echo(
        f"{counts['written']} images written to {out / 'shards'} "
        f"({counts['rejected']} rejected, see {out / 'rejects.csv'}); manifest: {out / 'manifest.json'}"
    )


@app.command()
def phantoms(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (Montgomery layout + labels.csv)."),
    n: int = typer.Option(64, "-n", help="Number of phantoms."),
    size: int = typer.Option(256, help="Image side in pixels."),
    seed: int = typer.Option(0, help="Seed: same seed and index give the same phantom."),
) -> None:
    """Write deterministic synthetic chest-X-ray phantoms with lung masks and labels
    (Cardiomegaly, Pleural Effusion, Consolidation) for demos and tests."""
    from dinodiff.data.phantoms import write_phantoms

    folder = write_phantoms(out, n, size=size, seed=seed)
    typer.echo(f"{n} phantoms in {folder} (labels: {folder / 'labels.csv'})")


@app.command(context_settings={"allow_extra_args": False})
def cache(
    config: str = typer.Option(..., "--config", "-c", help="Preset name or YAML file (the model must match the training run)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for the cached shards."),
    views: int = typer.Option(4, help="Augmented views per image (K); training picks one per visit."),
    batch_size: int = typer.Option(16, help="Images per forward pass of the frozen models."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides, e.g. data.shards=prep/ model.resolution=256."),
) -> None:
    """Precompute VAE latent moments and encoder global tokens (c_GLB) for K augmented views of
    every prepared image, so training runs only the UNet. Resumable."""
    from dinodiff.cache import build_cache

    cfg = _load(config, overrides)
    manifest = build_cache(cfg, out, views=views, batch_size=batch_size)
    typer.echo(f"cached {manifest['count']} images x {views} views in {out}")


@app.command()
def train(
    config: str = typer.Option(..., "--config", "-c", help="Preset name (tiny, cpu-small, sd15-dinov1, sd15-dinov2) or YAML file."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides, e.g. train.max_steps=1000 optim.lr=2e-4 data.shards=prep/."),
    resume: Optional[str] = typer.Option(None, help="latest, none, or a checkpoint folder (default: the config's train.resume, 'auto')."),
) -> None:
    """Train the DiNO-Diffusion UNet with HF accelerate (CPU, one or many GPUs, many nodes).

    Launch multi-GPU with `accelerate launch -m dinodiff.cli train ...`. The run folder gets
    config.yaml, metrics.csv, TensorBoard logs, samples/ and checkpoints/; a killed run resumes
    from its newest checkpoint when started again.
    """
    from dinodiff.train import TrainingDiverged, train as run_train

    cfg = _load(config, overrides)
    if resume is not None:
        cfg.train.resume = resume
    try:
        run_dir = run_train(cfg)
    except TrainingDiverged as err:
        _fail(str(err))
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err), 2)
    typer.echo(f"run finished: {run_dir}")


def _not_yet(stage: str) -> None:
    typer.secho(f"`dinodiff {stage}` is not yet available in this version.", fg=typer.colors.YELLOW, err=True)
    raise typer.Exit(3)


@app.command()
def generate() -> None:
    """(Not yet available) Synthetic datasets by reconstruction or interpolation of c_GLB."""
    _not_yet("generate")


@app.command()
def fid() -> None:
    """(Not yet available) XRV-FID between two image sets."""
    _not_yet("fid")


@app.command()
def segment() -> None:
    """(Not yet available) Zero-shot lung segmentation from the UNet's self-attention (DiffSeg)."""
    _not_yet("segment")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-output"), "--out", "-o", help="Folder for everything the demo makes."),
    n: int = typer.Option(48, "-n", help="Number of synthetic phantoms to train on."),
    steps: int = typer.Option(60, help="Training steps (the demo is a smoke run, not a useful model)."),
) -> None:
    """Run every available stage end to end on built-in phantoms: phantoms -> prepare -> cache -> train."""
    from dinodiff.demo import run_demo

    run_demo(out, n=n, steps=steps)


def main() -> None:  # `python -m dinodiff.cli`, also what `accelerate launch -m` calls
    app()


if __name__ == "__main__":
    sys.exit(main())
