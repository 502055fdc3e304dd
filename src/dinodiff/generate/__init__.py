"""The `generate` stage: synthetic datasets by reconstruction, interpolation or sampling of c_GLB.

plan (settings, items, seeds) -> sample (pipeline, images per item) -> previews (figures) -> outputs
(sources/, labels.csv, provenance.json) -> stage (`generate_dataset`, one or many processes).
"""

from dinodiff.generate.plan import STRATEGIES, GenerateSettings
from dinodiff.generate.stage import generate_dataset

__all__ = ["STRATEGIES", "GenerateSettings", "generate_dataset"]
