"""app: routes in-process through Flask's test client, one error map, and readiness."""

import json

import pytest

from md_runtime.app import create_app
from md_runtime.loader import load_model
from md_runtime.settings import read_settings


@pytest.fixture
def make_client(fixture_models):
    def make(name: str = "misbehaves_on_request", load: bool = True, **settings):
        model_dir = fixture_models / name
        app = create_app(read_settings({}, model_dir=str(model_dir), **settings), load_model(model_dir) if load else None)
        return app.test_client()

    return make


def records(mode="ok", xs=(1, 2)):
    return [{"mode": mode, "x": x} for x in xs]


def assert_error(response, status, kind, fragment):
    assert response.status_code == status, response.data
    body = response.get_json()
    assert body["error"] == kind
    assert fragment in body["message"]


def test_predict_records_split_and_csv_agree(make_client):
    client = make_client()
    by_records = client.post("/predict", json=records(xs=(1, 2, 3))).get_json()
    split = {"columns": ["mode", "x"], "data": [["ok", 1], ["ok", 2], ["ok", 3]]}
    by_split = client.post("/predict", json=split).get_json()
    by_csv = client.post("/predict", data="mode,x\nok,1\nok,2\nok,3\n", content_type="text/csv").get_json()
    assert [row["y"] for row in by_records] == [2, 4, 6]
    assert by_records == by_split == by_csv


def test_accept_csv_returns_csv(make_client):
    response = make_client().post("/predict", json=records(xs=(4,)), headers={"Accept": "text/csv"})
    assert response.content_type.startswith("text/csv")
    assert response.data.decode().splitlines()[0] == "y,pid"


@pytest.mark.parametrize(
    "kwargs,status,kind,fragment",
    [
        (dict(data="[{", content_type="application/json"), 400, "invalid_payload", "as JSON"),
        (dict(data="a=1", content_type="application/x-www-form-urlencoded"), 415, "unsupported_media_type", "send one of"),
        (dict(json=records("raise")), 500, "model_error", "predict() raised ValueError: x must be positive"),
        (dict(json=records("list")), 500, "invalid_model_output", "returned list instead of a pandas DataFrame"),
        (dict(json=records("short")), 500, "invalid_model_output", "returned 1 rows for 2 input rows"),
    ],
)
def test_errors_have_status_kind_and_message_and_the_next_request_succeeds(make_client, kwargs, status, kind, fragment):
    client = make_client()
    assert_error(client.post("/predict", **kwargs), status, kind, fragment)
    assert client.post("/predict", json=records()).status_code == 200


def test_body_over_limit_is_413(make_client):
    client = make_client(max_request_bytes="64")
    assert_error(client.post("/predict", json=records(xs=range(50))), 413, "payload_too_large", "MD_MAX_REQUEST_BYTES")
    assert client.post("/predict", json=records(xs=(1,))).status_code == 200


def test_columns_checked_against_model_yaml(make_client):
    client = make_client("declares_columns")
    assert_error(client.post("/predict", json=[{"a": 1, "z": 2}]), 422, "column_mismatch", "missing columns: b")
    assert client.post("/predict", json=[{"b": 2, "a": 1}]).get_json() == [{"total": 12}]


def test_not_ready_until_model_is_served(make_client):
    client = make_client(load=False)
    assert client.get("/health").status_code == 200
    assert_error(client.get("/ready"), 503, "not_ready", "state: starting")
    assert_error(client.post("/predict", json=records()), 503, "not_ready", "not ready")


def test_ready_and_info(make_client, fixture_models):
    client = make_client("declares_columns")
    assert client.get("/ready").get_json() == {"status": "ready"}
    info = client.get("/info").get_json()
    assert info["model_dir"] == str((fixture_models / "declares_columns").resolve())
    assert info["inputs"] == ["a", "b"] and info["output_columns"] == ["total"]
    assert len(info["package_sha256"]) == 64
    assert info["dependencies"]["pandas"] and info["dependencies"]["flask"] and info["runtime_version"]


def test_unknown_route_and_method_are_json(make_client):
    client = make_client()
    assert_error(client.get("/nope"), 404, "not_found", "URL was not found")
    assert_error(client.get("/predict"), 405, "method_not_allowed", "method is not allowed")


def test_metrics_count_predictions_rows_and_errors(make_client):
    client = make_client()
    client.post("/predict", json=records(xs=(1, 2, 3)))
    client.post("/predict", json=records("raise"))
    client.post("/predict", json=records(xs=(4,)))
    client.get("/health")
    client.get("/metrics")
    text = client.get("/metrics").data.decode()
    assert "md_predict_rows_total 4.0" in text
    assert 'md_predict_errors_total{kind="model_error"} 1.0' in text
    assert "md_predict_seconds_count 3.0" in text
    assert "md_model_load_seconds" in text
    assert 'md_http_request_duration_seconds_count{endpoint="predict",method="POST",status="500"} 1.0' in text
    assert 'md_http_request_duration_seconds_count{endpoint="predict",method="POST",status="200"} 2.0' in text
    assert 'md_http_request_total{method="POST",status="200"} 2.0' in text
    assert 'endpoint="health"' not in text and 'endpoint="prometheus_metrics"' not in text, "probes are not timed"


def test_explanations_are_timed_and_counted_by_declared_name(iris_model_dir):
    client = create_app(read_settings({}, model_dir=str(iris_model_dir)), load_model(iris_model_dir)).test_client()
    row = [{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}]
    assert client.post("/explain/feature_contributions", json=row).status_code == 200
    assert client.post("/explain/made_up_name", json=row).status_code == 404
    text = client.get("/metrics").data.decode()
    assert 'md_explain_seconds_count{explanation="feature_contributions"} 1.0' in text
    assert 'md_explain_seconds_count{explanation="undeclared"} 1.0' in text
    assert 'md_explain_errors_total{kind="not_found"} 1.0' in text and "made_up_name" not in text


