"""loader: the package.py contract, checked at load with messages that say what to fix."""

import pandas as pd
import pytest
from conftest import uses_model

from md_runtime.errors import (
    APP_LOAD_ERROR,
    ColumnMismatchError,
    ContractError,
    ModelDirError,
    ModelOutputError,
    ModelSpecError,
    UserCodeError,
    UserLoadError,
)
from md_runtime.loader import load_model
from md_runtime.spec import ModelSpec


@uses_model("sums_columns")
def test_loads_and_predicts(model_dir):
    model = load_model(model_dir)
    output = model.predict(pd.DataFrame({"a": [1, 2], "b": [10, 20]}))
    assert output["total"].tolist() == [11, 22]
    assert model.output_columns == ["total"]
    assert len(model.package_hash) == 64 and model.load_seconds > 0


@pytest.mark.parametrize(
    "name,error,fragment",
    [
        ("no_package_py", ModelDirError, "no package.py found"),
        ("no_get_model", ContractError, "no get_model() function"),
        ("no_predict", ContractError, "get_model() returned a Scorer with no predict() method"),
        ("get_model_raises", UserLoadError, "get_model() raised FileNotFoundError: weights.bin is missing"),
        ("import_raises", UserLoadError, "importing package.py raised ModuleNotFoundError"),
    ],
)
def test_load_errors_name_the_problem_and_exit_with_app_load_code(fixture_models, name, error, fragment):
    with pytest.raises(error) as caught:
        load_model(fixture_models / name)
    assert fragment in caught.value.message
    assert caught.value.exit_code == APP_LOAD_ERROR


def test_missing_directory(tmp_path):
    with pytest.raises(ModelDirError, match="no such directory"):
        load_model(tmp_path / "absent")


def test_user_traceback_is_logged_trimmed_to_package_py(fixture_models, caplog):
    with pytest.raises(UserLoadError):
        load_model(fixture_models / "get_model_raises")
    logged = caplog.text
    assert "package.py" in logged and "weights.bin is missing" in logged
    assert "md_runtime" not in logged.split("raised:", 1)[1]


@uses_model("imports_sibling")
def test_package_py_imports_its_siblings(model_dir):
    assert load_model(model_dir).predict(pd.DataFrame({"x": [1, 2]}))["scaled"].tolist() == [3, 6]


@uses_model("transforms_input")
def test_only_predict_is_called_and_it_calls_transform_input_itself(model_dir):
    # x doubled once by predict's own call: 2x + 1 (a runtime that called transform_input first gives 4x + 1)
    assert load_model(model_dir).predict(pd.DataFrame({"x": [1, 5]}))["y"].tolist() == [3, 11]


@uses_model("declares_columns")
def test_declared_inputs_are_reordered_extras_dropped_and_missing_refused(model_dir):
    model = load_model(model_dir)
    assert model.predict(pd.DataFrame({"b": [2], "a": [1]}))["total"].tolist() == [12]
    selected, dropped = model.select_inputs(pd.DataFrame({"id": [7], "b": [2], "a": [1], "target": [0]}))
    assert list(selected.columns) == ["a", "b"] and dropped == ["id", "target"]
    with pytest.raises(ColumnMismatchError) as caught:
        model.predict(pd.DataFrame({"a": [1], "c": [2]}))
    assert caught.value.status_code == 422
    assert "missing columns: b" in caught.value.message and "unexpected" not in caught.value.message


@pytest.mark.parametrize(
    "name,fragment",
    [("returns_list", "returned list instead of a pandas DataFrame"), ("returns_wrong_rows", "returned 1 rows for 2 input rows")],
)
def test_bad_output_is_a_model_error(fixture_models, name, fragment):
    with pytest.raises(ModelOutputError) as caught:
        load_model(fixture_models / name).predict(pd.DataFrame({"x": [1, 2]}))
    assert fragment in caught.value.message and caught.value.status_code == 500


def test_declared_outputs_are_checked(fixture_models, tmp_path):
    (tmp_path / "package.py").write_text((fixture_models / "sums_columns" / "package.py").read_text())
    (tmp_path / "model.yaml").write_text("outputs: [probability]\n")
    with pytest.raises(ModelOutputError, match=r"returned columns \['total'\] but model.yaml declares outputs"):
        load_model(tmp_path).predict(pd.DataFrame({"a": [1]}))


def test_predict_exception_is_a_user_code_error(fixture_models):
    model = load_model(fixture_models / "misbehaves_on_request")
    with pytest.raises(UserCodeError) as caught:
        model.predict(pd.DataFrame({"mode": ["raise"], "x": [-1]}))
    assert caught.value.message == "predict() raised ValueError: x must be positive, got -1"
    assert caught.value.status_code == 500


def test_model_yaml_in_platform_style(tmp_path):
    (tmp_path / "model.yaml").write_text(
        "model:\n  inputs:\n    - column-name: age\n      data-type: int\n  outputs:\n    - column-name: score\n"
    )
    spec = ModelSpec.read(tmp_path)
    assert (spec.inputs, spec.outputs) == (["age"], ["score"])


@pytest.mark.parametrize("text,fragment", [("inputs: [a\n", "not valid YAML"), ("inputs: a\n", "must be a list"), ("- a\n", "expected a mapping")])
def test_bad_model_yaml_is_named(tmp_path, text, fragment):
    (tmp_path / "model.yaml").write_text(text)
    with pytest.raises(ModelSpecError, match=fragment):
        ModelSpec.read(tmp_path)
