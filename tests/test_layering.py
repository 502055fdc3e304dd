"""The layering rules in pyproject.toml ([tool.importlinter]) hold, and the checker sees the imports they forbid."""

from __future__ import annotations

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
    assert "dinodiff.cli -> dinodiff.train" in result.stdout
