"""The demo's stages, each a thin call of the real stage function with the demo's sizes.

Every stage returns its outputs (name -> path); `run.py` records them with a fingerprint of the settings
they depend on, and skips a stage whose record matches (the stage functions themselves also resume).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from dinodiff.cache import build_cache
from dinodiff.config import TrainingSettings, load_training_settings
from dinodiff.data.phantoms import write_phantoms
from dinodiff.demo.settings import DemoSettings
from dinodiff.demo.summary import add_downstream
from dinodiff.encoder.pretrain import pretrain_encoder
from dinodiff.encoder.probe import ProbeSettings, probe_encoders
from dinodiff.encoder.settings import load_encoder_settings
from dinodiff.evaluate.classify import GridMismatch, classify, load_settings
from dinodiff.evaluate.segment.stage import segment
from dinodiff.generate.plan import GenerateSettings
from dinodiff.generate.stage import generate_dataset
from dinodiff.prepare import prepare
from dinodiff.report import build_report
from dinodiff.runs import resolve_model
from dinodiff.train.trainer import train

logger = logging.getLogger(__name__)
ENCODER_PRESET = "cpu-encoder"
CLASSIFY_PRESET = "classify-phantoms"


def source_folder(s: DemoSettings) -> Path:
    return Path(s.data) if s.data else s.root / "phantoms"


def model_folder(s: DemoSettings) -> Path:
    try:
        return resolve_model(s.root / "run").path
    except FileNotFoundError:
        raise FileNotFoundError(f"{s.root / 'run'} has no checkpoint: rerun the demo (training resumes).") from None


def stage_phantoms(s: DemoSettings) -> dict[str, Path]:
    if s.data:
        return {"images": Path(s.data)}
    return {"images": write_phantoms(s.root / "phantoms", s.n, size=s.phantom_size, seed=s.seed)}


def stage_prepare(s: DemoSettings) -> dict[str, Path]:
    out = s.root / "prepared"
    manifest = prepare([source_folder(s)], out, size=s.size, min_size=min(32, s.size), shard_size=64,
                       test_fraction=s.test_fraction, seed=s.seed)
    logger.info("%d images in %d shards, %d rejected", manifest["counts"]["written"], len(manifest["shards"]),
                manifest["counts"]["rejected"])
    return {"manifest": out / "manifest.json", "rejects": out / "rejects.csv"}


def encoder_overrides(s: DemoSettings) -> list[str]:
    """The cpu-encoder preset, reduced: the demo's image size, fewer steps, a smaller batch, no loader worker."""
    local = max(8, (s.size // 2) // 8 * 8)
    return [f"data.shards={s.root / 'prepared'}", f"backbone.image_size={s.size}", f"augment.local_size={local}",
            f"data.load_size={s.size}", "data.num_workers=0", f"run.run_dir={s.root / 'encoder'}",
            f"run.max_steps={s.encoder_steps}", f"run.batch_size={s.encoder_batch}", f"run.seed={s.seed}",
            f"run.checkpoint_every={s.encoder_steps}", f"optim.warmup_steps={max(1, s.encoder_steps // 5)}",
            f"loss.warmup_teacher_temp_steps={max(1, s.encoder_steps // 2)}", "run.log_every=5",
            "run.stop_on_collapse=false"]


def stage_encoder(s: DemoSettings) -> dict[str, Path]:
    settings = load_encoder_settings(ENCODER_PRESET, encoder_overrides(s))
    folder = pretrain_encoder(settings)
    return {"encoder": Path(folder), "metrics": s.root / "encoder" / "metrics.csv"}


def stage_probe(s: DemoSettings) -> dict[str, Path]:
    """k-NN / linear-probe AUC per label and view retrieval: the demo's encoder against its random init, on the
    prepared images it did not train on (the test split: probe-encoder leaves out its training images)."""
    run, out = s.root / "encoder", s.root / "encoder" / "probe"
    probe_encoders([str(run / "encoder"), str(run / "encoder-init")], [s.root / "prepared"], out,
                   ProbeSettings(size=s.size, folds=3, min_count=5, seed=s.seed))
    return {"results": out / "results.json", "table": out / "table.md"}


def train_config(s: DemoSettings) -> TrainingSettings:
    """The tiny preset at the demo's size, conditioned on the demo's encoder, trained from the cache."""
    steps = s.train_steps
    overrides = [f"data.shards={s.root / 'prepared'}", f"data.cache={s.root / 'cache'}",
                 f"train.run_dir={s.root / 'run'}", f"train.max_steps={steps}", f"train.seed={s.seed}",
                 f"train.batch_size={s.batch_size}", f"optim.lr={s.lr}", "train.cond_dropout=0.0",
                 f"train.checkpoint_every={max(steps // 2, 1)}", f"train.sample_every={steps}",
                 f"train.sample_steps={s.sample_steps}", "train.log_every=20", "train.keep_last=2",
                 f"model.resolution={s.size}", "model.autoencoder.scaling_factor=null",
                 "model.autoencoder.shift_factor=null", f"model.autoencoder.unshuffle_factor={s.latent_factor}",
                 f"model.noise.prediction_type={s.prediction}",
                 f"model.encoder.name_or_path={s.root / 'encoder' / 'encoder'}",
                 f"model.unet.overrides.block_out_channels=[{s.unet_channels[0]},{s.unet_channels[1]}]"]
    return load_training_settings("tiny", overrides)


def stage_cache(s: DemoSettings) -> dict[str, Path]:
    build_cache(train_config(s), s.root / "cache", views=s.views, batch_size=32)
    return {"cache": s.root / "cache" / "cache.json"}


def stage_train(s: DemoSettings) -> dict[str, Path]:
    run = train(train_config(s))
    return {"run": run, "model": model_folder(s), "metrics": run / "metrics.csv"}


def stage_generate(s: DemoSettings) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for strategy, ratio in (("reconstruction", 4), ("interpolation", 1)):
        settings = GenerateSettings(strategy=strategy, ratio=ratio, num_inference_steps=s.sample_steps, seed=s.seed,
                                    scheduler=s.sampler, source_options={"limit": s.generate_sources, "split": "test"})
        try:
            folder = _generate(s, strategy, settings)
        except ValueError as err:  # unlabelled real images: no pair shares a label
            if strategy != "interpolation" or not s.data:
                raise
            logger.warning("%s: interpolating any pair of sources instead", err)
            folder = _generate(s, strategy, replace(settings, shared_label=False))
        out[strategy] = folder / "preview.png"
    return out


def _generate(s: DemoSettings, strategy: str, settings: GenerateSettings) -> Path:
    return generate_dataset(model_folder(s), s.root / "prepared", s.root / "generated" / strategy, settings,
                            batch_size=32, preview_rows=4)


def classify_settings(s: DemoSettings) -> Any:
    overrides = [f"out={s.root / 'classify'}", f"data.source={s.root / 'prepared'}",
                 f"synthetic.model={model_folder(s)}", f"regimes=[{','.join(map(str, s.classify_regimes))}]",
                 f"synthetic.ratios=[{','.join(map(str, s.classify_ratios))}]", f"folds={s.classify_folds}",
                 f"seeds=[{','.join(map(str, s.classify_seeds))}]",
                 f"classifier.max_epochs={s.classify_epochs}", f"synthetic.num_inference_steps={s.sample_steps}",
                 f"synthetic.scheduler={s.sampler}",
                 f"classifier.image_size={min(32, s.size)}"]
    return load_settings(CLASSIFY_PRESET, overrides)


def stage_classify(s: DemoSettings) -> dict[str, Path]:
    try:
        classify(classify_settings(s))
    except GridMismatch as err:  # the demo's own grid, made with other settings or an older protocol: start again
        logger.warning("%s: replacing the demo's classify folder", err)
        shutil.rmtree(s.root / "classify")
        classify(classify_settings(s))
    return {"results": s.root / "classify" / "results.json", "table": s.root / "classify" / "table.md"}


def stage_segment(s: DemoSettings) -> dict[str, Path]:
    out = s.root / "segment"
    segment([model_folder(s)], [source_folder(s)], out, methods=("diffseg", "diffcut"),
            thresholds=tuple(s.segment_thresholds), threshold_mode="relative",
            timesteps=tuple((t,) for t in s.segment_timesteps), grid_sizes=tuple(s.segment_grids),
            limit=s.segment_limit, n_overlay=2, noise_seeds=(s.seed,))
    return {"results": out / "results.json", "table": out / "table.md"}


def stage_report(s: DemoSettings) -> dict[str, Path]:
    add_downstream(s.root)
    summary = build_report(s.root, s.root / "report.html", title="dinodiff demo")
    return {"html": summary["html"], "markdown": summary["markdown"]}
