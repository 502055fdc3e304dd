"""What `dinodiff audit` reads and how: its settings, each with the help its command-line option shows (saved
under results.json's provenance). A light module: the CLI builds the audit's options from it at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from dinodiff.config import setting


@dataclass(frozen=True)
class AuditSettings:
    """What the audit reads and how (saved under results.json's provenance)."""

    train: str
    holdout: str | None = setting(None, "Real images never trained on (default: the --train folder's test split, "
                                        "if any).")
    train_split: str = "train"
    holdout_split: str = "test"
    model: str | None = setting(None, "Pipeline model folder whose image_encoder/ gives the c_glb space (default: "
                                      "the model named in the synthetic sets' provenance.json).")
    encoder: str | None = setting(None, "An encoder folder (global_tokens.json) for the c_glb space instead.")
    xrv_weights: str | None = setting(None, "TorchXRayVision weights folder (default "
                                            "~/.torchxrayvision/models_data/); the xrv space is 'unavailable' "
                                            "without it.")
    size: int = setting(128, "Images are compared at this size in pixels.")
    limit: int | None = setting(None, "At most N synthetic images per dataset and N held-out images. Never caps the "
                                      "training set: every training image is searched (a truncated training set "
                                      "would push distances up and hide copies).")
    pairs: int = setting(8, "Closest synthetic/real pairs drawn per dataset.")
    spaces: list[str] = setting(help="Comma list of feature spaces.",
                                default_factory=lambda: ["pixels", "c_glb", "xrv", "rad-dino"])
    candidates: int = setting(16, "Pixel copy search: training images registered per query (rotation, zoom, shift).")
    calibration_queries: int = setting(2000, "train->train reference: at most N training images as queries (a "
                                             "seeded subsample; each still searched against the whole training "
                                             "set).")
    seed: int = setting(0, "Seed of the train->train subsample.")
    chunk: int = setting(1024, "Training images decoded and compared at a time (the training set is streamed).")
    max_memory_mb: float = setting(512, "Working memory of one distance or registration block, in MB.")
    device: str = setting("auto", "auto (the GPU when there is one), cpu or cuda.")
