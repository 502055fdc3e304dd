"""`dinodiff classify`: downstream classification with real, synthetic and count-matched control training sets
(the paper's Table 1 and Figure 4). Imports no other `evaluate` module."""

from dinodiff.evaluate.classify.settings import ClassifySettings, load_settings
from dinodiff.evaluate.classify.stage import GridMismatch, classify

__all__ = ["ClassifySettings", "GridMismatch", "classify", "load_settings"]
