"""serve: the real `md-runtime serve` (gunicorn, 2 gevent workers) on 127.0.0.1, end to end."""

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata

import joblib
import numpy as np
import pandas as pd
import pytest
import requests

from md_runtime.boot.run_dir import RunDir
from support import FIXTURE_MODELS, Server, runtime_env

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


@pytest.fixture(scope="module")
def iris_server(iris_model_dir):
    server = Server(iris_model_dir, "--workers", "2").wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def misbehaving_server():
    server = Server(FIXTURE_MODELS / "misbehaves_on_request", "--workers", "2").wait_ready()
    yield server
    server.stop()


def iris_rows(n=12):
    rng = np.random.default_rng(0)
    return pd.DataFrame(rng.uniform(0.1, 7.0, size=(n, 4)).round(3), columns=FEATURES)


def metric(server, line_prefix):
    for line in server.get("/metrics").text.splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_predictions_equal_in_process_model_for_records_split_and_csv(iris_server, iris_model_dir):
    rows = iris_rows()
    expected = joblib.load(iris_model_dir / "model.joblib").predict_proba(rows)
    bodies = {
        "records": dict(json=rows.to_dict(orient="records")),
        "split": dict(json={"columns": FEATURES, "data": rows.values.tolist()}),
        "csv": dict(data=rows.to_csv(index=False), headers={"Content-Type": "text/csv"}),
    }
    for name, body in bodies.items():
        response = iris_server.post("/predict", **body)
        assert response.status_code == 200, (name, response.text)
        served = pd.DataFrame(response.json())
        assert list(served.columns) == ["proba_setosa", "proba_versicolor", "proba_virginica"]
        np.testing.assert_allclose(served.values, expected, rtol=0, atol=1e-14, err_msg=name)


def test_csv_response_when_accepted(iris_server, iris_model_dir):
    rows = iris_rows(3)
    response = iris_server.post("/predict", json=rows.to_dict(orient="records"), headers={"Accept": "text/csv"})
    assert response.headers["Content-Type"].startswith("text/csv")
    served = pd.read_csv(__import__("io").StringIO(response.text))
    expected = joblib.load(iris_model_dir / "model.joblib").predict_proba(rows)
    np.testing.assert_allclose(served.values, expected, rtol=1e-12)


def test_health_ready_info(iris_server, iris_model_dir):
    assert iris_server.get("/health").json() == {"status": "alive"}
    assert iris_server.get("/ready").json() == {"status": "ready"}
    info = iris_server.get("/info").json()
    assert info["model_dir"] == str(iris_model_dir)
    assert info["inputs"] == FEATURES
    assert info["output_columns"] == ["proba_setosa", "proba_versicolor", "proba_virginica"]
    assert info["dependencies"]["gunicorn"] and info["dependencies"]["gevent"]


@pytest.mark.parametrize(
    "body,status,kind,fragment",
    [
        (dict(data="[{oops", headers={"Content-Type": "application/json"}), 400, "invalid_payload", "as JSON"),
        (dict(data="a,b\n1,2\n3,4,5,6\n", headers={"Content-Type": "text/csv"}), 400, "invalid_payload", "as CSV"),
        (dict(data="x=1", headers={"Content-Type": "application/x-www-form-urlencoded"}), 415, "unsupported_media_type", "application/json"),
        (dict(json=[{"sepal_length": 1.0}]), 422, "column_mismatch", "missing columns: petal_length, petal_width, sepal_width"),
    ],
)
def test_request_errors_and_the_next_request_succeeds(iris_server, body, status, kind, fragment):
    response = iris_server.post("/predict", **body)
    assert response.status_code == status, response.text
    assert response.json()["error"] == kind and fragment in response.json()["message"]
    assert iris_server.post("/predict", json=iris_rows(1).to_dict(orient="records")).status_code == 200


@pytest.mark.parametrize(
    "mode,kind,fragment",
    [
        ("raise", "model_error", "predict() raised ValueError: x must be positive, got 1"),
        ("list", "invalid_model_output", "returned list instead of a pandas DataFrame"),
        ("short", "invalid_model_output", "returned 1 rows for 2 input rows"),
    ],
)
def test_model_faults_are_500_without_traceback_and_the_worker_survives(misbehaving_server, mode, kind, fragment):
    response = misbehaving_server.post("/predict", json=[{"mode": mode, "x": 1}, {"mode": mode, "x": 2}])
    assert response.status_code == 500
    assert response.json() == {"error": kind, "message": response.json()["message"]}
    assert fragment in response.json()["message"] and "Traceback" not in response.text
    assert misbehaving_server.post("/predict", json=[{"mode": "ok", "x": 3}]).json()[0]["y"] == 6


