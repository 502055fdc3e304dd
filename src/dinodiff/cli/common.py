"""What every `dinodiff` command shares: the typer app, logging set-up, and errors turned into one clean line."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import click
import typer

app = typer.Typer(
    help=(
        "DiNO-Diffusion: latent diffusion for chest X-rays conditioned on frozen DINO global tokens.\n\n"
        "Stages: prepare -> cache -> train -> generate -> fid | classify | segment -> report. "
        "Run `dinodiff demo` for the whole chain on built-in synthetic phantoms."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ErrorKinds = type | tuple  # an exception class or a tuple of them, as in an `except` clause


def fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@contextmanager
def failures(codes: Mapping[ErrorKinds, int]) -> Iterator[None]:
    """Turn the errors listed (kind -> exit code, first match wins, as `except` clauses) into `error: MESSAGE`
    on stderr and that exit code; any other error propagates."""
    try:
        yield
    except typer.Exit:
        raise
    except Exception as err:
        for kinds, code in codes.items():
            if isinstance(err, kinds):
                fail(str(err), code)
        raise


def configure_logging(main_process: bool = True) -> None:
    """Time-stamped INFO lines on stderr (WARNING and above only on the other processes of a distributed run).
    The commands call this; library code only logs."""
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")


def is_main_process() -> bool:
    """Rank 0 of a launch (accelerate/torchrun, MPI), read from the environment without starting a process group."""
    from accelerate.utils import get_int_from_env

    return get_int_from_env(["RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK"], 0) == 0


def load_config(config: str | None, overrides: list[str] | None):
    from dinodiff.config import ConfigError
    from dinodiff.config import load_config as load

    with failures({ConfigError: 2}):
        return load(config, overrides or [])


CONFIG_HELP = ("YAML file of this command's settings (field: value, as in its results' provenance); options typed "
               "on the command line override it, options left at their defaults do not.")
S = TypeVar("S")


def typed(ctx: click.Context, **options: Any) -> dict[str, Any]:
    """The options of the running command that were typed on the command line (or set in the environment), by
    name: an option left at its default is not here, so it never overrides a --config file."""
    sources = {name: ctx.get_parameter_source(name) for name in options}
    # by name: typer's ParameterSource may be its own copy of click's enum
    return {name: value for name, value in options.items()
            if sources[name] is not None and sources[name].name not in ("DEFAULT", "DEFAULT_MAP")}


def stage_settings(schema: type[S], config: str | None, values: Mapping[str, Any],
                   base: Mapping[str, Any] | None = None) -> S:
    """The command's settings object through the one path (`dinodiff.config.build_settings`): the schema's
    defaults (<- `base`) <- the --config file <- the typed options (`values`, by field name). A bad key or value
    exits 2."""
    from dinodiff.config import ConfigError, build_settings

    with failures({ConfigError: 2}):
        return build_settings(schema, config, values=values, base=base)
    raise AssertionError("unreachable")  # failures() exits on a ConfigError


def floats(text: str | None) -> list[float] | None:
    return None if not text else [float(v) for v in text.replace(" ", "").split(",") if v]
