"""The `train` stage: the accelerate loop (trainer), what it feeds on (data) and its sample grids (samples)."""

from dinodiff.train.trainer import Trainer, TrainingDiverged, train

__all__ = ["Trainer", "TrainingDiverged", "train"]
