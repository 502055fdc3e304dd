"""The data stages: prepare (and phantoms) -> cache -> train -> generate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from dinodiff.cli.common import (
    CONFIG_HELP,
    configure_logging,
    failures,
    is_main_process,
    settings_options,
    stage_settings,
    training_settings,
    typed,
)
from dinodiff.config import PhantomSettings, PrepareSettings  # light: their fields make the options
from dinodiff.generate.settings import GenerateSettings


@settings_options(PrepareSettings, "kind", "size", "min_size", "remove_borders", "intensity", "shard_size", "workers",
                  "seed", "test_fraction", "val_fraction", "subject_column", "subject_pattern", "exclude")
def prepare(
    sources: list[Path] = typer.Argument(..., help="Image folders, a CSV, or a dataset root (MIMIC-CXR-JPG, Montgomery, Shenzhen, JSRT/SCR)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: shards/, manifest.json and rejects.csv go here."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP + " Fields: those of manifest.json's settings."),
    *,
    options: dict[str, Any],
) -> None:
    """Turn raw chest X-rays into WebDataset shards of square, border-free uint8 grey PNGs.

    Unusable files (zero-byte, truncated, not an image, DICOM without pixels, too small) are
    listed with their reason in OUT/rejects.csv; the run stops only when nothing is usable.
    Re-running skips finished shards and gives byte-identical output. Each sample's metadata names its
    subject (patient) when the dataset has one, and --test-fraction keeps a patient's images together.
    """
    from dinodiff.prepare import NothingUsable
    from dinodiff.prepare import prepare as run_prepare

    settings = stage_settings(PrepareSettings, config, options)
    with failures({NothingUsable: 1, (FileNotFoundError, ValueError): 2}):
        manifest = run_prepare(sources, out, settings, progress=progress)
    counts = manifest["counts"]
    excluded = counts["reject_reasons"].get("excluded", 0)
    typer.echo(
        f"{counts['written']} images written to {out / 'shards'} "
        f"({counts['rejected']} rejected{f', {excluded} of them excluded' if excluded else ''}, see "
        f"{out / 'rejects.csv'}); manifest: {out / 'manifest.json'}"
    )


@settings_options(PhantomSettings, "n", "size", "seed")
def phantoms(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (Montgomery layout + labels.csv)."),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    *,
    options: dict[str, Any],
) -> None:
    """Write deterministic synthetic chest-X-ray phantoms with lung masks and labels
    (Cardiomegaly, Pleural Effusion, Consolidation) for demos and tests."""
    from dinodiff.data.phantoms import write_phantoms

    settings = stage_settings(PhantomSettings, config, options)
    folder = write_phantoms(out, settings.n, size=settings.size, seed=settings.seed)
    typer.echo(f"{settings.n} phantoms in {folder} (labels: {folder / 'labels.csv'})")



def cache(
    config: str = typer.Option(..., "--config", "-c", help="Preset name or YAML file (the model must match the training run)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for the cached shards."),
    views: int = typer.Option(4, help="Augmented views per image (K); training picks one per visit."),
    batch_size: int = typer.Option(16, help="Images per forward pass of the frozen models."),
    overrides: list[str] | None = typer.Argument(None, help="Dotted overrides, e.g. data.shards=prep/ model.resolution=256."),
) -> None:
    """Precompute VAE latent moments and encoder global tokens (c_GLB) for K augmented views of
    every prepared image, so training runs only the UNet. Resumable."""
    from dinodiff.cache import build_cache

    cfg = training_settings(config, overrides)
    with failures({(FileNotFoundError, ValueError): 2}):  # missing or damaged shards: one line that names the fix
        manifest = build_cache(cfg, out, views=views, batch_size=batch_size)
    typer.echo(f"cached {manifest['count']} images x {views} views in {out}")


def train(
    config: str = typer.Option(..., "--config", "-c", help="Preset name (tiny, cpu-small, sd15-dinov1, sd15-dinov2) or YAML file."),
    overrides: list[str] | None = typer.Argument(None, help="Dotted overrides, e.g. train.max_steps=1000 optim.lr=2e-4 data.shards=prep/."),
    resume: str | None = typer.Option(None, help="latest, none, or a checkpoint folder (default: the config's train.resume, 'auto')."),
) -> None:
    """Train the DiNO-Diffusion UNet with HF accelerate (CPU, one or many GPUs, many nodes).

    Launch multi-GPU with `accelerate launch -m dinodiff.cli train ...`. The run folder gets
    config.yaml, metrics.csv, TensorBoard logs, samples/ and checkpoints/; a killed run resumes
    from its newest checkpoint when started again.
    """
    from dinodiff.evaluate.fid.sweep import hook_from_config
    from dinodiff.train import TrainingDiverged
    from dinodiff.train import train as run_train

    cfg = training_settings(config, [*(overrides or []), *([f"train.resume={resume}"] if resume is not None else [])])
    configure_logging(main_process=is_main_process())
    with failures({TrainingDiverged: 1, (FileNotFoundError, ValueError): 2}):
        # with train.eval_every > 0, checkpoints are scored by FID as the config's `eval` section says
        run_dir = run_train(cfg, eval_hook=hook_from_config(cfg) if cfg.train.eval_every else None)
    typer.echo(f"run finished: {run_dir}")



@settings_options(GenerateSettings, "strategy", "ratio", "num_inference_steps", "guidance_scale", "scheduler", "seed",
                  "mix", "r_range", "r_values", "shared_label", "embedding_model", "embedding_guidance",
                  "embedding_steps")
def generate(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Model folder (a checkpoint's model/, best/model), a run folder (its newest checkpoint) or a hub id."),
    source: Path = typer.Option(..., "--source", "-s", help="Labelled sources: prepared shards (folder or .tar), a CSV (path + label columns) or any dataset `prepare` reads."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: images/NNN/*.png (10,000 per folder), labels.csv, provenance.json, preview.png."),
    kind: str = typer.Option("auto", help="Source layout: auto, shards, csv, folder, mimic-cxr, montgomery, shenzhen or jsrt."),
    split: str | None = typer.Option(None, help="Use only this split of the sources (e.g. train); default all."),
    limit: int | None = typer.Option(None, help="Use only the first N sources."),
    path_column: str | None = typer.Option(None, help="CSV: column of image paths (default: path, filename, file, image...)."),
    label_columns: str | None = typer.Option(None, help="CSV: comma list of label columns; a text column (e.g. finding) becomes one label per value."),
    root: Path | None = typer.Option(None, help="CSV: folder the paths are relative to (default: the CSV's folder)."),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP + " Fields: those of provenance.json's settings."),
    batch_size: int | None = typer.Option(None, help="Images per forward pass (default 32 on CUDA, 8 on a CPU). Images do not depend on it beyond float rounding; keep it to finish a rerun bit-identically."),
    precision: str = typer.Option("auto", help="UNet/projection/VAE precision: auto (bf16 on CUDA, fp32 on a CPU), fp32, bf16 or fp16. The encoder stays fp32."),
    preview_rows: int = typer.Option(4, help="Rows of OUT/preview.png (reconstruction grid or interpolation strips); 0 = none."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    sync_timeout: float = typer.Option(6 * 3600, help="Several processes: seconds the others wait while the main one encodes the sources or writes the outputs."),
    *,
    options: dict[str, Any],
) -> None:
    """Generate a labelled synthetic dataset by reconstruction or interpolation of the sources' c_GLB.

    Resumable: rerun the same command to finish an interrupted run. Spread it over processes/GPUs with
    `accelerate launch -m dinodiff.cli generate ...` (each process makes a disjoint share; same images).
    """
    from dinodiff.generate.stage import generate_dataset
    from dinodiff.models.factory import check_model_source
    from dinodiff.runs import resolve_model

    configure_logging()
    with failures({(FileNotFoundError, ValueError): 2}):
        values = dict(options)
        # the sources' options are one field (source_options): typed ones, or all when no file gives them
        if config is None or typed(ctx, kind=kind, split=split, limit=limit, path_column=path_column,
                                   label_columns=label_columns, root=root):
            values["source_options"] = _source_options(kind, split, limit, path_column, label_columns, root)
        settings = stage_settings(GenerateSettings, config, values)
        folder = generate_dataset(resolve_model(check_model_source(model)).location, source, out, settings, batch_size=batch_size,
                                  preview_rows=preview_rows, progress=progress, sync_timeout_s=sync_timeout,
                                  precision=precision)
    typer.echo(f"synthetic dataset in {folder}: images/, labels.csv, provenance.json"
               + (", preview.png" if preview_rows else ""))


def _source_options(kind: str, split: str | None, limit: int | None, path_column: str | None,
                    label_columns: str | None, root: Path | None) -> dict:
    options = {"kind": kind, "split": split, "limit": limit}
    if path_column or label_columns or root:
        options.update(path_column=path_column, root=str(root) if root else None,
                       label_columns=label_columns.split(",") if label_columns else None)
    return options
