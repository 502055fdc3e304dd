"""Typed settings of `dinodiff classify`: dataclass defaults (the paper's protocol), a YAML preset merged over
them, then dotted overrides, the same way `dinodiff.config.load_training_settings` builds a training run's. A light
module: the CLI makes classify's options from these fields at start-up.

Presets live next to the training presets as ``configs/classify-*.yaml`` (``classify-phantoms``,
``classify-cxr-covid``, ``classify-mimic``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dinodiff.config import ConfigError, build_settings, setting, settings_dataclass

logger = logging.getLogger(__name__)

# control: real images repeated to (1 + r) n, the count of augmentation at ratio r; control-full: repeated to r n,
# the count of full-synthetic at ratio r (at r = 1 that is the real-only cell itself, which is reused).
EXPERIMENTS = ("augmentation", "full-synthetic", "control", "control-full")
STRATEGIES = ("reconstruction", "interpolation")
TESTS = ("corrected-ttest",)  # the corrected resampled t-test (stats.corrected_resampled_ttest)
_REFUSED_TESTS = {"ttest": "a plain paired t-test over cross-validation folds ignores that the folds share training "
                           "images and is anti-conservative",
                  "wilcoxon": "a signed-rank test over cross-validation folds treats overlapping folds as independent"}


@dataclass(frozen=True)
class DataSettings:
    """The labelled real images: prepared shards or any dataset `dinodiff.data.datasets.discover` reads."""

    source: str = setting("", "Labelled real images: prepared shards, a labelled CSV or a dataset root (MIMIC-CXR-JPG "
                              "...).", flags=("--source", "-s"))
    kind: str = "auto"  # auto | shards | csv | folder | mimic-cxr | montgomery | ...
    label_columns: list[str] | None = None  # CSV: label columns (a text column such as finding -> one per value)
    path_column: str | None = None
    root: str | None = None
    labels: list[str] | None = None  # the labels L to classify; None = every label with enough positives
    min_positives: int = 10  # auto-chosen labels need this many positives in both the pool and the test set
    balance_none: bool = False  # also draw images positive for none of L (a '(none)' stratum): gives negatives
    test_fraction: float = 0.25  # test share by subject hash when the source has no test split
    split_seed: int = 0
    subject_column: str | None = None  # CSV: the patient column (default: subject, patient_id, ... when present)
    subject_pattern: str | None = None  # images without a subject: regex on ids, group 1 (MIMIC: '^p\d+__(p\d+)__')
    test_limit: int | None = None  # use at most this many test images (first by id)


@dataclass(frozen=True)
class ClassifierSettings:
    """The paper's DenseNet-121 recipe; backbone and size are configurable so CPU runs can use a small net."""

    backbone: str = "densenet121"  # a torchvision model name, timm:<name>, or tiny-cnn
    weights: str = "auto"  # auto (ImageNet when cached locally, else scratch) | imagenet | none
    image_size: int = 224
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 1e-5
    plateau_patience: int = 10  # ReduceLROnPlateau on validation AUC
    plateau_factor: float = 0.1
    early_stop_patience: int = 25  # epochs without a validation-AUC gain
    max_epochs: int = 150
    min_epochs: int = 1
    augment: bool = True  # the paper's sharpening + affine, the same for real and synthetic images
    num_workers: int = 4  # data workers on GPU (0 on CPU)
    amp: bool = True  # bf16 autocast on CUDA (never on CPU, where it is slower)
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    threads: int = 0  # torch CPU threads per cell process (0 = torch's default)


@dataclass(frozen=True)
class SyntheticSettings:
    """How synthetic sets are made with `dinodiff.generate` (per regime, strategy and ratio)."""

    model: str | None = setting(None, "Model for synthetic sets: a model folder, a checkpoint, or a run (its selected "
                                      "best/model, else its newest checkpoint); without one only real-only and the "
                                      "controls run.", flags=("--model", "-m"))
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    ratios: list[int] = field(default_factory=lambda: [1, 5, 10, 50])
    num_inference_steps: int = 25
    guidance_scale: float = 1.0
    scheduler: str = "dpm"
    seed: int = 0
    batch_size: int = 16
    folder: str | None = None  # where synthetic sets are kept (default OUT/synthetic); reused when complete


