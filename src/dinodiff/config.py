"""Typed settings: frozen dataclass defaults, YAML presets merged over them, dotted overrides.

Settings are data (k-diffusion style): ``load_training_settings("cpu-small", ["train.lr=2e-4"])`` merges the
preset over the defaults below, then the overrides over that, validates types and choices, and returns a frozen
`TrainingSettings`; every other stage's `*Settings` is built by the same `build_settings`. A run's resolved
settings are saved with it as ``config.yaml``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dinodiff.files import write_text_atomic

logger = logging.getLogger(__name__)
PRESET_DIR = Path(__file__).resolve().parent / "configs"
S = TypeVar("S")


def setting(default: Any = MISSING, help: str = "", *, flags: Sequence[str] = (),
            default_factory: Callable[[], Any] | None = None) -> Any:
    """A settings field with its description: the one text a command's `--help` shows for the option made from it
    (`dinodiff.cli.common.settings_options`), so neither the default nor the help is written twice. `flags` are
    the option's own names when they are not ``--field-name`` (e.g. ``("--out", "-o")``, or
    ``("--shared-label/--any-pair",)`` for a bool): options users already type keep their names."""
    metadata = {"help": help, "flags": tuple(flags)}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def settings_dataclass(cls: type[S]) -> type[S]:
    """A frozen settings dataclass in which a field annotated with a section (another settings dataclass) and
    given no default defaults to that section's own defaults.

    A stage's settings are such sections (``model: ModelSettings``), so a section's type is written once, not
    again in ``field(default_factory=ModelSettings)``.
    """
    hints = get_type_hints(cls)  # resolves the string annotations of `from __future__ import annotations`
    for name in cls.__dict__.get("__annotations__", {}):
        if name not in cls.__dict__ and is_dataclass(hints[name]):
            setattr(cls, name, field(default_factory=hints[name]))
    return dataclass(frozen=True)(cls)


@dataclass(frozen=True)
class PrepareSettings:
    """Everything `prepare` depends on (recorded in manifest.json, except `workers`: any count gives the same bytes)."""

    kind: str = setting("auto", "Dataset layout: auto, folder, csv, mimic-cxr, montgomery, shenzhen or jsrt.")
    size: int = setting(512, "Side of the square output images in pixels.")
    min_size: int = setting(64, "Reject images whose content (after border removal) has a shorter side below this.")
    remove_borders: bool = setting(True, "Strip constant black/white frames and letterboxing before cropping.")
    intensity: str = setting("minmax", "How >8-bit images become uint8: minmax or percentile (0.5-99.5%).")
    shard_size: int = setting(1000, "Input images per shard.")
    workers: int | None = setting(None, "Parallel worker processes (default: all cores).")
    seed: int = setting(0, "Seed of the train/test/val assignment when the dataset has no split.")
    test_fraction: float = setting(0.0, "Fraction of subjects (patients; images when unknown) put in the test split "
                                        "when the dataset has none.")
    val_fraction: float = setting(0.0, "Fraction of subjects put in a 'val' split (from the training side): what "
                                       "`dinodiff sweep` selects checkpoints on, so the test split stays unseen.")
    subject_column: str | None = setting(None, "CSV sources: the column naming each image's patient (default: the "
                                               "first of subject, subject_id, patient, patient_id, patientid, "
                                               "PatientID). MIMIC-CXR needs none.")
    subject_pattern: str | None = setting(None, "A regex on ids whose group 1 is the patient, e.g. '^(\\d+)-' ; it "
                                                "must match every id.")
    exclude: list[str] | None = setting(None, "Comma-separated image sets (folders, datasets or prepared folders) "
                                              "whose images must not be written: an input that is one of their "
                                              "files, or the same picture (content fingerprint), is rejected as "
                                              "'excluded' in rejects.csv. Keeps evaluation images out of a "
                                              "training set.")


@dataclass(frozen=True)
class PhantomSettings:
    """`dinodiff phantoms`: deterministic synthetic CXRs with lung masks and labels (data.phantoms)."""

    n: int = setting(64, "Number of phantoms.", flags=("-n",))
    size: int = setting(256, "Image side in pixels.")
    seed: int = setting(0, "Seed: same seed and index give the same phantom.")


@dataclass(frozen=True)
class ReportSettings:
    """`dinodiff report`: what the page shows besides the results found under its folder."""

    title: str | None = setting(None, "Page title (default: 'dinodiff report: ROOT').")


@dataclass(frozen=True)
class EncoderSettings:
    # Hub id or local folder; "random:<family>" builds a small randomly initialised ViT of that
    # family (for demos and tests, since pretrained weights need the internet).
    name_or_path: str = "facebook/dino-vitb16"
    library: str = "auto"  # auto | transformers | timm
    tokens: list[str] | None = None  # subset of cls / pooler / registers; None = the family default
    image_size: int | None = None  # None = the encoder's own resolution
    # Used instead of name_or_path when that is a local folder that does not exist yet (cpu-small prefers the
    # output of `dinodiff pretrain-encoder --config cpu-encoder`, else the random ViT). The choice is made once,
    # when the config is loaded, and saved in the run's config.yaml; a resumed run keeps the encoder it began with.
    fallback: str | None = None


@dataclass(frozen=True)
class AutoencoderSettings:
    kind: str = "kl"  # kl | tiny | taef2 | unshuffle
    path: str | None = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    scaling_factor: float | None = None  # None = from the autoencoder's config, else estimated
    shift_factor: float | None = None
    unshuffle_factor: int = 8
    estimate_stats_images: int = 256  # images used to estimate scale/shift when the AE has none


@dataclass(frozen=True)
class UNetSettings:
    preset: str = "sd15"  # sd15 | small | tiny
    pretrained: str | None = None  # SD weights (hub id or folder) to start from
    overrides: dict[str, Any] = field(default_factory=dict)  # merged into the preset's UNet config


@dataclass(frozen=True)
class NoiseSettings:
    """The training noise schedule (diffusers DDPMScheduler arguments)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"  # epsilon | v_prediction
    rescale_betas_zero_snr: bool = False


