"""Batching: concurrent requests merged into one predict call must each get exactly their own rows' answer."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import requests

from md_runtime.batching import Batcher
from md_runtime.errors import UserCodeError
from md_runtime.loader import load_model
from support import Server, fixture_package, runtime_env


def iris_frames(n: int):
    """Request frames of 1 to 7 rows, each with its own values."""
    base = {"sepal_length": 5.0, "sepal_width": 3.0, "petal_length": 1.5, "petal_width": 0.2}
    frames = []
    for i in range(n):
        rows = [{k: v + 0.37 * ((i * 7 + r) % 11) for k, v in base.items()} for r in range(1 + i % 7)]
        frames.append(pd.DataFrame(rows))
    return frames


class CountingModel:
    """Wraps a LoadedModel to count predict calls and hold them long enough for others to queue."""

    def __init__(self, model):
        self.model, self.calls, self.lock = model, [], threading.Lock()

    def predict(self, frame):
        with self.lock:
            self.calls.append(len(frame))
        return self.model.predict(frame)


def run_concurrently(batcher, frames):
    barrier = threading.Barrier(len(frames))

    def one(frame):
        barrier.wait()
        try:
            return batcher.predict(frame)
        except Exception as exc:  # noqa: BLE001 - returned to be asserted on
            return exc

    with ThreadPoolExecutor(len(frames)) as pool:
        return list(pool.map(one, frames))


def test_each_request_gets_its_own_rows_in_order(iris_model_dir):
    model = load_model(iris_model_dir)
    counting = CountingModel(model)
    shared = []
    batcher = Batcher(counting.predict, max_rows=64, max_delay_ms=50, on_batch=shared.append)
    frames = iris_frames(16)
    results = run_concurrently(batcher, frames)
    for frame, result in zip(frames, results):
        pd.testing.assert_frame_equal(result, model.predict(frame))
    assert shared and sum(shared) > len(shared), "concurrent requests must share predict calls"
    assert len(counting.calls) < len(frames)


def test_outputs_of_mixed_types_are_split_with_their_types():
    def predict(frame):
        x = frame["x"]
        return pd.DataFrame({"label": ["big" if v > 2 else "small" for v in x], "score": x * 0.5, "n": x.astype("int32")})

    batcher = Batcher(predict, max_rows=64, max_delay_ms=50)
    frames = [pd.DataFrame({"x": list(range(i, i + 1 + i % 3))}) for i in range(8)]
    for frame, result in zip(frames, run_concurrently(batcher, frames)):
        pd.testing.assert_frame_equal(result, predict(frame))


def test_a_bad_request_fails_alone(iris_model_dir, caplog):
    model = load_model(iris_model_dir)
    batcher = Batcher(model.predict, max_rows=64, max_delay_ms=50)
    frames = iris_frames(6)
    frames[2] = frames[2].assign(sepal_width="wide")  # the model cannot take a string here
    results = run_concurrently(batcher, frames)
    assert isinstance(results[2], UserCodeError)
    assert "failed (UserCodeError: predict() raised ValueError" in caplog.text and "predicting each alone" in caplog.text
    for i, (frame, result) in enumerate(zip(frames, results)):
        if i != 2:
            pd.testing.assert_frame_equal(result, model.predict(frame))


def test_requests_with_other_columns_are_not_merged():
    seen = []

    def predict(frame):
        seen.append(list(frame.columns))
        return pd.DataFrame({"n": [len(frame.columns)] * len(frame)})

    batcher = Batcher(predict, max_rows=64, max_delay_ms=50)
    frames = [pd.DataFrame({"a": [1], "b": [2]}), pd.DataFrame({"a": [1]}), pd.DataFrame({"a": [3], "b": [4]})]
    results = run_concurrently(batcher, frames)
    assert [r["n"].tolist() for r in results] == [[2], [1], [2]]
    assert all(columns in (["a", "b"], ["a"]) for columns in seen), "a merged frame would have NaN-filled columns"


def test_batching_under_gunicorn_matches_in_process_predictions(tmp_path, iris_model_dir):
    import shutil

    model = load_model(iris_model_dir)
    slow_dir = tmp_path / "slow_iris"
    shutil.copytree(str(iris_model_dir), str(slow_dir))
    (slow_dir / "package.py").write_text(fixture_package("slow_iris"))
    frames = iris_frames(48)
    env = runtime_env(MD_MAX_BATCH_SIZE="64", MD_MAX_BATCH_DELAY_MS="5")
    with Server(slow_dir, "--workers", "2", env=env).wait_ready() as server:
        session_local = threading.local()

        def post(frame):
            session = getattr(session_local, "session", None) or requests.Session()
            session_local.session = session
            return session.post(server.url + "/predict", json=frame.to_dict(orient="records"), timeout=30)

        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(post, frames))
        metrics = server.get("/metrics").text
    for frame, response in zip(frames, responses):
        assert response.status_code == 200, response.text
        expected = model.predict(frame)
        pd.testing.assert_frame_equal(pd.DataFrame(response.json())[list(expected.columns)], expected, check_exact=False, rtol=0, atol=1e-14)
    shared = [line for line in metrics.splitlines() if line.startswith("md_batched_requests_total")]
    assert shared and float(shared[0].split()[-1]) > 0, "16 concurrent clients must have shared predict calls"


def test_batching_from_model_yaml(tmp_path, iris_model_dir):
    import shutil

    model_dir = tmp_path / "iris"
    shutil.copytree(str(iris_model_dir), str(model_dir))
    (model_dir / "model.yaml").write_text((iris_model_dir / "model.yaml").read_text() + "\nbatching:\n  max_batch_size: 32\n  max_delay_ms: 3\n")
    with Server(model_dir, "--workers", "1").wait_ready() as server:
        assert server.post("/predict", json=iris_frames(1)[0].to_dict(orient="records")).status_code == 200
    assert "batching: up to 32 rows per predict, waiting at most 3.0 ms" in server.output()


def test_the_leader_sleeps_until_a_request_arrives_instead_of_polling(monkeypatch):
    """Two requests, the second 30 ms behind the first: the leader wakes for it, not every 0.5 ms."""
    import time

    sleeps = []
    real_sleep = time.sleep
    monkeypatch.setattr(time, "sleep", lambda seconds: (sleeps.append(seconds), real_sleep(seconds)))
    in_flight = [2]
    batcher = Batcher(lambda frame: frame.assign(y=1), max_rows=64, max_delay_ms=500, in_flight=lambda: in_flight[0])
    later = threading.Timer(0.03, lambda: batcher.predict(pd.DataFrame({"x": [2]})))
    later.start()
    result = batcher.predict(pd.DataFrame({"x": [1]}))
    later.join()
    assert result["x"].tolist() == [1] and sleeps == [], "the leader polled with time.sleep"
