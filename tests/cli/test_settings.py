"""The one path to a stage's settings: defaults <- --config YAML <- options typed on the command line."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from dinodiff.cli import app
from dinodiff.cli.common import settings_options, stage_settings, typed
from dinodiff.config import (
    ConfigError,
    FidSettings,
    PhantomSettings,
    PrepareSettings,
    ReportSettings,
    build_settings,
    setting,
)
from dinodiff.demo.settings import DemoSettings
from dinodiff.embeddings.settings import EmbeddingTrainSettings
from dinodiff.evaluate.audit.settings import AuditSettings
from dinodiff.evaluate.classify.settings import ClassifySettings
from dinodiff.evaluate.segment.settings import SegmentSettings
from dinodiff.generate.settings import GenerateSettings

# Commands whose settings live in one frozen *Settings object; each takes --config.
SETTINGS_COMMANDS = ("phantoms", "prepare", "cache", "train", "generate", "fid", "sweep", "segment", "classify", "audit",
                     "pretrain-encoder", "probe-encoder", "train-embeddings", "demo", "report")


@dataclass(frozen=True)
class ToySettings:
    size: int = 64
    name: str = "a"
    values: tuple[float, ...] = (0.5,)
    where: str | None = None


def test_build_settings_layers_defaults_file_and_typed_values_and_names_a_bad_key(tmp_path):
    config = tmp_path / "toy.yaml"
    config.write_text("size: 32\nname: from-file\n")
    settings = build_settings(ToySettings, config, values={"name": "typed", "where": tmp_path})
    assert settings == ToySettings(size=32, name="typed", values=(0.5,), where=str(tmp_path))
    assert dataclasses.is_dataclass(settings) and isinstance(settings, ToySettings)
    config.write_text("sise: 32\n")
    with pytest.raises(ConfigError, match="sise"):
        build_settings(ToySettings, config)
    with pytest.raises(ConfigError, match="size"):
        build_settings(ToySettings, None, values={"size": "big"})
    assert build_settings(ToySettings, None, base={"size": 8}, values={"name": "b"}) == ToySettings(8, "b")


def test_only_typed_options_override_the_file(tmp_path):
    config = tmp_path / "toy.yaml"
    config.write_text("size: 32\nname: from-file\n")
    toy = typer.Typer()
    seen = {}

    @toy.command()
    def run(ctx: typer.Context, size: int = typer.Option(64), name: str = typer.Option("a"),
            config: str = typer.Option(None, "--config")) -> None:
        seen["settings"] = stage_settings(ToySettings, config, typed(ctx, size=size, name=name))

    assert CliRunner().invoke(toy, ["--config", str(config), "--name", "typed"]).exit_code == 0
    assert seen["settings"] == ToySettings(size=32, name="typed")  # size left at its default: the file's 32
    assert CliRunner().invoke(toy, []).exit_code == 0 and seen["settings"] == ToySettings()
    config.write_text("nmae: x\n")
    result = CliRunner().invoke(toy, ["--config", str(config)])
    assert result.exit_code == 2 and "nmae" in result.output and "Traceback" not in result.output


def test_every_settings_command_takes_config_and_fid_defaults_are_the_settings():
    group = typer.main.get_command(app)
    ctx = click.Context(group)
    assert set(group.list_commands(ctx)) == set(SETTINGS_COMMANDS)  # every command
    for name in SETTINGS_COMMANDS:
        options = {o for p in group.get_command(ctx, name).params for o in p.opts}
        assert "--config" in options, name
    fid = {p.name: p.default for p in group.get_command(ctx, "fid").params}
    for field in ("batch_size", "extractor", "seed", "kid_subsets", "kid_subset_size", "device"):
        assert fid[field] == getattr(FidSettings(), field), field  # the CLI shows the settings' own defaults
    sweep = {p.name: p.default for p in group.get_command(ctx, "sweep").params}
    assert sweep["batch_size"] == FidSettings().batch_size and sweep["sample_steps"] == FidSettings().sample_steps
    assert FidSettings(num_real=0, num_sources=0) == FidSettings(num_real=None, num_sources=None)  # 0 = all


@dataclass(frozen=True)
class DescribedSettings:
    size: int = setting(64, "Side in pixels.")
    spaces: list[str] = setting(help="Comma list of spaces.", default_factory=lambda: ["a", "b"])
    sharp: bool = setting(True, "Sharpen first.")
    where: str | None = setting(None, "Somewhere.")
    hidden: int = 3  # no option made from it


def test_settings_options_are_made_from_the_fields_and_only_typed_ones_reach_the_settings(tmp_path):
    toy, seen = typer.Typer(add_completion=False), {}

    @toy.command()
    @settings_options(DescribedSettings, "size", "spaces", "sharp", "where")
    def run(out: str = typer.Option("o", "--out"), config: str | None = typer.Option(None, "--config"), *,
            options: dict) -> None:
        seen["options"], seen["out"] = options, out
        seen["settings"] = stage_settings(DescribedSettings, config, options)

    command = typer.main.get_command(toy)
    params = {p.name: p for p in command.params}
    assert [p.name for p in command.params] == ["out", "size", "spaces", "sharp", "where", "config"]  # before --config
    assert (params["size"].default, params["size"].help) == (64, "Side in pixels.")
    assert params["spaces"].default == "a,b" and "--no-sharp" in params["sharp"].secondary_opts
    config = tmp_path / "toy.yaml"
    config.write_text("size: 32\nhidden: 5\nspaces: [c]\n")
    result = CliRunner().invoke(toy, ["--config", str(config), "--spaces", "x, y", "--no-sharp", "--out", "p"])
    assert result.exit_code == 0, result.output
    assert seen["options"] == {"spaces": ["x", "y"], "sharp": False} and seen["out"] == "p"
    assert seen["settings"] == DescribedSettings(size=32, spaces=["x", "y"], sharp=False, hidden=5)
    assert CliRunner().invoke(toy, []).exit_code == 0 and seen["settings"] == DescribedSettings()

    @toy.command()
    @settings_options(DescribedSettings, "size")
    def own_context(ctx: typer.Context, n: int = typer.Option(1), *, options: dict) -> None:  # the command's own ctx
        seen["options"], seen["n"] = options, typed(ctx, n=n)

    assert CliRunner().invoke(toy, ["own-context", "--size", "9", "--n", "2"]).exit_code == 0
    assert seen["options"] == {"size": 9} and seen["n"] == {"n": 2}


def _described_fields(schema: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every field with a help text, a section's by its dotted name (data.source)."""
    found, hints = {}, typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            found.update(_described_fields(hints[f.name], f"{prefix}{f.name}."))
        elif f.metadata.get("help"):
            found[prefix + f.name] = f
    return found


