"""`dinodiff demo`: the whole method end to end on built-in phantoms (or a folder of real images), on CPU.

phantoms -> prepare -> pretrain-encoder -> cache -> train -> generate -> learning checks (image quality)
-> classify -> segment -> report. See `run.run_demo` and `settings.DemoSettings`.
"""

from typing import Any

from dinodiff.demo.settings import DemoSettings, quick_settings

__all__ = ["DemoSettings", "quick_settings", "run_demo"]


def __getattr__(name: str) -> Any:
    """`run_demo` is imported when first used: the CLI reads DemoSettings at start-up, without torch (PEP 562)."""
    if name == "run_demo":
        from dinodiff.demo.run import run_demo

        return run_demo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
