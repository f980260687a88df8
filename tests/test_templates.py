"""package_py_templates: each template filled with a tiny real model trained here, served with `md-runtime serve`,
must answer what the framework itself predicts in-process. Frameworks not installed are skipped, with the reason."""

import re
from pathlib import Path
from typing import Callable, List

import numpy as np
import pandas as pd
import pytest

from support import REPO, Server, md_runtime, runtime_env

TEMPLATES = REPO / "package_py_templates"
IRIS_COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
TORCH_COLUMNS = ["x1", "x2", "x3", "x4"]


@pytest.fixture(scope="module")
def iris():
    from sklearn.datasets import load_iris

    data = load_iris()
    X = pd.DataFrame(data.data, columns=IRIS_COLUMNS)
    return X, data.target, X.iloc[::15].reset_index(drop=True)


def init_template(tmp_path: Path, template: str) -> Path:
    model_dir = tmp_path / template
    result = md_runtime("init", "--template", template, str(model_dir))
    assert result.returncode == 0, result.stderr
    return model_dir


def served(model_dir: Path, rows: pd.DataFrame, columns: List[str]) -> np.ndarray:
    """The prediction for `rows`, which must not change when the columns come in another order, nor with the
    model preloaded in the master (MD_PRELOAD=auto: a worker forked from it predicts with the CPUs' threads)
    or loaded in the worker (MD_PRELOAD=false). TensorFlow, which does not survive a fork, is never preloaded."""
    shuffled = rows[rows.columns[::-1]]
    answers = []
    for preload in ("auto", "false"):
        with Server(model_dir, "--workers", "1", env=runtime_env(MD_PRELOAD=preload)).wait_ready() as server:
            assert server.get("/info").json()["memory"]["preload"] is (preload == "auto" and model_dir.name != "tensorflow")
            for frame in (rows, shuffled):
                response = server.post("/predict", json=frame.to_dict(orient="records"))
                assert response.status_code == 200, response.text + server.output()[-3000:]
                answers.append(pd.DataFrame(response.json())[columns].to_numpy())
    for answer in answers[1:]:
        np.testing.assert_array_equal(answers[0], answer)
    return answers[0]


def proba_columns(n: int) -> List[str]:
    return ["proba_{}".format(i) for i in range(n)]


def serve_and_compare(tmp_path: Path, template: str, save: Callable[[Path], None], rows: pd.DataFrame,
                      expected: np.ndarray, columns: List[str], tolerance: float = 1e-9) -> None:
    model_dir = init_template(tmp_path, template)
    save(model_dir)
    np.testing.assert_allclose(served(model_dir, rows, columns), expected, rtol=0, atol=tolerance)


def test_generic(tmp_path):
    rows = pd.DataFrame({"x1": [1.0, 2.0, -3.5], "x2": [4.0, 0.0, 2.0]})
    expected = (0.5 * rows["x1"] - 0.25 * rows["x2"]).to_numpy().reshape(-1, 1)
    serve_and_compare(tmp_path, "generic", lambda d: None, rows, expected, ["score"])


def test_sklearn(tmp_path, iris):
    import joblib
    from sklearn.linear_model import LogisticRegression

    X, y, rows = iris
    model = LogisticRegression(max_iter=500).fit(X, y)
    serve_and_compare(tmp_path, "sklearn", lambda d: joblib.dump(model, d / "model.joblib"), rows,
                      model.predict_proba(rows), proba_columns(3))


def test_xgboost(tmp_path, iris):
    xgboost = pytest.importorskip("xgboost", reason="xgboost is not installed")
    X, y, rows = iris
    model = xgboost.XGBClassifier(n_estimators=10, max_depth=3).fit(X, y)
    serve_and_compare(tmp_path, "xgboost", lambda d: model.save_model(str(d / "model.json")), rows,
                      model.predict_proba(rows), proba_columns(3), tolerance=1e-6)


def test_lightgbm(tmp_path, iris):
    lightgbm = pytest.importorskip("lightgbm", reason="lightgbm is not installed")
    X, y, rows = iris
    model = lightgbm.LGBMClassifier(n_estimators=10, verbose=-1).fit(X, y)
    serve_and_compare(tmp_path, "lightgbm", lambda d: model.booster_.save_model(str(d / "model.txt")), rows,
                      model.predict_proba(rows), proba_columns(3))


