"""Compatibility: the runtime's source must run on Python 3.8 (vermin) and type-check (mypy)."""

import os
import subprocess
import sys
from pathlib import Path

from support import REPO

VERMIN = str(Path(sys.executable).parent / "vermin")  # vermin has no __main__; its script sits beside python


def test_runtime_source_runs_on_python_38():
    result = subprocess.run(
        [VERMIN, "-q", "--no-tips", "--violations", "--eval-annotations", "-t=3.8-",
         str(REPO / "runtime"), str(REPO / "dockerfiles")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_runtime_type_checks():
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--cache-dir", os.devnull, "--config-file", str(REPO / "pyproject.toml")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
