"""The md-base images, really built with build.sh (podman, on a debootstrapped Debian bullseye base) and run."""

import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import pandas as pd
import pytest
import requests

from images_support import Container, Podman, owned_by
from osv_support import advisory, fixed, plant
from packaging_support import LocalIndex, make_wheel, venv_over_this_environment
from support import REPO, fixture_package, free_port

pytestmark = pytest.mark.container

IMAGE_UID = 1000
WHEELHOUSE = Path(os.environ.get("MD_WHEELHOUSE", "/var/cache/md-base/wheelhouse"))  # filled by .ci/wheelhouse

@pytest.fixture(scope="session")
def podman() -> Podman:
    return Podman()


def build_and_report(podman: Podman, name: str, pytestconfig, line: str = "exact") -> str:
    """Build the image; CI's log gets build.sh's line with its size and build time."""
    tag, summary = podman.build(name, line)
    with pytestconfig.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        pytestconfig.pluginmanager.get_plugin("terminalreporter").write_line("\n" + summary)
    return tag


@pytest.fixture(scope="session")
def python39(podman, pytestconfig) -> str:
    return build_and_report(podman, "python-39", pytestconfig)


@pytest.fixture(scope="session")
def python39_patched(podman, pytestconfig) -> str:
    return build_and_report(podman, "python-39", pytestconfig, line="patched")


@pytest.fixture(scope="session")
def machine_learning(podman, pytestconfig) -> str:
    return build_and_report(podman, "machine-learning", pytestconfig)


def make_override_model(root: Path) -> Tuple[Path, Path]:
    """A model whose requirements.txt asks for mdtest-lib 2.0 (its wheel in root/wheels), and an overlay cache
    directory the image's user can write: (model, cache)."""
    make_wheel(root / "wheels", "mdtest-lib", "2.0")
    model, cache = root / "model", root / "cache"
    model.mkdir()
    (model / "package.py").write_text(fixture_package("slow_version"))
    (model / "requirements.txt").write_text("mdtest-lib==2.0\n")
    cache.mkdir()
    owned_by(IMAGE_UID, cache)
    return model, cache


def fixture_model(root: Path, fixture: str) -> Path:
    """A model directory holding tests/fixtures/models/FIXTURE's package.py."""
    model = root / fixture
    model.mkdir()
    (model / "package.py").write_text(fixture_package(fixture))
    return model


def post_rows(container: Container, rows: list, timeout: float = 60) -> requests.Response:
    return requests.post(container.url("/predict"), json=rows, timeout=timeout)


def test_python39_image_installs_an_override_serves_and_drains_on_stop(tmp_path, podman, python39):
    model, cache = make_override_model(tmp_path)
    with LocalIndex(list((tmp_path / "wheels").glob("*.whl"))) as index:
        flags = ("--memory", "512m", "--cpus", "1", "-v", "{}:/cache".format(cache))
        env = {"PIP_INDEX_URL": index.url, "MD_WORKERS": "2"}
        first = Container(podman, python39, free_port(), *flags, host_network=True, env=env, model=model)
        try:
            first.wait_ready()
            assert post_rows(first, [{"sleep_s": 0}, {"sleep_s": 0}]).json() == [{"mdtest_version": "2.0"}] * 2
            assert requests.get(first.url("/health"), timeout=5).status_code == 200
            info = requests.get(first.url("/info"), timeout=5).json()
            assert {"name": "mdtest-lib", "version": "2.0"} in info["overrides"]["installed"]
            assert info["overrides"]["from_cache"] is False
            metrics = requests.get(first.url("/metrics"), timeout=5).text
            assert "md_requirements_install_seconds" in metrics and "md_predict_seconds_count" in metrics

            uids = first.exec("python", "-c", "import os; print(sorted({os.stat('/proc/' + p).st_uid for p in os.listdir('/proc') if p.isdigit()}))")
            assert json.loads(uids) == [IMAGE_UID], "every process in the container must run as the image's user"
            assert podman.run("healthcheck", "run", first.name, check=False).returncode == 0

            in_flight = {}
            slow = threading.Thread(target=lambda: in_flight.update(response=post_rows(first, [{"sleep_s": 3}])))
            slow.start()
            time.sleep(1)
            started = time.monotonic()
            podman.run("stop", "-t", "20", first.name)
            stopped_in = time.monotonic() - started
            slow.join(30)
            assert in_flight["response"].status_code == 200, "the in-flight request must be answered"
            assert stopped_in < 10, "stop must drain and exit well inside the grace period, took {:.1f}s".format(stopped_in)
            assert podman.inspect("{{.State.ExitCode}}", first.name) == "0", first.logs()[-3000:]
        finally:
            first.remove()

        requests_before = len(index.requests)
        second = Container(podman, python39, free_port(), *flags, host_network=True, env=env, model=model)
        try:
            second.wait_ready()
            assert requests.get(second.url("/info"), timeout=5).json()["overrides"]["from_cache"] is True
            assert post_rows(second, [{"sleep_s": 0}]).json() == [{"mdtest_version": "2.0"}]
            assert len(index.requests) == requests_before, "a cached overlay must not touch the index"
        finally:
            second.remove()


