"""The servers the benchmarks compare, started the way a user would pick each at its best setting, on 127.0.0.1.

- md-runtime: `md-runtime serve` with gevent workers (batching off, its default, or on);
- MLServer 1.7 with its sklearn runtime: parallel inference workers (its default, 1, or 2; uvloop 0.21, see
  bench/run.sh), with or without adaptive batching;
- LitServe 0.2: two inference workers and two API servers (its defaults for 2 workers) with ZeroMQ queues
  (`fast_queue`, its high-throughput setting), with or without its batching.

Each runs in its own session, so that stop() ends its whole process tree and cpu_seconds() counts all of it.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional

FEATURES = ["f{}".format(i) for i in range(20)]
BATCH_SIZE = 64
BATCH_DELAY_S = 0.001  # every server waits this long for a batch to fill: md-runtime, MLServer and LitServe alike

LITSERVE_APP = r'''
import sys

import joblib
import litserve as ls
import numpy as np

MODEL, PORT, WORKERS, BATCH, DELAY = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])


class Classifier(ls.LitAPI):
    def setup(self, device):
        self.pipeline = joblib.load(MODEL)
        self.sizes = []

    def decode_request(self, request):
        return np.asarray(request["data"], dtype=np.float64)

    def batch(self, inputs):
        self.sizes = [len(x) for x in inputs]
        return np.concatenate(inputs)

    def predict(self, x):
        return self.pipeline.predict_proba(x)

    def unbatch(self, output):
        return np.split(output, np.cumsum(self.sizes)[:-1])

    def encode_response(self, output):
        return {"p0": output[:, 0].tolist(), "p1": output[:, 1].tolist()}


if __name__ == "__main__":
    api = Classifier(max_batch_size=BATCH, batch_timeout=DELAY if BATCH > 1 else 0.0)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=WORKERS, fast_queue=True, timeout=60)
    server.run(port=PORT, host="127.0.0.1", generate_client_file=False, log_level="warning")
'''


class Server(NamedTuple):
    name: str
    url: str
    body: Callable[[int], bytes]
    content_type: str
    process: subprocess.Popen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows_of(n: int) -> List[List[float]]:
    return [[round(((r * 31 + c * 7) % 97) / 13.0 - 3.5, 4) for c in range(20)] for r in range(n)]


def split_body(n: int) -> bytes:
    """The platform's payload: a JSON split frame."""
    return json.dumps({"columns": FEATURES, "data": rows_of(n)}).encode()


def v2_body(n: int) -> bytes:
    flat = [v for row in rows_of(n) for v in row]
    request = {"inputs": [{"name": "input-0", "shape": [n, 20], "datatype": "FP64", "data": flat}],
               "outputs": [{"name": "predict_proba"}]}
    return json.dumps(request).encode()


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process.poll() is not None:
            raise SystemExit("{} exited while starting".format(url))
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.02)  # time to ready is measured from this loop
    raise SystemExit("{} not ready in {}s".format(url, timeout))


def _spawn(command: List[str], log: Path, env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=None if cwd is None else str(cwd))


def start_ours(name: str, python: str, model_dir: Path, workers: int, log: Path, batch: int = 0,
               env: Optional[Dict[str, str]] = None, ready_timeout: float = 120) -> Server:
    port = free_port()
    environment = dict(os.environ, MD_MAX_BATCH_SIZE=str(batch), MD_MAX_BATCH_DELAY_MS=str(BATCH_DELAY_S * 1000),
                       MD_LOG_LEVEL="warning", **(env or {}))
    command = [python, "-m", "md_runtime.cli", "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
               "--workers", str(workers)]
    process = _spawn(command, log, environment)
    url = "http://127.0.0.1:{}".format(port)
    wait_ready(url + "/ready", process, ready_timeout)
    return Server(name, url + "/predict", split_body, "application/json", process)


def start_mlserver(name: str, python: str, model_dir: Path, workers: int, log: Path, batch: int = 0,
                   model_name: str = "clf", ready_timeout: float = 120) -> Server:
    port, grpc, metrics = free_port(), free_port(), free_port()
    (model_dir / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": port, "grpc_port": grpc, "metrics_port": metrics,
        "parallel_workers": workers, "logging_level": "WARNING"}))
    model_settings = {"name": model_name, "implementation": "mlserver_sklearn.SKLearnModel",
                      "parameters": {"uri": "./model.joblib"}}
    if batch > 1:
        model_settings.update(max_batch_size=batch, max_batch_time=BATCH_DELAY_S)
    (model_dir / "model-settings.json").write_text(json.dumps(model_settings))
    mlserver = os.path.join(os.path.dirname(os.path.abspath(python)), "mlserver")
    process = _spawn([mlserver, "start", str(model_dir)], log, cwd=model_dir)
    url = "http://127.0.0.1:{}/v2/models/{}".format(port, model_name)
    wait_ready(url + "/ready", process, ready_timeout)
    return Server(name, url + "/infer", v2_body, "application/json", process)


def start_litserve(name: str, python: str, model_dir: Path, workers: int, log: Path, batch: int = 0) -> Server:
    port = free_port()
    app = model_dir / "litserve_app.py"
    app.write_text(LITSERVE_APP)
    process = _spawn([python, str(app), str(model_dir / "model.joblib"), str(port), str(workers), str(max(batch, 1)),
                      str(BATCH_DELAY_S)], log, cwd=model_dir)
    url = "http://127.0.0.1:{}".format(port)
    wait_ready(url + "/health", process)  # 200 once every inference worker is set up
    return Server(name, url + "/predict", split_body, "application/json", process)


def stop(server: Server, timeout: float = 20) -> None:
    """Stop the server and everything it started, and wait until all of it is gone: a LitServe's workers
    outlived its main process by seconds, busy, and slowed the next server's measurement 10-fold."""
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while (server.process.poll() is None or session_pids(server.process.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)  # poll() reaps the main process, whose zombie would count as alive
    for pid in session_pids(server.process.pid):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    server.process.wait()


def session_pids(session: int) -> List[int]:
    """Every live process of the session `session` leads (a server and all it started)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session:  # after the command: state, ppid, pgrp, session
            pids.append(int(stat.parent.name))
    return pids


def cpu_seconds(server: Server) -> float:
    """User and system CPU seconds the server's live processes have used so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in session_pids(server.process.pid):
        try:
            fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def versions(python: str, names: List[str]) -> Dict[str, str]:
    code = "import json, importlib.metadata as m; print(json.dumps({n: m.version(n) for n in %r}))" % (names,)
    return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout)
