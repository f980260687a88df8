"""Side-by-side benchmark: md-runtime against MLServer and LitServe, each at its best setting, in one run.

The same scikit-learn pipeline (StandardScaler + LogisticRegression, 20 numeric features), trained by each
server's own Python from the same seed, served on 127.0.0.1 and driven by wrk at concurrency 1, 8 and 64
with 1-row and 100-row requests, plus one 10,000-row request timed on its own. Every server is started fresh
for each rep; within a rep each cell is measured on all servers back to back, their order rotated and
reversed from cell to cell and from rep to rep, and the tables show the median and the worst rep; a target
counts as met only when md-runtime meets it in every rep against that rep's best peer.
The CPU each request costs is the server's whole process tree's user and system time over the measurement,
divided by the requests it answered. Writes bench/RESULTS.md. Run it with `bash bench/run.sh`.
"""

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Tuple

import peers
import where_time_goes
from report import BATCHING_PEERS, OURS, OURS_BATCHING, PEERS, Result, report

BENCH = Path(__file__).resolve().parent
WORK = BENCH / ".work"
CELLS = [(c, rows) for rows in (1, 100) for c in (1, 8, 64)]
BIG_ROWS = 10000
BIG_CELL = (1, BIG_ROWS)
BLAS_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

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

class Setup(NamedTuple):
    ours_python: str
    mlserver_python: str
    litserve_python: str
    models: Dict[str, Path]


def starters(setup: Setup) -> Dict[str, Callable[[Path], peers.Server]]:
    """Each server of the run, by name: a function of its log file that starts it."""
    ours, mlserver, litserve = (setup.models[name] for name in ("ours", "mlserver", "litserve"))
    return {
        OURS: lambda log: peers.start_ours(OURS, setup.ours_python, ours, 2, log),
        OURS_BATCHING: lambda log: peers.start_ours(OURS_BATCHING, setup.ours_python, ours, 2, log, batch=peers.BATCH_SIZE),
        PEERS[0]: lambda log: peers.start_mlserver(PEERS[0], setup.mlserver_python, mlserver, 1, log),
        PEERS[1]: lambda log: peers.start_mlserver(PEERS[1], setup.mlserver_python, mlserver, 2, log),
        BATCHING_PEERS[0]: lambda log: peers.start_mlserver(BATCHING_PEERS[0], setup.mlserver_python, mlserver, 2, log,
                                                            batch=peers.BATCH_SIZE),
        PEERS[2]: lambda log: peers.start_litserve(PEERS[2], setup.litserve_python, litserve, 2, log),
        BATCHING_PEERS[1]: lambda log: peers.start_litserve(BATCHING_PEERS[1], setup.litserve_python, litserve, 2, log,
                                                            batch=peers.BATCH_SIZE),
    }


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def parse_ms(text: str) -> float:
    number, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(number) * UNITS[unit]


def post_script(server: peers.Server, rows: int) -> Path:
    """wrk's Lua script posting one body of `rows` rows to the server."""
    script = WORK / "post-{}-{}.lua".format(re.sub(r"\W+", "-", server.name), rows)
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "{}"\nwrk.body = [==[{}]==]\n'.format(
        server.content_type, server.body(rows).decode()))
    return script


def wrk(server: peers.Server, rows: int, connections: int, seconds: int) -> Tuple[float, float, float, int, int]:
    """(req/s, p50 ms, p99 ms, errors, requests) of one wrk run."""
    command = ["wrk", "-t", str(min(connections, 2)), "-c", str(connections), "-d", "{}s".format(seconds), "--latency",
               "-s", str(post_script(server, rows)), server.url]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = parse_ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = parse_ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(bad.group(1)) if bad else 0) + (sum(map(int, socket_errors.groups())) if socket_errors else 0)
    return rps, p50, p99, errors, requests


