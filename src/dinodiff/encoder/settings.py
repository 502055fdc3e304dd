"""Typed settings of `dinodiff pretrain-encoder` (dataclass defaults <- YAML preset <- dotted overrides) and of
`dinodiff probe-encoder`. A light module: the CLI builds probe-encoder's options from ProbeSettings at start-up.

Same conventions as the diffusion config (`dinodiff.config`): presets live in `dinodiff/configs/`
(`cpu-encoder`, `gpu-encoder`), overrides look like `optim.lr=1e-3`, and the resolved settings are
saved with the run as `config.yaml` and in the encoder folder's `dinodiff_encoder.json`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dinodiff.config import ConfigError, build_settings, setting, settings_dataclass


@dataclass(frozen=True)
class BackboneSettings:
    # None/"" = a new transformers Dinov2WithRegistersModel of the size below, trained from scratch;
    # else a hub id or local folder (transformers ViT/DINOv2 or timm ViT) to continue from.
    name_or_path: str | None = None
    library: str = "auto"  # for name_or_path: auto | transformers | timm
    image_size: int = 64  # global-crop side = the saved encoder's input resolution
    patch_size: int = 8
    hidden_size: int = 192
    num_layers: int = 6
    num_heads: int = 3
    mlp_ratio: int = 4
    num_registers: int = 4
    drop_path: float = 0.1


@dataclass(frozen=True)
class HeadSettings:
    """lightly's DINOProjectionHead (3-layer MLP -> L2-normalised bottleneck -> weight-normalised prototypes)."""

    hidden_dim: int = 1024
    bottleneck_dim: int = 128
    output_dim: int = 2048  # K prototypes; the uniform loss is ln K
    norm_last_layer: bool = True
    # BatchNorm in the head's hidden layers (DINO's ResNet setting). It rescales the differences between images
    # to unit variance, which lets a small, freshly initialised ViT escape the uniform-teacher plateau (loss at
    # ln K) that plain heads stay on for hundreds of CPU steps; the teacher's head then uses batch statistics.
    batch_norm: bool = True
    freeze_last_layer_steps: int = 0  # DINO freezes the prototypes for the first epoch


@dataclass(frozen=True)
class LossSettings:
    """lightly's DINOLoss: teacher centring (EMA of its mean output) + sharpening (low temperature)."""

    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_steps: int = 100  # linear 0.04 -> 0.07
    center_momentum: float = 0.9
    # How the teacher's outputs are centred: "mean" = DINO's EMA centre (lightly DINOLoss); "sinkhorn" = DINOv2's
    # Sinkhorn-Knopp normalisation (lightly's sinkhorn_knopp, 3 iterations, per global crop): the teacher's
    # targets are balanced over the prototypes within the batch, so they can be neither uniform nor one-hot.
    centering: str = "sinkhorn"
    # KoLeo (DINOv2, Oquab et al. 2023, section 4; lightly's KoLeoLoss) on the student's global-crop CLS tokens:
    # spreads the embeddings of a batch apart, which keeps a small run off the one-point / uniform plateaus.
    koleo_weight: float = 0.1


@dataclass(frozen=True)
class AugmentSettings:
    """Multi-crop for grey radiographs (see encoder/augment.py for what is left out and why)."""

    global_scale: tuple[float, float] = (0.4, 1.0)
    local_crops: int = 2
    local_size: int = 32
    local_scale: tuple[float, float] = (0.1, 0.4)
    rotation: float = 10.0  # degrees
    translate: float = 0.05
    brightness: float = 0.3
    contrast: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.4)
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global 1, global 2, locals (as DINO)
    sharpen_p: float = 0.2
    hflip_p: float = 0.0  # off: left/right carries anatomy (heart side) in CXRs


@dataclass(frozen=True)
class DataSettings:
    shards: str = ""  # a `dinodiff prepare` folder (or folder of .tar shards)
    split: str | None = "train"  # None = every split
    load_size: int = 128  # images are held in memory at this side (>= image_size)
    max_images: int | None = None
    num_workers: int = 1  # DataLoader workers building the multi-crop batches


@dataclass(frozen=True)
class OptimSettings:
    lr: float = 1e-3  # peak AdamW lr for batch_size x processes = 256 (scaled linearly, as DINO)
    min_lr: float = 1e-5
    warmup_steps: int = 50
    weight_decay: float = 0.04
    max_grad_norm: float | None = 3.0


