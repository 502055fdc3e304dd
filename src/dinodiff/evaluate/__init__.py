"""Evaluation of generated images: FID/KID on XRV (default), Inception, DINOv2 or RAD-DINO features
(`evaluate.fid`), and the checkpoint sweep that picks a run's best checkpoint (`evaluate.sweep`)."""

from dinodiff.evaluate.features import EXTRACTORS, FeatureExtractor, build_extractor
from dinodiff.evaluate.fid import fid_from_features, frechet_distance, kid_from_features

__all__ = ["EXTRACTORS", "FeatureExtractor", "build_extractor", "fid_from_features", "frechet_distance",
           "kid_from_features"]
