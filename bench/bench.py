"""Side-by-side benchmark: md-runtime (batching on and off) against MLServer's sklearn runtime, one run.

The same scikit-learn pipeline (StandardScaler + LogisticRegression, 20 numeric features), trained by each
server's own Python from the same seed, served on 127.0.0.1 and driven by wrk at concurrency 1, 8 and 64
with 1-row and 100-row requests (the servers alternate within each scenario), plus one 10,000-row request
timed on its own. Writes bench/RESULTS.md. Run it with `bash bench/run.sh`.
"""

import argparse
import array
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / ".work"
FEATURES = ["f{}".format(i) for i in range(20)]

TRAIN = r'''
import sys
import joblib
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

X, y = make_classification(n_samples=2000, n_features=20, random_state=0)
joblib.dump(make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(X, y), sys.argv[1])
'''

PACKAGE_PY = '''
from pathlib import Path

import joblib
import pandas as pd

PACKAGE_PATH = Path(__file__).parent
FEATURES = ["f{}".format(i) for i in range(20)]
OUTPUTS = pd.Index(["p0", "p1"])


class Model:
    def __init__(self):
        self.pipeline = joblib.load(PACKAGE_PATH / "model.joblib")

    def predict(self, input_df):  # columns as package_py_templates/sklearn selects them; numpy: fit on arrays
        features = input_df if list(input_df.columns) == FEATURES else input_df[FEATURES]
        return pd.DataFrame(self.pipeline.predict_proba(features.to_numpy()), columns=OUTPUTS)


def get_model():
    return Model()
'''


BREAKDOWN = r'''
import json, sys, timeit
import numpy as np
import pandas as pd
from md_runtime import codecs
from md_runtime.loader import load_model
model = load_model(sys.argv[1])
body = sys.argv[2].encode()
frame = codecs.decode(body, "application/json", model.spec.inputs)
output = model.predict(frame)
pipeline, X = model.model.pipeline, frame.to_numpy()
steps = {
    "decode (JSON split -> DataFrame)": lambda: codecs.decode(body, "application/json", model.spec.inputs),
    "predict through package.py (pandas in, pandas out)": lambda: model.predict(frame),
    "of which the pipeline's own predict_proba on a numpy array": lambda: pipeline.predict_proba(X),
    "not done: selecting the columns by name (package.py skips it when they come in order)": lambda: frame[list(frame.columns)],
    "not done: the output frame from a column list (package.py builds the column Index once)": lambda: pd.DataFrame(output.to_numpy(), columns=list(output.columns)),
    "encode (DataFrame -> JSON records)": lambda: codecs.encode(output),
}
print(json.dumps({name: min(timeit.repeat(step, number=500, repeat=5)) / 500 * 1e6 for name, step in steps.items()}))
'''


class Server(NamedTuple):
    name: str
    url: str
    body: Callable[[int], bytes]
    content_type: str
    process: subprocess.Popen


class Result(NamedTuple):
    server: str
    scenario: str
    rows: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows_of(n: int) -> List[List[float]]:
    return [[round(((r * 31 + c * 7) % 97) / 13.0 - 3.5, 4) for c in range(20)] for r in range(n)]


def ours_body(n: int) -> bytes:
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


def start_ours(name: str, python: str, model_dir: Path, workers: int, batch: int, log: Path) -> Server:
    port = free_port()
    env = dict(os.environ, MD_MAX_BATCH_SIZE=str(batch), MD_MAX_BATCH_DELAY_MS="1", MD_LOG_LEVEL="warning")
    command = [python, "-m", "md_runtime.cli", "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
               "--workers", str(workers)]
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = "http://127.0.0.1:{}".format(port)
    wait_ready(url + "/ready", process)
    return Server(name, url + "/predict", ours_body, "application/json", process)


def start_mlserver(python: str, model_dir: Path, log: Path) -> Server:
    port, grpc, metrics = free_port(), free_port(), free_port()
    (model_dir / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": port, "grpc_port": grpc, "metrics_port": metrics,
        "parallel_workers": 0, "logging_level": "WARNING"}))
    (model_dir / "model-settings.json").write_text(json.dumps({
        "name": "clf", "implementation": "mlserver_sklearn.SKLearnModel", "parameters": {"uri": "./model.joblib"}}))
    mlserver = os.path.join(os.path.dirname(os.path.abspath(python)), "mlserver")
    process = subprocess.Popen([mlserver, "start", str(model_dir)], stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True, cwd=str(model_dir))
    url = "http://127.0.0.1:{}".format(port)
    wait_ready(url + "/v2/models/clf/ready", process)
    return Server("mlserver", url + "/v2/models/clf/infer", v2_body, "application/json", process)


def stop(server: Server) -> None:
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def parse_ms(text: str) -> float:
    number, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(number) * UNITS[unit]