def test_python39_image_has_its_pins_labels_and_nothing_extra(podman, python39):
    info = podman.image_info(python39)
    labels = info["Labels"]
    assert labels["org.opencontainers.image.title"] == "md-base/python/python-39"
    assert labels["org.opencontainers.image.version"] == "1.1.0"
    assert labels["org.opencontainers.image.source"] and labels["io.md-base.python"] == "3.9"
    assert "flask==2.2.2" in labels["io.md-base.pins"].split(",")
    assert info["Config"]["User"] == "md"
    assert "8080/tcp" in info["Config"]["ExposedPorts"]
    assert "/health" in " ".join(info["Healthcheck"]["Test"])
    assert info["Config"]["Entrypoint"][:2] == ["tini", "--"]
    probe = "command -v gcc cc make || ls /root/.cache /cache/home/.cache 2>/dev/null || echo lean"
    done = podman.run("run", "--rm", "--user", "root", "--entrypoint", "sh", python39, "-c", probe)
    assert done.stdout.strip() == "lean", "no build toolchain or pip cache may be left in the image: " + done.stdout
    writable = "find / -xdev \\( -path /proc -o -path /sys \\) -prune -o -writable -print 2>/dev/null; true"
    done = podman.run("run", "--rm", "--network", "none", "--entrypoint", "sh", python39, "-c", writable)
    assert sorted(done.stdout.split()) == ["/cache", "/cache/envs", "/cache/home", "/run/lock", "/tmp", "/var/lock", "/var/tmp"], \
        "the service user may write its cache and the temporary directories, nothing it runs"


def test_python39_image_serves_on_a_published_port_with_the_seed_versions(tmp_path, podman, python39):
    model = REPO / "tests" / "fixtures" / "models" / "sums_columns"
    container = Container(podman, python39, free_port(), "--memory", "256m", "--cpus", "0.5", model=model)
    try:
        container.wait_ready()
        assert post_rows(container, [{"a": 1, "b": 2}]).status_code == 200
        info = requests.get(container.url("/info"), timeout=5).json()
        assert info["python_version"].startswith("3.9")
        versions = {k.lower(): v for k, v in info["dependencies"].items()}
        assert {k: versions[k] for k in ("flask", "gunicorn", "gevent", "pydantic", "pandas", "numpy")} == {
            "flask": "2.2.2", "gunicorn": "20.1.0", "gevent": "21.12.0", "pydantic": "1.10.7", "pandas": "1.5.1", "numpy": "1.23.4",
        }
    finally:
        container.remove()


def test_python39_image_runs_as_sagemaker_runs_it(podman, python39):
    """SageMaker: `docker run IMAGE serve`, the model under /opt/ml/model, /ping and headerless CSV on /invocations."""
    model = REPO / "tests" / "fixtures" / "models" / "sums_columns"
    container = Container(podman, python39, free_port(), model=model, model_at="/opt/ml/model",
                          env={"MD_MODEL_DIR": "/opt/ml/model"}, args=("serve",))
    try:
        container.wait_ready()
        assert requests.get(container.url("/ping"), timeout=5).status_code == 200
        csv = requests.post(container.url("/invocations"), data="1,2\n3,4.5\n", headers={"Content-Type": "text/csv"}, timeout=30)
        assert csv.status_code == 200, csv.text
        assert csv.json() == [{"total": 3}, {"total": 7.5}]
        infer = requests.post(container.url("/v2/models/model/infer"), timeout=30, json={
            "inputs": [{"name": "a", "shape": [2], "datatype": "INT64", "data": [1, 2]},
                       {"name": "b", "shape": [2], "datatype": "FP32", "data": [0.5, 0.25]}]})
        assert infer.status_code == 200, infer.text
        assert infer.json()["outputs"] == [{"name": "total", "datatype": "FP64", "shape": [2], "data": [1.5, 2.25]}]
    finally:
        container.remove()


