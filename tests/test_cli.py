"""The `dinodiff` command: every sub-command explains itself, bad input gives a message, not a traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from dinodiff.cli import app

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
