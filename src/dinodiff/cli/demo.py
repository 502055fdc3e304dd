"""`dinodiff demo`: every stage end to end on built-in phantoms."""

from __future__ import annotations

from pathlib import Path

import typer

from dinodiff.cli.common import (
    CONFIG_HELP,
    configure_logging,
    failures,
    stage_settings,
    typed,
)


def demo(
    ctx: typer.Context,
    out: Path = typer.Option(Path("demo-output"), "--out", "-o", help="Folder for everything the demo makes."),
    data: Path | None = typer.Option(None, "--data", help="A folder of real images (masks and labels used when present) instead of the built-in phantoms."),
    quick: bool = typer.Option(False, "--quick", help="The smallest form (32 px, a few hundred steps): what the tests run."),
    train_steps: int | None = typer.Option(None, "--train-steps", help="Diffusion training steps (default: the demo's size)."),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP + " Fields: those of DemoSettings (OUT/settings.json); --quick starts from the quick sizes."),
) -> None:
    """Run every stage end to end on built-in phantoms, on CPU: prepare -> pretrain-encoder -> cache -> train ->
    generate -> learning checks -> classify -> segment -> report. A rerun skips what is done."""
    from dataclasses import asdict

    from dinodiff.demo import DemoSettings, quick_settings, run_demo

    values = typed(ctx, out=out, data=data, train_steps=train_steps)
    if config is None or "out" in values:
        values["out"] = out  # the demo's folder is always named (its default too)
    quick_sizes = asdict(quick_settings(str(out))) if quick else None  # under the --config file's values
    settings = stage_settings(DemoSettings, config, values, base=quick_sizes)
    configure_logging()  # the stages' progress lines (the trainer's among them)
    with failures({(FileNotFoundError, ValueError, OSError): 2}):
        run_demo(settings)