@settings_dataclass
class ModelSettings:
    resolution: int = 512  # image side in pixels fed to the autoencoder
    encoder: EncoderSettings
    autoencoder: AutoencoderSettings
    unet: UNetSettings
    noise: NoiseSettings


@dataclass(frozen=True)
class TrainDataSettings:
    shards: str = ""  # a prepared folder, a shard file/brace pattern, or a URL (pipe:, s3://)
    cache: str | None = None  # a `dinodiff cache` folder; when set, training reads it instead
    augment: bool = True  # the paper's sharpening + affine augmentation
    shuffle_buffer: int = 1000
    num_workers: int = 2
    num_holdout: int = 8  # fixed images whose reconstructions are drawn in sample grids
    # A damaged shard (cut short, bad sidecar size): skip = log it, count it and train/cache without it;
    # stop = fail with its name. `generate` and scoring always stop (their image sets must not shrink).
    on_corrupt: str = "skip"


@dataclass(frozen=True)
class TrainOptimSettings:
    lr: float = 1e-4
    warmup_steps: int = 1000
    lr_schedule: str = "constant_with_warmup"  # any diffusers.optimization.get_scheduler name
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = True  # bitsandbytes on CUDA when installed; plain AdamW otherwise (logged)
    max_grad_norm: float | None = 1.0
    fused: bool = True  # torch AdamW's fused CUDA kernel (CUDA only; not with 8-bit Adam)


