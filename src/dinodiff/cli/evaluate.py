"""The evaluations and the report: fid, sweep, segment, report, classify, audit."""

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
    typed,
)
from dinodiff.config import FidSettings, ReportSettings  # light, like AuditSettings: their fields make options
from dinodiff.evaluate.audit.settings import AuditSettings
from dinodiff.evaluate.classify.settings import ClassifySettings
from dinodiff.evaluate.segment.settings import SegmentSettings


@settings_options(FidSettings, "extractor", "weights", "seed", "split", "batch_size", "device", "cache_dir", "cache",
                  "kid_subsets", "kid_subset_size")
def fid(
    ctx: typer.Context,
    real: Path = typer.Argument(..., help="Real images: a folder, a `prepare` folder/shards, or a synthetic dataset."),
    fake: Path = typer.Argument(..., help="Generated images: a `dinodiff generate` folder, a folder of images or shards."),
    num_samples: int = typer.Option(5000, help="Images drawn from each set (all when a set has fewer); 0 = all."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the results record here (a folder gets results.json; a .json file name is used as given); `dinodiff report` shows it."),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    *,
    options: dict[str, Any],
) -> None:
    """FID and KID between two image sets, on XRV features by default (the paper's protocol).

    The result names the extractor, its feature tap and weights: FIDs on different taps are not comparable.
    """
    from dinodiff.evaluate.fid.stage import fid as run_fid

    values = dict(options)
    if "num_samples" in typed(ctx, num_samples=num_samples):
        values.update(num_real=num_samples or None, num_sources=num_samples or None)
    settings = stage_settings(FidSettings, config, values)
    with failures({(FileNotFoundError, ValueError): 2}):  # MissingWeights is a FileNotFoundError
        result = run_fid(real, fake, settings, out=out)
    typer.echo(f"FID {result['fid']:.4f}  KID {result['kid_mean']:.5f} +- {result['kid_std']:.5f}  "
               f"({result['extractor']}:{result['tap']}, {result['n_real']} real vs {result['n_fake']} fake)")
    if out is not None:
        typer.echo(f"result: {out}")


@settings_options(FidSettings, "real", "sources", "num_real", "num_sources", "sample_steps", "extractor", "weights",
                  "split", "per_source", "batch_size", "seed", "device", "cache_dir")
def sweep(
    run_dir: Path = typer.Argument(..., help="A training run folder (with checkpoints/)."),
    force: bool = typer.Option(False, help="Re-score checkpoints already in fid.csv."),
    update_best: bool = typer.Option(True, help="Copy the lowest-FID checkpoint's model to RUN_DIR/best/."),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP + " A run's config.yaml `eval:` section has the same fields."),
    *,
    options: dict[str, Any],
) -> None:
    """Score every checkpoint of a run by FID of reconstructions (the paper's Figure 3).

    Writes RUN_DIR/fid.csv and RUN_DIR/fid.png (best checkpoint starred) and keeps RUN_DIR/best/ up to date.
    Restartable: checkpoints already scored with the same settings are skipped.
    """
    from dinodiff.evaluate.fid.sweep import sweep as run_sweep

    configure_logging()  # one line per checkpoint
    settings = stage_settings(FidSettings, config, options)
    with failures({(FileNotFoundError, ValueError): 2}):  # MissingWeights is a FileNotFoundError
        summary = run_sweep(run_dir, settings, force=force, update_best=update_best)
    for row in summary["rows"]:
        typer.echo(f"step {row['step']:>8}  FID {float(row['fid']):10.4f}  KID {float(row['kid_mean']):.5f}")
    best = summary["best"]
    if best is not None:
        typer.echo(f"best: step {best['step']} (FID {float(best['fid']):.4f}, {best['extractor']}:{best['tap']})")
    typer.echo(f"table: {summary['csv']}  plot: {summary['plot']}" + (f"  best model: {summary['best_dir']}" if summary["best_dir"] else ""))


@settings_options(SegmentSettings, "methods", "thresholds", "threshold_mode", "merge_iterations", "grid_sizes", "taus",
                  "alphas", "feature_sides", "refinements", "superpixel_scales", "node_scales", "timesteps",
                  "noise_seeds", "report_fraction", "split_seed", "condition", "transductive", "resolution", "sd15",
                  "batch_size", "device", "limit", "n_overlay")
def segment(
    models: list[Path] = typer.Argument(..., help="Model folders, checkpoints or run folders (a run = all its checkpoints, grid-searched)."),
    data: list[Path] = typer.Option(..., "--data", "-d", help="Images with lung masks: Montgomery, Shenzhen, JSRT/SCR layout or images/ + masks/ (repeat for several)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: table.md, table.csv, results.json, overlays/, cells/ (cache)."),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP + " Fields: those of SegmentSettings (results.json's settings)."),
    *,
    options: dict[str, Any],
) -> None:
    """Zero-shot lung segmentation from the UNet's self-attention, scored by Dice against lung masks.

    DiffSeg (the paper's), DiffCut, ncut-inputs and/or ncut-superpixels, grid-searched over their parameters x
    timesteps x checkpoints on a tuning split of the images (by subject) and reported on the other images, beside a
    leave-one-out mean-mask prior, a position-only k-means control, Otsu, image-only superpixels (Felzenszwalb,
    scale chosen on the tuning split) and the whole image. Cells are cached: a re-run computes only new ones.
    """
    from dinodiff.evaluate.segment.stage import segment as run_segment

    configure_logging()
    with failures({(FileNotFoundError, ValueError): 2}):
        settings = stage_settings(SegmentSettings, config, options)
        results = run_segment(models, data, out, settings)
    typer.echo(Path(results["tables"]["markdown"]).read_text())
    typer.echo(f"tables: {results['tables']['markdown']}, {results['tables']['csv']}; results: {out / 'results.json'}"
               + "".join(f"\noverlay: {p}" for p in results.get("overlays", {}).values()))