def test_body_over_limit_is_413(tmp_path):
    server = Server(FIXTURE_MODELS / "sums_columns", "--workers", "1", "--max-request-bytes", "1000").wait_ready()
    try:
        response = server.post("/predict", json=[{"a": i} for i in range(200)])
        assert response.status_code == 413 and response.json()["error"] == "payload_too_large"
        assert server.post("/predict", json=[{"a": 1}]).json() == [{"total": 1}]
    finally:
        server.stop()
    assert "gunicorn.access" not in server.output(), "the access log is off unless asked for"


def test_metrics_aggregate_requests_served_by_both_workers(misbehaving_server):
    rows_before = metric(misbehaving_server, "md_predict_rows_total")
    pids, sent_rows = set(), 0

    def call(i):
        rows = [{"mode": "ok", "x": i, "busy_ms": 30}, {"mode": "ok", "x": i, "busy_ms": 30}]
        return misbehaving_server.post("/predict", json=rows).json()

    with ThreadPoolExecutor(8) as pool:
        for _ in range(10):  # bounded: stop as soon as both workers have answered
            for result in pool.map(call, range(8)):
                pids.update(row["pid"] for row in result)
                sent_rows += len(result)
            if len(pids) >= 2:
                break
    assert len(pids) == 2, "requests never reached the second worker"
    assert metric(misbehaving_server, "md_predict_rows_total") - rows_before == sent_rows
    text = misbehaving_server.get("/metrics").text
    assert 'md_http_request_duration_seconds_count{endpoint="predict",method="POST",status="200"}' in text


@pytest.mark.parametrize(
    "name,exit_code,message",
    [
        ("no_get_model", 4, "package.py: no get_model() function; define `def get_model():`"),
        ("get_model_raises", 4, "get_model() raised FileNotFoundError: weights.bin is missing"),
        ("no_package_py", 4, "no package.py found"),
    ],
)
def test_boot_failure_exits_non_zero_with_one_last_line(name, exit_code, message):
    server = Server(FIXTURE_MODELS / name, "--workers", "2")
    assert server.wait_exit() == exit_code, server.output()
    last_line = server.output().strip().splitlines()[-1]
    assert last_line.startswith("md-runtime: error: ") and message in last_line, server.output()


def test_invalid_setting_exits_3_naming_the_variable():
    server = Server(FIXTURE_MODELS / "sums_columns", env=runtime_env(MD_WORKER_CONNECTIONS="lots"))
    assert server.wait_exit() == 3
    assert server.output().strip().splitlines()[-1].startswith("md-runtime: error: MD_WORKER_CONNECTIONS='lots' is invalid")


def test_json_logs_are_one_object_per_line():
    server = Server(FIXTURE_MODELS / "misbehaves_on_request", "--workers", "1", "--access-log",
                    env=runtime_env(MD_LOG_FORMAT="json")).wait_ready()
    try:
        server.post("/predict", json=[{"mode": "raise", "x": -1}])
    finally:
        server.stop()
    events = [json.loads(line) for line in server.output().splitlines() if line.strip()]
    assert any(e["logger"] == "gunicorn.access" for e in events)
    failure = [e for e in events if "predict() raised" in e["message"]]
    assert failure and "x must be positive" in failure[0]["message"]


def test_sigterm_drains_the_in_flight_request():
    server = Server(FIXTURE_MODELS / "misbehaves_on_request", "--workers", "1").wait_ready()
    result = {}

    def slow_request():
        result["response"] = server.post("/predict", json=[{"mode": "ok", "x": 1, "busy_ms": 1500}])

    caller = threading.Thread(target=slow_request)
    caller.start()
    try:
        deadline = 50
        while deadline and busy_serving(server) is False:
            deadline -= 1
        server.process.send_signal(signal.SIGTERM)
        caller.join(30)
        assert result["response"].status_code == 200 and result["response"].json()[0]["y"] == 2
        assert server.process.wait(20) == 0
    finally:
        server.stop()


def test_sigterm_turns_ready_off_at_once_and_serves_new_requests_through_the_drain():
    server = Server(FIXTURE_MODELS / "sums_columns", "--workers", "1", "--drain-seconds", "5").wait_ready()
    try:
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # the master forwards the signal to the worker within milliseconds; from then on /ready is 503
        assert eventually(lambda: requests.get(server.url + "/ready", timeout=5).status_code == 503, seconds=2)
        not_ready = requests.get(server.url + "/ready", timeout=5)
        assert not_ready.status_code == 503
        assert not_ready.json() == {"error": "not_ready", "message": "the model is not ready (state: draining)"}
        served = 0
        while time.monotonic() - signalled < 4:  # inside the drain: every new request is served
            assert requests.post(server.url + "/predict", json=[{"a": 1}], timeout=5).json() == [{"total": 1}]
            served += 1
        assert served > 0
        assert server.process.wait(30) == 0
        with pytest.raises(requests.ConnectionError):
            requests.get(server.url + "/health", timeout=2)
    finally:
        server.stop()
    assert "draining for 5 s (MD_DRAIN_SECONDS) before stopping" in server.output()


