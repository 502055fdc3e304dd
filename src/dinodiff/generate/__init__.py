"""The `generate` stage: synthetic datasets by reconstruction, interpolation or sampling of c_GLB.

settings (what the images depend on) -> plan (items, seeds) -> sample (pipeline, images per item) -> previews
(figures) -> outputs (sources/, labels.csv, provenance.json) -> stage (`generate_dataset`, one or many processes).
"""

from typing import Any

from dinodiff.generate.settings import STRATEGIES, GenerateSettings

__all__ = ["STRATEGIES", "GenerateSettings", "generate_dataset"]


def __getattr__(name: str) -> Any:
    """`generate_dataset` is imported when first used: the CLI reads GenerateSettings at start-up, without torch
    (PEP 562)."""
    if name == "generate_dataset":
        from dinodiff.generate.stage import generate_dataset

        return generate_dataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
