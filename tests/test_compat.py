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


def _runtime_imports(path: Path) -> "list[str]":
    """The md_runtime stages a module imports (relative or absolute), leaving out `if TYPE_CHECKING:` blocks."""
    import ast

    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            node.body = []
    package_depth = len(path.relative_to(REPO / "runtime" / "md_runtime").parts) - 1
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = (node.module or "").split(".") if node.level > package_depth else []
            names = [parts[0]] if parts and parts[0] else [a.name for a in node.names]
            found += names if node.level > package_depth else []
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("md_runtime."):
            found.append(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "md_runtime":
            found += [a.name for a in node.names]
    return [name for name in found if name != "__version__"]


def test_imports_follow_the_stage_order():
    from md_runtime import STAGES

    root = REPO / "runtime" / "md_runtime"
    against = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).parts
        if relative == ("__init__.py",):
            continue
        stage = relative[0][:-3] if len(relative) == 1 else relative[0]
        assert stage in STAGES, "{} is not in md_runtime.STAGES".format(path.relative_to(REPO))
        for imported in _runtime_imports(path):
            if STAGES.index(imported) > STAGES.index(stage):
                against.append("{} imports {}".format("/".join(relative), imported))
    assert not against, against
