"""Nearest-neighbour privacy audit of synthetic datasets (DCR, calibrated on real-vs-real distances).

Imports no other evaluate subpackage or module.
"""

from dinodiff.evaluate.audit.stage import AuditSettings, audit

__all__ = ["AuditSettings", "audit"]
