"""Errors that name the fix, through the CLI: one clean line, no traceback (issue 10, item 9)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from dinodiff.cli import app

runner = CliRunner()


def _one_clean_line(result) -> str:
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.mark.parametrize("shards", ["missing-folder", "empty-folder", "train-{000000..000003}.tar"])
def test_train_with_missing_shards_says_prepared_shards_not_found_and_to_run_prepare(tmp_path, shards):
    (tmp_path / "empty-folder").mkdir()
    target = tmp_path / shards
    result = runner.invoke(app, ["train", "--config", "tiny", f"data.shards={target}",
                                 f"train.run_dir={tmp_path / 'run'}"])
    assert result.exit_code == 2
    line = _one_clean_line(result)
    where = str(target) if "{" not in shards else str(tmp_path / "train-000000.tar")
    assert f"prepared shards not found at {where}; run `dinodiff prepare" in line
    assert not (tmp_path / "run").exists()  # stopped before any work


def test_train_with_a_missing_cache_names_the_cache_command(tmp_path):
    result = runner.invoke(app, ["train", "--config", "tiny", f"data.cache={tmp_path / 'nocache'}",
                                 f"train.run_dir={tmp_path / 'run'}"])
    assert result.exit_code == 2
    assert "dinodiff cache" in _one_clean_line(result)


@pytest.mark.parametrize("model", ["{tmp}/runs/exp/best/model", "./no-such-model", "runs/missing"])
def test_generate_with_a_missing_model_says_model_not_found(tmp_path, model):
    model = model.format(tmp=tmp_path)
    (tmp_path / "src").mkdir()
    result = runner.invoke(app, ["generate", model, "--source", str(tmp_path / "src"), "--out", str(tmp_path / "o"),
                                 "--no-progress"])
    assert result.exit_code == 2
    line = _one_clean_line(result)
    assert "model not found" in line and model.lstrip("./") in line
    assert "repo id" not in line.lower() and "repo_id" not in line


@pytest.mark.parametrize("override, key", [
    ("train.max_stepz=3", "train.max_stepz"),  # a typo
    ("train.max_steps=many", "train.max_steps"),  # a value of the wrong type
    ("train.mixed_precision=bf17", "train.mixed_precision"),  # not one of the choices
    ("data.on_corrupt=ignore", "data.on_corrupt"),
])
def test_config_override_typo_or_bad_value_gives_one_clean_line_naming_the_key(tmp_path, override, key):
    result = runner.invoke(app, ["train", "--config", "tiny", override])
    assert result.exit_code == 2
    assert key in _one_clean_line(result)


@pytest.mark.parametrize("text, expected", [
    ("train:\n  max_stepz: 3\n", "train.max_stepz"),  # a typo in a config file
    ("train:\n  max_steps: 3\n bad: [\n", "Invalid YAML"),  # a YAML syntax error
])
def test_config_file_typo_gives_one_clean_line(tmp_path, text, expected):
    config = tmp_path / "mine.yaml"
    config.write_text(text)
    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 2
    line = _one_clean_line(result)
    assert expected in line and str(config) in line
