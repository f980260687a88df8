"""Thread sizing under a CPU quota: md-runtime's default (threads = the worker's share of the quota) against
numpy/OpenBLAS's own default (one thread per host CPU), in the python-39 image limited to 500 millicores.

The model multiplies each request by a 400x400 matrix (BLAS-bound). Writes bench/THREADS.md. Needs podman and
the python-39 image (`bash .ci/images python-39`); run with `python3 bench/threads.py`.
"""

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
IMAGE = "md-base/python/python-39:1.1.0"
MODEL = '''
import numpy as np
import pandas as pd

WEIGHTS = np.random.default_rng(0).standard_normal((400, 400))


class Model:
    def predict(self, input_df):
        x = np.repeat(input_df[["x"]].to_numpy(), 400, axis=1)
        for _ in range(20):
            x = np.tanh(x @ WEIGHTS / 20.0)
        return pd.DataFrame({"y": x[:, 0]})


def get_model():
    return Model()
'''
LUA = 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = [==[{}]==]\n'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(label: str, model_dir: str, script: str, extra_env: list) -> str:
    port = free_port()
    name = "md-threads-{}".format(port)
    subprocess.run(["podman", "run", "-d", "--name", name, "--cpus", "0.5", "--memory", "512m",
                    "-p", "127.0.0.1:{}:8080".format(port), "-v", "{}:/app/model:ro".format(model_dir)]
                   + extra_env + [IMAGE], check=True, capture_output=True)
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen("http://127.0.0.1:{}/ready".format(port), timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        url = "http://127.0.0.1:{}/predict".format(port)
        subprocess.run(["wrk", "-t1", "-c4", "-d3s", "-s", script, url], capture_output=True)
        out = subprocess.run(["wrk", "-t1", "-c4", "-d15s", "--latency", "-s", script, url],
                             capture_output=True, text=True, check=True).stdout
    finally:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True)
    rps = re.search(r"Requests/sec:\s+(\S+)", out).group(1)  # type: ignore[union-attr]
    p50 = re.search(r"\s50%\s+(\S+)", out).group(1)  # type: ignore[union-attr]
    p99 = re.search(r"\s99%\s+(\S+)", out).group(1)  # type: ignore[union-attr]
    return "| {} | {} | {} | {} |".format(label, rps, p50, p99)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        model_dir.mkdir()
        (model_dir / "package.py").write_text(MODEL)
        os.chmod(tmp, 0o755)
        script = Path(tmp) / "post.lua"
        script.write_text(LUA.format('[{"x": 0.5}, {"x": -0.25}, {"x": 1.0}, {"x": 2.0}]'))
        host_cpus = os.cpu_count() or 1
        rows = [
            run("md-runtime default: 1 worker, 1 BLAS thread (the quota's share)", str(model_dir), str(script), []),
            run("library default: 1 worker, {} BLAS threads (one per host CPU)".format(host_cpus), str(model_dir),
                str(script), ["-e", "OMP_NUM_THREADS={}".format(host_cpus), "-e", "OPENBLAS_NUM_THREADS={}".format(host_cpus)]),
        ]
    report = "\n".join([
        "# Thread sizing under a CPU quota", "",
        "Written by `python3 bench/threads.py` on {}: {} in podman with `--cpus 0.5` on a {}-CPU host; a BLAS-bound"
        " model (20 products with a 400x400 matrix per request of 4 rows); wrk, 4 connections, 15 s after a 3 s"
        " warm-up.".format(time.strftime("%Y-%m-%d", time.gmtime()), IMAGE, host_cpus), "",
        "| threads | req/s | p50 | p99 |", "| --- | ---: | ---: | ---: |"] + rows) + "\n"
    (BENCH / "THREADS.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