def _as_typed(default):
    """A field's default as its option shows it: sequences comma-separated, a group inside one as A+B."""
    if isinstance(default, (list, tuple)):
        return ",".join("+".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v) for v in default)
    return default


@pytest.mark.parametrize("command, schema", [("prepare", PrepareSettings), ("audit", AuditSettings),
                                             ("fid", FidSettings), ("sweep", FidSettings),
                                             ("phantoms", PhantomSettings), ("report", ReportSettings),
                                             ("train-embeddings", EmbeddingTrainSettings),
                                             ("generate", GenerateSettings), ("segment", SegmentSettings),
                                             ("classify", ClassifySettings), ("demo", DemoSettings)])
def test_commands_show_their_settings_own_defaults_help_and_flags(command, schema):
    group = typer.main.get_command(app)
    fields = _described_fields(schema)
    params = {p.name.replace("__", "."): p for p in group.get_command(click.Context(group), command).params
              if p.param_type_name == "option"}
    made = [name for name in params if name in fields]
    assert made, command
    for name in made:
        field, param = fields[name], params[name]
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        assert (param.default, param.help) == (_as_typed(default), field.metadata["help"]), (command, name)
        flags = field.metadata["flags"] or ("--" + field.name.replace("_", "-"),)  # e.g. --shared-label/--any-pair
        assert {part for flag in flags for part in flag.split("/")} <= {*param.opts, *param.secondary_opts}, name
    # the settings fields that have help are all offered (sections' too), apart from those a command leaves out
    offered = {"segment": set(fields), "generate": set(fields), "classify": {"out", "data.source", "synthetic.model",
                                                                             "workers"}}
    if command in offered:
        assert set(made) == offered[command], command


@pytest.fixture
def captured(monkeypatch) -> dict:
    """The SegmentSettings `dinodiff segment` builds, under "settings"; the stage itself stops at once (exit 2)."""
    import dinodiff.evaluate.segment.stage as stage

    seen: dict = {}

    def fake_segment(models, data, out, settings):
        seen["settings"] = settings
        raise FileNotFoundError("stop here")

    monkeypatch.setattr(stage, "segment", fake_segment)
    return seen


