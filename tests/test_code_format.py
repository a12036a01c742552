"""The repository's Python code keeps its format: black, isort and flake8 with the settings in pyproject.toml and
setup.cfg report nothing (run ``black . && isort .`` to fix the first two)."""

import subprocess
import sys

import pytest

from conftest import ROOT

CHECKS = {
    "black": ["-m", "black", "--check", "--quiet", "."],
    "isort": ["-m", "isort", "--check-only", "--quiet", "."],
    "flake8": ["-m", "flake8"],
}


@pytest.mark.parametrize("tool", sorted(CHECKS))
def test_code_is_formatted(tool):
    result = subprocess.run(
        [sys.executable, *CHECKS[tool]], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, f"{tool} found:\n{result.stdout[-4000:]}{result.stderr[-4000:]}"
