"""The ecosystem's protocols on the real server: Open Inference Protocol v2 (driven by tritonclient),
SageMaker's /ping and /invocations, MLflow scoring payloads, and custom explanations."""

import io
import json

import joblib
import numpy as np
import pandas as pd
import pytest

from md_runtime.app import create_app
from md_runtime.inference_protocol import model_metadata
from md_runtime.loader import load_model
from md_runtime.settings import read_settings
from md_runtime.spec import ModelSpec
from support import FIXTURE_MODELS, Server

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
OUTPUTS = ["proba_setosa", "proba_versicolor", "proba_virginica"]


@pytest.fixture(scope="module")
def server(iris_model_dir):
    with Server(iris_model_dir, "--workers", "2").wait_ready() as running:
        yield running


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(1)
    return pd.DataFrame(rng.uniform(0.1, 7.0, size=(9, 4)).round(3), columns=FEATURES)


@pytest.fixture(scope="module")
def expected(iris_model_dir, rows):
    return joblib.load(iris_model_dir / "model.joblib").predict_proba(rows)


def served_frame(response):
    assert response.status_code == 200, response.text
    return pd.DataFrame(response.json())[OUTPUTS].values


# --- Open Inference Protocol v2, with a real client ----------------------------------------------------------


@pytest.fixture(scope="module")
def triton(server):
    httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the test extras")
    client = httpclient.InferenceServerClient(url=server.url.replace("http://", ""))
    yield httpclient, client
    client.close()


def test_v2_health_and_metadata_through_tritonclient(triton):
    _, client = triton
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("iris")
    assert not client.is_model_ready("not-iris")
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    metadata = client.get_model_metadata("iris")
    assert [i["name"] for i in metadata["inputs"]] == FEATURES
    assert [o["name"] for o in metadata["outputs"]] == OUTPUTS
    assert {i["shape"][0] for i in metadata["inputs"]} == {-1}


@pytest.mark.parametrize("binary", [True, False], ids=["binary-tensors", "json-tensors"])
def test_v2_infer_one_tensor_per_column(triton, rows, expected, binary):
    httpclient, client = triton
    inputs = []
    for column in FEATURES:
        tensor = httpclient.InferInput(column, [len(rows)], "FP64")
        tensor.set_data_from_numpy(rows[column].to_numpy(), binary_data=binary)
        inputs.append(tensor)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in OUTPUTS]
    result = client.infer("iris", inputs, outputs=outputs, request_id="req-7")
    assert result.get_response()["id"] == "req-7"
    served = np.column_stack([result.as_numpy(name) for name in OUTPUTS])
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-12)


def test_v2_infer_one_2d_tensor_takes_model_yaml_column_names(triton, rows, expected):
    httpclient, client = triton
    tensor = httpclient.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows.to_numpy(np.float32))  # binary, as tritonclient sends by default
    result = client.infer("iris", [tensor])  # no outputs named: all of them, in binary
    assert [o["name"] for o in result.get_response()["outputs"]] == OUTPUTS
    assert result.as_numpy("proba_virginica").dtype == np.float64
    np.testing.assert_allclose(result.as_numpy("proba_setosa"), expected[:, 0], atol=1e-6)


def test_v2_errors_reach_the_client_as_their_message(triton, rows):
    httpclient, client = triton
    from tritonclient.utils import InferenceServerException

    tensor = httpclient.InferInput("input", list(rows.shape), "FP64")
    tensor.set_data_from_numpy(rows.to_numpy())
    with pytest.raises(InferenceServerException, match="no model named 'other'; this server serves 'iris'"):
        client.infer("other", [tensor])
    with pytest.raises(InferenceServerException, match="no output named nope; the outputs are: proba_setosa"):
        client.infer("iris", [tensor], outputs=[httpclient.InferRequestedOutput("nope")])
    three = httpclient.InferInput("input", [2, 3], "FP64")
    three.set_data_from_numpy(np.ones((2, 3)))
    with pytest.raises(InferenceServerException, match="'input' has 3 columns; name them"):
        client.infer("iris", [three])