@dataclass(frozen=True)
class TrainRunSettings:
    run_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 140_000
    batch_size: int = 64  # per device; effective = batch_size x processes x grad_accum
    grad_accum: int = 2
    mixed_precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | no | fp16 | bf16
    gradient_checkpointing: bool = False
    attention: str = "auto"  # auto (xformers when installed, else SDPA) | sdpa | xformers
    # GPU speed (train/performance.py); none of them changes what is learnt beyond float rounding.
    sdpa_backend: str = "auto"  # auto (PyTorch chooses) | flash | efficient | cudnn | math; see BENCHMARKS.md
    channels_last: bool | None = None  # None = on CUDA only: UNet and autoencoder weights in NHWC
    compile: str = "none"  # none | default | max-autotune-no-cudagraphs: torch.compile of the UNet
    tf32: bool = True  # CUDA only: TF32 matmuls/convolutions (the fp32 frozen models above all)
    ema: bool = False
    ema_decay: float = 0.9999
    snr_gamma: float | None = None  # Min-SNR weighting; None = plain MSE (the paper)
    noise_offset: float = 0.0
    cond_dropout: float = 0.0  # probability of a null condition, enables classifier-free guidance
    log_every: int = 10  # metrics row + the non-finite check; loss/grad norm stay on the device in between
    checkpoint_every: int = 2500
    keep_last: int = 3
    sample_every: int = 2500  # 0 = never (no sample grids)
    sample_steps: int = 25
    eval_every: int = 0  # 0 = off; > 0 calls the evaluation hook (FID) every N steps
    deterministic: bool = False  # torch deterministic algorithms (needed for bitwise resume tests)
    resume: str = "auto"  # auto (latest when the run dir has checkpoints) | latest | none | a checkpoint path
    # Multi-process runs: timeout of the training collectives (None = torch's: NCCL 10 min, gloo 30 min), and how
    # long the other processes wait while the main one works alone (sample grid, model folder, FID evaluation).
    dist_timeout_s: float | None = None
    eval_timeout_s: float = 6 * 3600


@dataclass(frozen=True)
class FidSettings:
    """FID/KID of generated images against real ones, on the features of `extractor`: the one list of FID
    settings, for `dinodiff fid`, `dinodiff sweep` and a run's `eval` section (training with train.eval_every > 0).

    For `fid`, `num_real` and `num_sources` are the subset sizes of the real and the generated set; for a sweep
    they are the real images and the fixed sources that every checkpoint reconstructs.
    """

    real: str | None = setting(None, "Real images (default: the run's data.shards).")
    sources: str | None = setting(None, "Images whose reconstructions are scored (default: the real set).")
    # None: `fid` reports on "test"; checkpoint selection (sweep, training hook) uses "val" when present, else
    # "train", never "test" unless named (see evaluate.fid.sweep.selection_split).
    split: str | None = setting(None, "Split of a prepared folder. fid reports on it (default: test); sweep selects "
                                      "checkpoints on it (default: 'val' when present, else 'train'; never 'test' "
                                      "unless named: fid and classify report on it).")
    extractor: str = setting("xrv", "Feature extractor: xrv (TorchXRayVision densenet121-res224-all features2, the "
                                    "paper's), inception, dinov2 or rad-dino.")
    weights: str | None = setting(None, "Extractor weights: xrv's cache folder (default "
                                        "~/.torchxrayvision/models_data/), an Inception-v3 state-dict file (default "
                                        "$TORCH_HOME/hub/checkpoints/), or a DINOv2/RAD-DINO hub id or folder.")
    num_real: int | None = setting(5000, "Real images (seeded subset; 0 = all).")  # None (or 0) = all
    num_sources: int | None = setting(5000, "Source images, the same for every checkpoint (seeded subset; 0 = "
                                            "all).")  # fid: the generated images drawn; None (or 0) = all
    per_source: int = setting(1, "Reconstructions per source image.")
    sample_steps: int = setting(25, "Sampling steps per image.", flags=("--steps",))  # sweep
    batch_size: int = setting(16, "Images per batch, for sampling (sweep) and for the extractor.")
    seed: int = setting(0, "Seed of the image subsets, of the sampling noise (sweep: the same for every checkpoint) "
                           "and of KID's random subsets.")
    device: str = setting("auto", "auto (CUDA when available), cpu, cuda, cuda:1, ...")
    cache_dir: str | None = setting(None, "Folder of cached real-set features (default: fid $DINODIFF_CACHE/fid-stats, "
                                          "sweep RUN_DIR/fid-cache).")
    cache: bool = setting(True, "Cache the real set's features (keyed by extractor and exact file list).")
    kid_subsets: int = setting(100, "KID: number of random subsets.")
    kid_subset_size: int = setting(1000, "KID: images per subset (capped by the smaller set).")

    def __post_init__(self) -> None:
        for name in ("num_real", "num_sources"):  # 0 = all, as the options say
            if getattr(self, name) == 0:
                object.__setattr__(self, name, None)


