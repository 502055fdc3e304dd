"""`dinodiff demo`: every available stage, end to end, on built-in synthetic phantoms (no downloads).

phantoms -> prepare -> cache -> train (tiny preset) -> generate (reconstruction grid + interpolation strips)
-> fid (when TorchXRayVision's weights can be had) -> segment (DiffSeg against the phantoms' lung masks)
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()


def _stage(title: str) -> float:
    console.rule(f"[bold]{title}")
    return time.time()


def run_demo(out: str | Path = "demo-output", *, n: int = 48, steps: int = 60) -> dict[str, Path]:
    """Run the demo into `out`; every stage skips work already done, so a rerun is quick."""
    from dinodiff.cache import build_cache
    from dinodiff.checkpointing import latest_checkpoint
    from dinodiff.config import load_config
    from dinodiff.data.phantoms import write_phantoms
    from dinodiff.generate import GenerateSettings, generate_dataset
    from dinodiff.prepare import prepare
    from dinodiff.train import train

    out = Path(out)
    results: dict[str, Path] = {}
    timings: dict[str, float] = {}

    start = _stage(f"1/7 phantoms: {n} synthetic chest X-rays with lung masks and labels")
    results["phantoms"] = write_phantoms(out / "phantoms", n, size=256, seed=0)
    timings["phantoms"] = time.time() - start

    start = _stage("2/7 prepare: border removal, square crop, resize, WebDataset shards")
    prepared = out / "prepared"
    manifest = prepare([results["phantoms"]], prepared, size=128, shard_size=16, test_fraction=0.1, seed=0)
    console.print(f"{manifest['counts']['written']} images in {len(manifest['shards'])} shards; "
                  f"{manifest['counts']['rejected']} rejected")
    results["prepared"] = prepared
    timings["prepare"] = time.time() - start

    start = _stage("3/7 cache: latent moments + encoder global tokens for 2 augmented views")
    overrides = [f"data.shards={prepared}", f"train.run_dir={out / 'run'}", f"train.max_steps={steps}",
                 f"train.checkpoint_every={max(steps // 2, 1)}", f"train.sample_every={max(steps // 2, 1)}",
                 "train.log_every=5", "model.resolution=64"]
    cfg = load_config("tiny", overrides)
    build_cache(cfg, out / "cache", views=2, batch_size=16)
    results["cache"] = out / "cache"
    timings["cache"] = time.time() - start

    start = _stage(f"4/7 train: tiny UNet, {steps} steps from the cache (resumes if interrupted)")
    cfg.data.cache = str(out / "cache")
    results["run"] = train(cfg)
    timings["train"] = time.time() - start

    start = _stage("5/7 generate: reconstructions and label-sharing interpolations of the prepared phantoms")
    model = latest_checkpoint(results["run"]) / "model"
    for strategy, ratio in (("reconstruction", 3), ("interpolation", 1)):
        settings = GenerateSettings(strategy=strategy, ratio=ratio, num_inference_steps=10,
                                    source_options={"limit": 16})
        results[strategy] = generate_dataset(model, prepared, out / "generated" / strategy, settings, batch_size=16,
                                             preview_rows=4)
    timings["generate"] = time.time() - start

    start = _stage("6/7 fid: XRV-FID of the reconstructions against the prepared images")
    results["fid"] = _demo_fid(prepared, results["reconstruction"], out / "fid.json")
    timings["fid"] = time.time() - start

    start = _stage("7/7 segment: zero-shot lung segmentation (DiffSeg) of the phantoms, scored against their masks")
    from dinodiff.evaluate.segment import segment

    segment([model], [results["phantoms"]], out / "segment", thresholds=(0.1,), threshold_mode="relative",
            timesteps=(300,), grid_sizes=(4,), limit=16, n_overlay=2)
    results["segment"] = out / "segment"
    timings["segment"] = time.time() - start

    table = Table(title="dinodiff demo: where the results are")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("output")
    table.add_row("phantoms", f"{timings['phantoms']:.1f}", str(results["phantoms"]))
    table.add_row("prepare", f"{timings['prepare']:.1f}", f"{prepared}/manifest.json, rejects.csv, shards/")
    table.add_row("cache", f"{timings['cache']:.1f}", f"{results['cache']}/cache.json, shards/")
    table.add_row("train", f"{timings['train']:.1f}",
                  f"{results['run']}/metrics.csv, samples/, checkpoints/ (model/ inside each)")
    table.add_row("generate", f"{timings['generate']:.1f}",
                  f"{results['reconstruction']}/preview.png (grid), {results['interpolation']}/preview.png (strips), "
                  "images/, labels.csv, provenance.json")
    table.add_row("fid", f"{timings['fid']:.1f}", str(results["fid"] or "skipped: XRV weights unavailable"))
    table.add_row("segment", f"{timings['segment']:.1f}", f"{results['segment']}/table.md, overlays/")
    console.print(table)
    return results


def _demo_fid(real: Path, fake: Path, out: Path) -> Path | None:
    """FID needs TorchXRayVision's pretrained weights (downloaded on first use); say so when they cannot be had."""
    from dinodiff.evaluate.features import MissingWeights
    from dinodiff.evaluate.fid import fid

    try:
        result = fid(real, fake, split=None, num_samples=None, out=out, kid_subset_size=16)
    except (MissingWeights, OSError) as err:
        console.print(f"[yellow]fid skipped: {err}[/yellow]")
        return None
    console.print(f"FID {result['fid']:.2f} (tiny demo model, few images: only shows the stage runs)")
    return out