def test_runtime_test_suite_passes_inside_python39_on_the_seed_pins(podman, python39):
    """The oldest supported versions, on a real Python 3.9: the image's installed runtime against tests/, with
    the test extra installed from the wheelhouse (.ci/wheelhouse seed-suite/) and no network at all."""
    suite = WHEELHOUSE / "seed-suite"
    if not (suite / "requirements.txt").is_file():
        raise RuntimeError("no {}: run `bash .ci/wheelhouse {}`".format(suite, WHEELHOUSE))
    script = "\n".join([
        "set -e",
        "pip freeze --exclude md-runtime > /tmp/keep.txt",
        "pip install -q --no-index --find-links /wheels -c /tmp/keep.txt -r /wheels/requirements.txt",
        "if pip freeze --exclude md-runtime | diff /tmp/keep.txt - | grep '^<'; then exit 9; fi",  # a pin moved
        "cd /tmp && FUZZ_EXAMPLES=30 python -m pytest /src/tests -m 'not container' -p no:cacheprovider -q -n 2 "
        "--dist loadfile",
    ])
    done = podman.run(
        # privileged: the start-up fault tests mount tmpfs directories in a mount namespace of their own
        "run", "--rm", "--user", "root", "--privileged", "--network", "none", "-v", "{}:/wheels:ro".format(suite),
        "-v", "{}:/src:ro".format(REPO), "--entrypoint", "sh", python39, "-c", script, check=False, timeout=1500,
    )
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and " failed" not in done.stdout


TRAIN_IN_IMAGE = r'''
"""Runs inside the machine-learning image: trains one small iris classifier per library with the image's own
versions, and writes a model directory for each with the predictions the served model must reproduce."""
import json
import sys
from pathlib import Path

import catboost, lightgbm, nltk, shap, sklearn, xgboost  # every library the image carries must import
import joblib
import pandas as pd
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

PACKAGE = """
from pathlib import Path

import pandas as pd

PACKAGE_PATH = Path(__file__).parent
COLUMNS = ["proba_0", "proba_1", "proba_2"]


class Model:
    def __init__(self):
{load}

    def predict(self, input_df):
        return pd.DataFrame({proba}, columns=COLUMNS)


def get_model():
    return Model()
"""
LIBRARIES = {
    "sklearn": ("        import joblib\n        self.model = joblib.load(PACKAGE_PATH / 'model.joblib')", "self.model.predict_proba(input_df)"),
    "xgboost": ("        import xgboost\n        self.model = xgboost.XGBClassifier()\n        self.model.load_model(str(PACKAGE_PATH / 'model.json'))", "self.model.predict_proba(input_df)"),
    "lightgbm": ("        import lightgbm\n        self.model = lightgbm.Booster(model_file=str(PACKAGE_PATH / 'model.txt'))", "self.model.predict(input_df)"),
    "catboost": ("        import catboost\n        self.model = catboost.CatBoostClassifier()\n        self.model.load_model(str(PACKAGE_PATH / 'model.cbm'))", "self.model.predict_proba(input_df)"),
}

iris = load_iris(as_frame=True)
X = iris.data.rename(columns=lambda c: c.replace(" (cm)", "").replace(" ", "_"))
y = iris.target
sample = X.iloc[::30]
out = Path(sys.argv[1])
for name, (load, proba) in LIBRARIES.items():
    target = out / name
    target.mkdir(parents=True)
    if name == "sklearn":
        model = LogisticRegression(max_iter=500).fit(X, y)
        joblib.dump(model, target / "model.joblib")
    elif name == "xgboost":
        model = xgboost.XGBClassifier(n_estimators=20, max_depth=3).fit(X, y)
        model.save_model(str(target / "model.json"))
    elif name == "lightgbm":
        model = lightgbm.LGBMClassifier(n_estimators=20, verbose=-1).fit(X, y)
        model.booster_.save_model(str(target / "model.txt"))
    else:
        model = catboost.CatBoostClassifier(iterations=20, verbose=False, allow_writing_files=False).fit(X, y)
        model.save_model(str(target / "model.cbm"))
    (target / "package.py").write_text(PACKAGE.format(load=load, proba=proba))
    expected = {"rows": sample.to_dict(orient="records"), "proba": model.predict_proba(sample).tolist()}
    (target / "expected.json").write_text(json.dumps(expected))
print("trained with", {m.__name__: m.__version__ for m in (catboost, lightgbm, nltk, shap, sklearn, xgboost)})
'''


