"""overrides: requirements.txt installed into a cached overlay from a local index on 127.0.0.1, never PyPI."""

import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from md_runtime.overrides import classify
from packaging_support import LocalIndex, make_failing_sdist, make_wheel, venv_over_this_environment
from support import Server, fixture_package, free_port, md_runtime, runtime_env

@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory) -> Path:
    house = tmp_path_factory.mktemp("wheelhouse")
    make_wheel(house, "mdtest-lib", "1.0")
    make_wheel(house, "mdtest-lib", "2.0")
    make_wheel(house, "flask", "0.12")  # a stand-in old flask: enough to break the runtime's dependency range
    return house


def pip_env(index_url: str, cache: Path, **extra: str) -> dict:
    """pip sees only the test's index: the machine's pip.conf, find-links and constraints are set aside."""
    env = {k: v for k, v in runtime_env().items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=index_url, PIP_CACHE_DIR=str(cache / "pip-cache"))
    env.update(MD_ENV_CACHE=str(cache / "envs"), MD_INSTALL_BACKOFF="0.05", MD_LOG_LEVEL="info")
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def base_python(tmp_path_factory, wheelhouse) -> str:
    """A base environment with mdtest-lib 1.0 on top of the test environment (which stays untouched)."""
    python = venv_over_this_environment(tmp_path_factory.mktemp("base") / "venv")
    env = dict(pip_env("http://127.0.0.1:9/simple/", tmp_path_factory.mktemp("pipcache")), PIP_NO_INDEX="1")
    subprocess.run([python, "-m", "pip", "install", "-q", "--find-links", str(wheelhouse), "mdtest-lib==1.0"], check=True, env=env)
    return python


def base_mdtest_version(python: str) -> str:
    return subprocess.run([python, "-c", "import mdtest_lib; print(mdtest_lib.__version__)"], capture_output=True, text=True, check=True).stdout.strip()


def make_model(root: Path, name: str, requirements=None, wheels=()) -> Path:
    model = root / name
    model.mkdir(parents=True)
    (model / "package.py").write_text(fixture_package("reports_version"))
    if requirements is not None:
        (model / "requirements.txt").write_text(requirements)
    for wheel in wheels:
        (model / "wheels").mkdir(exist_ok=True)
        shutil.copy(wheel, model / "wheels" / wheel.name)
    return model


def test_two_models_with_conflicting_versions_run_side_by_side(tmp_path, wheelhouse, base_python):
    upgraded = make_model(tmp_path, "wants_2", "# needs the new API\nmdtest-lib==2.0\n")
    plain = make_model(tmp_path, "takes_base")
    with LocalIndex(list(wheelhouse.glob("*.whl"))) as index:
        env = pip_env(index.url, tmp_path)
        servers = [Server(m, "--workers", "1", env=env, python=base_python) for m in (upgraded, plain)]
        try:
            for server in servers:
                server.wait_ready()
            versions = [s.post("/predict", json=[{"x": 1}]).json()[0]["mdtest_version"] for s in servers]
            assert versions == ["2.0", "1.0"]
            info = servers[0].get("/info").json()["overrides"]
            assert info["from_cache"] is False
            assert info["installed"] == [{"name": "mdtest-lib", "version": "2.0"}], "only what differs is installed"
            assert servers[1].get("/info").json()["overrides"] is None
            assert "md_requirements_install_seconds" in servers[0].get("/metrics").text
        finally:
            for server in servers:
                server.stop()
    assert base_mdtest_version(base_python) == "1.0"


def test_second_start_uses_the_cache_without_the_index(tmp_path, wheelhouse, base_python):
    model = make_model(tmp_path, "cached", "mdtest-lib==2.0\n")
    with LocalIndex(list(wheelhouse.glob("*.whl"))) as index:
        env = pip_env(index.url, tmp_path)
        first = md_runtime("env", str(model), env=env, python=base_python)
        assert first.returncode == 0, first.stderr + first.stdout
        assert "built in" in first.stdout
        asked = len(index.requests)
        server = Server(model, "--workers", "1", env=env, python=base_python).wait_ready()
        try:
            assert server.get("/info").json()["overrides"]["from_cache"] is True
            assert server.post("/predict", json=[{"x": 1}]).json() == [{"mdtest_version": "2.0"}]
        finally:
            server.stop()
        assert len(index.requests) == asked, "a cached start must not reach the index"