@settings_dataclass
class TrainingSettings:
    """A training run's whole configuration, saved as RUN/config.yaml (the sections below, in this order)."""

    model: ModelSettings
    data: TrainDataSettings
    optim: TrainOptimSettings
    train: TrainRunSettings
    eval: FidSettings


_CHOICES = {
    "model.encoder.library": ("auto", "transformers", "timm"),
    "model.autoencoder.kind": ("kl", "tiny", "taef2", "unshuffle"),
    "model.unet.preset": ("sd15", "small", "tiny"),
    "model.noise.prediction_type": ("epsilon", "v_prediction"),
    "train.mixed_precision": ("auto", "no", "fp16", "bf16"),
    "train.attention": ("auto", "sdpa", "xformers"),
    "train.sdpa_backend": ("auto", "flash", "efficient", "cudnn", "math"),
    "train.compile": ("none", "default", "max-autotune-no-cudagraphs"),
    "eval.extractor": ("xrv", "inception", "dinov2", "rad-dino"),
    "data.on_corrupt": ("skip", "stop"),
}


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which key and why."""


def preset_path(name_or_path: str | Path) -> Path:
    """A preset name (``tiny``, ``cpu-small``, ...) or a YAML path -> an existing YAML path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
    raise ConfigError(f"No config file '{name_or_path}'. Give a YAML path or one of the presets: {known}.")


def merge_preset(schema: Any, source: str | Path | None = None, overrides: Sequence[str] = (),
                 choices: dict[str, Sequence[Any]] | None = None) -> DictConfig:
    """Defaults of the dataclass ``schema`` (a class, or an instance to start from) <- YAML preset/file <- dotted
    overrides, with one-line errors.

    The one merge rule for every stage's settings (training config, encoder pretraining, classification).
    """
    merged = OmegaConf.structured(schema)
    try:
        if source is not None:
            merged = OmegaConf.merge(merged, OmegaConf.load(preset_path(source)))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"Overrides must look like key=value (e.g. train.lr=2e-4); got {bad}.")
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:  # omegaconf adds full_key/object_type lines: keep one line
        where = f" (key {err.full_key})" if getattr(err, "full_key", None) else ""
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"Invalid config ({source or 'defaults'}): {first}{where}") from None
    except yaml.YAMLError as err:  # a syntax error in the YAML file
        mark = getattr(err, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"Invalid YAML in {source}{at}: {getattr(err, 'problem', None) or err}") from None
    for key, allowed in (choices or {}).items():
        value = OmegaConf.select(merged, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}.")
    return merged


