"""What every `dinodiff` command shares: the typer app, logging set-up, and errors turned into one clean line."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import typing
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import click
import typer

if TYPE_CHECKING:  # the CLI imports dinodiff's modules lazily, for start-up time
    from dinodiff.config import TrainingSettings

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


def training_settings(config: str | None, overrides: list[str] | None) -> TrainingSettings:
    from dinodiff.config import ConfigError
    from dinodiff.config import load_training_settings as load

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


def settings_options(schema: type, *names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Offer the fields `names` of the settings dataclass `schema` as options of the decorated command, made from
    the fields themselves: default, type, help and flags (`dinodiff.config.setting`), so none of them is written
    twice. A dotted name is a field of a section (``data.source``); its option is named after its last part.

    They are placed before the command's --config option. The command receives `options`: the ones typed on
    the command line, by field name (an option left at its default never overrides a --config file); a list or
    tuple field is typed as one comma-separated value, and an element that is itself a group as A+B."""
    fields = {name: _field(schema, name) for name in names}
    parameter = {name: name.replace(".", "__") for name in names}  # a Python name for each option

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        made = [_option_parameter(parameter[name], *fields[name]) for name in names]

        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "options"]
        # typer fills one parameter annotated typer.Context: the command's own, else one added here
        context = next((p.name for p in own if p.annotation is typer.Context), None)

        @functools.wraps(command)
        def with_options(*args: Any, **kwargs: Any) -> Any:
            ctx = kwargs[context] if context else kwargs.pop(_CONTEXT)
            values = {parameter[name]: kwargs.pop(parameter[name]) for name in names}
            chosen = typed(ctx, **values)
            options = {name: _from_option(chosen[parameter[name]], fields[name][1]) for name in names
                       if parameter[name] in chosen}
            return command(*args, options=options, **kwargs)

        at = next((i for i, p in enumerate(own) if p.name == "config"), len(own))
        added = [] if context else [inspect.Parameter(_CONTEXT, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                      annotation=typer.Context)]
        parameters = [*added, *own[:at], *made, *own[at:]]
        with_options.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        with_options.__annotations__ = {p.name: p.annotation for p in parameters}  # what typer resolves types from
        return with_options

    return decorate


_CONTEXT = "settings_options_context"


def _field(schema: type, dotted: str) -> tuple[dataclasses.Field, Any]:
    """The dataclass field `dotted` names (``data.source``: field source of the section data) and its type."""
    *sections, name = dotted.split(".")
    for section in sections:
        schema = typing.get_type_hints(schema)[section]
    return next(f for f in dataclasses.fields(schema) if f.name == name), typing.get_type_hints(schema)[name]


def _option_parameter(name: str, field: dataclasses.Field, hint: Any) -> inspect.Parameter:
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    if _is_sequence(hint):  # a list or tuple is typed comma-separated: --spaces pixels,c_glb; --timesteps 300,50+300
        hint, default = (str | None, None) if default is None else (str, _option_text(default))
    section_field = name != field.name  # data.source: its option is --source, not --data--source
    flags = field.metadata.get("flags") or (("--" + field.name.replace("_", "-"),) if section_field else ())
    option = typer.Option(default, *flags, help=field.metadata.get("help", ""))  # default flags: --field-name
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=option, annotation=hint)


def _option_text(values: Any) -> str:
    return ",".join("+".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v) for v in values)


def _is_sequence(hint: Any) -> bool:
    return any(typing.get_origin(h) in (list, tuple) for h in (hint, *typing.get_args(hint)))


def _from_option(value: Any, hint: Any) -> Any:
    """A comma-separated option as a list of its (stripped) parts; the settings type-check and convert them."""
    return [v.strip() for v in value.split(",") if v.strip()] if _is_sequence(hint) and value is not None else value


def stage_settings(schema: type[S], config: str | None, values: Mapping[str, Any],
                   base: Mapping[str, Any] | None = None) -> S:
    """The command's settings object through the one path (`dinodiff.config.build_settings`): the schema's
    defaults (<- `base`) <- the --config file <- the typed options (`values`, by field name). A bad key or value
    exits 2."""
    from dinodiff.config import ConfigError, build_settings

    with failures({ConfigError: 2}):
        return build_settings(schema, config, values=values, base=base)
    raise AssertionError("unreachable")  # failures() exits on a ConfigError
