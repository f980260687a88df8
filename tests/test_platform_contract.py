"""The platform's package.py contract: model directories written as its docs and client write them, trained
here and served unchanged by a real server (records, split and CSV), plus model.yaml from ModelInfo.to_dict(),
relative imports and the platform's integrated-gradients hooks."""

import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from md_runtime.app import DROPPED_COLUMNS_HEADER, create_app
from md_runtime.integrated_gradients import completeness_error_pct, integrate
from md_runtime.loader import load_model
from md_runtime.spec import ModelSpec
from md_runtime.settings import read_settings
from support import FIXTURE_MODELS, Server, md_runtime

ROWS = pd.DataFrame({"age": [25, 40, 58], "income": [1200.0, 2500.0, 4800.0], "city": ["a", "c", "b"]})


def copy_fixture(name, tmp_path):
    return Path(shutil.copytree(str(FIXTURE_MODELS / name), str(tmp_path / name)))


def post_three_ways(server, frame, **headers):
    """The same rows as JSON records, JSON split and CSV: (the three answers, the three responses)."""
    records = server.post("/predict", data=frame.to_json(orient="records"), headers=dict(headers, **{"Content-Type": "application/json"}))
    split = server.post("/predict", data=frame.to_json(orient="split", index=False), headers=dict(headers, **{"Content-Type": "application/json"}))
    csv = server.post("/predict", data=frame.to_csv(index=False), headers=dict(headers, **{"Content-Type": "text/csv"}))
    responses = [records, split, csv]
    assert [r.status_code for r in responses] == [200, 200, 200], [r.text for r in responses]
    return [pd.DataFrame(r.json()) for r in responses], responses


@pytest.fixture(scope="module")
def xgboost_model(tmp_path_factory):
    xgb = pytest.importorskip("xgboost")
    model_dir = copy_fixture("platform_xgboost", tmp_path_factory.mktemp("xgb"))
    rng = np.random.default_rng(0)
    features = pd.DataFrame(rng.normal(size=(200, 3)), columns=["age", "hours", "education"])
    labels = (features["age"] + features["hours"] > 0).astype(int)
    booster = xgb.train({"objective": "binary:logistic", "max_depth": 3}, xgb.DMatrix(features, label=labels), 10)
    with open(str(model_dir / "xgboost_model.pkl"), "wb") as out:
        pickle.dump(booster, out)
    return model_dir, booster, features.head(4)


def test_docs_xgboost_pattern_with_a_dmatrix_transform_input(xgboost_model):
    import xgboost as xgb

    model_dir, booster, rows = xgboost_model
    expected = booster.predict(xgb.DMatrix(rows))
    with Server(model_dir, "--workers", "1") as server:
        server.wait_ready()
        answers, _ = post_three_ways(server, rows)
    for answer in answers:
        np.testing.assert_allclose(answer["probability_over_50k"], expected, rtol=1e-6)


@pytest.fixture(scope="module")
def encoder_model(tmp_path_factory):
    from sklearn.linear_model import LogisticRegression

    model_dir = copy_fixture("platform_encoder", tmp_path_factory.mktemp("encoder"))
    rng = np.random.default_rng(1)
    train = pd.DataFrame({"age": rng.integers(20, 61, 300), "income": rng.uniform(1000, 5000, 300),
                          "city": rng.integers(0, 3, 300)})
    labels = (train["income"] / 1000 + train["city"] - train["age"] / 20 > 2.5).astype(int)
    classifier = LogisticRegression(max_iter=1000).fit(train, labels)
    with open(str(model_dir / "model.pkl"), "wb") as out:
        pickle.dump(classifier, out)
    encoded = ROWS.assign(city=ROWS["city"].map({"a": 0, "b": 1, "c": 2}))
    return model_dir, classifier.predict_proba(encoded)[:, 1], classifier


def test_encoder_transform_input_runs_once_and_extra_columns_are_dropped(encoder_model):
    model_dir, expected, _ = encoder_model
    with_target = ROWS.assign(label=[0, 1, 1], row_id=["r1", "r2", "r3"])
    with Server(model_dir, "--workers", "1", "--log-level", "debug") as server:
        server.wait_ready()
        answers, responses = post_three_ways(server, with_target)
        missing = server.post("/predict", json=[{"age": 30, "income": 2000.0}])
        output = server.output()
    for answer, response in zip(answers, responses):
        np.testing.assert_allclose(answer["proba"], expected, rtol=1e-9)
        assert response.headers[DROPPED_COLUMNS_HEADER] == "label,row_id"
    assert "dropped columns model.yaml does not declare as inputs: label, row_id" in output
    assert missing.status_code == 422 and "missing columns: city" in missing.json()["message"]