def post_script(server: Server, rows: int) -> Path:
    """wrk's Lua script posting one body of `rows` rows to the server."""
    script = WORK / "post-{}-{}.lua".format(server.name, rows)
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "{}"\nwrk.body = [==[{}]==]\n'.format(
        server.content_type, server.body(rows).decode()))
    return script


def wrk(server: Server, rows: int, connections: int, seconds: int) -> Result:
    script = post_script(server, rows)
    threads = min(connections, 2)
    command = ["wrk", "-t", str(threads), "-c", str(connections), "-d", "{}s".format(seconds), "--latency",
               "-s", str(script), server.url]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = parse_ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = parse_ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(bad.group(1)) if bad else 0
    errors += sum(int(g) for g in socket_errors.groups()) if socket_errors else 0
    return Result(server.name, "c={} rows={}".format(connections, rows), rows, rps, p50, p99, errors)


def http_baseline(server: Server) -> float:
    """p50 ms of each server's cheapest GET at c=1: what its HTTP stack costs with no model work."""
    url = server.url.split("/v2/")[0] + "/v2/health/ready" if server.name == "mlserver" else server.url.replace("/predict", "/ping")
    out = subprocess.run(["wrk", "-t", "1", "-c", "1", "-d", "5s", "--latency", url], capture_output=True, text=True, check=True).stdout
    return parse_ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]


# Where a sampled stack's time goes: the first of these met walking from the innermost frame outwards.
PROFILE_PARTS = (
    ("package.py: the wrapper's pandas work and the pipeline", re.compile(r"\(package\.py:")),
    ("md-runtime codecs (bytes <-> DataFrame)", re.compile(r"\(md_runtime/(codecs|inference_protocol)\.py:")),
    ("Prometheus metrics", re.compile(r"\(prometheus_")),
    ("md-runtime routes and batching", re.compile(r"\(md_runtime/")),
    ("Flask and werkzeug (request, routing, response)", re.compile(r"\((flask|werkzeug)/")),
    ("gunicorn (HTTP parsing and writing)", re.compile(r"\(gunicorn/")),
)


