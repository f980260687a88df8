"""versions: a model's files written by other library versions are named with the fix, and `md-runtime freeze`
pins what the model needs as installed here."""

import copyreg
import pickle
import shutil
from importlib import metadata
from pathlib import Path

import pytest

from md_runtime.errors import APP_LOAD_ERROR, VersionMismatchError
from md_runtime.loader import load_model
from md_runtime.versions import diagnose, merge_requirements
from support import REPO, fixture_package, md_runtime

def pickled_model(tmp_path: Path, payload: bytes) -> Path:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "package.py").write_text(fixture_package("loads_pickle"))
    (model_dir / "model.pkl").write_bytes(payload)
    return model_dir


def test_a_module_the_training_version_had_is_named_with_the_fix(tmp_path):
    # what loading a GradientBoosting model pickled by scikit-learn 1.1 gives on a current release
    payload = b"\x80\x04csklearn.ensemble._gb_losses\nLeastSquaresError\n."
    with pytest.raises(VersionMismatchError) as caught:
        load_model(pickled_model(tmp_path, payload))
    message = caught.value.message
    assert caught.value.exit_code == APP_LOAD_ERROR
    assert message.startswith("get_model() failed: the model's files were written by other library versions")
    assert "scikit-learn {} here".format(metadata.version("scikit-learn")) in message
    assert "`md-runtime freeze MODEL_DIR`" in message


def test_an_estimator_pickled_by_another_scikit_learn_warns_with_the_pin(tmp_path):
    from sklearn.linear_model import LinearRegression

    estimator = LinearRegression().fit([[0.0], [1.0]], [0.0, 2.0])
    state = dict(estimator.__getstate__(), _sklearn_version="0.24.2")  # as if pickled by that release

    class AsPickledThen:
        def __reduce__(self):
            return copyreg._reconstructor, (LinearRegression, object, None), state

    payload = pickle.dumps(AsPickledThen(), protocol=4)
    model_dir = pickled_model(tmp_path, payload)
    loaded = load_model(model_dir)
    assert loaded.warnings and "scikit-learn==0.24.2" in loaded.warnings[0]
    result = md_runtime("check", str(model_dir), "--sample", str(write_rows(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert "warning: loading warned: the model's files were written by other library versions" in result.stdout
    assert "add to requirements.txt: scikit-learn==0.24.2" in result.stdout


def write_rows(tmp_path: Path) -> Path:
    rows = tmp_path / "rows.csv"
    rows.write_text("x\n1.5\n")
    return rows


@pytest.mark.parametrize(
    "text,requirement",
    [
        ("ModuleNotFoundError: No module named 'numpy._core'", "numpy>=2"),
        ("Trying to unpickle estimator Pipeline from version 1.5.2 when using version 1.1.1. This might lead", "scikit-learn==1.5.2"),
    ],
)
def test_diagnose_reads_the_libraries_own_words(text, requirement):
    assert [m.requirement() for m in diagnose([text])] == [requirement]


def test_freeze_pins_what_package_py_imports_and_the_model_holds(iris_model_dir, tmp_path):
    model_dir = Path(shutil.copytree(str(iris_model_dir), str(tmp_path / "iris")))
    (model_dir / "requirements.txt").write_text("# ours\nnumpy<2\nmdtest-lib>=1\n")
    result = md_runtime("freeze", str(model_dir))
    assert result.returncode == 0, result.stderr
    lines = (model_dir / "requirements.txt").read_text().splitlines()
    expected = ["{}=={}".format(name, metadata.version(name)) for name in ("joblib", "numpy", "pandas", "scikit-learn")]
    assert lines == ["# ours", "mdtest-lib>=1"] + expected
    printed = md_runtime("freeze", str(REPO / "tests" / "fixtures" / "models" / "imports_sibling"), "--print")
    assert printed.stdout.split() == ["pandas==" + metadata.version("pandas")]


def test_merge_keeps_other_lines_and_replaces_pinned_ones():
    merged = merge_requirements("scikit_learn==1.0.2\nxgboost>=1\n\n", ["scikit-learn==1.5.2"])
    assert merged == "xgboost>=1\nscikit-learn==1.5.2\n"