def test_check_predicts_on_rows_generated_from_the_platform_model_yaml(encoder_model):
    model_dir, _, _ = encoder_model
    result = md_runtime("check", str(model_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "predict: 3 rows in (generated from model.yaml's inputs) -> 3 rows out" in result.stdout


def test_dropped_column_names_reach_the_header_encoded_and_bounded(encoder_model):
    model_dir, expected, _ = encoder_model
    client = create_app(read_settings({}, model_dir=str(model_dir)), load_model(model_dir)).test_client()
    odd = ROWS.assign(**{"naïve\r\nSet-Cookie: x": 1, "a,b": 2})
    response = client.post("/predict", data=odd.to_json(orient="records"), content_type="application/json")
    assert response.status_code == 200, response.data
    assert response.headers[DROPPED_COLUMNS_HEADER] == "na%C3%AFve%0D%0ASet-Cookie%3A%20x,a%2Cb"
    wide = ROWS.assign(**{"extra_{}".format(i): 0 for i in range(60)})
    response = client.post("/predict", data=wide.to_json(orient="records"), content_type="application/json")
    names = response.headers[DROPPED_COLUMNS_HEADER].split(",")
    assert len(names) == 51 and names[-1] == "...10 more"
    np.testing.assert_allclose(pd.DataFrame(response.get_json())["proba"], expected, rtol=1e-9)


def test_model_yaml_from_model_info_to_dict_is_read_whole(encoder_model):
    model_dir, _, classifier = encoder_model
    spec = ModelSpec.read(model_dir)
    assert spec.inputs == ["age", "income", "city"] and spec.outputs == ["proba"]
    assert spec.explanations == ["contributions"]
    assert spec.platform_info() == {"task": "binary_classification", "targets": ["label"], "target_class_order": [0, 1]}
    client = create_app(read_settings({}, model_dir=str(model_dir)), load_model(model_dir)).test_client()
    info = client.get("/info").get_json()
    assert info["model"] == spec.platform_info()
    metadata = client.get("/v2/models/platform_encoder").get_json()
    assert metadata["parameters"]["target_class_order"] == [0, 1] and metadata["parameters"]["task"] == "binary_classification"
    explained = client.post("/explain/contributions", json=ROWS.to_dict(orient="records"))
    assert explained.status_code == 200, explained.data
    encoded = ROWS.assign(city=ROWS["city"].map({"a": 0, "b": 1, "c": 2}))
    np.testing.assert_allclose(pd.DataFrame(explained.get_json()).to_numpy(), encoded.to_numpy() * classifier.coef_[0])
    other = client.post("/explain/shap_values", json=ROWS.to_dict(orient="records"))
    assert other.status_code == 404 and "available: contributions" in other.get_json()["message"]


def test_relative_imports_in_a_package_model_directory():
    model = load_model(FIXTURE_MODELS / "relative_imports")
    assert model.predict(pd.DataFrame({"x": [1, 2]}))["scaled"].tolist() == [3, 6]


# --- integrated gradients -----------------------------------------------------------------------------


def test_integrated_gradients_of_a_linear_model_over_http():
    model_dir = FIXTURE_MODELS / "linear_ig"
    client = create_app(read_settings({}, model_dir=str(model_dir)), load_model(model_dir)).test_client()
    rows = [{"a": 3.0, "b": -2.0, "c": 10.0}, {"a": 0.5, "b": 4.0, "c": -1.0}]
    for name in ("ig", "ig_flex"):
        response = client.post("/explain/" + name, json=rows)
        assert response.status_code == 200, response.data
        body = response.get_json()
        for row, attributions in zip(rows, body["explanation"]["score"]):
            for column, weight in zip("abc", (2.0, -3.0, 0.5)):
                assert attributions[column] == pytest.approx((row[column] - 1.0) * weight, abs=1e-6)
        assert body["completeness_error_pct"] < 1e-6 and body["steps"] == 4 and body["converged"] is True


def test_integrated_gradients_doubles_steps_until_complete():
    """F(x) = sum(x^3): the midpoint rule errs, so the steps double until under ig_min_error_pct."""
    start, end = {"x": np.array([[0.0, 0.0]])}, {"x": np.array([[2.0, -1.0]])}
    deltas = np.array([[8.0 - 1.0]])
    settings = {"ig_start_steps": 2, "ig_max_steps": 4096, "ig_min_error_pct": 0.1}
    result = integrate(lambda point: [{"x": 3 * point["x"] ** 2}], start, end, deltas, settings)
    assert result.error_pct <= 0.1 and result.steps > 2
    np.testing.assert_allclose(result.attributions[0]["x"], [[8.0, -1.0]], rtol=2e-3)
    assert completeness_error_pct(result.attributions, deltas) == pytest.approx(result.error_pct)
    capped = integrate(lambda point: [{"x": 3 * point["x"] ** 2}], start, end, deltas, dict(settings, ig_max_steps=4))
    assert capped.steps == 4 and capped.error_pct > 0.1


def test_a_model_without_integrated_gradients_hooks_gets_404_naming_them(fixture_models):
    client = create_app(read_settings({}, model_dir=str(fixture_models / "sums_columns")), load_model(fixture_models / "sums_columns")).test_client()
    response = client.post("/explain/ig", json=[{"a": 1, "b": 2}])
    assert response.status_code == 404 and "compute_gradients" in response.get_json()["message"]
