"""`dinodiff demo`: the whole method end to end on built-in phantoms (or a folder of real images), on CPU.

phantoms -> prepare -> pretrain-encoder -> cache -> train -> generate -> learning checks (image quality)
-> classify -> segment -> report. See `run.run_demo` and `settings.DemoSettings`.
"""

from dinodiff.demo.run import run_demo
from dinodiff.demo.settings import DemoSettings, quick_settings

__all__ = ["DemoSettings", "quick_settings", "run_demo"]