def test_catboost(tmp_path, iris):
    catboost = pytest.importorskip("catboost", reason="catboost is not installed")
    X, y, rows = iris
    model = catboost.CatBoostClassifier(iterations=10, verbose=False, allow_writing_files=False).fit(X, y)
    serve_and_compare(tmp_path, "catboost", lambda d: model.save_model(str(d / "model.cbm")), rows,
                      model.predict_proba(rows), proba_columns(3))


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # new torch deprecates TorchScript; the image's 1.13 has it
def test_pytorch(tmp_path, iris):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    rows = iris[2].set_axis(TORCH_COLUMNS, axis=1)
    with torch.inference_mode():
        expected = net(torch.tensor(rows.to_numpy(dtype="float32"))).numpy()
    scripted = torch.jit.script(net)
    serve_and_compare(tmp_path, "pytorch", lambda d: torch.jit.save(scripted, str(d / "model.pt")), rows,
                      expected, ["score_0", "score_1"], tolerance=1e-5)


def test_tensorflow(tmp_path, iris):
    tf = pytest.importorskip("tensorflow", reason="tensorflow is not installed (too big for CI's time budget)")
    tf.random.set_seed(0)
    model = tf.keras.Sequential([tf.keras.Input(shape=(4,)), tf.keras.layers.Dense(8, activation="relu"),
                                 tf.keras.layers.Dense(2)])
    rows = iris[2].set_axis(TORCH_COLUMNS, axis=1)
    expected = model(rows.to_numpy(dtype="float32")).numpy()

    def save(model_dir: Path) -> None:
        if hasattr(model, "export"):  # Keras 3
            model.export(str(model_dir / "saved_model"))
        else:
            tf.saved_model.save(model, str(model_dir / "saved_model"))

    serve_and_compare(tmp_path, "tensorflow", save, rows, expected, ["score_0", "score_1"], tolerance=1e-5)


def tiny_text_classifier(folder: Path):
    """A 1-layer BERT with a 20-word vocabulary, built from a config: nothing is downloaded."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    words = "the a movie film was is good great bad awful not very fun boring".split()
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    tokenizer = BertTokenizer(str(vocab))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words) + 5, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=2,
                        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    model = BertForSequenceClassification(config).eval()
    return tokenizer, model


def test_transformers(tmp_path):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    pytest.importorskip("transformers", reason="transformers is not installed")
    tokenizer, model = tiny_text_classifier(tmp_path / "build")
    rows = pd.DataFrame({"text": ["the movie was great", "a very boring film", "not fun", "good"]})
    with torch.inference_mode():
        batch = tokenizer(rows["text"].tolist(), padding=True, truncation=True, max_length=128, return_tensors="pt")
        expected = torch.softmax(model(**batch).logits, dim=-1).numpy()

    def save(model_dir: Path) -> None:
        model.save_pretrained(str(model_dir / "hf_model"))
        tokenizer.save_pretrained(str(model_dir / "hf_model"))

    serve_and_compare(tmp_path, "transformers", save, rows, expected, ["proba_negative", "proba_positive"],
                      tolerance=1e-5)


def test_every_template_is_tested_and_listed_in_the_readme():
    names = sorted(p.name for p in TEMPLATES.iterdir() if (p / "package.py").is_file())
    tested = sorted(name[len("test_"):] for name in globals() if name.startswith("test_") and (TEMPLATES / name[5:]).is_dir())
    assert names == tested
    readme = (TEMPLATES / "README.md").read_text()
    assert all("({}/package.py)".format(name) in readme for name in names)
    assert "package_py_templates/README.md" in (REPO / "README.md").read_text()


def test_init_copies_a_template_and_never_overwrites(tmp_path):
    target = tmp_path / "new_model"
    first = md_runtime("init", "--template", "generic", str(target))
    assert first.returncode == 0 and (target / "package.py").read_text() == (TEMPLATES / "generic" / "package.py").read_text()
    (target / "package.py").write_text("# the user's own work\n")
    again = md_runtime("init", "--template", "sklearn", str(target))
    assert again.returncode != 0
    assert "already has package.py: init never overwrites" in again.stderr.strip().splitlines()[-1]
    assert (target / "package.py").read_text() == "# the user's own work\n"


def test_init_rejects_an_unknown_template(tmp_path):
    result = md_runtime("init", "--template", "sklearn2", str(tmp_path / "m"))
    assert result.returncode == 2 and "invalid choice: 'sklearn2'" in result.stderr


def test_check_a_template_before_its_model_file_is_there(tmp_path):
    model_dir = init_template(tmp_path, "sklearn")
    result = md_runtime("check", str(model_dir))
    assert result.returncode == 4
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("md-runtime: error: ") and "model.joblib" in last


def test_every_template_folder_is_a_package_the_wheel_ships():
    from md_runtime.cli import template_names

    pyproject = (REPO / "pyproject.toml").read_text()
    listed = set(re.findall(r'"md_runtime\.templates\.(\w+)"', pyproject))
    assert listed == set(template_names()), "list each package_py_templates/ folder in pyproject.toml's packages"