def test_a_bug_of_ours_is_a_logged_500_and_the_next_request_is_served(make_client, monkeypatch, caplog):
    from md_runtime import codecs

    client = make_client()
    real_decode = codecs.decode
    monkeypatch.setattr(codecs, "decode", lambda *args: 1 / 0)  # a fault no request can cause
    assert_error(client.post("/predict", json=records()), 500, "internal_error", "internal error: ZeroDivisionError")
    assert "unexpected error while serving POST /predict" in caplog.text and "Traceback" in caplog.text
    monkeypatch.setattr(codecs, "decode", real_decode)
    assert client.post("/predict", json=records()).status_code == 200


def test_response_body_is_plain_json_records(make_client):
    response = make_client().post("/predict", json=records(xs=(1.5,)))
    assert response.content_type == "application/json"
    assert json.loads(response.data)[0]["y"] == 3.0


def test_a_sibling_workers_metrics_file_still_empty_never_fails_a_boot(tmp_path, monkeypatch, fixture_models):
    """Workers boot side by side; one may find another's multiprocess file created but not yet written."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    (tmp_path / "counter_99999.db").touch()
    settings = read_settings({}, model_dir=str(fixture_models / "sums_columns"), metrics_dir=str(tmp_path))
    client = create_app(settings, load_model(fixture_models / "sums_columns")).test_client()
    assert client.post("/predict", json=[{"a": 1}]).get_json() == [{"total": 1}]


# (model, method, path, request, answered by the predict lane rather than Flask)
LANE_CASES = [
    ("misbehaves_on_request", "POST", "/predict", dict(json=records(xs=(1, 2))), True),
    ("misbehaves_on_request", "POST", "/predict", dict(json=records(), headers={"Accept": "text/csv"}), True),
    ("misbehaves_on_request", "POST", "/predict", dict(json=records(), headers={"Accept": "*/*"}), True),
    ("misbehaves_on_request", "POST", "/predict", dict(data="mode,x\nok,1\n", content_type="text/csv"), True),
    ("misbehaves_on_request", "POST", "/predict", dict(data="[{", content_type="application/json"), True),
    ("misbehaves_on_request", "POST", "/predict", dict(data="", content_type="application/json"), True),
    ("misbehaves_on_request", "POST", "/predict", dict(data="a=1", content_type="text/plain"), True),
    ("misbehaves_on_request", "POST", "/predict", dict(json=records("raise")), True),
    ("misbehaves_on_request", "POST", "/predict", dict(json=records("list")), True),
    ("misbehaves_on_request", "POST", "/predict", dict(json=records(xs=range(100))), True),  # 413
    ("declares_columns", "POST", "/predict", dict(json=[{"a": 1, "b": 2, "z z": 3}]), True),  # a dropped column
    ("declares_columns", "POST", "/predict", dict(json=[{"a": 1}]), True),  # 422
    ("misbehaves_on_request", "POST", "/predict", dict(json=records(), headers={"Accept": "text/html"}), False),
    ("misbehaves_on_request", "POST", "/predict", dict(json=records(), headers={"Accept": "text/csv;q=0.5, */*"}), False),
    ("misbehaves_on_request", "POST", "/predict", dict(data=b"x", headers={"Content-Encoding": "gzip"}), True),
    ("misbehaves_on_request", "POST", "/predict/", dict(json=records()), False),
    ("misbehaves_on_request", "GET", "/predict", {}, False),
    ("misbehaves_on_request", "POST", "/invocations", dict(json=records()), False),
]


def lane_app(fixture_models, name):
    model_dir = fixture_models / name
    app = create_app(read_settings({}, model_dir=str(model_dir), max_request_bytes="1000"), load_model(model_dir))
    lane = app.wsgi_app
    flask_wsgi, lane.flask_calls = lane.flask, []
    lane.flask = lambda environ, start_response: lane.flask_calls.append(1) or flask_wsgi(environ, start_response)
    return app, lane, flask_wsgi


def answer(wsgi, method, path, request):
    from werkzeug.test import Client

    response = Client(wsgi).open(path, method=method, **request)
    return response.status_code, sorted((name.lower(), value) for name, value in response.headers.items()), response.data


@pytest.mark.parametrize("name, method, path, request_, in_lane", LANE_CASES)
def test_the_predict_lane_answers_as_the_flask_route_does(fixture_models, name, method, path, request_, in_lane):
    _, lane, flask_wsgi = lane_app(fixture_models, name)
    by_lane = answer(lane, method, path, request_)
    assert not lane.flask_calls == in_lane, "the lane answered" if lane.flask_calls else "Flask answered"
    assert by_lane == answer(flask_wsgi, method, path, request_)


def test_the_predict_lane_counts_in_the_metrics_as_the_flask_route_does(fixture_models):
    counted = []
    for use_lane in (True, False):
        app, lane, flask_wsgi = lane_app(fixture_models, "misbehaves_on_request")
        for _, method, path, request_, _ in [case for case in LANE_CASES if case[0] == "misbehaves_on_request"]:
            answer(lane if use_lane else flask_wsgi, method, path, request_)
        text = app.test_client().get("/metrics").data.decode()
        counted.append(sorted(line for line in text.splitlines() if line.startswith("md_")
                              and ("_total" in line or "_count" in line) and "model_load" not in line))
    assert any('status="413"' in line for line in counted[0]) and any('kind="model_error"' in line for line in counted[0])
    assert counted[0] == counted[1]