def measure_cell(server: peers.Server, rep: int, connections: int, rows: int, seconds: int) -> Result:
    wrk(server, rows, connections, 1)  # warm-up: the connections' first requests, the allocator
    cpu_before = peers.cpu_seconds(server)
    rps, p50, p99, errors, requests = wrk(server, rows, connections, seconds)
    cpu_ms = (peers.cpu_seconds(server) - cpu_before) * 1000 / max(requests, 1)
    return Result(server.name, "c={} rows={}".format(connections, rows), rep, rows, rps, p50, p99, errors, cpu_ms)


def big_request(server: peers.Server, rep: int, repeats: int = 20, warm_up: int = 4) -> Result:
    """One BIG_ROWS-row request at a time: the platform's JSON split for md-runtime and LitServe, V2 JSON for
    MLServer. The first warm_up requests warm every worker (a fresh connection each, so any worker may take
    one); req/s is 1 / the median time of the next repeats, p99 the slowest of them."""
    body, times = server.body(BIG_ROWS), []
    for _ in range(warm_up + repeats):
        request = urllib.request.Request(server.url, data=body, headers={"Content-Type": server.content_type})
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
        times.append(time.perf_counter() - started)
        if len(times) == warm_up:
            cpu_before = peers.cpu_seconds(server)
    cpu_ms = (peers.cpu_seconds(server) - cpu_before) * 1000 / repeats
    median = statistics.median(times[warm_up:])
    return Result(server.name, "one request, rows={}".format(BIG_ROWS), rep, BIG_ROWS, 1 / median, median * 1000,
                  max(times[warm_up:]) * 1000, 0, cpu_ms)


# LitServe with batching polls its queue while idle (a quarter of a core): it runs only for its own cells.
IDLE_POLLERS = frozenset([BATCHING_PEERS[1]])


def run_rep(starts: Dict[str, Callable[[Path], peers.Server]], order: List[str], rep: int, seconds: int) -> List[Result]:
    """One rep: every server started fresh, then each cell measured on all of them back to back (in an order
    rotated and reversed from cell to cell), so that a slow minute of the shared machine falls on every server
    of a cell, not on one server's whole rep."""
    def log(name: str, suffix: str = "") -> Path:
        return WORK / "{}-{}{}.log".format(re.sub(r"\W+", "-", name), rep, suffix)

    live = {name: starts[name](log(name)) for name in order if name not in IDLE_POLLERS}
    results = []
    try:
        for index, cell in enumerate(CELLS + [BIG_CELL]):
            for name in order_of(order, index):
                server = live.get(name) or starts[name](log(name, "-cell{}".format(index)))
                try:
                    results.append(measure(server, rep, cell, seconds))
                finally:
                    if name not in live:
                        peers.stop(server)
                print(results[-1], flush=True)
    finally:
        for server in live.values():
            peers.stop(server)
    return results


def measure(server: peers.Server, rep: int, cell: Tuple[int, int], seconds: int) -> Result:
    connections, rows = cell
    return big_request(server, rep) if cell == BIG_CELL else measure_cell(server, rep, connections, rows, seconds)


def order_of(names: List[str], rep: int) -> List[str]:
    """Rotated by the rep, and reversed every other rep: each server goes first, and last, in some rep."""
    rotated = names[rep % len(names):] + names[:rep % len(names)]
    return rotated[::-1] if rep % 2 else rotated