def test_machine_learning_image_serves_models_of_each_library(tmp_path, podman, machine_learning):
    labels = podman.image_info(machine_learning)["Labels"]
    assert {"catboost==1.1.1", "lightgbm==3.3.0", "xgboost==1.7.1", "scikit-learn==1.1.1", "shap==0.40.0"} <= set(labels["io.md-base.pins"].split(","))
    (tmp_path / "train.py").write_text(TRAIN_IN_IMAGE)
    trained = podman.run(
        "run", "--rm", "--user", "root", "-v", "{}:/work".format(tmp_path), "--entrypoint", "python",
        machine_learning, "/work/train.py", "/work/models",
    )
    assert "'xgboost': '1.7.1'" in trained.stdout and "'catboost': '1.1.1'" in trained.stdout, trained.stdout
    for library in ("sklearn", "xgboost", "lightgbm", "catboost"):
        model = tmp_path / "models" / library
        expected = json.loads((model / "expected.json").read_text())
        # one worker with two threads: OpenMP pools, which must not cross the master's fork (MD_PRELOAD=auto)
        container = Container(podman, machine_learning, free_port(), "--memory", "1g", "--cpus", "2", model=model,
                              env={"MD_WORKERS": "1"})
        try:
            container.wait_ready()
            assert requests.get(container.url("/info")).json()["memory"]["preload"] is True
            response = post_rows(container, expected["rows"])
            assert response.status_code == 200, (library, response.text)
            served = [row["proba_{}".format(k)] for row in response.json() for k in range(3)]
            assert served == pytest.approx([p for row in expected["proba"] for p in row], abs=1e-9), library
        finally:
            container.remove()


def test_too_little_container_memory_is_a_clear_error_not_an_oom_kill(tmp_path, podman, python39):
    model = fixture_model(tmp_path, "holds_memory")
    done = podman.run("run", "--rm", "--memory", "256m", "--memory-swap", "256m", "-e", "BIG_MIB=400",
                      "-v", "{}:/app/model:ro".format(model), python39, check=False, timeout=300)
    assert done.returncode == 3, "exit {} (137 is the kernel's OOM kill):\n{}".format(done.returncode, done.stderr[-3000:])
    last = [line for line in done.stderr.strip().splitlines() if "systemd" not in line][-1]
    assert last.startswith("md-runtime: error: ModelServeError: the model does not fit: loading the model took more "
                           "than 2"), last
    assert re.search(r"this replica has 256 MiB for \d worker\(s\); raise memory above 256 MiB", last), last


def limited_container(podman: Podman, image: str, model: Path, memory_mib: int, cpus: str = "1",
                      env: Optional[dict] = None) -> Container:
    """A container serving `model` under a real memory limit (no swap) and CPU quota."""
    memory = "{}m".format(memory_mib)
    return Container(podman, image, free_port(), "--memory", memory, "--memory-swap", memory, "--cpus", cpus,
                     env=env, model=model)


def container_workers(container: Container) -> int:
    """The gunicorn processes in the container less the master."""
    script = ("import glob, os\nprint(sum(b'gunicorn' in open(p, 'rb').read() for p in glob.glob('/proc/[0-9]*/cmdline')\n"
              "          if p.split('/')[2] != str(os.getpid())) - 1)")
    return int(container.exec("python", "-c", script))


def wait_for_workers(container: Container, expected: int, seconds: float = 30) -> int:
    """The workers running once `expected` are, or after `seconds`: without preloading gunicorn sleeps up to 0.1 s
    after each fork, and the first worker can be ready before the last is forked."""
    deadline = time.monotonic() + seconds
    while True:
        running = container_workers(container)
        if running >= expected or time.monotonic() > deadline:
            return running
        time.sleep(0.2)