def busy_serving(server) -> bool:
    """True once the slow request is being served (the only worker is busy, so /health must wait)."""
    try:
        requests.get(server.url + "/health", timeout=0.2)
        return False
    except requests.Timeout:
        return True


def eventually(check, seconds: float = 10.0) -> bool:
    """True as soon as `check()` is (gunicorn's master starts its control socket after the workers serve)."""
    end = time.monotonic() + seconds
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True


def test_run_files_stay_in_the_metrics_directory_which_goes_at_exit_unless_the_user_named_it(tmp_path):
    made_in, named, home = tmp_path / "tmp", tmp_path / "named", tmp_path / "home"
    made_in.mkdir()
    home.mkdir()
    gunicorn_has_control_socket = int(metadata.version("gunicorn").split(".")[0]) >= 25
    for extra, made in (({}, 1), ({"MD_METRICS_DIR": str(named)}, 0)):
        env = runtime_env(TMPDIR=str(made_in), HOME=str(home), **extra)
        env.pop("XDG_RUNTIME_DIR", None)
        server = Server(FIXTURE_MODELS / "sums_columns", "--workers", "1", env=env)
        try:
            assert server.wait_ready().post("/predict", json=[{"a": 1}]).json() == [{"total": 1}]
            run_dirs = [named] if extra else list(made_in.glob("md-runtime-metrics-*"))
            assert len(run_dirs) == 1 and len(list(made_in.glob("md-runtime-metrics-*"))) == made
            control_socket = run_dirs[0] / "gunicorn.ctl"
            if gunicorn_has_control_socket and RunDir(run_dirs[0]).control_socket is not None:
                assert eventually(control_socket.is_socket), server.output()[-2000:]
            else:  # an old gunicorn, or a path too long for a unix socket (pytest-xdist's temporary paths)
                assert not control_socket.exists()
            assert "Control server error" not in server.output()
        finally:
            server.stop()
    assert list(made_in.glob("md-runtime-metrics-*")) == [], "the server's own temporary directory is removed"
    assert list(named.glob("*.db")), "a directory the user named keeps its metrics"
    assert list(home.iterdir()) == [], "nothing written to the home directory"


def waiting_server(**settings: str) -> Server:
    return Server(FIXTURE_MODELS / "waits", env=runtime_env(MD_REQUEST_TIMEOUT="1", MD_WORKERS="1", **settings))


def assert_timed_out_then_served(server: Server, answer: requests.Response) -> None:
    assert answer.status_code == 504, answer.text
    assert answer.json() == {
        "error": "predict_timeout",
        "message": "predict() did not finish within 1 s (MD_REQUEST_TIMEOUT); the model may be waiting on "
                   "something (a network call, a lock)",
    }
    assert server.get("/ready").status_code == 200
    assert server.post("/predict", json=[{"a": 3, "wait": 0}]).json() == [{"total": 3}]
    assert metric(server, 'md_predict_errors_total{kind="predict_timeout"}') >= 1
    assert "predict() did not finish within 1 s (MD_REQUEST_TIMEOUT): answered 504" in server.output()


def test_a_predict_that_waits_past_md_request_timeout_is_504_logged_and_counted_while_others_are_served():
    with waiting_server() as server:
        server.wait_ready()
        with ThreadPoolExecutor(2) as pool:
            stuck = pool.submit(server.post, "/predict", json=[{"a": 1, "wait": 30}])
            served = pool.submit(server.post, "/predict", json=[{"a": 2, "wait": 0}])
            assert served.result().json() == [{"total": 2}]
            assert_timed_out_then_served(server, stuck.result())


def test_a_batch_that_waits_past_md_request_timeout_fails_alone_and_the_next_batch_runs():
    with waiting_server(MD_MAX_BATCH_SIZE="8") as server:
        server.wait_ready()
        assert_timed_out_then_served(server, server.post("/predict", json=[{"a": 1, "wait": 30}]))


def test_a_worker_busy_on_the_cpu_past_md_timeout_is_replaced():
    env = runtime_env(MD_TIMEOUT="2", MD_WORKERS="1")
    with Server(FIXTURE_MODELS / "waits", env=env) as server:
        server.wait_ready()
        with pytest.raises(requests.ConnectionError):
            server.post("/predict", json=[{"a": 1, "spin": 60}])
        server.wait_ready()
        assert server.post("/predict", json=[{"a": 2}]).json() == [{"total": 2}]
        assert "WORKER TIMEOUT" in server.output()


def test_tiny_floats_are_not_flushed_to_zero():
    """gevent 21.12 (the images' pin) is linked with -ffast-math; a served model must still compute IEEE floats."""
    smallest_normal = 2.2250738585072014e-308
    with Server(FIXTURE_MODELS / "halves", "--workers", "1") as server:
        server.wait_ready()
        split = {"columns": ["x"], "data": [[smallest_normal]]}
        half = server.post("/predict", json=split).json()[0]["half"]
        assert half == pytest.approx(smallest_normal / 2, rel=1e-12) and half != 0.0
