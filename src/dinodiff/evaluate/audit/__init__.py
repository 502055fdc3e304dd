"""Nearest-neighbour privacy audit of synthetic datasets (DCR, calibrated on real-vs-real distances).

Imports no other evaluate subpackage or module.
"""

from typing import Any

from dinodiff.evaluate.audit.settings import AuditSettings

__all__ = ["AuditSettings", "audit"]


def __getattr__(name: str) -> Any:
    """`audit` is imported when first used: the CLI reads AuditSettings at start-up, without torch (PEP 562)."""
    if name == "audit":
        from dinodiff.evaluate.audit.stage import audit

        return audit
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
