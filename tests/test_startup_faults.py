"""Start-up faults outside the model: a port in use, read-only or full directories, a build killed midway.
Each ends in one `md-runtime: error:` line and exit 3, and leaves nothing behind. Directories are made
read-only or small with tmpfs mounts in a private mount namespace (`unshare`), so nothing outside changes."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

from packaging_support import LocalIndex, make_wheel
from support import FIXTURE_MODELS, fixture_package, free_port, runtime_env

def namespace_command() -> List[str]:
    return ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--mount"]


def can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(namespace_command() + ["sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


needs_unshare = pytest.mark.skipif(not can_mount_tmpfs(), reason="needs unshare and tmpfs mounts (a user namespace, "
                                   "or root with CAP_SYS_ADMIN)")


def run_with_mounts(mounts: Dict[Path, str], args: List[str], env: Dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """`md-runtime ARGS` in a mount namespace of its own where each path is a fresh tmpfs with those options."""
    namespace = namespace_command()
    for path in mounts:
        path.mkdir(parents=True, exist_ok=True)
    script = " && ".join("mount -t tmpfs -o {} tmpfs {}".format(options, path) for path, options in mounts.items())
    argv = namespace + ["sh", "-c", script + ' && exec "$@"', "sh", sys.executable, "-m", "md_runtime.cli"] + args
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 3, result.stdout[-3000:] + result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("md-runtime: error:")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    return errors[0][len("md-runtime: error: "):]


def model_with_requirements(root: Path) -> Path:
    model = root / "model"
    model.mkdir(parents=True)
    (model / "package.py").write_text(fixture_package("reports_version"))
    (model / "requirements.txt").write_text("mdtest-lib==2.0\n")
    return model


def index_env(root: Path, index_url: str, **extra: str) -> Dict[str, str]:
    env = {k: v for k, v in runtime_env().items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=index_url, PIP_CACHE_DIR=str(root / "pip-cache"),
               MD_INSTALL_BACKOFF="0.05", TMPDIR=str(root / "tmp"))
    (root / "tmp").mkdir(exist_ok=True)
    env.update(extra)
    return env


def test_a_port_in_use_is_one_line_before_anything_is_made(tmp_path):
    port = free_port()
    (tmp_path / "tmp").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = subprocess.run(
            [sys.executable, "-m", "md_runtime.cli", "serve", str(FIXTURE_MODELS / "sums_columns"), "--host", "127.0.0.1",
             "--port", str(port)], env=runtime_env(TMPDIR=str(tmp_path / "tmp")), capture_output=True, text=True, timeout=60)
    assert one_error_line(result) == (
        "127.0.0.1:{} is already in use (another server?); stop that server or choose another port with MD_PORT".format(port))
    assert list((tmp_path / "tmp").iterdir()) == [], "no run directory is left behind"


@needs_unshare
@pytest.mark.parametrize("variable", ["MD_ENV_CACHE", "HOME"])
def test_a_read_only_cache_or_home_is_one_line(tmp_path, variable):
    model = model_with_requirements(tmp_path)
    read_only = tmp_path / "read-only"
    env = index_env(tmp_path, "http://127.0.0.1:9/simple/", **{variable: str(read_only)})
    env.pop("XDG_CACHE_HOME", None)
    cache = read_only if variable == "MD_ENV_CACHE" else read_only / ".cache" / "md-runtime" / "envs"
    message = one_error_line(run_with_mounts({read_only: "ro,size=1m"}, ["env", str(model)], env))
    assert message == ("MD_ENV_CACHE ({}) cannot be written: Read-only file system; point MD_ENV_CACHE at a writable "
                       "directory (it defaults to $XDG_CACHE_HOME or $HOME/.cache)".format(cache))


@needs_unshare
def test_a_read_only_metrics_directory_is_one_line(tmp_path):
    read_only = tmp_path / "read-only"
    env = runtime_env(MD_METRICS_DIR=str(read_only), MD_MEMORY_CHECK="0")
    args = ["serve", str(FIXTURE_MODELS / "sums_columns"), "--host", "127.0.0.1", "--port", str(free_port())]
    message = one_error_line(run_with_mounts({read_only: "ro,size=1m"}, args, env, timeout=60))
    assert message == ("MD_METRICS_DIR ({}) cannot be written: Read-only file system; set MD_METRICS_DIR to a "
                       "writable directory".format(read_only))


@needs_unshare
def test_a_full_disk_is_named_at_once_not_retried_as_the_network(tmp_path):
    model = model_with_requirements(tmp_path)
    big = make_wheel(tmp_path / "wheels", "mdtest-lib", "2.0", payload=4 * 1024 * 1024)
    cache = tmp_path / "small"
    with LocalIndex([big]) as index:
        result = run_with_mounts({cache: "size=2m"}, ["env", str(model)], index_env(tmp_path, index.url, MD_ENV_CACHE=str(cache)))
    assert one_error_line(result) == ("requirements.txt: the disk ran out of space while installing mdtest-lib==2.0; free "
                                      "space there or point MD_ENV_CACHE at a bigger volume")
    assert "pip attempt 2" not in result.stdout


def test_a_build_killed_midway_is_cleaned_on_the_next_start(tmp_path):
    model = model_with_requirements(tmp_path)
    wheel = make_wheel(tmp_path / "wheels", "mdtest-lib", "2.0")
    cache = tmp_path / "envs"
    with LocalIndex([wheel], delay=30) as slow:
        env = index_env(tmp_path, slow.url, MD_ENV_CACHE=str(cache))
        started = subprocess.Popen([sys.executable, "-m", "md_runtime.cli", "env", str(model)], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while not slow.requests and time.monotonic() < deadline:
                time.sleep(0.1)
            assert slow.requests, "pip never reached the index"
        finally:
            os.killpg(started.pid, signal.SIGKILL)
            started.wait(10)
    assert len(list(cache.glob(".build-*"))) == 1, "the killed start left its build"
    with LocalIndex([wheel]) as index:
        again = subprocess.run([sys.executable, "-m", "md_runtime.cli", "env", str(model)],
                               env=index_env(tmp_path, index.url, MD_ENV_CACHE=str(cache)), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "left by a start that was stopped while installing" in again.stdout
    assert list(cache.glob(".build-*")) == []