def sampled_profile(py_spy: str, server: Server, seconds: int = 8) -> Dict[str, float]:
    """Share of the workers' busy samples per part, with py-spy on every worker while wrk drives c=1, 1 row."""
    workers = subprocess.run(["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True).stdout.split()
    load = subprocess.Popen(["wrk", "-t", "1", "-c", "1", "-d", "{}s".format(seconds + 2), "-s",
                             str(post_script(server, 1)), server.url], stdout=subprocess.DEVNULL)
    outputs = [WORK / "py-spy-{}.txt".format(pid) for pid in workers]
    spies = [subprocess.Popen([py_spy, "record", "--pid", pid, "--duration", str(seconds), "--rate", "500", "--format",
                               "raw", "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for pid, out in zip(workers, outputs)]
    failures = [(spy.communicate()[1].strip() or "exit status {}".format(spy.returncode)).splitlines()[-1]
                for spy in spies if spy.wait() != 0]
    load.wait()
    if failures:  # mostly ptrace being refused: py-spy needs root or CAP_SYS_PTRACE
        sys.exit("py-spy could not sample md-runtime's workers (run as root, or drop --py-spy): " + failures[0])
    counts = dict.fromkeys([name for name, _ in PROFILE_PARTS] + ["gevent and the rest"], 0)
    pipeline = 0
    for out in outputs:
        for line in out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames = stack.split(";")[::-1]
            part = next((name for frame in frames for name, pattern in PROFILE_PARTS if pattern.search(frame)), None)
            counts[part or "gevent and the rest"] += int(count)
            pipeline += int(count) if part == PROFILE_PARTS[0][0] and "(sklearn/" in stack else 0
    total = sum(counts.values()) or 1
    shares = {name: 100.0 * count / total for name, count in counts.items()}
    shares["of package.py: inside scikit-learn"] = 100.0 * pipeline / total
    return shares


def big_request(server: Server, rows: int = 10000) -> Result:
    return timed_posts(server.name, server.url, server.body(rows), {"Content-Type": server.content_type}, rows)


def big_v2_requests(server: Server, rows: int = 10000) -> List[Result]:
    """Ours on its Open Inference Protocol route: MLServer's own JSON body, and binary tensors (tritonclient's default)."""
    url = server.url.replace("/predict", "/v2/models/ours-model/infer")
    flat = array.array("d", [v for row in rows_of(rows) for v in row]).tobytes()  # little-endian on x86
    head = json.dumps({"inputs": [{"name": "input", "shape": [rows, 20], "datatype": "FP64",
                                   "parameters": {"binary_data_size": len(flat), "columns": FEATURES}}],
                       "parameters": {"binary_data_output": True}}).encode()
    binary_headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
    json_body = json.loads(v2_body(rows))
    json_body["inputs"][0]["parameters"] = {"columns": FEATURES}
    del json_body["outputs"]
    return [
        timed_posts(server.name + " v2 JSON", url, json.dumps(json_body).encode(), {"Content-Type": "application/json"}, rows),
        timed_posts(server.name + " v2 binary", url, head + flat, binary_headers, rows),
    ]


def timed_posts(name: str, url: str, body: bytes, headers: Dict[str, str], rows: int, repeats: int = 5) -> Result:
    times = []
    for _ in range(repeats + 1):
        request = urllib.request.Request(url, data=body, headers=headers)
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
            assert response.status == 200
        times.append(time.perf_counter() - started)
    median = statistics.median(times[1:])  # the first one warms up
    return Result(name, "one request, rows={}".format(rows), rows, 1 / median, median * 1000, max(times[1:]) * 1000, 0)


def versions(python: str, names: List[str]) -> Dict[str, str]:
    code = "import json, importlib.metadata as m; print(json.dumps({n: m.version(n) for n in %r}))" % (names,)
    return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return "{} CPUs ({}), {} , Python {}".format(os.cpu_count(), cpu, platform.platform(), platform.python_version())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ours-python", default=sys.executable)
    parser.add_argument("--mlserver-python", required=True)
    parser.add_argument("--seconds", type=int, default=10, help="wrk duration per measurement")
    parser.add_argument("--workers", type=int, default=2, help="md-runtime workers")
    parser.add_argument("--py-spy", help="py-spy executable: profile md-runtime's workers at c=1 (default: skip)")
    args = parser.parse_args()

    WORK.mkdir(exist_ok=True)
    ours_dir, theirs_dir = WORK / "ours-model", WORK / "mlserver-model"
    for model_dir, python in ((ours_dir, args.ours_python), (theirs_dir, args.mlserver_python)):
        shutil.rmtree(str(model_dir), ignore_errors=True)
        model_dir.mkdir()
        subprocess.run([python, "-c", TRAIN, str(model_dir / "model.joblib")], check=True)
    (ours_dir / "package.py").write_text(PACKAGE_PY)

    servers = []
    try:
        servers.append(start_ours("md-runtime batching", args.ours_python, ours_dir, args.workers, 64, WORK / "ours-batch.log"))
        servers.append(start_ours("md-runtime", args.ours_python, ours_dir, args.workers, 0, WORK / "ours.log"))
        servers.append(start_mlserver(args.mlserver_python, theirs_dir, WORK / "mlserver.log"))
        results = []
        scenarios = [(c, r) for r in (1, 100) for c in (1, 8, 64)]
        for i, (connections, rows) in enumerate(scenarios):
            order = servers[i % 3:] + servers[:i % 3]  # alternate which server goes first
            for server in order:
                wrk(server, rows, connections, 2)  # warm-up
                results.append(wrk(server, rows, connections, args.seconds))
                print(results[-1], flush=True)
        for server in servers:
            results.append(big_request(server))
            print(results[-1], flush=True)
        results += big_v2_requests(servers[1])
        print(results[-2:], flush=True)
        baseline = {s.name: http_baseline(s) for s in servers[1:]}
        sampled = sampled_profile(args.py_spy, servers[1]) if args.py_spy else {}
        in_process = json.loads(subprocess.run([args.ours_python, "-c", BREAKDOWN, str(ours_dir), ours_body(1).decode()],
                                               capture_output=True, text=True, check=True).stdout)
    finally:
        for server in servers:
            stop(server)

    ours_versions = versions(args.ours_python, ["md-runtime", "flask", "gunicorn", "gevent", "pandas", "numpy", "scikit-learn"])
    theirs_versions = versions(args.mlserver_python, ["mlserver", "mlserver-sklearn", "scikit-learn", "numpy"])
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[0]
    (BENCH / "RESULTS.md").write_text(report(results, ours_versions, theirs_versions, wrk_version, args)
                                      + profile(baseline, in_process, sampled))
    print((BENCH / "RESULTS.md").read_text())
    return 0


def report(results: List[Result], ours: Dict[str, str], theirs: Dict[str, str], wrk_version: str, args) -> str:
    by = {(r.server, r.scenario): r for r in results}
    lines = [
        "# md-runtime vs MLServer",
        "",
        "Written by `bash bench/run.sh` on {}.".format(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())),
        "",
        "- Machine: {}".format(machine()),
        "- md-runtime: {} workers (gevent), {}".format(args.workers, ", ".join("{} {}".format(k, v) for k, v in ours.items())),
        "- MLServer: one process (parallel_workers=0), {}".format(", ".join("{} {}".format(k, v) for k, v in theirs.items())),
        "- Load: {}, {} s per measurement after a 2 s warm-up, on 127.0.0.1; servers alternate within each scenario".format(wrk_version, args.seconds),
        "- Model: StandardScaler + LogisticRegression on 20 features, predict_proba; md-runtime gets JSON split"
        " frames (and, for the 10,000-row request, V2 tensors as JSON and as binary), MLServer V2 tensors as JSON;"
        " md-runtime's package.py does what package_py_templates/sklearn does (selects columns only when they come"
        " out of order, builds the output's column Index once)",
        "",
        "| scenario | server | req/s | rows/s | p50 ms | p99 ms | errors | req/s vs MLServer | p99 vs MLServer |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for scenario in dict.fromkeys(r.scenario for r in results):
        theirs_result = by.get(("mlserver", scenario))
        for r in (x for x in results if x.scenario == scenario):
            ratio = r.rps / theirs_result.rps if theirs_result else float("nan")
            p99_ratio = r.p99_ms / theirs_result.p99_ms if theirs_result else float("nan")
            lines.append("| {} | {} | {:.0f} | {:.0f} | {:.2f} | {:.2f} | {} | {:.2f}x | {:.2f}x |".format(
                scenario, r.server, r.rps, r.rps * r.rows, r.p50_ms, r.p99_ms, r.errors, ratio, p99_ratio))
    lines += ["", "For the 10,000-row request, req/s is 1 / median time, p50 the median and p99 the slowest of 5.", ""]
    lines += targets(by)
    return "\n".join(lines) + "\n"


def profile(baseline: Dict[str, float], in_process: Dict[str, float], sampled: Dict[str, float]) -> str:
    lines = ["", "## Where a 1-row request's time goes", "",
             "HTTP stack alone, p50 of the cheapest GET at c=1 (no model work): " + ", ".join(
                 "{} {:.3f} ms".format(name, ms) for name, ms in baseline.items()) + ".", "",
             "md-runtime's steps in-process, 1 row (best of 5 x 500 calls):", "",
             "| step | microseconds |", "| --- | ---: |"]
    lines += ["| {} | {:.0f} |".format(name, us) for name, us in in_process.items()]
    if sampled:
        lines += ["", "py-spy on md-runtime's workers (batching off) at c=1, 1-row requests, share of busy samples:", "",
                  "| part | share |", "| --- | ---: |"]
        lines += ["| {} | {:.0f}% |".format(name, share) for name, share in sampled.items()]
    lines += ["", "wrk's latency percentiles include its coordinated-omission correction: after the run it adds"
              " synthetic samples for every request slower than the mean interval per connection, so one slow"
              " request at c=64 counts many times in p99.", ""]
    return "\n".join(lines)


def targets(by: Dict) -> List[str]:
    def check(label: str, ok: bool, detail: str) -> str:
        return "- {} {}: {}".format("MET" if ok else "MISSED", label, detail)

    batch64, plain64, theirs64 = (by[(s, "c=64 rows=1")] for s in ("md-runtime batching", "md-runtime", "mlserver"))
    plain1, theirs1 = by[("md-runtime", "c=1 rows=1")], by[("mlserver", "c=1 rows=1")]
    big = [by[(s, "one request, rows=10000")] for s in ("md-runtime v2 binary", "mlserver")]
    return [
        "## Targets",
        "",
        check("1 row, c=64, batching: >= 3x MLServer's req/s with p99 no worse", batch64.rps >= 3 * theirs64.rps and batch64.p99_ms <= theirs64.p99_ms,
              "{:.2f}x req/s, p99 {:.1f} ms vs {:.1f} ms".format(batch64.rps / theirs64.rps, batch64.p99_ms, theirs64.p99_ms)),
        check("1 row, c=1: p50 no worse than MLServer's", plain1.p50_ms <= theirs1.p50_ms,
              "{:.2f} ms vs {:.2f} ms".format(plain1.p50_ms, theirs1.p50_ms)),
        check("10,000 rows (ours: v2 binary tensors): >= 2x MLServer's rows/s", big[0].rps >= 2 * big[1].rps, "{:.2f}x".format(big[0].rps / big[1].rps)),
        check("batching off, c=64: p99 under 5x p50", plain64.p99_ms < 5 * plain64.p50_ms,
              "p50 {:.1f} ms, p99 {:.1f} ms".format(plain64.p50_ms, plain64.p99_ms)),
        check("batching off: no regression against the naive Flask numbers (650 req/s at c=1, 1,270 at c=64)",
              plain1.rps >= 650 and plain64.rps >= 1270, "{:.0f} req/s at c=1, {:.0f} at c=64".format(plain1.rps, plain64.rps)),
    ]


if __name__ == "__main__":
    sys.exit(main())
