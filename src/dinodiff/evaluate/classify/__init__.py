"""`dinodiff classify`: downstream classification with real, synthetic and count-matched control training sets
(the paper's Table 1 and Figure 4). Imports no other `evaluate` module."""

from typing import Any

from dinodiff.evaluate.classify.settings import ClassifySettings, load_settings

__all__ = ["ClassifySettings", "GridMismatch", "classify", "load_settings"]


def __getattr__(name: str) -> Any:
    """The stage is imported when first used: the CLI reads ClassifySettings at start-up, without torch (PEP 562)."""
    if name in ("GridMismatch", "classify"):
        import dinodiff.evaluate.classify.stage as stage  # a plain import: `from ... import` would ask here again

        return getattr(stage, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
