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
    try:
        manifest = build_cache(cfg, out, views=views, batch_size=batch_size)
    except (FileNotFoundError, ValueError) as err:  # missing or damaged shards: one line that names the fix
        _fail(str(err), 2)
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
    from dinodiff.evaluate.fid.sweep import hook_from_config
    from dinodiff.train import TrainingDiverged
    from dinodiff.train import train as run_train

    cfg = _load(config, overrides)
    if resume is not None:
        cfg.train.resume = resume
    try:  # with train.eval_every > 0, checkpoints are scored by FID as the config's `eval` section says
        run_dir = run_train(cfg, eval_hook=hook_from_config(cfg) if cfg.train.eval_every else None)
    except TrainingDiverged as err:
        _fail(str(err))
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err), 2)
    typer.echo(f"run finished: {run_dir}")


def _not_yet(stage: str) -> None:
    typer.secho(f"`dinodiff {stage}` is not yet available in this version.", fg=typer.colors.YELLOW, err=True)
    raise typer.Exit(3)


def _floats(text: Optional[str]) -> Optional[list[float]]:
    return None if not text else [float(v) for v in text.replace(" ", "").split(",") if v]


@app.command()
def generate(
    model: str = typer.Argument(..., help="Model folder (a checkpoint's model/, best/model), a run folder (its newest checkpoint) or a hub id."),
    source: Path = typer.Option(..., "--source", "-s", help="Labelled sources: prepared shards (folder or .tar), a CSV (path + label columns) or any dataset `prepare` reads."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: images/*.png, labels.csv, provenance.json, preview.png."),
    strategy: str = typer.Option("reconstruction", help="reconstruction (variations of each source), interpolation (mixes of label-sharing pairs) or sampled (c_GLB drawn from --embedding-model; sources give only labels)."),
    ratio: int = typer.Option(1, help="Synthetic images per real source (the paper's 1:1, 1:5, 1:10, 1:50 -> 1, 5, 10, 50)."),
    steps: int = typer.Option(25, help="Sampling steps."),
    guidance: float = typer.Option(1.0, help="Classifier-free guidance scale (needs a model trained with train.cond_dropout > 0)."),
    scheduler: str = typer.Option("dpm", help="Sampler: dpm (DPM-Solver++), ddim, euler, euler-a, ddpm, unipc, pndm or a diffusers scheduler class."),
    batch_size: int = typer.Option(8, help="Images per forward pass. Images do not depend on it beyond float rounding; keep it to finish a rerun bit-identically."),
    seed: int = typer.Option(0, help="Base seed; item i uses a seed derived from (seed, i), recorded in labels.csv."),
    mix: str = typer.Option("lerp", help="Interpolation of c_GLB: lerp or slerp."),
    r_range: str = typer.Option("0,1", help="Interpolation: r drawn uniformly from LOW,HIGH."),
    r_values: Optional[str] = typer.Option(None, help="Interpolation: draw r from this comma list instead (e.g. 0.25,0.5,0.75)."),
    shared_label: bool = typer.Option(True, "--shared-label/--any-pair", help="Interpolate only pairs sharing a positive label (the paper), or any pair."),
    embedding_model: Optional[Path] = typer.Option(None, help="Sampled: an embedding model folder made by `dinodiff train-embeddings`."),
    embedding_guidance: float = typer.Option(1.0, help="Sampled: guidance scale on the sources' labels (label-conditioned embedding model)."),
    embedding_steps: int = typer.Option(50, help="Sampled: DDIM steps of the embedding model."),
    kind: str = typer.Option("auto", help="Source layout: auto, shards, csv, folder, mimic-cxr, montgomery, shenzhen or jsrt."),
    split: Optional[str] = typer.Option(None, help="Use only this split of the sources (e.g. train); default all."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N sources."),
    path_column: Optional[str] = typer.Option(None, help="CSV: column of image paths (default: path, filename, file, image...)."),
    label_columns: Optional[str] = typer.Option(None, help="CSV: comma list of label columns; a text column (e.g. finding) becomes one label per value."),
    root: Optional[Path] = typer.Option(None, help="CSV: folder the paths are relative to (default: the CSV's folder)."),
    preview_rows: int = typer.Option(4, help="Rows of OUT/preview.png (reconstruction grid or interpolation strips); 0 = none."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    sync_timeout: float = typer.Option(6 * 3600, help="Several processes: seconds the others wait while the main one encodes the sources or writes the outputs."),
) -> None:
    """Generate a labelled synthetic dataset by reconstruction or interpolation of the sources' c_GLB.

    Resumable: rerun the same command to finish an interrupted run. Spread it over processes/GPUs with
    `accelerate launch -m dinodiff.cli generate ...` (each process makes a disjoint share; same images).
    """
    import logging

    from dinodiff.generate.plan import GenerateSettings
    from dinodiff.generate.stage import generate_dataset
    from dinodiff.runs import resolve_model
    from dinodiff.models.factory import check_model_source

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    options = {"kind": kind, "split": split, "limit": limit}
    if path_column or label_columns or root:
        options.update(path_column=path_column, root=str(root) if root else None,
                       label_columns=label_columns.split(",") if label_columns else None)
    try:
        bounds = _floats(r_range) or []
        if len(bounds) != 2:
            raise ValueError(f"--r-range takes LOW,HIGH (e.g. 0.2,0.8), got {r_range!r}.")
        low, high = bounds
        settings = GenerateSettings(strategy=strategy, ratio=ratio, seed=seed, num_inference_steps=steps,
                                    guidance_scale=guidance, scheduler=scheduler, mix=mix, r_range=(low, high),
                                    r_values=_floats(r_values), shared_label=shared_label, source_options=options,
                                    embedding_model=str(embedding_model) if embedding_model else None,
                                    embedding_guidance=embedding_guidance, embedding_steps=embedding_steps)
        folder = generate_dataset(resolve_model(check_model_source(model)), source, out, settings, batch_size=batch_size,
                                  preview_rows=preview_rows, progress=progress, sync_timeout_s=sync_timeout)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err), 2)
    typer.echo(f"synthetic dataset in {folder}: images/, labels.csv, provenance.json"
               + (", preview.png" if preview_rows else ""))


_EXTRACTOR_HELP = "Feature extractor: xrv (TorchXRayVision densenet121-res224-all features2, the paper's), inception, dinov2 or rad-dino."
_WEIGHTS_HELP = ("Extractor weights: xrv's cache folder (default ~/.torchxrayvision/models_data/), an Inception-v3 "
                 "state-dict file (default $TORCH_HOME/hub/checkpoints/), or a DINOv2/RAD-DINO hub id or folder.")


@app.command()
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
    from dinodiff.evaluate.fid.features import MissingWeights
    from dinodiff.evaluate.fid.stage import fid as run_fid

    try:
        result = run_fid(real, fake, extractor=extractor, weights=weights, num_samples=num_samples or None,
                         seed=seed, split=split, batch_size=batch_size, device=device,
                         cache_dir=(cache_dir or "default") if cache else None, out=out,
                         kid_subsets=kid_subsets, kid_subset_size=kid_subset_size)
    except (MissingWeights, FileNotFoundError, ValueError) as err:
        _fail(str(err), 2)
    typer.echo(f"FID {result['fid']:.4f}  KID {result['kid_mean']:.5f} +- {result['kid_std']:.5f}  "
               f"({result['extractor']}:{result['tap']}, {result['n_real']} real vs {result['n_fake']} fake)")
    if out is not None:
        typer.echo(f"result: {out}")


@app.command()
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
    import logging

    from dinodiff.evaluate.fid.features import MissingWeights
    from dinodiff.evaluate.fid.sweep import sweep as run_sweep

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # one line per checkpoint
    try:
        summary = run_sweep(run_dir, force=force, update_best=update_best, real=real, sources=sources, split=split,
                            extractor=extractor, weights=weights, num_real=num_real or None,
                            num_sources=num_sources or None, per_source=per_source, sample_steps=steps,
                            batch_size=batch_size, seed=seed, device=device, cache_dir=cache_dir)
    except (MissingWeights, FileNotFoundError, ValueError) as err:
        _fail(str(err), 2)
    for row in summary["rows"]:
        typer.echo(f"step {row['step']:>8}  FID {float(row['fid']):10.4f}  KID {float(row['kid_mean']):.5f}")
    best = summary["best"]
    if best is not None:
        typer.echo(f"best: step {best['step']} (FID {float(best['fid']):.4f}, {best['extractor']}:{best['tap']})")
    typer.echo(f"table: {summary['csv']}  plot: {summary['plot']}" + (f"  best model: {summary['best_dir']}" if summary["best_dir"] else ""))


@app.command()
def segment(
    models: List[Path] = typer.Argument(..., help="Model folders, checkpoints or run folders (a run = all its checkpoints, grid-searched)."),
    data: List[Path] = typer.Option(..., "--data", "-d", help="Images with lung masks: Montgomery, Shenzhen, JSRT/SCR layout or images/ + masks/ (repeat for several)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: table.md, table.csv, results.json, overlays/, cells/ (cache)."),
    thresholds: str = typer.Option("0.05", help="Comma list of merging thresholds to grid-search (each used for every iteration)."),
    threshold_mode: str = typer.Option("absolute", help="absolute (the paper's KL values) or relative (quantiles of each image's anchor-to-anchor KL)."),
    merge_iterations: int = typer.Option(3, help="Merging iterations (DiffSeg's threshold list length)."),
    timesteps: str = typer.Option("300", help="Comma list of timesteps to grid-search."),
    grid_sizes: str = typer.Option("16", help="Comma list of anchor grid sizes M (MxM anchors; at most the largest attention map's side)."),
    condition: str = typer.Option("image", help="UNet condition: image (the image's own c_GLB) or null."),
    noise_seed: Optional[int] = typer.Option(None, help="Noise the latent to the timestep with this seed (default: the clean latent, as DiffSeg)."),
    resolution: Optional[int] = typer.Option(None, help="Image size in pixels (default: the model's training resolution)."),
    sd15: Optional[Path] = typer.Option(None, help="A Stable Diffusion 1.x folder (unet/, vae/, text_encoder/, tokenizer/) to run as a baseline."),
    batch_size: int = typer.Option(8, help="Images per UNet pass."),
    device: str = typer.Option("auto", help="auto (CUDA when available), cpu, cuda, ..."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N images of each dataset."),
    overlays: int = typer.Option(3, help="Best and worst cases per dataset drawn in OUT/overlays/ (0 = none)."),
) -> None:
    """Zero-shot lung segmentation from the UNet's self-attention (DiffSeg), scored by Dice against lung masks.

    Grid-searches thresholds x timesteps x grid sizes x checkpoints (cached per cell: a re-run computes only
    new cells) and compares with a mean-mask prior, a position-only k-means control and Otsu.
    """
    import logging

    from dinodiff.evaluate.segment.stage import segment as run_segment

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        ints = [int(v) for v in timesteps.split(",") if v.strip()], [int(v) for v in grid_sizes.split(",") if v.strip()]
        results = run_segment(models, data, out, thresholds=_floats(thresholds) or [], threshold_mode=threshold_mode,
                              merge_iterations=merge_iterations, timesteps=ints[0], grid_sizes=ints[1],
                              condition=condition, noise_seed=noise_seed, resolution=resolution, sd15=sd15,
                              batch_size=batch_size, device=device, limit=limit, n_overlay=overlays)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err), 2)
    typer.echo(Path(results["tables"]["markdown"]).read_text())
    typer.echo(f"tables: {results['tables']['markdown']}, {results['tables']['csv']}; results: {out / 'results.json'}"
               + "".join(f"\noverlay: {p}" for p in results.get("overlays", {}).values()))


@app.command()
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

    try:
        summary = build_report(root, out, title=title)
    except (ReportError, FileNotFoundError) as err:
        _fail(str(err), 2)
    for name in summary["sections"]:
        typer.echo(f"  ok       {name}")
    for name, command in summary["missing"]:
        typer.echo(f"  missing  {name}: {command}")
    for problem in summary["problems"]:
        typer.echo(f"  unread   {problem}")
    typer.echo(f"report: {summary['html']}  summary: {summary['markdown']}")


@app.command()
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
    import logging

    from dinodiff.config import ConfigError
    from dinodiff.evaluate.classify import classify as run_classify, load_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    extra = [f"{key}={value}" for key, value in (("out", out), ("data.source", source), ("synthetic.model", model),
                                                  ("workers", workers)) if value is not None]
    try:
        settings = load_settings(config, [*(overrides or []), *extra])
        results = run_classify(settings, progress=progress)
    except ConfigError as err:
        _fail(str(err), 2)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        _fail(str(err), 2)
    typer.echo(Path(results["files"]["table_markdown"]).read_text())
    typer.echo(f"classifier weights: {', '.join(results['classifier']['weights'])}; results: "
               f"{results['files']['results_csv']}, {Path(settings.out) / 'results.json'}"
               + (f"; figure: {results['files']['figure']}" if "figure" in results["files"] else ""))


@app.command("pretrain-encoder")
def pretrain_encoder(
    config: str = typer.Option("cpu-encoder", "--config", "-c", help="Preset (cpu-encoder, gpu-encoder) or YAML file."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides, e.g. data.shards=PREP run.max_steps=600 optim.lr=1e-3 backbone.name_or_path=microsoft/rad-dino."),
    resume: Optional[str] = typer.Option(None, help="latest, none, or a checkpoint folder (default: the config's run.resume, 'auto')."),
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
    from dinodiff.encoder.data import NoImages
    from dinodiff.encoder.monitor import EncoderCollapsed
    from dinodiff.encoder.pretrain import EncoderDiverged, pretrain_encoder as run_pretrain
    from dinodiff.encoder.settings import load_encoder_settings

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        settings = load_encoder_settings(config, overrides or [])
    except ConfigError as err:
        _fail(str(err), 2)
    if resume is not None:
        settings.run.resume = resume
    try:
        out = run_pretrain(settings)
    except (EncoderCollapsed, EncoderDiverged) as err:
        _fail(str(err))
    except (NoImages, FileNotFoundError, ValueError) as err:
        _fail(str(err), 2)
    typer.echo(f"encoder written to {out} (use model.encoder.name_or_path={out})")


@app.command("probe-encoder")
def probe_encoder(
    encoders: List[str] = typer.Argument(..., help="Encoder folders, hub ids or random:<family> (e.g. RUN/encoder RUN/encoder-init)."),
    data: List[Path] = typer.Option(..., "--data", "-d", help="Labelled images: prepared shards, a CSV or a dataset folder (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for results.json and table.md."),
    labels: Optional[str] = typer.Option(None, help="Comma-separated labels to probe (default: every label with >= --min-count positives and negatives)."),
    label_columns: Optional[str] = typer.Option(None, help="For a CSV: comma-separated label columns (a text column such as finding gives one label per value)."),
    size: int = typer.Option(128, help="Side at which images are read; each encoder resizes to its own input."),
    folds: int = typer.Option(5, help="Stratified cross-validation folds."),
    k: int = typer.Option(10, help="Neighbours of the k-NN probe."),
    min_count: int = typer.Option(10, help="Smallest number of positives and of negatives for a label to be probed."),
    seed: int = typer.Option(0, help="Seed of the folds and of the augmented views."),
) -> None:
    """Measure encoders on the same labelled images: k-NN and linear-probe ROC AUC per label
    (cross-validated, mean ± SD) and augmented-view retrieval top-1 among 2N views."""
    from dinodiff.encoder.probe import ProbeSettings, markdown_table, probe_encoders

    split = lambda text: [v.strip() for v in text.split(",") if v.strip()] if text else None  # noqa: E731
    settings = ProbeSettings(size=size, labels=split(labels), label_columns=split(label_columns), folds=folds, k=k,
                             min_count=min_count, seed=seed)
    try:
        results = probe_encoders(encoders, data, out, settings)
    except (FileNotFoundError, ValueError, OSError) as err:
        _fail(str(err), 2)
    typer.echo(markdown_table(results), nl=False)


@app.command("train-embeddings")
def train_embeddings_command(
    cache_dir: Path = typer.Option(..., "--cache", help="A `dinodiff cache` folder: its c_GLB (every augmented view) are the training set."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: settings.json, metrics.csv, checkpoints/, model/, eval.json."),
    steps: int = typer.Option(2000, help="Training steps."),
    batch_size: int = typer.Option(256, help="Embeddings per step."),
    lr: float = typer.Option(1e-3, help="AdamW learning rate."),
    width: int = typer.Option(512, help="Width of the MLP's residual blocks."),
    depth: int = typer.Option(4, help="Number of residual blocks."),
    labels: str = typer.Option("auto", help="auto: condition on the cached images' labels when they have any (null label for guidance); none: unconditional."),
    label_dropout: float = typer.Option(0.1, help="Probability of the null label in training (classifier-free guidance)."),
    checkpoint_every: int = typer.Option(500, help="Steps between checkpoints (a killed run resumes from the newest)."),
    seed: int = typer.Option(0, help="Seed of the weights, batches and noise."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N cached images."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Train the embedding generator for source-free generation: a small diffusion model over c_GLB (after RCG).

    Then `dinodiff generate MODEL --strategy sampled --embedding-model OUT ...` draws new c_GLB and decodes them.
    OUT/eval.json compares sampled with training embeddings (nearest-neighbour distance, precision/recall, FD).
    """
    import logging

    from dinodiff.embeddings import EmbeddingTrainSettings, train_embeddings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        settings = EmbeddingTrainSettings(cache=str(cache_dir), out=str(out), max_steps=steps, batch_size=batch_size,
                                          lr=lr, width=width, depth=depth, labels=labels, label_dropout=label_dropout,
                                          checkpoint_every=checkpoint_every, seed=seed, limit=limit)
        folder = train_embeddings(settings, progress=progress)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err), 2)
    import json

    report = json.loads((out / "eval.json").read_text())
    typer.echo(f"embedding model: {folder}; sampled vs training: NN median {report['nn_median']:.3f} "
               f"(training's own {report['train_nn_median']:.3f}), copies {report['copy_fraction']:.1%}, "
               f"precision {report['precision']:.3f}, recall {report['recall']:.3f}, FD {report['fd']:.3f}")


@app.command()
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
    import logging

    from dinodiff.evaluate.audit import AuditSettings, audit as run_audit

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        settings = AuditSettings(train=str(train_data), holdout=str(holdout) if holdout else None,
                                 model=str(model) if model else None, encoder=str(encoder) if encoder else None,
                                 xrv_weights=str(xrv_weights) if xrv_weights else None, size=size, limit=limit,
                                 pairs=pairs, spaces=[s for s in spaces.split(",") if s])
        run_audit(synthetic, out, settings)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err), 2)
    typer.echo((out / "audit.md").read_text())
    typer.echo(f"results: {out / 'results.json'}; closest pairs: {out / 'closest-pairs.png'}")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-output"), "--out", "-o", help="Folder for everything the demo makes."),
    data: Optional[Path] = typer.Option(None, "--data", help="A folder of real images (masks and labels used when present) instead of the built-in phantoms."),
    quick: bool = typer.Option(False, "--quick", help="The smallest form (32 px, a few hundred steps): what the tests run."),
    train_steps: Optional[int] = typer.Option(None, "--train-steps", help="Diffusion training steps (default: the demo's size)."),
) -> None:
    """Run every stage end to end on built-in phantoms, on CPU: prepare -> pretrain-encoder -> cache -> train ->
    generate -> learning checks -> classify -> segment -> report. A rerun skips what is done."""
    from dataclasses import replace

    from dinodiff.demo import DemoSettings, quick_settings, run_demo

    settings = quick_settings(str(out), str(data) if data else None) if quick else DemoSettings(
        out=str(out), data=str(data) if data else None)
    if train_steps is not None:
        settings = replace(settings, train_steps=train_steps)
    try:
        run_demo(settings)
    except (FileNotFoundError, ValueError, OSError) as err:
        _fail(str(err), 2)


def main() -> None:  # `python -m dinodiff.cli`, also what `accelerate launch -m` calls
    app()


if __name__ == "__main__":
    sys.exit(main())