@dataclass(frozen=True)
class RunSettings:
    run_dir: str = "runs/encoder"
    out: str | None = None  # the encoder folder; None = RUN/encoder
    seed: int = 0
    max_steps: int = 1000
    batch_size: int = 64  # per process
    momentum_start: float = 0.99  # teacher EMA momentum, cosine to momentum_end
    momentum_end: float = 1.0
    mixed_precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | no | fp16 | bf16
    log_every: int = 10
    checkpoint_every: int = 200
    keep_last: int = 2
    deterministic: bool = False
    resume: str = "auto"  # auto | latest | none | a checkpoint folder
    # Collapse monitor: the teacher's L2-normalised embeddings have a per-dimension std of ~1/sqrt(D) when
    # healthy and -> 0 when every image maps to the same point; the teacher's batch-mean output entropy
    # -> 0 when one prototype takes everything.
    collapse_std_ratio: float = 0.1  # collapsed when std * sqrt(D) falls below this
    collapse_entropy: float = 0.5  # collapsed when the entropy (nats) of the mean teacher output falls below
    collapse_patience: int = 3  # consecutive logged checks before acting
    stop_on_collapse: bool = True  # raise EncoderCollapsed; False = warn only


@settings_dataclass
class EncoderPretrainSettings:
    backbone: BackboneSettings
    head: HeadSettings
    loss: LossSettings
    augment: AugmentSettings
    data: DataSettings
    optim: OptimSettings
    run: RunSettings

    @property
    def out_dir(self) -> Path:
        return Path(self.run.out) if self.run.out else Path(self.run.run_dir) / "encoder"


_CHOICES = {
    "backbone.library": ("auto", "transformers", "timm"),
    "run.mixed_precision": ("auto", "no", "fp16", "bf16"),
    "loss.centering": ("mean", "sinkhorn"),
}


def load_encoder_settings(source: str | Path | None = None, overrides: Sequence[str] = ()) -> EncoderPretrainSettings:
    """Defaults <- YAML preset/file (``cpu-encoder``, ``gpu-encoder`` or a path) <- dotted overrides, validated."""
    settings = build_settings(EncoderPretrainSettings, source, overrides, choices=_CHOICES)
    _validate(settings)
    return settings


def _validate(s: EncoderPretrainSettings) -> None:
    b = s.backbone
    if b.image_size % b.patch_size or s.augment.local_size % b.patch_size:
        raise ConfigError(f"backbone.image_size ({b.image_size}) and augment.local_size ({s.augment.local_size}) "
                          f"must be multiples of backbone.patch_size ({b.patch_size}).")
    if b.hidden_size % b.num_heads:
        raise ConfigError(f"backbone.hidden_size ({b.hidden_size}) must be divisible by num_heads ({b.num_heads}).")
    if s.data.load_size < b.image_size:
        raise ConfigError(f"data.load_size ({s.data.load_size}) must be >= backbone.image_size ({b.image_size}).")


def to_container(settings: EncoderPretrainSettings) -> DictConfig:
    """The settings as an OmegaConf node (for `config.yaml` and provenance)."""
    return OmegaConf.structured(settings)


HELDOUT_FAMILY = ("shear", "zoom out", "resolution loss", "gaussian noise", "jpeg")


@dataclass(frozen=True)
class HeldOutViewSettings:
    """The probe's held-out augmentations (encoder.views): none of them is a pretraining augmentation."""

    shear: float = 0.08  # largest |shear| along x and along y
    zoom_out: tuple[float, float] = (0.85, 1.0)  # scale of the image inside the view (<= 1: never a crop)
    downsample: tuple[float, float] = (0.5, 1.0)  # side kept before resizing back up
    noise_std: tuple[float, float] = (0.0, 0.03)
    jpeg_quality: tuple[int, int] = (30, 70)

    def describe(self) -> dict:
        return {"family": list(HELDOUT_FAMILY), "shear": self.shear, "zoom_out": list(self.zoom_out),
                "downsample": list(self.downsample), "noise_std": list(self.noise_std),
                "jpeg_quality": list(self.jpeg_quality)}


@settings_dataclass
class ProbeSettings:
    size: int = setting(128, "Side at which images are read; each encoder resizes to its own input.")
    labels: list[str] | None = setting(None, "Comma-separated labels to probe (default: every label with >= "
                                             "--min-count positives and negatives).")
    label_columns: list[str] | None = setting(None, "For a CSV: comma-separated label columns (a text column such "
                                                    "as finding gives one label per value).")
    min_count: int = setting(10, "Smallest number of positives and of negatives for a label to be probed.")
    folds: int = setting(5, "Stratified cross-validation folds.")
    k: int = setting(10, "Neighbours of the k-NN probe (cosine, distance-weighted).")
    C: float = 0.1  # inverse L2 strength of the logistic-regression probe (standardised features)
    views: int = 0  # images used for view retrieval (0 = all probed images)
    tokens: str = "all"  # all = the flattened c_GLB; cls = its first token only
    seed: int = setting(0, "Seed of the folds and of the augmented views.")
    batch_size: int = 64
    transductive: bool = setting(False, "Probe the images the encoders trained on too (every number is then "
                                        "labelled transductive where it is).")
    heldout_views: HeldOutViewSettings  # the reported invariance
    augment: AugmentSettings  # the pretext views (pretraining's)
