import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from md_runtime.boot.resources import restore_ieee_floats
from support import FIXTURE_MODELS, REPO


@pytest.fixture
def fixture_models() -> Path:
    return FIXTURE_MODELS


def uses_model(*names: str):
    """Parametrize a test over fixture models in tests/fixtures/models, by name."""
    return pytest.mark.parametrize("model_dir", [FIXTURE_MODELS / name for name in names], ids=list(names))


@pytest.fixture(autouse=True)
def clean_process_state(monkeypatch):
    """Each test starts without MD_* variables, with IEEE floats (gevent 21.12, the images' pin, turns on
    flush-to-zero when a test imports it, and numpy and hypothesis refuse to work so), and leaves no imported
    package.py behind."""
    restore_ieee_floats()
    for name in list(os.environ):
        if name.startswith("MD_") or name in ("PORT", "WEB_CONCURRENCY", "PROMETHEUS_MULTIPROC_DIR"):
            monkeypatch.delenv(name)
    path_before = list(sys.path)
    yield
    fixture_modules = ("package", "helper", "md_model")
    for name in [m for m in sys.modules if m in fixture_modules or m.split(".")[0] in ("package", "md_model")]:
        del sys.modules[name]
    assert sys.path == path_before, "a test leaked sys.path entries"


@pytest.fixture(scope="session")
def iris_model_dir(tmp_path_factory) -> Path:
    """The examples/iris model directory, trained in the test session (nothing pickled is committed)."""
    target = tmp_path_factory.mktemp("models") / "iris"
    shutil.copytree(REPO / "examples" / "iris", target, ignore=shutil.ignore_patterns("*.joblib", "*.csv"))
    subprocess.run([sys.executable, str(target / "train.py")], check=True, capture_output=True)
    return target