def served_memory_plan(podman: Podman, image: str, model: Path, memory_mib: int, env: dict) -> Tuple[dict, str]:
    """(/info's memory plan, the logs) of a container started under a real --memory limit; it must serve."""
    container = limited_container(podman, image, model, memory_mib, env=env)
    try:
        container.wait_ready()
        assert post_rows(container, [{"x": 1}]).json() == [{"y": 1.0}]
        plan = requests.get(container.url("/info")).json()["memory"]
        assert wait_for_workers(container, plan["workers"]) == plan["workers"], plan
        return plan, container.logs()
    finally:
        container.remove()


def test_workers_are_fitted_into_a_real_memory_limit(tmp_path, podman, python39):
    """Four workers each holding their own copy of a 40 MiB model: all fit in 1 GiB, two in a limit between
    two's need and three's, none in less than one's, which is refused with the memory to ask for."""
    model = fixture_model(tmp_path, "holds_memory")
    env = {"MD_WORKERS": "4", "BIG_MIB": "40", "MD_PRELOAD": "false"}
    plan, _ = served_memory_plan(podman, python39, model, 1024, env)
    assert plan["workers"] == 4 and plan["limit_mib"] == 1024, plan
    need = [plan["master_mib"] + plan["files_mib"] + n * plan["worker_mib"] * 1.1 for n in (1, 2, 3)]

    two_of_four = int((need[1] + need[2]) / 2)
    plan, logs = served_memory_plan(podman, python39, model, two_of_four, env)
    assert plan["workers"] == 2, (two_of_four, plan)
    assert "memory: starting 2 worker(s) instead of 4" in logs, logs[-3000:]

    too_little = int(need[0]) - 8
    done = podman.run("run", "--rm", "--memory", "{}m".format(too_little), "--memory-swap", "{}m".format(too_little),
                      *[arg for key, value in env.items() for arg in ("-e", "{}={}".format(key, value))],
                      "-v", "{}:/app/model:ro".format(model), python39, check=False, timeout=300)
    last = [line for line in done.stderr.strip().splitlines() if "systemd" not in line][-1]
    assert done.returncode == 3, "exit {} (137 is the kernel's OOM kill):\n{}".format(done.returncode, done.stderr[-3000:])
    assert re.fullmatch(r"md-runtime: error: ModelServeError: the model does not fit: master \d+ MiB \+ \d+ MiB per "
                        r"worker; this replica has {} MiB for 4 worker\(s\); deploy with memory=(\d+) \(MiB\) or more, "
                        r"\d+ for all 4 workers".format(too_little), last), last
    asked = int(re.search(r"memory=(\d+)", last).group(1))
    assert need[0] <= asked <= need[0] * 1.1, (asked, need)


