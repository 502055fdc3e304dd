"""`dinodiff demo`: every stage end to end on built-in phantoms."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dinodiff.cli.common import configure_logging, failures


def demo(
    out: Path = typer.Option(Path("demo-output"), "--out", "-o", help="Folder for everything the demo makes."),
    data: Optional[Path] = typer.Option(None, "--data", help="A folder of real images (masks and labels used when present) instead of the built-in phantoms."),
    quick: bool = typer.Option(False, "--quick", help="The smallest form (32 px, a few hundred steps): what the tests run."),
    train_steps: Optional[int] = typer.Option(None, "--train-steps", help="Diffusion training steps (default: the demo's size)."),
) -> None:
    """Run every stage end to end on built-in phantoms, on CPU: prepare -> pretrain-encoder -> cache -> train ->
    generate -> learning checks -> classify -> segment -> report. A rerun skips what is done."""
    from dataclasses import replace

    from dinodiff.demo import DemoSettings, quick_settings, run_demo

    settings = quick_settings(str(out), str(data) if data else None) if quick else DemoSettings(
        out=str(out), data=str(data) if data else None)
    if train_steps is not None:
        settings = replace(settings, train_steps=train_steps)
    configure_logging()  # the stages' progress lines (the trainer's among them)
    with failures({(FileNotFoundError, ValueError, OSError): 2}):
        run_demo(settings)