def prepare(setup_pythons: Dict[str, str]) -> Dict[str, Path]:
    models = {}
    for name, python in setup_pythons.items():
        model_dir = WORK / "{}-model".format(name)
        shutil.rmtree(str(model_dir), ignore_errors=True)
        model_dir.mkdir(parents=True)
        subprocess.run([python, "-c", TRAIN, str(model_dir / "model.joblib")], check=True)
        models[name] = model_dir
    (models["ours"] / "package.py").write_text(PACKAGE_PY)
    return models


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ours-python", default=sys.executable)
    parser.add_argument("--mlserver-python", required=True)
    parser.add_argument("--litserve-python", required=True)
    parser.add_argument("--seconds", type=int, default=5, help="wrk duration per measurement, after a 1 s warm-up")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="run only these servers (default: all)")
    parser.add_argument("--unset-blas-env", action="store_true",
                        help="unset {} for every server (they slow current numpy; default: as the machine sets them)".format(
                            " and ".join(BLAS_VARIABLES)))
    parser.add_argument("--py-spy", help="py-spy executable: profile md-runtime's workers at c=1 (default: skip)")
    parser.add_argument("--output", default=str(BENCH / "RESULTS.md"))
    args = parser.parse_args()
    if args.unset_blas_env:
        for variable in BLAS_VARIABLES:
            os.environ.pop(variable, None)

    WORK.mkdir(exist_ok=True)
    setup = Setup(args.ours_python, args.mlserver_python, args.litserve_python, {})
    setup = setup._replace(models=prepare({"ours": args.ours_python, "mlserver": args.mlserver_python,
                                           "litserve": args.litserve_python}))
    servers = starters(setup)
    names = [name for name in servers if not args.only or name in args.only]
    results = []
    for rep in range(args.reps):
        results += run_rep(servers, order_of(names, rep), rep, args.seconds)
    profile = ""
    if OURS in names:
        profile = where_time_goes_section(setup, servers[OURS], args.py_spy)
    Path(args.output).write_text(report(results, describe(setup, args)) + profile)
    print(Path(args.output).read_text())
    return 0


def where_time_goes_section(setup: Setup, start: Callable[[Path], peers.Server], py_spy: str) -> str:
    server = start(WORK / "profile.log")
    try:
        baseline = {OURS: http_baseline(server.url.replace("/predict", "/ping"))}
        shares = where_time_goes.sampled(py_spy, server, post_script(server, 1), WORK) if py_spy else {}
    finally:
        peers.stop(server)
    steps = where_time_goes.in_process(setup.ours_python, setup.models["ours"], peers.split_body(1))
    return where_time_goes.section(baseline, steps, shares)


def http_baseline(url: str) -> float:
    """p50 ms of the cheapest GET at c=1: what the HTTP stack costs with no model work."""
    out = subprocess.run(["wrk", "-t", "1", "-c", "1", "-d", "3s", "--latency", url], capture_output=True, text=True, check=True).stdout
    return parse_ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return "{} CPUs ({}), {} , Python {}".format(os.cpu_count(), cpu, platform.platform(), platform.python_version())


def describe(setup: Setup, args: argparse.Namespace) -> List[str]:
    """The run's set-up, a line each: machine, versions, load."""
    ours = peers.versions(setup.ours_python, ["md-runtime", "flask", "gunicorn", "gevent", "orjson", "pysimdjson", "pandas", "numpy", "scikit-learn"])
    mlserver = peers.versions(setup.mlserver_python, ["mlserver", "mlserver-sklearn", "uvloop", "scikit-learn", "numpy"])
    litserve = peers.versions(setup.litserve_python, ["litserve", "fastapi", "uvicorn", "pyzmq", "scikit-learn", "numpy"])
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[0]
    blas = ", ".join("{}={}".format(v, os.environ[v]) for v in BLAS_VARIABLES if v in os.environ) or "unset"
    return [
        "Machine: {}; BLAS environment: {}".format(machine(), blas),
        "md-runtime, 2 gevent workers: " + ", ".join("{} {}".format(k, v) for k, v in ours.items()),
        "MLServer, parallel inference workers: " + ", ".join("{} {}".format(k, v) for k, v in mlserver.items()),
        "LitServe, 2 inference workers, 2 API servers, fast_queue: " + ", ".join("{} {}".format(k, v) for k, v in litserve.items()),
        "Batching where on: {} rows at most, {:g} ms wait, for every server".format(peers.BATCH_SIZE, peers.BATCH_DELAY_S * 1000),
        "Load: {}, {} s per measurement after a 1 s warm-up, on 127.0.0.1; {} reps, each server started fresh for each; "
        "within a rep each cell on all servers back to back, the order rotated and reversed from cell to cell and rep to "
        "rep (LitServe with batching started for each of its cells: it polls while idle)".format(
            wrk_version, args.seconds, args.reps),
    ]


if __name__ == "__main__":
    sys.exit(main())