@settings_dataclass
class ClassifySettings:
    out: str = setting("classify-output", "Output folder: results.csv, table.md/csv, figure4.png, results.json; "
                                          "cells/ caches each trained cell.", flags=("--out", "-o"))
    regimes: list[int] = field(default_factory=lambda: [50, 100, 500, 1000, 5000, 10000])
    experiments: list[str] = field(default_factory=lambda: list(EXPERIMENTS))  # real-only always runs
    folds: int = 5
    seeds: list[int] = field(default_factory=lambda: [0])  # repetitions: each re-draws the folds and the training
    subset_seed: int = 0  # the regimes' subsets (fixed across repetitions)
    workers: int = setting(1, "Cells trained in parallel processes (one per GPU when several are visible).")
    test: str = "corrected-ttest"  # over folds x seeds: the corrected resampled t-test (Nadeau & Bengio 2003)
    correction: str = "holm"  # holm | bonferroni, over all comparisons of the grid
    alpha: float = 0.05
    ci_level: float = 0.95  # confidence intervals of AUC differences: paired bootstrap over test images
    bootstrap: int = 2000  # bootstrap resamples
    bootstrap_seed: int = 0
    data: DataSettings
    classifier: ClassifierSettings
    synthetic: SyntheticSettings


def _check(settings: ClassifySettings) -> ClassifySettings:
    bad = [e for e in settings.experiments if e not in EXPERIMENTS]
    bad += [s for s in settings.synthetic.strategies if s not in STRATEGIES]
    if bad:
        raise ConfigError(f"Unknown experiments/strategies {bad}; use {EXPERIMENTS} and {STRATEGIES}.")
    if settings.folds < 2:
        raise ConfigError(f"folds must be >= 2 (cross-validation), got {settings.folds}.")
    if settings.test in _REFUSED_TESTS:
        raise ConfigError(f"test={settings.test} is refused: {_REFUSED_TESTS[settings.test]}; use "
                          "test=corrected-ttest (the corrected resampled t-test).")
    if settings.test not in TESTS or settings.correction not in ("holm", "bonferroni"):
        raise ConfigError(f"test must be one of {TESTS} and correction holm|bonferroni, got {settings.test!r}, "
                          f"{settings.correction!r}.")
    if any(r < 1 for r in settings.synthetic.ratios) or any(n < 2 for n in settings.regimes):
        raise ConfigError("ratios must be >= 1 and regimes >= 2.")
    if not 0.5 <= settings.ci_level < 1 or settings.bootstrap < 100:
        raise ConfigError(f"ci_level must be in [0.5, 1) and bootstrap >= 100, got {settings.ci_level}, "
                          f"{settings.bootstrap}.")
    data = settings.data
    is_csv = data.kind == "csv" or (data.kind == "auto" and data.source.endswith((".csv", ".csv.gz")))
    if data.subject_column and not is_csv:
        raise ConfigError(f"data.subject_column names a CSV column, but data.source {data.source!r} is not a CSV "
                          "(its adapter or prepare's metadata gives the subjects); remove data.subject_column.")
    if settings.classifier.weights not in ("auto", "imagenet", "none"):
        raise ConfigError(f"classifier.weights={settings.classifier.weights!r} is not one of auto, imagenet, none.")
    return settings


def load_settings(source: str | Path | None = None, overrides: Sequence[str] = (),
                  values: Mapping[str, Any] | None = None) -> ClassifySettings:
    """Defaults <- a preset name (``classify-phantoms``) or YAML file <- dotted overrides (``folds=3``) <- values
    typed on the command line (by field name, dotted for a section's: ``data.source``)."""
    return _check(build_settings(ClassifySettings, source, overrides, values=values))


def to_dict(settings: ClassifySettings) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(settings), resolve=True)  # type: ignore[return-value]