def test_a_leaking_worker_is_recycled_under_a_real_limit_and_the_container_serves_on(tmp_path, podman, python39):
    model = fixture_model(tmp_path, "allocates_memory")
    container = limited_container(podman, python39, model, 400)
    try:
        container.wait_ready()
        share = requests.get(container.url("/info")).json()["memory"]["worker_share_mib"]
        answered = set()
        for _ in range(int(share // 40) + 3):  # a leak of 40 MiB a request, slower than the guard's readings
            answer = post_rows(container, [{"mib": 40, "keep": True}])
            assert answer.status_code in (200, 507), answer.text
            if answer.status_code == 200:
                answered.add(answer.json()[0]["pid"])
            time.sleep(1.2)
        container.wait_ready()
        assert post_rows(container, [{"mib": 1, "keep": False}]).status_code == 200
        assert len(answered) >= 2, "the leaking worker was replaced by a new one"
        assert 'md_worker_recycled_total{reason="memory"} 1.0' in requests.get(container.url("/metrics")).text
        assert "replacing it" in container.logs()
        assert podman.inspect("{{.State.OOMKilled}} {{.State.Running}}", container.name) == "false true"
    finally:
        container.remove()


def container_memory(podman: Podman, container: Container) -> Dict[str, float]:
    """The PSS of every process in the container, in MiB by pid: alone in its cgroup, what the replica holds. Read
    by a shell: a python process would map the interpreter's pages too and take its part of their PSS away."""
    script = ('for p in /proc/[0-9]*; do [ "${p#/proc/}" = $$ ] || echo "${p#/proc/}" '
              '$(grep "^Pss:" "$p/smaps_rollup" 2>/dev/null); done')
    lines = (line.split() for line in podman.run("exec", container.name, "sh", "-c", script).stdout.splitlines())
    return {fields[0]: int(fields[2]) / 1024 for fields in lines if len(fields) == 4}


def test_the_iris_example_serves_at_the_platforms_default_memory_and_a_no_op_model_at_its_minimum(tmp_path, podman, machine_learning, python39):
    iris = tmp_path / "iris"
    shutil.copytree(REPO / "examples" / "iris", iris, ignore=shutil.ignore_patterns("*.joblib", "*.csv"))
    podman.run("run", "--rm", "--user", "root", "-v", "{}:/work".format(iris), "--entrypoint", "python", machine_learning,
               "/work/train.py")
    noop = fixture_model(tmp_path, "allocates_memory")
    for image, model, memory, rows in ((machine_learning, iris, 256, pd.read_csv(iris / "sample.csv").to_dict(orient="records")),
                                       (python39, noop, 150, [{"mib": 1, "keep": False}])):
        container = limited_container(podman, image, model, memory, cpus="0.1")  # the platform's default cpu
        try:
            container.wait_ready()
            for _ in range(5):
                assert post_rows(container, rows).status_code == 200
            plan = requests.get(container.url("/info")).json()["memory"]
            assert plan["preload"] is True and plan["workers"] == 1 and plan["limit_mib"] == memory
            processes = container_memory(podman, container)
            measured = sum(processes.values())
            assert abs(plan["replica_mib"] - measured) <= 0.1 * measured, (model.name, plan, processes)
        finally:
            container.remove()


def test_a_request_too_big_for_the_container_gets_507_and_nothing_is_killed(tmp_path, podman, python39):
    model = fixture_model(tmp_path, "allocates_memory")
    container = limited_container(podman, python39, model, 512)
    try:
        container.wait_ready()
        answer = post_rows(container, [{"mib": 1024, "keep": False}])
        assert answer.status_code == 507 and answer.json()["error"] == "out_of_memory", answer.text
        assert post_rows(container, [{"mib": 100, "keep": False}]).json()[0]["allocated_mib"] == 100
        assert podman.inspect("{{.State.OOMKilled}} {{.State.Running}}", container.name) == "false true"
    finally:
        container.remove()


@pytest.fixture(scope="session")
def laptop_python(tmp_path_factory) -> str:
    """A data scientist's laptop: this test environment with numpy 2 and a recent scikit-learn on top, installed
    from the wheelhouse .ci/wheelhouse fills (tests/laptop-stack.txt), never from an index."""
    if not (WHEELHOUSE / "host").is_dir():
        raise RuntimeError("no wheelhouse at {}: run `bash .ci/wheelhouse {}`".format(WHEELHOUSE, WHEELHOUSE))
    python = venv_over_this_environment(tmp_path_factory.mktemp("laptop") / "venv", with_pip=True)
    stack = [line for line in (REPO / "tests" / "laptop-stack.txt").read_text().splitlines() if line and not line.startswith("#")]
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull)
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(WHEELHOUSE / "host"), *stack],
                   check=True, env=env)
    return python


