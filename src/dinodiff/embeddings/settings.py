"""What a `train-embeddings` run depends on, each field with the help its command-line option shows. A light
module: the CLI builds train-embeddings' options from it at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from dinodiff.config import setting

CHUNK = 2048  # rows per block of the embedding metrics: a block of distances is CHUNK x CHUNK float32 (16 MiB)


@dataclass(frozen=True)
class EmbeddingTrainSettings:
    """Everything a `train-embeddings` run depends on (saved as settings.json in the run folder)."""

    cache: str
    out: str
    max_steps: int = setting(2000, "Training steps.", flags=("--steps",))
    batch_size: int = setting(256, "Embeddings per step.")
    lr: float = setting(1e-3, "AdamW learning rate.")
    weight_decay: float = 0.0
    width: int = setting(512, "Width of the MLP's residual blocks.")
    depth: int = setting(4, "Number of residual blocks.")
    dropout: float = 0.0
    num_train_timesteps: int = 1000
    prediction_type: str = "v_prediction"  # epsilon | v_prediction | sample (v: stable at every t, Salimans & Ho 2022)
    beta_schedule: str = "linear"  # DDPM (Ho et al. 2020) and RCG: linear betas 1e-4 .. 0.02 over 1000 steps
    labels: str = setting("auto", "auto: condition on the cached images' labels when they have any (null label for "
                                  "guidance); none: unconditional.")
    label_dropout: float = setting(0.1, "Probability of the null label in training (classifier-free guidance).")
    checkpoint_every: int = setting(500, "Steps between checkpoints (a killed run resumes from the newest).")
    keep_last: int = 2
    log_every: int = 50
    seed: int = setting(0, "Seed of the weights, batches and noise.")
    limit: int | None = setting(None, "Use only the first N cached images.")
    holdout_fraction: float = setting(0.1, "Fraction of the subjects (patients; images when unknown), drawn with "
                                           "--seed, held out of training: eval.json measures the samples against "
                                           "them. 0: against the training embeddings (transductive).")
    eval_steps: int = 50  # DDIM steps of the evaluation samples
    eval_samples: int | None = 10_000  # samples the evaluation draws (one per training image up to this); None = all
    metrics_chunk: int = setting(CHUNK, "Rows per block of eval.json's distance computations (memory grows with "
                                        "its square).")

    def __post_init__(self) -> None:
        if self.labels not in ("auto", "none"):
            raise ValueError(f"labels={self.labels!r}: use auto or none.")
        if self.max_steps < 1 or self.batch_size < 1 or not 0 <= self.label_dropout < 1:
            raise ValueError("max_steps and batch_size must be >= 1 and label_dropout in [0, 1).")
        if not 0 <= self.holdout_fraction < 1 or self.metrics_chunk < 1:
            raise ValueError("holdout_fraction must be in [0, 1) and metrics_chunk >= 1.")
