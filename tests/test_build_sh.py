"""build.sh's command line. The real builds are in test_images.py (container marker); here a recording engine
stands in for docker where a real one would need a registry to push to."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from support import REPO

BASH = shutil.which("bash")
RECORDING_ENGINE = """#!/bin/sh
echo "$0 $*" >> {log}
if [ "$1" = image ]; then echo 123000000; fi
"""


def build_sh(*args: str, path: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=path)
    return subprocess.run([BASH, str(REPO / "build.sh"), *args], capture_output=True, text=True, env=env, timeout=60)


def bin_with(tmp_path: Path, *names: str) -> str:
    """A PATH holding only python3, dirname and the named programs (recording engines)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    (bin_dir / "dirname").symlink_to(shutil.which("dirname"))
    for name in names:
        engine = bin_dir / name
        engine.write_text(RECORDING_ENGINE.format(log=tmp_path / "calls.log"))
        engine.chmod(0o755)
    return str(bin_dir)


def calls(tmp_path: Path) -> list:
    return [shlex.split(line) for line in (tmp_path / "calls.log").read_text().splitlines()]


def test_unknown_image_name_is_refused(tmp_path):
    result = build_sh("python-37", path=bin_with(tmp_path, "podman"))
    assert result.returncode == 1
    assert "unknown image python-37: choose from machine-learning, deep-learning, python-38, python-39" in result.stderr


def test_no_engine_found_says_what_to_install(tmp_path):
    result = build_sh("python-39", path=bin_with(tmp_path))
    assert result.returncode == 1
    assert "no container engine found: install Docker (with a running engine) or Podman" in result.stderr


def test_registry_base_image_engine_flags_and_push(tmp_path):
    result = build_sh(
        "--engine", "podman", "--registry", "registry.example.com/team/", "--base-image", "localhost/py:3.9",
        "--push", "python-39", "--", "--network", "host", "--build-arg", "PIP_INDEX_URL=http://mirror/simple",
        path=bin_with(tmp_path, "podman"),
    )
    assert result.returncode == 0, result.stderr
    build, push, inspect = calls(tmp_path)
    tag = "registry.example.com/team/md-base/python/python-39:1.1.0"
    assert build[1:2] == ["build"] and build[build.index("-t") + 1] == tag
    assert "BASE_IMAGE=localhost/py:3.9" in build and "IMAGE_VERSION=1.1.0" in build and "PYTHON_VERSION=3.9" in build
    assert build[-5:] == ["--network", "host", "--build-arg", "PIP_INDEX_URL=http://mirror/simple", str(REPO)]
    assert push[1:] == ["push", tag]
    assert inspect[1:3] == ["image", "inspect"]
    assert "{}  123 MB  built in".format(tag) in result.stdout


def test_all_images_by_default_each_on_its_own_python(tmp_path):
    result = build_sh("--engine", "docker", path=bin_with(tmp_path, "docker"))
    assert result.returncode == 0, result.stderr
    builds = [call for call in calls(tmp_path) if call[1] == "build"]
    bases = [next(a for a in call if a.startswith("BASE_IMAGE=")) for call in builds]
    assert bases == ["BASE_IMAGE=python:3.9-slim"] * 2 + ["BASE_IMAGE=python:3.8-slim", "BASE_IMAGE=python:3.9-slim"]
    assert "--format" not in builds[0], "docker keeps HEALTHCHECK without podman's --format docker"


def test_both_release_lines_build_the_patched_one_a_patch_above_with_its_overlay(tmp_path):
    result = build_sh("--engine", "podman", "--line", "both", "python-39", path=bin_with(tmp_path, "podman"))
    assert result.returncode == 0, result.stderr
    exact, patched = [call for call in calls(tmp_path) if call[1] == "build"]
    assert exact[exact.index("-t") + 1].endswith("python-39:1.1.0") and "RELEASE_LINE=exact" in exact
    assert patched[patched.index("-t") + 1].endswith("python-39:1.1.1") and "RELEASE_LINE=patched" in patched
    pins = lambda call: next(a for a in call if a.startswith("PINS=")).split("=", 1)[1].split(",")  # noqa: E731
    assert {"gunicorn==20.1.0", "orjson==3.10.15", "pandas==1.5.1"} <= set(pins(exact))
    assert {"gunicorn==23.0.0", "pandas==1.5.1"} <= set(pins(patched)), "the serving stack moves, pandas stays"
    assert not any(pin.startswith("orjson==") for pin in pins(patched)), "`!orjson` removes it"


def test_the_pins_each_image_build_installs_per_line():
    def pins(*args: str) -> list:
        done = subprocess.run([sys.executable, str(REPO / "dockerfiles" / "images.py"), "pins", *args],
                              capture_output=True, text=True, check=True)
        return done.stdout.split()

    assert pins("python-38", "--line", "patched", "--tools") == ["pip==25.0.1", "setuptools==75.3.4", "wheel==0.45.1"]
    machine_learning = pins("machine-learning", "--line", "patched")
    assert "scikit-learn==1.1.1" in machine_learning and "werkzeug==3.1.9" in machine_learning
    assert pins("machine-learning") == sorted(pins("machine-learning")) and "werkzeug==2.2.3" in pins("machine-learning")


SBOM_ENGINE = """#!/bin/sh
echo "$0 $*" >> {log}
case "$1" in
  image) echo 123000000 ;;
  run) echo '{{"components": [{{"name": "gunicorn", "version": "20.1.0", "purl": "pkg:pypi/gunicorn@20.1.0"}},
    {{"name": "md-runtime", "version": "0.2.0", "purl": "pkg:pypi/md-runtime@0.2.0"}},
    {{"name": "tini", "version": "0.19.0-1", "purl": "pkg:deb/debian/tini@0.19.0-1"}}]}}' ;;
esac
"""
PIP_AUDIT = """#!/bin/sh
echo "$*" > {log}
while [ "$1" != --requirement ]; do shift; done
while IFS= read -r line; do echo "$line"; done < "$2" > {requirements}
echo "gunicorn | 20.1.0 | PYSEC-TEST | 22.0.0"
exit 1
"""


def test_audit_with_pip_audit_asks_about_every_pypi_package_strictly_and_pushes_nothing_that_fails(tmp_path):
    """pip-audit needs PyPI's JSON API, out of reach here: a stand-in shows what build.sh gives it and does."""
    path = bin_with(tmp_path)
    (Path(path) / "podman").write_text(SBOM_ENGINE.format(log=tmp_path / "calls.log"))
    (Path(path) / "pip-audit").write_text(PIP_AUDIT.format(log=tmp_path / "pip-audit.log",
                                                           requirements=tmp_path / "asked.txt"))
    for name in ("podman", "pip-audit"):
        (Path(path) / name).chmod(0o755)
    result = build_sh("--engine", "podman", "--audit", "pip-audit", "--fail-on", "any", "--push", "--reports",
                      str(tmp_path / "reports"), "python-39", path=path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "build.sh: error: md-base/python/python-39:1.1.0 failed the audit (--fail-on any, scope all): see its report above")
    assert (tmp_path / "asked.txt").read_text().split() == ["gunicorn==20.1.0"], "md-runtime and Debian's are not on PyPI"
    assert (tmp_path / "pip-audit.log").read_text().split()[:3] == ["--strict", "--no-deps", "--disable-pip"]
    assert "PYSEC-TEST" in (tmp_path / "reports" / "python-39-1.1.0.audit.md").read_text()
    assert not [call for call in calls(tmp_path) if call[1] == "push"], "an image that fails its audit is not pushed"