@settings_options(ReportSettings, "title")
def report(
    root: Path = typer.Argument(..., help="A training run folder, or a work folder holding stage outputs (searched recursively)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="The HTML page (default ROOT/report.html); the Markdown summary goes beside it (.md)."),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    *,
    options: dict[str, Any],
) -> None:
    """One self-contained HTML page (figures embedded) and a Markdown summary of every result under ROOT.

    Reads only the files the stages write (config.yaml, metrics.csv, fid.csv, provenance.json, results.json);
    sections without results are listed with the command that makes them.
    """
    from dinodiff.report import ReportError, build_report

    settings = stage_settings(ReportSettings, config, options)
    with failures({(ReportError, FileNotFoundError): 2}):
        summary = build_report(root, out, title=settings.title)
    for name in summary["sections"]:
        typer.echo(f"  ok       {name}")
    for name, command in summary["missing"]:
        typer.echo(f"  missing  {name}: {command}")
    for problem in summary["problems"]:
        typer.echo(f"  unread   {problem}")
    typer.echo(f"report: {summary['html']}  summary: {summary['markdown']}")



@settings_options(ClassifySettings, "out", "data.source", "synthetic.model", "workers")
def classify(
    config: str | None = typer.Option(None, "--config", "-c", help="Preset (classify-phantoms, classify-cxr-covid, classify-mimic) or YAML file merged over the paper's defaults."),
    overrides: list[str] | None = typer.Argument(None, help="Dotted overrides, e.g. data.source=prep/ synthetic.model=run/ regimes=[50,100] classifier.max_epochs=20."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    *,
    options: dict[str, Any],
) -> None:
    """Downstream classification (the paper's Table 1 and Figure 4): real-only vs augmentation (real + synthetic)
    vs full-synthetic, each synthetic arm beside the count-matched control of its own size (real images repeated
    to (1 + r) n for augmentation, to r n for full-synthetic).

    Label-balanced nested subsets per regime, split and grouped by subject (patient); repeated k-fold
    cross-validation; synthetic sets made with `generate` from each fold's training images only (keyed on the
    model's weights); test AUC, the corrected resampled t-test with Holm correction and paired-bootstrap 95%
    intervals of every difference. Every cell is cached: rerun the same command to resume an interrupted grid.
    """
    from dinodiff.evaluate.classify import classify as run_classify
    from dinodiff.evaluate.classify import load_settings

    configure_logging()
    with failures({(FileNotFoundError, ValueError, RuntimeError): 2}):  # a ConfigError is a ValueError
        settings = load_settings(config, overrides or [], values=options)
        results = run_classify(settings, progress=progress)
    files = results.data["files"]
    typer.echo(Path(files["table_markdown"]).read_text())
    typer.echo(f"classifier weights: {', '.join(results.data['classifier']['weights'])}; results: "
               f"{files['results_csv']}, {Path(settings.out) / 'results.json'}"
               + (f"; figure: {files['figure']}" if "figure" in files else ""))



@settings_options(AuditSettings, "holdout", "model", "encoder", "xrv_weights", "size", "limit", "pairs", "spaces",
                  "candidates", "calibration_queries", "seed", "chunk", "max_memory_mb", "device")
def audit(
    synthetic: list[Path] = typer.Argument(..., help="Synthetic datasets made by `dinodiff generate` (one per strategy and ratio)."),
    train_data: Path | None = typer.Option(None, "--train", help="Required (here or as `train:` in --config). The model's training images: a `dinodiff prepare` folder (its train split) or an image dataset."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: results.json, audit.md, closest-pairs.png, dcr.png."),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    *,
    options: dict[str, Any],
) -> None:
    """Privacy audit: each synthetic image's distance to its closest training record (DCR), per feature space,
    calibrated on real held-out and train-vs-other-patient-train distances; near-copies flagged (the pixel space
    registers each candidate over rotation, zoom and shift, after equalising intensities), every fraction with an
    exact 95% CI; reconstruction's per-source memorisation reported apart."""
    from dinodiff.evaluate.audit import audit as run_audit

    configure_logging()
    with failures({(FileNotFoundError, ValueError): 2}):
        values = {**options, **({"train": train_data} if train_data is not None else {})}
        settings = stage_settings(AuditSettings, config, values)
        run_audit(synthetic, out, settings)
    typer.echo((out / "audit.md").read_text())
    typer.echo(f"results: {out / 'results.json'}; closest pairs: {out / 'closest-pairs.png'}")