def test_segment_reads_its_settings_from_a_file(tmp_path, captured):
    config = tmp_path / "seg.yaml"
    config.write_text("thresholds: [0.1, 0.2]\ntimesteps: [100, 300]\nbatch_size: 2\n")
    result = CliRunner().invoke(app, ["segment", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                                      "--config", str(config), "--batch-size", "4"])
    assert result.exit_code == 2 and "stop here" in result.output
    settings = captured["settings"]
    assert settings.thresholds == (0.1, 0.2) and settings.timesteps == ((100,), (300,)) and settings.batch_size == 4
    assert Path(tmp_path).exists()


def test_segment_methods_groups_and_refinements_come_from_the_file_or_the_typed_options(tmp_path, captured):
    config = tmp_path / "seg.yaml"
    config.write_text("methods: [diffseg, diffcut]\ntimesteps: [300, [100, 300], '50+300']\nrefinements: [none, "
                      "components]\nnoise_seeds: [1, 2]\ntaus: [0.5, 0.7]\nreport_fraction: 0.4\n")
    base = ["segment", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--config", str(config)]
    assert CliRunner().invoke(app, base).exit_code == 2
    s = captured["settings"]
    assert s.methods == ("diffseg", "diffcut") and s.timesteps == ((300,), (100, 300), (50, 300))
    assert s.refinements == ("none", "components") and s.noise_seeds == (1, 2) and s.taus == (0.5, 0.7)
    assert s.report_fraction == 0.4 and s.n_overlay == 3
    # typed options override the file, by their own names (--method -> methods, --refine -> refinements, ...)
    result = CliRunner().invoke(app, [*base, "--method", "diffcut", "--timesteps", "100+300,500", "--refine", "none",
                                      "--noise-seeds", "7", "--overlays", "0", "--split-seed", "3"])
    assert result.exit_code == 2 and "stop here" in result.output
    s = captured["settings"]
    assert s.methods == ("diffcut",) and s.timesteps == ((100, 300), (500,)) and s.refinements == ("none",)
    assert s.noise_seeds == (7,) and s.n_overlay == 0 and s.split_seed == 3 and s.taus == (0.5, 0.7)
    config.write_text("methods: [diffseg, watershed]\n")  # checked when the settings are made, before the stage
    result = CliRunner().invoke(app, base)
    assert result.exit_code == 2 and "--method must be one or more of" in result.output and "watershed" in result.output


def _stop(seen: dict, name: str):
    def stage(*args, **kwargs):
        seen[name] = args, kwargs
        raise FileNotFoundError("stop here")
    return stage


def test_generate_options_by_their_own_names_reach_the_settings_fields(tmp_path, monkeypatch):
    import dinodiff.generate.stage as stage

    seen: dict = {}
    monkeypatch.setattr(stage, "generate_dataset", _stop(seen, "generate"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")  # a model folder, as far as the CLI looks
    base = ["generate", str(tmp_path / "model"), "--source", str(tmp_path), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, [*base, "--strategy", "interpolation", "--steps", "7", "--guidance", "2.5",
                                      "--r-range", "0.2,0.8", "--r-values", "0.25,0.75", "--any-pair"])
    assert result.exit_code == 2 and "stop here" in result.output, result.output
    settings = seen["generate"][0][3]
    assert (settings.strategy, settings.num_inference_steps, settings.guidance_scale) == ("interpolation", 7, 2.5)
    assert settings.r_range == (0.2, 0.8) and settings.r_values == [0.25, 0.75] and settings.shared_label is False
    assert settings.source_options == {"kind": "auto", "split": None, "limit": None}
    result = CliRunner().invoke(app, [*base, "--r-range", "0.2,0.5,0.8"])  # LOW,HIGH: one line naming the key
    assert result.exit_code == 2 and "r_range" in result.output and "Traceback" not in result.output


def test_classify_options_fill_fields_of_its_sections_over_the_preset_and_overrides(tmp_path, monkeypatch):
    import dinodiff.evaluate.classify.stage as stage

    seen: dict = {}
    monkeypatch.setattr(stage, "classify", _stop(seen, "classify"))
    result = CliRunner().invoke(app, ["classify", "-c", "classify-phantoms", "data.source=a/", "folds=3",
                                      "-s", "b/", "-m", "run/", "--workers", "2", "-o", str(tmp_path)])
    assert result.exit_code == 2 and "stop here" in result.output, result.output
    settings = seen["classify"][0][0]
    assert (settings.data.source, settings.synthetic.model, settings.workers) == ("b/", "run/", 2)  # options last
    assert settings.out == str(tmp_path) and settings.folds == 3
    assert settings.classifier.backbone == "tiny-cnn"  # from the preset
