"""The layering rules in pyproject.toml ([tool.importlinter]) hold, and the checker sees the imports they forbid."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(config_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT)], cwd=config_dir, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin", "NO_COLOR": "1"})


def test_every_import_contract_holds():
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" in result.stdout and " 0 broken" in result.stdout


def test_the_checker_sees_function_local_imports(tmp_path):
    # Negative control: the CLI imports each stage inside its command (kept lazy for start-up time); a contract
    # forbidding one of those imports must break, or the kept contracts above would prove nothing.
    text = (REPO / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(text + (
        '\n[[tool.importlinter.contracts]]\nname = "negative control"\ntype = "forbidden"\n'
        'source_modules = ["dinodiff.cli"]\nforbidden_modules = ["dinodiff.train"]\n'))
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert re.search(r"dinodiff\.cli(\.\w+)? -> dinodiff\.train\b", result.stdout), result.stdout


def test_the_cycle_contract_breaks_on_a_cycle(tmp_path):
    # Negative control for "no import cycles": the same contract type over a package whose two modules
    # import each other (inside a function, as the cycles issue 11 removed were hidden) must break.
    package = tmp_path / "src" / "cyclic"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from cyclic import b\n")
    (package / "b.py").write_text("def f():\n    from cyclic import a\n    return a\n")
    (tmp_path / "pyproject.toml").write_text(
        '[tool.importlinter]\nroot_package = "cyclic"\n\n[[tool.importlinter.contracts]]\nname = "no cycles"\n'
        'type = "acyclic_siblings"\nancestors = ["cyclic"]\n')
    result = subprocess.run([str(LINT)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(tmp_path / "src"), "PATH": "/usr/bin:/bin", "NO_COLOR": "1"})
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout


def test_the_stage_api_contract_breaks_when_an_evaluation_reaches_into_a_stage(tmp_path):
    # Negative control for "an evaluation uses another stage only through its public API": the same contract over
    # the real package, with classify made to import generate's planning module, must break.
    src = tmp_path / "src"
    shutil.copytree(REPO / "src" / "dinodiff", src / "dinodiff", ignore=shutil.ignore_patterns("__pycache__"))
    grid = src / "dinodiff" / "evaluate" / "classify" / "grid.py"
    grid.write_text(grid.read_text() + "\nfrom dinodiff.generate.plan import GenerateSettings  # noqa\n")
    (tmp_path / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    result = subprocess.run([str(LINT)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin", "NO_COLOR": "1"})
    assert result.returncode != 0
    assert re.search(r"dinodiff\.evaluate\.classify\.grid -> dinodiff\.generate\.plan", result.stdout), result.stdout
