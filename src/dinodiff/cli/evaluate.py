"""The evaluations and the report: fid, sweep, segment, report, classify, audit."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from dinodiff.cli.common import configure_logging, failures, floats

_EXTRACTOR_HELP = "Feature extractor: xrv (TorchXRayVision densenet121-res224-all features2, the paper's), inception, dinov2 or rad-dino."
_WEIGHTS_HELP = ("Extractor weights: xrv's cache folder (default ~/.torchxrayvision/models_data/), an Inception-v3 "
                 "state-dict file (default $TORCH_HOME/hub/checkpoints/), or a DINOv2/RAD-DINO hub id or folder.")


def fid(
    real: Path = typer.Argument(..., help="Real images: a folder, a `prepare` folder/shards, or a synthetic dataset."),
    fake: Path = typer.Argument(..., help="Generated images: a `dinodiff generate` folder, a folder of images or shards."),
    extractor: str = typer.Option("xrv", help=_EXTRACTOR_HELP),
    weights: Optional[str] = typer.Option(None, help=_WEIGHTS_HELP),
    num_samples: int = typer.Option(5000, help="Images drawn from each set (all when a set has fewer); 0 = all."),
    seed: int = typer.Option(0, help="Seed of the image subsets and of KID's random subsets."),
    split: str = typer.Option("test", help="Split used when a prepared folder has one (else all its shards)."),
    batch_size: int = typer.Option(32, help="Images per forward pass of the extractor."),
    device: str = typer.Option("auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ..."),
    cache_dir: Optional[Path] = typer.Option(None, help="Folder of cached real-set features (default $DINODIFF_CACHE/fid-stats)."),
    cache: bool = typer.Option(True, help="Cache the real set's features (keyed by extractor and exact file list)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the result as JSON here."),
    kid_subsets: int = typer.Option(100, help="KID: number of random subsets."),
    kid_subset_size: int = typer.Option(1000, help="KID: images per subset (capped by the smaller set)."),
) -> None:
    """FID and KID between two image sets, on XRV features by default (the paper's protocol).

    The result names the extractor, its feature tap and weights: FIDs on different taps are not comparable.
    """
    from dinodiff.evaluate.fid.settings import FidSettings
    from dinodiff.evaluate.fid.stage import fid as run_fid

    settings = FidSettings(split=split, extractor=extractor, weights=weights, num_real=num_samples or None,
                           num_sources=num_samples or None, batch_size=batch_size, seed=seed, device=device,
                           cache_dir=cache_dir, cache=cache, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size)
    with failures({(FileNotFoundError, ValueError): 2}):  # MissingWeights is a FileNotFoundError
        result = run_fid(real, fake, settings, out=out)
    typer.echo(f"FID {result['fid']:.4f}  KID {result['kid_mean']:.5f} +- {result['kid_std']:.5f}  "
               f"({result['extractor']}:{result['tap']}, {result['n_real']} real vs {result['n_fake']} fake)")
    if out is not None:
        typer.echo(f"result: {out}")


def sweep(
    run_dir: Path = typer.Argument(..., help="A training run folder (with checkpoints/)."),
    real: Optional[str] = typer.Option(None, help="Real images (default: the run's data.shards, test split when present)."),
    sources: Optional[str] = typer.Option(None, help="Images whose reconstructions are scored (default: the real set)."),
    extractor: str = typer.Option("xrv", help=_EXTRACTOR_HELP),
    weights: Optional[str] = typer.Option(None, help=_WEIGHTS_HELP),
    num_real: int = typer.Option(5000, help="Real images (seeded subset; 0 = all)."),
    num_sources: int = typer.Option(5000, help="Source images, the same for every checkpoint (seeded subset; 0 = all)."),
    per_source: int = typer.Option(1, help="Reconstructions per source image."),
    steps: int = typer.Option(25, help="Sampling steps per image."),
    split: str = typer.Option("test", help="Split used when a prepared folder has one."),
    batch_size: int = typer.Option(16, help="Images per batch, for sampling and for the extractor."),
    seed: int = typer.Option(0, help="Seed of the subsets and of the sampling noise (the same for every checkpoint)."),
    device: str = typer.Option("auto", help="auto (CUDA when available), cpu, cuda, ..."),
    cache_dir: Optional[Path] = typer.Option(None, help="Cached real-set features (default RUN_DIR/fid-cache)."),
    force: bool = typer.Option(False, help="Re-score checkpoints already in fid.csv."),
    update_best: bool = typer.Option(True, help="Copy the lowest-FID checkpoint's model to RUN_DIR/best/."),
) -> None:
    """Score every checkpoint of a run by FID of reconstructions (the paper's Figure 3).

    Writes RUN_DIR/fid.csv and RUN_DIR/fid.png (best checkpoint starred) and keeps RUN_DIR/best/ up to date.
    Restartable: checkpoints already scored with the same settings are skipped.
    """
    from dinodiff.evaluate.fid.settings import FidSettings
    from dinodiff.evaluate.fid.sweep import sweep as run_sweep

    configure_logging()  # one line per checkpoint
    settings = FidSettings(real=real, sources=sources, split=split, extractor=extractor, weights=weights,
                           num_real=num_real or None, num_sources=num_sources or None, per_source=per_source,
                           sample_steps=steps, batch_size=batch_size, seed=seed, device=device, cache_dir=cache_dir)
    with failures({(FileNotFoundError, ValueError): 2}):  # MissingWeights is a FileNotFoundError
        summary = run_sweep(run_dir, settings, force=force, update_best=update_best)
    for row in summary["rows"]:
        typer.echo(f"step {row['step']:>8}  FID {float(row['fid']):10.4f}  KID {float(row['kid_mean']):.5f}")
    best = summary["best"]
    if best is not None:
        typer.echo(f"best: step {best['step']} (FID {float(best['fid']):.4f}, {best['extractor']}:{best['tap']})")
    typer.echo(f"table: {summary['csv']}  plot: {summary['plot']}" + (f"  best model: {summary['best_dir']}" if summary["best_dir"] else ""))


def segment(
    models: List[Path] = typer.Argument(..., help="Model folders, checkpoints or run folders (a run = all its checkpoints, grid-searched)."),
    data: List[Path] = typer.Option(..., "--data", "-d", help="Images with lung masks: Montgomery, Shenzhen, JSRT/SCR layout or images/ + masks/ (repeat for several)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: table.md, table.csv, results.json, overlays/, cells/ (cache)."),
    method: str = typer.Option("diffseg", help="Zero-shot method(s), comma list: diffseg (the paper's: merge self-attention maps by KL) and/or diffcut (recursive normalised cut on the encoder's self-attention outputs)."),
    thresholds: str = typer.Option("0.05", help="DiffSeg: comma list of merging thresholds to grid-search (each used for every iteration)."),
    threshold_mode: str = typer.Option("absolute", help="DiffSeg: absolute (the paper's KL values) or relative (quantiles of each image's anchor-to-anchor KL)."),
    merge_iterations: int = typer.Option(3, help="DiffSeg: merging iterations (DiffSeg's threshold list length)."),
    grid_sizes: str = typer.Option("16", help="DiffSeg: comma list of anchor grid sizes M (MxM anchors; at most the largest attention map's side)."),
    taus: str = typer.Option("0.5", help="DiffCut: comma list of Ncut thresholds tau (a segment is split while its best cut is below tau)."),
    alphas: str = typer.Option("10", help="DiffCut: comma list of affinity exponents alpha (cosine similarity, min-max scaled, ** alpha)."),
    feature_sides: str = typer.Option("0", help="DiffCut: comma list of feature maps: 0 = the encoder's final self-attention (DiffCut's), S = the last encoder self-attention with an SxS map."),
    refine: str = typer.Option("none", help="Comma list: none (the methods as published) and/or components (also each method with every segment split into its connected components, its own column)."),
    timesteps: str = typer.Option("300", help="Comma list of timestep groups to grid-search; a group averages its passes, e.g. 300,100+300+500."),
    noise_seeds: str = typer.Option("", help="Comma list of noise seeds: one noised pass per seed and timestep, averaged (default: the clean latent, as DiffSeg)."),
    report_fraction: float = typer.Option(0.5, help="Share of subjects (images without subject ids: images) in the report split; the rest choose the configuration."),
    split_seed: int = typer.Option(0, help="Seed of the tuning / report split."),
    condition: str = typer.Option("image", help="UNet condition: image (the image's own c_GLB) or null."),
    resolution: Optional[int] = typer.Option(None, help="Image size in pixels (default: the model's training resolution)."),
    sd15: Optional[Path] = typer.Option(None, help="A Stable Diffusion 1.x folder (unet/, vae/, text_encoder/, tokenizer/) to run as a DiffSeg baseline."),
    batch_size: int = typer.Option(8, help="Images per UNet pass."),
    device: str = typer.Option("auto", help="auto (CUDA when available), cpu, cuda, ..."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N images of each dataset."),
    overlays: int = typer.Option(3, help="Best and worst report-split cases per dataset and method drawn in OUT/overlays/ (0 = none)."),
) -> None:
    """Zero-shot lung segmentation from the UNet's self-attention, scored by Dice against lung masks.

    DiffSeg (the paper's) and/or DiffCut, grid-searched over their parameters x timesteps x checkpoints on a
    tuning split of the images (by subject) and reported on the other images, beside a leave-one-out
    mean-mask prior, a position-only k-means control, Otsu and the whole image. Cells are cached: a re-run
    computes only new ones.
    """
    from dinodiff.evaluate.segment.settings import SegmentSettings
    from dinodiff.evaluate.segment.stage import segment as run_segment

    configure_logging()
    with failures({(FileNotFoundError, ValueError): 2}):
        groups = [tuple(int(t) for t in g.split("+") if t.strip()) for g in timesteps.split(",") if g.strip()]
        settings = SegmentSettings(
            methods=[m.strip() for m in method.split(",") if m.strip()], thresholds=floats(thresholds) or [],
            threshold_mode=threshold_mode, merge_iterations=merge_iterations, timesteps=groups,
            grid_sizes=[int(v) for v in grid_sizes.split(",") if v.strip()], taus=floats(taus) or [],
            alphas=floats(alphas) or [], feature_sides=[int(v) for v in feature_sides.split(",") if v.strip()],
            refinements=[r.strip() for r in refine.split(",") if r.strip()],
            noise_seeds=[int(v) for v in noise_seeds.split(",") if v.strip()], report_fraction=report_fraction,
            split_seed=split_seed, condition=condition, resolution=resolution, sd15=sd15, batch_size=batch_size,
            device=device, limit=limit, n_overlay=overlays)
        results = run_segment(models, data, out, settings)
    typer.echo(Path(results["tables"]["markdown"]).read_text())
    typer.echo(f"tables: {results['tables']['markdown']}, {results['tables']['csv']}; results: {out / 'results.json'}"
               + "".join(f"\noverlay: {p}" for p in results.get("overlays", {}).values()))


def report(
    root: Path = typer.Argument(..., help="A training run folder, or a work folder holding stage outputs (searched recursively)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="The HTML page (default ROOT/report.html); the Markdown summary goes beside it (.md)."),
    title: Optional[str] = typer.Option(None, help="Page title (default: 'dinodiff report: ROOT')."),
) -> None:
    """One self-contained HTML page (figures embedded) and a Markdown summary of every result under ROOT.

    Reads only the files the stages write (config.yaml, metrics.csv, fid.csv, provenance.json, results.json);
    sections without results are listed with the command that makes them.
    """
    from dinodiff.report import ReportError, build_report

    with failures({(ReportError, FileNotFoundError): 2}):
        summary = build_report(root, out, title=title)
    for name in summary["sections"]:
        typer.echo(f"  ok       {name}")
    for name, command in summary["missing"]:
        typer.echo(f"  missing  {name}: {command}")
    for problem in summary["problems"]:
        typer.echo(f"  unread   {problem}")
    typer.echo(f"report: {summary['html']}  summary: {summary['markdown']}")



def classify(
    config: Optional[str] = typer.Option(None, "--config", "-c", help="Preset (classify-phantoms, classify-cxr-covid, classify-mimic) or YAML file merged over the paper's defaults."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides, e.g. data.source=prep/ synthetic.model=run/ regimes=[50,100] classifier.max_epochs=20."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (else the settings' `out`): results.csv, table.md/csv, figure4.png, results.json; cells/ caches each trained cell."),
    source: Optional[str] = typer.Option(None, "--source", "-s", help="Labelled real images (data.source): prepared shards, a labelled CSV or a dataset root (MIMIC-CXR-JPG ...)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model folder for synthetic sets (synthetic.model); without one only real-only and the control run."),
    workers: Optional[int] = typer.Option(None, help="Cells trained in parallel processes (one per GPU when several are visible)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Downstream classification (the paper's Table 1 and Figure 4): real-only vs augmentation (real + synthetic)
    vs full-synthetic vs a count-matched control (real images repeated to the same count).

    Label-balanced nested subsets per regime, synthetic sets made from each regime's subset with `generate`,
    k-fold cross-validation, test AUC, a paired test with Holm correction. Every cell is cached: rerun the same
    command to resume an interrupted grid.
    """
    from dinodiff.evaluate.classify import classify as run_classify, load_settings

    configure_logging()
    extra = [f"{key}={value}" for key, value in (("out", out), ("data.source", source), ("synthetic.model", model),
                                                  ("workers", workers)) if value is not None]
    with failures({(FileNotFoundError, ValueError, RuntimeError): 2}):  # a ConfigError is a ValueError
        settings = load_settings(config, [*(overrides or []), *extra])
        results = run_classify(settings, progress=progress)
    typer.echo(Path(results["files"]["table_markdown"]).read_text())
    typer.echo(f"classifier weights: {', '.join(results['classifier']['weights'])}; results: "
               f"{results['files']['results_csv']}, {Path(settings.out) / 'results.json'}"
               + (f"; figure: {results['files']['figure']}" if "figure" in results["files"] else ""))



def audit(
    synthetic: List[Path] = typer.Argument(..., help="Synthetic datasets made by `dinodiff generate` (one per strategy and ratio)."),
    train_data: Path = typer.Option(..., "--train", help="The model's training images: a `dinodiff prepare` folder (its train split) or an image dataset."),
    holdout: Optional[Path] = typer.Option(None, help="Real images never trained on (default: the --train folder's test split, if any)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: results.json, audit.md, closest-pairs.png, dcr.png."),
    model: Optional[Path] = typer.Option(None, help="Pipeline model folder whose image_encoder/ gives the c_glb space (default: the model named in the synthetic sets' provenance.json)."),
    encoder: Optional[Path] = typer.Option(None, help="An encoder folder (global_tokens.json) for the c_glb space instead."),
    xrv_weights: Optional[Path] = typer.Option(None, help="TorchXRayVision weights folder (default ~/.torchxrayvision/models_data/); the xrv space is 'unavailable' without it."),
    spaces: str = typer.Option("pixels,c_glb,xrv,rad-dino", help="Comma list of feature spaces."),
    size: int = typer.Option(128, help="Images are compared at this size in pixels."),
    limit: Optional[int] = typer.Option(None, help="At most N images per set."),
    pairs: int = typer.Option(8, help="Closest synthetic/real pairs drawn per dataset."),
) -> None:
    """Privacy audit: each synthetic image's distance to its closest training record (DCR), per feature space,
    calibrated on real held-out and train-vs-other-train distances; near-copies flagged; reconstruction's
    per-source memorisation reported apart."""
    from dinodiff.evaluate.audit import AuditSettings, audit as run_audit

    configure_logging()
    with failures({(FileNotFoundError, ValueError): 2}):
        settings = AuditSettings(train=str(train_data), holdout=str(holdout) if holdout else None,
                                 model=str(model) if model else None, encoder=str(encoder) if encoder else None,
                                 xrv_weights=str(xrv_weights) if xrv_weights else None, size=size, limit=limit,
                                 pairs=pairs, spaces=[s for s in spaces.split(",") if s])
        run_audit(synthetic, out, settings)
    typer.echo((out / "audit.md").read_text())
    typer.echo(f"results: {out / 'results.json'}; closest pairs: {out / 'closest-pairs.png'}")