def test_a_model_trained_on_a_newer_stack_names_the_fix_then_serves_with_what_freeze_wrote(tmp_path, podman, machine_learning, laptop_python):
    model = tmp_path / "iris"
    shutil.copytree(str(REPO / "examples" / "iris"), str(model), ignore=shutil.ignore_patterns("*.joblib", "*.csv"))
    subprocess.run([laptop_python, str(model / "train.py")], check=True, capture_output=True)
    expected = subprocess.run(
        [laptop_python, "-c", "import sys, pandas as pd; sys.path.insert(0, sys.argv[1]); import package; "
         "print(package.get_model().predict(pd.read_csv(sys.argv[1] + '/sample.csv')).to_json(orient='records', double_precision=15))",
         str(model)], check=True, capture_output=True, text=True).stdout
    rows = pd.read_csv(str(model / "sample.csv")).to_dict(orient="records")

    refused = podman.run("run", "--rm", "-v", "{}:/app/model:ro".format(model), machine_learning, check=False, timeout=300)
    last = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 4, refused.stderr[-3000:]
    assert last.startswith("md-runtime: error: ") and "numpy 1.23.4 here, the files need numpy>=2" in last, last
    assert "add to requirements.txt: numpy>=2" in last and "md-runtime freeze MODEL_DIR" in last

    frozen = subprocess.run([laptop_python, "-m", "md_runtime.cli", "freeze", str(model)], capture_output=True, text=True)
    assert frozen.returncode == 0, frozen.stderr
    pins = (model / "requirements.txt").read_text().split()
    assert {"numpy==2.0.2", "scikit-learn==1.6.1", "pandas==2.2.3", "joblib==1.4.2"} <= set(pins), pins
    cache = tmp_path / "cache"
    cache.mkdir()
    owned_by(IMAGE_UID, cache)
    with LocalIndex(list((WHEELHOUSE / "image").glob("*.whl"))) as index:
        port = free_port()
        container = Container(podman, machine_learning, port, "-v", "{}:/cache".format(cache), host_network=True,
                              env={"PIP_INDEX_URL": index.url, "MD_WORKERS": "1"}, model=model)
        try:
            container.wait_ready(600)
            response = post_rows(container, rows)
            assert response.status_code == 200, response.text
            served, wanted = pd.DataFrame(response.json()), pd.DataFrame(json.loads(expected))
            pd.testing.assert_frame_equal(served, wanted, check_exact=False, atol=1e-12, rtol=0)
        finally:
            container.remove()


def in_image(podman: Podman, image: str, *command: str, entrypoint: str = "", flags: Tuple[str, ...] = (),
             check: bool = True) -> subprocess.CompletedProcess:
    """A command in a throwaway container of the image: md-runtime's, or entrypoint's; no network."""
    chosen = ("--entrypoint", entrypoint) if entrypoint else ()
    return podman.run("run", "--rm", "--network", "none", *flags, *chosen, image, *command, check=check)


def test_python39_sbom_lists_every_package_pip_and_dpkg_report(podman, python39):
    assert podman.image_info(python39)["Labels"]["io.md-base.sbom"] == "/usr/share/md-base/sbom.json"
    sbom = json.loads(in_image(podman, python39, "sbom").stdout)
    assert sbom["metadata"]["component"] == {"type": "container", "name": "md-base/python/python-39", "version": "1.1.0"}
    components = {c["purl"].split("/")[0]: set() for c in sbom["components"]}
    for c in sbom["components"]:
        components[c["purl"].split("/")[0]].add((c["name"].lower(), c["version"]))
    listed = in_image(podman, python39, "list", "--format", "json", entrypoint="pip").stdout
    assert components["pkg:pypi"] == {(p["name"].lower(), p["version"]) for p in json.loads(listed)}
    assert ("gunicorn", "20.1.0") in components["pkg:pypi"] and ("md-runtime", "0.2.0") in components["pkg:pypi"]
    dpkg = in_image(podman, python39, "-W", "-f", "${db:Status-Status} ${Package} ${Version}\\n", entrypoint="dpkg-query")
    installed = {tuple(line.split()[1:]) for line in dpkg.stdout.splitlines() if line.startswith("installed ")}
    assert components["pkg:deb"] == installed and ("tini", next(v for n, v in installed if n == "tini")) in installed


# What public advisories said of the serving stack's pins (and their fixes) when the patched line was cut
SERVING_ADVISORIES = [
    advisory("PLANT-GUNICORN-1", "gunicorn", fixed("22.0.0"), severity="high", cve="CVE-2024-1135"),
    advisory("PLANT-GUNICORN-2", "gunicorn", fixed("23.0.0"), severity="high", cve="CVE-2024-6827"),
    advisory("PLANT-WERKZEUG", "Werkzeug", fixed("2.3.8"), fixed("3.0.1", introduced="3.0.0"), fixed("3.1.6", introduced="3.1.0"), severity="moderate"),
    advisory("PLANT-FLASK", "flask", fixed("2.2.5"), fixed("3.1.3", introduced="2.3.0"), severity="low"),
    advisory("PLANT-GEVENT", "gevent", fixed("25.4.2"), severity="critical", cve="CVE-2023-41419"),
    advisory("PLANT-PYDANTIC", "pydantic", fixed("1.10.13"), severity="moderate", cve="CVE-2024-3772"),
    advisory("PLANT-SETUPTOOLS", "setuptools", fixed("78.1.1"), severity="high", cve="CVE-2025-47273"),
    advisory("PLANT-WHEEL", "wheel", [{"introduced": "0.40.0"}, {"last_affected": "0.46.1"}], severity="high"),
    advisory("PLANT-PIP", "pip", fixed("25.3"), severity="moderate", cve="CVE-2025-8869"),
    advisory("PLANT-ORJSON", "orjson", fixed("3.11.6"), severity="moderate"),
]
ELSEWHERE_ADVISORIES = [
    advisory("PLANT-TINI", "tini", fixed("0.19.0-99"), ecosystem="Debian:11", severity="low"),  # a Debian package
    advisory("DECOY-TORCH", "torch", fixed("2.6.0"), severity="critical"),  # not in the image
    advisory("DECOY-NUMPY", "numpy", fixed("1.23.4"), severity="critical"),  # fixed in exactly the pinned version
    advisory("DECOY-TINI-12", "tini", fixed("0.19.0-99"), ecosystem="Debian:12"),  # another Debian release
]