def test_v2_error_bodies_and_bad_tensors(server):
    url = "/v2/models/iris/infer"
    cases = {
        "no inputs": ({"inputs": []}, "expected {\"inputs\""),
        "bad datatype": ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP128", "data": [1]}]}, "datatype 'FP128'"),
        "wrong count": ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP64", "data": [1]}]}, "has 1 values, but shape [2] holds 2"),
        "not numbers": ({"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": ["a"]}]}, "are not INT64 values"),
        "3-D": ({"inputs": [{"name": "x", "shape": [1, 2, 2], "datatype": "FP64", "data": [1, 2, 3, 4]}]}, "shape [1, 2, 2]"),
    }
    for name, (body, message) in cases.items():
        response = server.post(url, json=body)
        assert response.status_code == 400, (name, response.text)
        assert list(response.json()) == ["error"] and message in response.json()["error"], name
    missing = server.post(url, json={"inputs": [{"name": "sepal_length", "shape": [1], "datatype": "FP64", "data": [1.0]}]})
    assert missing.status_code == 422 and "missing columns: petal_length" in missing.json()["error"]
    assert server.get("/v2/models/other").status_code == 404
    unrouted = server.get("/v2/nothing-here")
    assert unrouted.status_code == 404 and list(unrouted.json()) == ["error"]  # the v2 error shape, even from Flask
    assert server.get("/health").status_code == 200  # the workers survived all of it


# --- SageMaker and MLflow ------------------------------------------------------------------------------------


def test_sagemaker_ping_and_csv_invocations_with_and_without_header(server, rows, expected):
    assert server.get("/ping").status_code == 200
    headerless = rows.to_csv(index=False, header=False)
    for body in (headerless, rows.to_csv(index=False)):
        response = server.post("/invocations", data=body, headers={"Content-Type": "text/csv"})
        np.testing.assert_allclose(served_frame(response), expected, rtol=0, atol=1e-14)
    as_csv = server.post("/invocations", data=headerless, headers={"Content-Type": "text/csv", "Accept": "text/csv"})
    assert as_csv.headers["Content-Type"].startswith("text/csv")
    np.testing.assert_allclose(pd.read_csv(io.StringIO(as_csv.text))[OUTPUTS].values, expected, atol=1e-12)
    explicit = server.post("/invocations", data=headerless, headers={"Content-Type": "text/csv; header=absent"})
    assert explicit.status_code == 200
    narrow = server.post("/invocations", data="1,2\n3,4\n", headers={"Content-Type": "text/csv"})
    assert narrow.status_code == 422 and "missing columns" in narrow.json()["message"]


def mlflow_payloads(rows):
    return {
        "dataframe_split": {"dataframe_split": {"columns": FEATURES, "data": rows.values.tolist(), "index": list(range(len(rows)))}},
        "dataframe_records": {"dataframe_records": rows.to_dict(orient="records")},
        "instances as records": {"instances": rows.to_dict(orient="records")},
        "inputs as columns": {"inputs": rows.to_dict(orient="list")},
        "instances as a tensor": {"instances": rows.values.tolist()},
        "inputs with params": {"inputs": rows.to_dict(orient="list"), "params": {"ignored": 1}},
    }


@pytest.mark.parametrize("path", ["/invocations", "/predict"])
def test_mlflow_scoring_payloads(server, rows, expected, path):
    for name, payload in mlflow_payloads(rows).items():
        response = server.post(path, json=payload)
        np.testing.assert_allclose(served_frame(response), expected, rtol=0, atol=1e-14, err_msg=name)


def test_mlflow_payload_mistakes_are_named(server, rows):
    cases = {
        "two keys": ({"instances": [], "inputs": []}, "more than one of instances, inputs; send exactly one"),
        "ragged rows": ({"instances": [[1, 2], [3]]}, "rows must all be lists of one length"),
        "ragged columns": ({"inputs": {"a": [1, 2], "b": [1]}}, "all of one length"),
        "split without data": ({"dataframe_split": {"columns": FEATURES}}, 'expected {"columns"'),
        "unknown key": ({"rows": []}, "dataframe_split, dataframe_records, instances, inputs"),
    }
    for name, (payload, message) in cases.items():
        response = server.post("/invocations", json=payload)
        assert response.status_code == 400, (name, response.text)
        assert message in response.json()["message"], name


# --- custom explanations -------------------------------------------------------------------------------------


def test_custom_explanation_equals_the_model_in_process(server, iris_model_dir, rows):
    pipeline = joblib.load(iris_model_dir / "model.joblib")
    scaled = pipeline[0].transform(rows)
    expected = scaled * pipeline[-1].coef_[pipeline[-1].predict(scaled)]
    response = server.post("/explain/feature_contributions", json=rows.to_dict(orient="records"))
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(pd.DataFrame(response.json())[FEATURES].values, expected, atol=1e-12)
    unknown = server.post("/explain/shap", json=rows.to_dict(orient="records"))
    assert unknown.status_code == 404
    assert unknown.json()["message"] == "no explanation named 'shap'; available: feature_contributions"


