"""Typed run configuration: dataclass defaults, YAML presets merged over them, dotted overrides.

A config is data (k-diffusion style): ``load_config("configs/cpu-small.yaml", ["train.lr=2e-4"])``
merges the preset over the defaults below, then the overrides over that, and validates types
and choices. The resolved config is saved with every run as ``config.yaml``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dinodiff.files import write_text_atomic

logger = logging.getLogger(__name__)
PRESET_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class EncoderConfig:
    # Hub id or local folder; "random:<family>" builds a small randomly initialised ViT of that
    # family (for demos and tests, since pretrained weights need the internet).
    name_or_path: str = "facebook/dino-vitb16"
    library: str = "auto"  # auto | transformers | timm
    tokens: Optional[list[str]] = None  # subset of cls / pooler / registers; None = the family default
    image_size: Optional[int] = None  # None = the encoder's own resolution
    # Used instead of name_or_path when that is a local folder that does not exist yet (cpu-small prefers the
    # output of `dinodiff pretrain-encoder --config cpu-encoder`, else the random ViT). The choice is made once,
    # when the config is loaded, and saved in the run's config.yaml; a resumed run keeps the encoder it began with.
    fallback: Optional[str] = None


@dataclass
class AutoencoderConfig:
    kind: str = "kl"  # kl | tiny | taef2 | unshuffle
    path: Optional[str] = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    scaling_factor: Optional[float] = None  # None = from the autoencoder's config, else estimated
    shift_factor: Optional[float] = None
    unshuffle_factor: int = 8
    estimate_stats_images: int = 256  # images used to estimate scale/shift when the AE has none


@dataclass
class UNetConfig:
    preset: str = "sd15"  # sd15 | small | tiny
    pretrained: Optional[str] = None  # SD weights (hub id or folder) to start from
    overrides: dict[str, Any] = field(default_factory=dict)  # merged into the preset's UNet config


@dataclass
class NoiseConfig:
    """The training noise schedule (diffusers DDPMScheduler arguments)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"  # epsilon | v_prediction
    rescale_betas_zero_snr: bool = False


@dataclass
class ModelConfig:
    resolution: int = 512  # image side in pixels fed to the autoencoder
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)


@dataclass
class DataConfig:
    shards: str = ""  # a prepared folder, a shard file/brace pattern, or a URL (pipe:, s3://)
    cache: Optional[str] = None  # a `dinodiff cache` folder; when set, training reads it instead
    augment: bool = True  # the paper's sharpening + affine augmentation
    shuffle_buffer: int = 1000
    num_workers: int = 2
    num_holdout: int = 8  # fixed images whose reconstructions are drawn in sample grids
    # A damaged shard (cut short, bad sidecar size): skip = log it, count it and train/cache without it;
    # stop = fail with its name. `generate` and scoring always stop (their image sets must not shrink).
    on_corrupt: str = "skip"


@dataclass
class OptimConfig:
    lr: float = 1e-4
    warmup_steps: int = 1000
    lr_schedule: str = "constant_with_warmup"  # any diffusers.optimization.get_scheduler name
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = True  # bitsandbytes on CUDA when installed; plain AdamW otherwise (logged)
    max_grad_norm: Optional[float] = 1.0
    fused: bool = True  # torch AdamW's fused CUDA kernel (CUDA only; not with 8-bit Adam)


@dataclass
class TrainConfig:
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
    channels_last: Optional[bool] = None  # None = on CUDA only: UNet and autoencoder weights in NHWC
    compile: str = "none"  # none | default | max-autotune-no-cudagraphs: torch.compile of the UNet
    tf32: bool = True  # CUDA only: TF32 matmuls/convolutions (the fp32 frozen models above all)
    ema: bool = False
    ema_decay: float = 0.9999
    snr_gamma: Optional[float] = None  # Min-SNR weighting; None = plain MSE (the paper)
    noise_offset: float = 0.0
    cond_dropout: float = 0.0  # probability of a null condition, enables classifier-free guidance
    log_every: int = 10  # metrics row + the non-finite check; loss/grad norm stay on the device in between
    checkpoint_every: int = 2500
    keep_last: int = 3
    sample_every: int = 2500
    sample_steps: int = 25
    eval_every: int = 0  # 0 = off; > 0 calls the evaluation hook (FID) every N steps
    deterministic: bool = False  # torch deterministic algorithms (needed for bitwise resume tests)
    resume: str = "auto"  # auto (latest when the run dir has checkpoints) | latest | none | a checkpoint path
    # Multi-process runs: timeout of the training collectives (None = torch's: NCCL 10 min, gloo 30 min), and how
    # long the other processes wait while the main one works alone (sample grid, model folder, FID evaluation).
    dist_timeout_s: Optional[float] = None
    eval_timeout_s: float = 6 * 3600


@dataclass
class EvalConfig:
    """FID of checkpoints (`dinodiff sweep`, and training when train.eval_every > 0): reconstructions of
    fixed source images vs real images, on the features of `extractor`."""

    real: Optional[str] = None  # real images (folder/shards); None = data.shards
    sources: Optional[str] = None  # images whose c_GLB is reconstructed; None = the real set
    split: Optional[str] = None  # None: "val" when the prepared folder has one, else "train"; never "test" unless named
    extractor: str = "xrv"  # xrv (the paper's) | inception | dinov2 | rad-dino
    weights: Optional[str] = None  # xrv cache folder / Inception state dict / DINO id; None = the library's default
    num_real: int = 5000
    num_sources: int = 5000
    per_source: int = 1  # reconstructions per source
    sample_steps: int = 25
    batch_size: int = 16
    seed: int = 0


@dataclass
class Config:
    """A training run's whole configuration, saved as RUN/config.yaml (the sections below, in this order)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


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


def merge_preset(schema: type, source: str | Path | None = None, overrides: Sequence[str] = (),
                 choices: dict[str, Sequence[Any]] | None = None) -> DictConfig:
    """Defaults of the dataclass ``schema`` <- YAML preset/file <- dotted overrides, with one-line errors.

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


def load_config(source: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults <- YAML preset/file <- dotted overrides (``train.lr=2e-4``), validated; the encoder chosen."""
    cfg = merge_preset(Config, source, overrides, _CHOICES)
    choose_encoder(cfg)
    return cfg


def choose_encoder(cfg: DictConfig) -> None:
    """Settle ``model.encoder.name_or_path`` when a ``fallback`` is given (see EncoderConfig.fallback).

    A run that already has a config.yaml keeps the encoder recorded there, so resuming never swaps encoders.
    """
    enc = cfg.model.encoder
    if not enc.fallback:
        return
    saved = Path(cfg.train.run_dir) / "config.yaml"
    recorded = OmegaConf.select(OmegaConf.load(saved), "model.encoder.name_or_path") if saved.is_file() else None
    if recorded:
        chosen, why = recorded, f"recorded in {saved}"
    elif Path(enc.name_or_path).expanduser().is_dir():
        chosen, why = enc.name_or_path, "found"
    else:
        chosen, why = enc.fallback, f"{enc.name_or_path} not found (run `dinodiff pretrain-encoder` to make it)"
    logger.info("encoder: %s (%s)", chosen, why)
    enc.name_or_path, enc.fallback = chosen, None


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    write_text_atomic(path, OmegaConf.to_yaml(cfg, resolve=True))


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