def audit_in(podman: Podman, image: str, osv: Path, *flags: str) -> subprocess.CompletedProcess:
    return in_image(podman, image, "audit", "--osv", "/osv", *flags, flags=("--read-only", "-v", "{}:/osv:ro".format(osv)),
                    check=False)


def test_the_report_on_python39_finds_exactly_the_planted_advisories_and_the_patched_line_passes(
        tmp_path, podman, python39, python39_patched):
    osv = plant(tmp_path / "osv", *SERVING_ADVISORIES, *ELSEWHERE_ADVISORIES)
    report = json.loads(audit_in(podman, python39, osv, "--format", "json").stdout)
    found = {row["package"].lower(): row["advisories"] for row in report["affected"]}
    assert found == {"gunicorn": ["PLANT-GUNICORN-1", "PLANT-GUNICORN-2"], "werkzeug": ["PLANT-WERKZEUG"],
                     "flask": ["PLANT-FLASK"], "gevent": ["PLANT-GEVENT"], "pydantic": ["PLANT-PYDANTIC"],
                     "setuptools": ["PLANT-SETUPTOOLS"], "wheel": ["PLANT-WHEEL"], "pip": ["PLANT-PIP"],
                     "orjson": ["PLANT-ORJSON"], "tini": ["PLANT-TINI"]}
    ways_out = {row["package"].lower(): row["fixed_in"] for row in report["affected"]}
    assert ways_out["flask"] == "2.2.5" and ways_out["gunicorn"] == "23.0.0" and ways_out["wheel"] == "> 0.46.1"

    exact = audit_in(podman, python39, osv, "--fail-on", "any", "--scope", "serving")
    assert exact.returncode == 1 and "10 advisories at --fail-on any (scope serving)" in exact.stderr, exact.stderr
    patched = audit_in(podman, python39_patched, osv, "--fail-on", "any", "--scope", "serving")
    assert patched.returncode == 0, patched.stdout + patched.stderr
    assert "1 of " in patched.stdout and "| tini | " in patched.stdout, "the Debian advisory is still reported"
    everything = audit_in(podman, python39_patched, osv, "--fail-on", "low")
    assert everything.returncode == 1 and "cover tini 0.19.0-1:" in everything.stderr


def test_patched_python39_installs_an_override_and_serves_read_only_with_no_capabilities(tmp_path, podman, python39_patched):
    model, cache = make_override_model(tmp_path)
    flags = ("--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "-v", "{}:/cache".format(cache))
    with LocalIndex(list((tmp_path / "wheels").glob("*.whl"))) as index:
        container = Container(podman, python39_patched, free_port(), *flags, host_network=True,
                              env={"PIP_INDEX_URL": index.url, "MD_WORKERS": "2"}, model=model)
        try:
            container.wait_ready()
            assert post_rows(container, [{"sleep_s": 0}]).json() == [{"mdtest_version": "2.0"}]
            versions = requests.get(container.url("/info"), timeout=5).json()["dependencies"]
            assert versions["gunicorn"] == "23.0.0" and versions["pandas"] == "1.5.1"
            status = container.exec("sh", "-c", "grep -h CapEff /proc/[0-9]*/status | sort -u")
            assert status.split() == ["CapEff:", "0000000000000000"], status
            refused = podman.run("exec", container.name, "touch", "/opt/md/bin/x", check=False)
            assert refused.returncode != 0 and "Read-only file system" in refused.stderr
        finally:
            container.remove()