def in_process(model_dir):
    """The app without a server: for tests whose subject is a route, not the process."""
    return create_app(read_settings({}, model_dir=str(model_dir)), load_model(model_dir)).test_client()


def test_explain_without_explain_custom_is_404_saying_how_to_add_it():
    response = in_process(FIXTURE_MODELS / "sums_columns").post("/explain/anything", json=[{"a": 1, "b": 2}])
    assert response.status_code == 404
    assert "define explain_custom(explanation_name, input_df)" in response.get_json()["message"]


def test_v2_metadata_comes_from_the_first_prediction_without_model_yaml():
    client = in_process(FIXTURE_MODELS / "sums_columns")
    before = client.get("/v2/models/sums_columns").get_json()
    assert before["inputs"] == [] and before["outputs"] == []
    assert client.post("/predict", json=[{"a": 1, "b": 2.5, "label": "x"}]).status_code == 200
    after = client.get("/v2/models/sums_columns").get_json()
    assert after["inputs"] == [
        {"name": "a", "datatype": "INT64", "shape": [-1]},
        {"name": "b", "datatype": "FP64", "shape": [-1]},
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
    ]
    assert after["outputs"] == [{"name": "total", "datatype": "FP64", "shape": [-1]}]


def test_v2_metadata_datatypes_from_model_yaml_data_types(tmp_path):
    (tmp_path / "model.yaml").write_text(
        "model:\n  inputs: [{column-name: age, data-type: int}, {column-name: city, data-type: category}]\n"
        "  outputs: [{column-name: score, data-type: float}]\n"
    )
    spec = ModelSpec.read(tmp_path)
    metadata = model_metadata("m", spec.types, spec.inputs, spec.outputs, None)
    assert [(t["name"], t["datatype"]) for t in metadata["inputs"]] == [("age", "INT64"), ("city", "BYTES")]
    assert [(t["name"], t["datatype"]) for t in metadata["outputs"]] == [("score", "FP64")]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_v2_output_datatypes_decode_in_tritonclient(binary):
    """Each column dtype becomes its v2 datatype; tritonclient's own parser reads the body back."""
    httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the test extras")
    from md_runtime.inference_protocol import InferRequest, encode_infer

    frame = pd.DataFrame({
        "flag": [True, False],
        "count": np.array([3, -4], dtype=np.int32),
        "score": [0.5, np.nan],
        "label": ["a", "é"],
        "when": pd.to_datetime(["2026-01-02 03:04:05", "2026-11-24 00:00:00"]),
    })
    body, headers = encode_infer("m", InferRequest("x", frame, None, binary), frame)
    result = httpclient.InferResult.from_response_body(body, header_length=int(headers.get("Inference-Header-Content-Length", 0)) or None)
    datatypes = {o["name"]: o["datatype"] for o in result.get_response()["outputs"]}
    assert datatypes == {"flag": "BOOL", "count": "INT32", "score": "FP64", "label": "BYTES", "when": "BYTES"}
    assert result.as_numpy("flag").tolist() == [True, False]
    assert result.as_numpy("count").tolist() == [3, -4]
    score = result.as_numpy("score")
    assert score[0] == 0.5 and np.isnan(score[1])  # JSON carries null, the client reads it as NaN
    text = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label").tolist()]
    assert text == ["a", "é"]
    when = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("when").tolist()]
    assert when[0].startswith("2026-01-02T03:04:05") and when[1].startswith("2026-11-24T00:00:00")


@pytest.mark.parametrize("shape", [[0, 1810816360127481826, 17087], [2 ** 62, 4, 0], [2 ** 62, 4]])
def test_v2_shapes_whose_product_overflows_are_400_not_500(shape):
    """The 500-example fuzz on the images' numpy found these: np.prod wrapped around and reshape raised."""
    from md_runtime.errors import PayloadError
    from md_runtime.inference_protocol import decode_infer

    body = json.dumps({"inputs": [{"name": "a", "shape": shape, "datatype": "INT64", "data": []}]}).encode()
    with pytest.raises(PayloadError, match="input 'a'"):
        decode_infer(body, None)
