"""The `dinodiff` command: every sub-command explains itself, bad input gives a message, not a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import dinodiff
from dinodiff.cli import app
from dinodiff.cli.common import failures

runner = CliRunner()


def test_top_level_help_lists_every_stage():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for stage in ("prepare", "phantoms", "cache", "train", "generate", "fid", "segment", "demo"):
        assert stage in result.output


@pytest.mark.parametrize("command, options", [
    ("prepare", ["--out", "--kind", "--size", "--min-size", "--workers", "--test-fraction", "--intensity", "rejects.csv"]),
    ("phantoms", ["--out", "-n", "--size", "--seed"]),
    ("cache", ["--config", "--out", "--views"]),
    ("train", ["--config", "--resume", "overrides"]),
    ("demo", ["--out", "--data", "--quick"]),
])
def test_each_command_help_explains_its_options(command, options):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0, result.output
    for option in options:
        assert option in result.output.lower(), (command, option)


def test_prepare_of_junk_fails_with_a_message_not_a_traceback(tmp_path):
    (tmp_path / "notes.txt").write_text("not an x-ray")
    (tmp_path / "empty.png").write_bytes(b"")
    result = runner.invoke(app, ["prepare", str(tmp_path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 1
    assert "nothing usable" in result.output and "rejects.csv" in result.output
    assert "Traceback" not in result.output


def test_train_with_a_bad_override_names_the_key(tmp_path):
    result = runner.invoke(app, ["train", "--config", "tiny", "train.max_stepz=3"])
    assert result.exit_code == 2
    assert "max_stepz" in result.output


def test_train_without_data_says_how_to_get_it(tmp_path):
    result = runner.invoke(app, ["train", "--config", "tiny", f"train.run_dir={tmp_path / 'run'}"])
    assert result.exit_code == 2
    assert "data.shards" in result.output and "dinodiff prepare" in result.output


def test_phantoms_command_writes_the_montgomery_layout(tmp_path):
    result = runner.invoke(app, ["phantoms", "--out", str(tmp_path / "ph"), "-n", "3", "--size", "64"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "ph" / "CXR_png").glob("*.png"))) == 3
    assert len(list((tmp_path / "ph" / "ManualMask" / "leftMask").glob("*.png"))) == 3


def test_failures_maps_listed_errors_to_one_line_and_their_exit_code_and_lets_others_through():
    class Diverged(RuntimeError):
        pass

    errors = {"diverged": Diverged("loss is nan"), "missing": FileNotFoundError("no shards at x"),
              "bad": ValueError("bad value"), "bug": TypeError("a bug")}
    one = typer.Typer()

    @one.command()
    def run(kind: str) -> None:
        with failures({Diverged: 1, (FileNotFoundError, ValueError): 2, RuntimeError: 3}):  # first match wins
            raise errors[kind]

    for kind, code, line in [("diverged", 1, "error: loss is nan"), ("missing", 2, "error: no shards at x"),
                             ("bad", 2, "error: bad value")]:
        result = runner.invoke(one, [kind])
        assert (result.exit_code, result.output.strip()) == (code, line)
    result = runner.invoke(one, ["bug"])  # not listed: propagates as it is
    assert isinstance(result.exception, TypeError)


def test_python_dash_m_runs_the_same_command():
    proc = subprocess.run([sys.executable, "-m", "dinodiff.cli", "phantoms", "--help"], capture_output=True, text=True,
                          timeout=120, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "--seed" in proc.stdout and "Usage: python -m dinodiff.cli phantoms" in proc.stdout


def test_only_the_cli_configures_logging():
    src = Path(dinodiff.__file__).parent
    callers = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.py") if "basicConfig" in p.read_text())
    assert callers == ["cli/common.py"]