def _plain(value: Any) -> Any:
    """A command-line value as OmegaConf takes it: paths as strings, tuples as lists."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def build_settings(schema: type[S], source: str | Path | None = None, overrides: Sequence[str] = (),
                   values: Mapping[str, Any] | None = None, choices: dict[str, Sequence[Any]] | None = None,
                   base: Mapping[str, Any] | None = None) -> S:
    """The one path to a stage's settings object: the defaults of the frozen dataclass `schema` (<- `base`, a
    named starting point such as the demo's quick sizes) <- a YAML preset or file (`--config`) <- dotted overrides
    <- `values` (the options typed on the command line, by field name), checked against the schema's fields and
    types (ConfigError names the key and the file)."""
    if base:
        schema_defaults = OmegaConf.merge(OmegaConf.structured(schema),
                                          OmegaConf.create({k: _plain(v) for k, v in base.items()}))
        schema = OmegaConf.to_object(schema_defaults)  # an instance: OmegaConf.structured takes it as defaults
    merged = merge_preset(schema, source, overrides, choices)
    key = None
    try:
        for key, value in (values or {}).items():  # one at a time, so that an error names its key
            merged = OmegaConf.merge(merged, OmegaConf.create(_nested({key: value})))
        key = None
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or key
        where = f" (key {key})" if key else ""
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"Invalid settings ({source or 'command line'}): {first}{where}") from None
    except (TypeError, ValueError) as err:  # a settings class's own checks (__post_init__)
        raise ConfigError(f"Invalid settings ({source or 'command line'}): {err}") from None


def _nested(values: Mapping[str, Any]) -> dict[str, Any]:
    """Values by field name, a dotted name for a section's field (``data.source``), as nested plain mappings."""
    nested: dict[str, Any] = {}
    for key, value in values.items():
        *sections, name = key.split(".")
        node = nested
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = _plain(value)
    return nested


def load_training_settings(source: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainingSettings:
    """A training run's settings: defaults <- YAML preset/file <- dotted overrides (``train.lr=2e-4``), validated,
    through `build_settings` like every stage's; the encoder chosen (`choose_encoder`)."""
    settings = build_settings(TrainingSettings, source, overrides, choices=_CHOICES)
    for key in ("log_every", "checkpoint_every", "sample_every", "max_steps"):
        lowest = 0 if key == "sample_every" else 1  # the trainer counts steps modulo these
        if getattr(settings.train, key) < lowest:
            raise ConfigError(f"train.{key}={getattr(settings.train, key)} must be >= {lowest} "
                              f"({source or 'defaults'}).")
    return choose_encoder(settings)


def with_overrides(settings: S, overrides: Sequence[str]) -> S:
    """A copy of frozen `settings` with dotted overrides (``data.cache=DIR``) applied and type-checked: how a
    program that holds a settings object (a benchmark, a test, the CLI's --resume) derives another."""
    return OmegaConf.to_object(merge_preset(settings, None, overrides))  # type: ignore[return-value]


def choose_encoder(settings: TrainingSettings) -> TrainingSettings:
    """Settle ``model.encoder.name_or_path`` when a ``fallback`` is given (see EncoderSettings.fallback).

    A run that already has a config.yaml keeps the encoder recorded there, so resuming never swaps encoders.
    """
    enc = settings.model.encoder
    if not enc.fallback:
        return settings
    saved = Path(settings.train.run_dir) / "config.yaml"
    recorded = OmegaConf.select(OmegaConf.load(saved), "model.encoder.name_or_path") if saved.is_file() else None
    if recorded:
        chosen, why = recorded, f"recorded in {saved}"
    elif Path(enc.name_or_path).expanduser().is_dir():
        chosen, why = enc.name_or_path, "found"
    else:
        chosen, why = enc.fallback, f"{enc.name_or_path} not found (run `dinodiff pretrain-encoder` to make it)"
    logger.info("encoder: %s (%s)", chosen, why)
    model = replace(settings.model, encoder=replace(enc, name_or_path=chosen, fallback=None))
    return replace(settings, model=model)


def save_config(settings: Any, path: str | Path) -> None:
    """Write resolved settings (a settings dataclass or a plain mapping) as YAML, atomically."""
    node = OmegaConf.structured(settings) if is_dataclass(settings) else OmegaConf.create(settings)
    write_text_atomic(path, OmegaConf.to_yaml(node, resolve=True))