@pytest.mark.parametrize("faults", [dict(fail_first=2), dict(reset_first=1)], ids=["503", "reset"])
def test_flaky_index_still_installs(tmp_path, wheelhouse, base_python, faults):
    model = make_model(tmp_path, "flaky", "mdtest-lib==2.0\n")
    with LocalIndex(list(wheelhouse.glob("*.whl")), **faults) as index:
        result = md_runtime("env", str(model), env=pip_env(index.url, tmp_path), python=base_python)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "attempt(s)" in result.stdout and "mdtest-lib==2.0" in result.stdout
    assert "pip attempt 1 failed" in result.stdout


def test_an_index_failing_its_first_12_requests_installs_with_the_default_retries(tmp_path, wheelhouse, base_python):
    model = make_model(tmp_path, "very_flaky", "mdtest-lib==2.0\n")
    with LocalIndex(list(wheelhouse.glob("*.whl")), fail_first=12) as index:  # a short backoff keeps the test short
        result = md_runtime("env", str(model), env=pip_env(index.url, tmp_path, MD_INSTALL_BACKOFF="0.001"), python=base_python)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pip attempt 12 failed" in result.stdout and "(built in" in result.stdout


def test_an_index_that_is_down_at_first_and_comes_back_installs(tmp_path, wheelhouse, base_python):
    model = make_model(tmp_path, "index_returns", "mdtest-lib==2.0\n")
    port = free_port()
    env = pip_env("http://127.0.0.1:{}/simple/".format(port), tmp_path, MD_INSTALL_BACKOFF="0.5")
    installing = subprocess.Popen([base_python, "-m", "md_runtime.cli", "env", str(model)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(4)  # down: connections refused
        with LocalIndex(list(wheelhouse.glob("*.whl")), port=port):
            output, _ = installing.communicate(timeout=120)
    finally:
        installing.kill()
    assert installing.returncode == 0, output
    assert "pip attempt 1 failed" in output and "connection refused" in output.lower()


def test_index_down_fails_within_the_deadline_with_one_line(tmp_path, base_python):
    model = make_model(tmp_path, "offline_index", "mdtest-lib==2.0\n")
    env = pip_env("http://127.0.0.1:{}/simple/".format(free_port()), tmp_path,
                  MD_INSTALL_TIMEOUT="6", MD_INSTALL_RETRIES="1000", MD_INSTALL_BACKOFF="0.5")
    result = md_runtime("env", str(model), env=env, python=base_python)
    assert result.returncode == 3
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("md-runtime: error: requirements.txt: could not install mdtest-lib==2.0 after ")
    attempts = int(last.split(" after ")[1].split(" ")[0])
    assert 1 < attempts < 1000, "the deadline, not the retry count, must end it"
    assert "MD_OFFLINE=1" in last
    assert "connection refused" in last.lower(), "the cause must be the last network error"


@pytest.mark.parametrize(
    "requirements,reason",
    [
        ("mdtest-lib==9.9\n", "requirements.txt: mdtest-lib==9.9 cannot be installed: no such package or version"),
        ("mdtest-lib=>2\n", "requirements.txt: invalid requirement"),
    ],
)
def test_permanent_failures_fail_at_once(tmp_path, wheelhouse, base_python, requirements, reason):
    model = make_model(tmp_path, "permanent", requirements)
    with LocalIndex(list(wheelhouse.glob("*.whl"))) as index:
        result = md_runtime("env", str(model), env=pip_env(index.url, tmp_path), python=base_python)
    assert result.returncode == 3
    assert reason in result.stderr.strip().splitlines()[-1]
    assert result.stdout.count("pip attempt") == 1, "a permanent failure must not be retried"


def test_a_requirement_that_fails_to_build_is_named(tmp_path, base_python):
    sdist = make_failing_sdist(tmp_path / "sdists", "mdtest-broken", "1.0")
    model = make_model(tmp_path, "broken", "mdtest-broken==1.0\n")
    with LocalIndex([sdist]) as index:
        result = md_runtime("env", str(model), env=pip_env(index.url, tmp_path), python=base_python)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 3, result.stdout + result.stderr
    assert "requirements.txt: mdtest" in last and "failed to build from source" in last, last
    assert "None" not in last


def test_check_runs_in_the_overlay_serve_would_use(tmp_path, wheelhouse, base_python):
    model = make_model(tmp_path, "needs2", "mdtest-lib==2.0\n")
    (model / "package.py").write_text(fixture_package("needs_version_2"))
    (model / "sample.csv").write_text("x\n1\n")
    with LocalIndex(list(wheelhouse.glob("*.whl"))) as index:
        env = pip_env(index.url, tmp_path)
        checked = md_runtime("check", str(model), env=env, python=base_python)
        as_is = md_runtime("check", str(model), "--no-overlay", env=env, python=base_python)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "environment: overlay" in checked.stdout and "mdtest-lib==2.0" in checked.stdout
    assert "ok: " in checked.stdout
    assert as_is.returncode == 4 and "AssertionError: 1.0" in as_is.stderr, "the base environment has mdtest-lib 1.0"


def test_concurrent_starts_build_the_overlay_once(tmp_path, wheelhouse, base_python):
    model = make_model(tmp_path, "shared", "mdtest-lib==2.0\n")
    with LocalIndex(list(wheelhouse.glob("*.whl"))) as index:
        env = pip_env(index.url, tmp_path)
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda _: md_runtime("env", str(model), env=env, python=base_python), range(2)))
        assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
        assert sorted("from the cache" in r.stdout for r in results) == [False, True]
        assert index.downloads() == 1
    overlays = [p for p in (tmp_path / "envs").iterdir() if p.is_dir()]
    assert len(overlays) == 1, overlays


def test_override_that_breaks_the_runtime_is_refused(tmp_path, wheelhouse, base_python):
    model = make_model(tmp_path, "old_flask", "flask==0.12\n")
    with LocalIndex(list(wheelhouse.glob("*.whl"))) as index:
        server = Server(model, env=pip_env(index.url, tmp_path), python=base_python)
        assert server.wait_exit() == 3
    last = server.output().strip().splitlines()[-1]
    assert "requirements.txt makes flask 0.12 but md-runtime needs flask" in last and "change or remove that pin" in last
    assert not [p for p in (tmp_path / "envs").iterdir() if p.is_dir()], "a refused overlay must not be cached"


def test_offline_installs_from_the_model_wheels_only(tmp_path, wheelhouse, base_python):
    model = make_model(tmp_path, "offline", "mdtest-lib==2.0\n", wheels=[wheelhouse / "mdtest_lib-2.0-py3-none-any.whl"])
    env = pip_env("http://127.0.0.1:{}/simple/".format(free_port()), tmp_path, MD_OFFLINE="1", MD_INSTALL_RETRIES="0")
    result = md_runtime("env", model.name, env=env, python=base_python, cwd=model.parent)  # a relative MODEL_DIR
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mdtest-lib==2.0" in result.stdout


def test_no_requirements_means_the_base_environment(tmp_path, base_python):
    model = make_model(tmp_path, "plain", "# nothing to add\n\n")
    result = md_runtime("env", str(model), env=pip_env("http://127.0.0.1:9/simple/", tmp_path), python=base_python)
    assert result.returncode == 0 and "has no requirements.txt" in result.stdout


@pytest.mark.parametrize(
    "output,transient,fragment",
    [
        ("Collecting a==1\n  WARNING: Retrying ... NewConnectionError(... [Errno 111] Connection refused)\nERROR: No matching distribution found for a==1", True, "Connection refused"),
        ("Collecting a==1\nERROR: Could not install ... Read timed out.", True, "Read timed out"),
        ("Collecting a==1\nERROR: HTTP error 503 while getting https://x/a.whl", True, "HTTP error 503"),
        ("Could not fetch URL https://x/simple/a/: 503 Server Error: Service Unavailable for url - skipping\nERROR: No matching distribution found for a==1", True, "503 Server Error"),
        ("Could not fetch URL https://pypi.org/simple/a/: 404 Client Error: Not Found - skipping\nERROR: No matching distribution found for a==9", False, "a==9 cannot be installed"),
        ("Collecting a==9\nERROR: Could not find a version that satisfies the requirement a==9\nERROR: No matching distribution found for a==9", False, "a==9 cannot be installed"),
        ("ERROR: Could not find a version that satisfies the requirement numpy==2.3.4 (from versions: 1.26.4, 2.0.0, 2.0.2)\n"
         "ERROR: No matching distribution found for numpy==2.3.4", False,
         "numpy==2.3.4 cannot be installed: no such package or version on the index for Python {}.{} (the newest it has is 2.0.2)".format(*sys.version_info[:2])),
        ("ERROR: Cannot install a==1 and b==2 because these package versions have conflicting dependencies.\nERROR: ResolutionImpossible", False, "the requirements conflict"),
        ("Collecting c\n  error: subprocess-exited-with-error\nERROR: Failed to build c", False, "failed to build from source"),
    ],
)
def test_classify_pip_failures(tmp_path, output, transient, fragment):
    failure = classify(output, tmp_path / "requirements.txt")
    assert failure.transient is transient
    assert fragment in failure.error(1, 0.0).message
