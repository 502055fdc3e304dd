"""`dinodiff demo`: every stage end to end on built-in phantoms."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import typer

from dinodiff.cli.common import CONFIG_HELP, configure_logging, failures, settings_options, stage_settings
from dinodiff.demo.settings import DemoSettings, quick_settings  # light: its fields make the options


@settings_options(DemoSettings, "out", "data", "train_steps")
def demo(
    quick: bool = typer.Option(False, "--quick", help="The smallest form (32 px, a few hundred steps): what the tests run."),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP + " Fields: those of DemoSettings (OUT/settings.json); --quick starts from the quick sizes."),
    *,
    options: dict[str, Any],
) -> None:
    """Run every stage end to end on built-in phantoms, on CPU: prepare -> pretrain-encoder -> cache -> train ->
    generate -> learning checks -> classify -> segment -> report. A rerun skips what is done."""
    from dinodiff.demo import run_demo

    quick_sizes = asdict(quick_settings(DemoSettings.out)) if quick else None  # under the --config file's values
    settings = stage_settings(DemoSettings, config, options, base=quick_sizes)
    configure_logging()  # the stages' progress lines (the trainer's among them)
    with failures({(FileNotFoundError, ValueError, OSError): 2}):
        run_demo(settings)
