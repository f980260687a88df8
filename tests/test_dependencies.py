"""Declared dependencies: `md-runtime serve` runs with nothing installed but md-runtime's own requirements.

The test environment carries more (pytest pulls in `packaging`, for one), so a library that md-runtime needs
but does not declare only shows up where a user installs md-runtime alone: gunicorn's gevent worker imports
`packaging` without declaring it, and `bash examples/serve.sh` failed on a fresh machine for it.
"""

import re
import sys
import venv
from importlib import metadata
from pathlib import Path
from typing import Dict, List

from packaging.requirements import Requirement

from support import FIXTURE_MODELS, Server


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_closure(name: str) -> List["metadata.Distribution"]:
    """The installed distributions `name` needs, itself included, without extras."""
    installed: Dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions():  # in sys.path order: the first of a name is the one imported
        installed.setdefault(normalize(dist.metadata["Name"]), dist)
    needed: Dict[str, metadata.Distribution] = {}
    pending = [name]
    while pending:
        key = normalize(pending.pop())
        if key in needed:
            continue
        needed[key] = installed[key]
        for line in needed[key].requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return list(needed.values())


def isolated_python(directory: Path, distributions: List["metadata.Distribution"]) -> str:
    """A venv whose site-packages links to those distributions' files and nothing else."""
    venv.create(str(directory), with_pip=False)
    site_packages = directory / "lib" / "python{}.{}".format(*sys.version_info[:2]) / "site-packages"
    for dist in distributions:
        for top in {Path(str(file)).parts[0] for file in dist.files or []} - {".."}:
            link, target = site_packages / top, Path(str(dist.locate_file(top)))
            if target.exists() and not link.exists():
                link.symlink_to(target)
    return str(directory / "bin" / "python")


def test_serve_needs_only_the_declared_dependencies(tmp_path):
    python = isolated_python(tmp_path / "venv", requirement_closure("md-runtime"))
    with Server(FIXTURE_MODELS / "sums_columns", "--workers", "1", python=python) as server:
        server.wait_ready()
        answer = server.post("/predict", json={"columns": ["a", "b"], "data": [[1, 2], [3, 4.5]]})
        assert answer.status_code == 200, answer.text
        assert answer.json() == [{"total": 3.0}, {"total": 7.5}]
