"""Encoders and embeddings: pretrain-encoder, probe-encoder, train-embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from dinodiff.cli.common import (
    CONFIG_HELP,
    configure_logging,
    failures,
    settings_options,
    stage_settings,
)

# light modules (no torch): the options of train-embeddings and probe-encoder are made from these settings' fields
from dinodiff.embeddings.settings import EmbeddingTrainSettings
from dinodiff.encoder.settings import ProbeSettings


def pretrain_encoder(
    config: str = typer.Option("cpu-encoder", "--config", "-c", help="Preset (cpu-encoder, gpu-encoder) or YAML file."),
    overrides: list[str] | None = typer.Argument(None, help="Dotted overrides, e.g. data.shards=PREP run.max_steps=600 optim.lr=1e-3 backbone.name_or_path=microsoft/rad-dino."),
    resume: str | None = typer.Option(None, help="latest, none, or a checkpoint folder (default: the config's run.resume, 'auto')."),
) -> None:
    """Pretrain a domain encoder on your own unlabelled images with DINO self-distillation.

    A student ViT and its EMA teacher (momentum cosine to 1), teacher centring and sharpening,
    2 global + N local crops with radiograph augmentations (no colour, no flips), lightly's DINO
    loss and head, HF accelerate (CPU, one or many GPUs). Trains from scratch (a transformers
    DINOv2-with-registers ViT) or continues from backbone.name_or_path. A collapse monitor logs the
    teacher's entropy and the normalised embedding std and stops a collapsed run. RUN/ gets config.yaml,
    metrics.csv, TensorBoard logs and checkpoints (a killed run resumes); RUN/encoder/ is the teacher,
    usable as `model.encoder.name_or_path=RUN/encoder`; RUN/encoder-init/ the same ViT at step 0.
    """
    from dinodiff.config import ConfigError
    from dinodiff.encoder.monitor import EncoderCollapsed
    from dinodiff.encoder.pretrain import EncoderDiverged
    from dinodiff.encoder.pretrain import pretrain_encoder as run_pretrain
    from dinodiff.encoder.settings import load_encoder_settings

    configure_logging()
    with failures({ConfigError: 2}):
        settings = load_encoder_settings(config, [*(overrides or []), *([f"run.resume={resume}"] if resume else [])])
    with failures({(EncoderCollapsed, EncoderDiverged): 1, (FileNotFoundError, ValueError): 2}):  # NoImages too
        out = run_pretrain(settings)
    typer.echo(f"encoder written to {out} (use model.encoder.name_or_path={out})")



@settings_options(ProbeSettings, "labels", "label_columns", "size", "folds", "k", "min_count", "seed", "transductive")
def probe_encoder(
    encoders: list[str] = typer.Argument(..., help="Encoder folders, hub ids or random:<family> (e.g. RUN/encoder RUN/encoder-init)."),
    data: list[Path] = typer.Option(..., "--data", "-d", help="Labelled images: prepared shards, a CSV or a dataset folder (repeatable)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Folder for results.json and table.md."),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP + " Also sets what has no option (C, views, tokens, heldout_views, augment)."),
    *,
    options: dict[str, Any],
) -> None:
    """Measure encoders on the same labelled images that none of them trained on: k-NN and linear-probe ROC AUC
    per label (cross-validated, grouped by subject, mean ± SD) and view retrieval top-1 among 2N views drawn with
    augmentations pretraining never used (plus the pretraining augmentation's, labelled pretext).

    The images each encoder trained on come from its training_images.json (written by pretrain-encoder) and are
    left out; an encoder without one (a hub model) is labelled unknown."""
    from dinodiff.encoder.probe import markdown_table, probe_encoders

    settings = stage_settings(ProbeSettings, config, options)
    with failures({(FileNotFoundError, ValueError, OSError): 2}):
        results = probe_encoders(encoders, data, out, settings)
    typer.echo(markdown_table(results.data), nl=False)



@settings_options(EmbeddingTrainSettings, "max_steps", "batch_size", "lr", "width", "depth", "labels", "label_dropout",
                  "checkpoint_every", "seed", "limit", "holdout_fraction", "metrics_chunk")
def train_embeddings_command(
    cache_dir: Path = typer.Option(..., "--cache", help="A `dinodiff cache` folder: its c_GLB (every augmented view) are the training set."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: settings.json, metrics.csv, checkpoints/, model/, eval.json."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    *,
    options: dict[str, Any],
) -> None:
    """Train the embedding generator for source-free generation: a small diffusion model over c_GLB (after RCG).

    Then `dinodiff generate MODEL --strategy sampled --embedding-model OUT ...` draws new c_GLB and decodes them.
    OUT/eval.json compares sampled embeddings with the held-out images' (precision/recall, FD), beside the real
    floor (training embeddings against the same held-out ones), and counts copies of training images (nearest of
    all their cached views).
    """
    import json

    from dinodiff.embeddings import train_embeddings

    configure_logging()
    with failures({(FileNotFoundError, ValueError): 2}):
        values = {**options, "cache": cache_dir, "out": out}
        settings = stage_settings(EmbeddingTrainSettings, config, values)
        folder = train_embeddings(settings, progress=progress)
    report = json.loads((out / "eval.json").read_text())
    floor = report.get("real_floor")
    typer.echo(f"embedding model: {folder}; nearest training image: NN median {report['nn_median']:.3f} (training's "
               f"own {report['train_nn_median']:.3f}), copies {report['copy_fraction']:.1%}; against "
               f"{report['n_reference']} {report['protocol']} embeddings: precision {report['precision']:.3f}, "
               f"recall {report['recall']:.3f}, FD {report['fd']:.3f}"
               + (f" (real training embeddings: {floor['precision']:.3f}, {floor['recall']:.3f}, {floor['fd']:.3f})"
                  if floor else ""))

