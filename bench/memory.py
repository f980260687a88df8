"""Memory and time to ready: md-runtime, preloading and not, against MLServer's parallel workers, in one run.

A scikit-learn random forest of about 330 MB (the same seed, trained by each server's own Python), served with
1, 2 and 4 workers. For each server and worker count: the seconds from start until every worker has the
model (md-runtime: /ready, plus each worker's load in its log when not preloading; MLServer: the model's
ready endpoint), then the replica's memory, the PSS of the server's whole process tree, once every worker has
answered predictions. Reps alternate the servers' order; the tables show the worst rep and the spread.
Writes bench/MEMORY.md:

    bash bench/run.sh --memory    # sets up MLServer's venv in bench/.work, then runs this
"""

import argparse
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402  (starting and stopping the servers)
from bench import machine  # noqa: E402

BENCH = Path(__file__).resolve().parent
WORK = BENCH / ".work" / "memory"
WORKERS = (1, 2, 4)
OURS_IMPORTS = "import gunicorn.arbiter, md_runtime.app, md_runtime.worker, sklearn.ensemble"
THEIR_IMPORTS = "import mlserver.server, mlserver_sklearn, sklearn.ensemble"
ROWS_PER_REQUEST = 5

TRAIN = r'''
import sys
import joblib
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier

X, y = make_classification(n_samples=200000, n_features=20, n_informative=12, flip_y=0.2, random_state=0)
joblib.dump(RandomForestClassifier(n_estimators=100, random_state=0, n_jobs=-1).fit(X, y), sys.argv[1])
'''

PACKAGE_PY = '''
from pathlib import Path

import joblib
import pandas as pd

HERE = Path(__file__).parent


class Forest:
    def __init__(self):
        self.forest = joblib.load(HERE / "model.joblib")

    def predict(self, input_df):
        return pd.DataFrame(self.forest.predict_proba(input_df.to_numpy()), columns=["p0", "p1"])


def get_model():
    return Forest()
'''


class Cell(NamedTuple):
    server: str
    workers: int
    ready_seconds: float
    pss_mib: float


def tree_pss_mib(root: int) -> float:
    """The PSS of a process and all its descendants, from /proc."""
    parents: Dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    total = 0.0
    for pid in tree:
        try:
            rollup = Path("/proc/{}/smaps_rollup".format(pid)).read_text()
        except OSError:
            continue
        total += next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:")) / 1024
    return total


def post(url: str, body: bytes) -> None:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", "Connection": "close"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200, response.status


def wait_for_lines(log: Path, text: str, count: int, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if log.read_text(errors="replace").count(text) >= count:
            return
        time.sleep(0.05)
    raise SystemExit("{}: not {} x {!r} in {} s".format(log, count, text, timeout))


def start_ours(python: str, model_dir: Path, workers: int, preload: bool, log: Path) -> Tuple[peers.Server, float]:
    name = "md-runtime, {}".format("preloaded" if preload else "loaded per worker")
    started = time.monotonic()
    server = peers.start_ours(name, python, model_dir, workers, log, env={"MD_PRELOAD": str(preload).lower(),
                              "MD_LOG_LEVEL": "info"}, ready_timeout=600)
    wait_for_lines(log, "loaded model from", 1 if preload else workers)  # every worker has its model
    wait_for_lines(log, "Booting worker", workers)
    return server, time.monotonic() - started


def start_mlserver(python: str, model_dir: Path, workers: int, log: Path) -> Tuple[peers.Server, float]:
    started = time.monotonic()
    server = peers.start_mlserver("MLServer, parallel workers", python, model_dir, workers, log, model_name="forest",
                                  ready_timeout=600)
    return server, time.monotonic() - started


def measure(start: Callable[[], Tuple[peers.Server, float]], workers: int) -> Cell:
    server, ready = start()
    try:
        for _ in range(30 * workers):  # on fresh connections, so that every worker predicts
            post(server.url, server.body(ROWS_PER_REQUEST))
        time.sleep(2)
        return Cell(server.name, workers, ready, tree_pss_mib(server.process.pid))
    finally:
        peers.stop(server)


def one_load_seconds(python: str, model: Path, imports: str) -> Tuple[float, float]:
    """(joblib.load alone, a whole process: the interpreter's start, the server's imports and the load)."""
    code = "import time, joblib; t = time.perf_counter(); joblib.load({!r}); print(time.perf_counter() - t)".format(str(model))
    started = time.monotonic()
    done = subprocess.run([python, "-c", imports + "\n" + code], capture_output=True, text=True, check=True)
    return float(done.stdout), time.monotonic() - started


def prepare(python: str, name: str) -> Path:
    model_dir = WORK / name
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "package.py").write_text(PACKAGE_PY)
    if not (model_dir / "model.joblib").is_file():
        subprocess.run([python, "-c", TRAIN, str(model_dir / "model.joblib")], check=True)
    return model_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ours-python", default=str(BENCH.parent / ".venv" / "bin" / "python"))
    parser.add_argument("--mlserver-python", required=True)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=str(BENCH / "MEMORY.md"))
    args = parser.parse_args()
    ours_dir, theirs_dir = prepare(args.ours_python, "ours"), prepare(args.mlserver_python, "mlserver")
    logs = WORK / "logs"
    logs.mkdir(exist_ok=True)
    starts: List[Tuple[str, Callable[[int], Callable[[], Tuple[peers.Server, float]]]]] = [
        ("md-runtime, preloaded", lambda n: lambda: start_ours(args.ours_python, ours_dir, n, True, logs / "ours.log")),
        ("md-runtime, loaded per worker", lambda n: lambda: start_ours(args.ours_python, ours_dir, n, False, logs / "ours.log")),
        ("MLServer, parallel workers", lambda n: lambda: start_mlserver(args.mlserver_python, theirs_dir, n, logs / "mlserver.log")),
    ]
    cells: List[Cell] = []
    for rep in range(args.reps):
        order = starts if rep % 2 == 0 else starts[::-1]
        for workers in WORKERS:
            for name, start in order:
                cell = measure(start(workers), workers)
                print("rep {} {:32} workers={} ready {:.2f}s PSS {:.0f} MiB".format(rep + 1, name, workers,
                                                                                       cell.ready_seconds, cell.pss_mib), flush=True)
                cells.append(cell)
    loads = {"md-runtime": one_load_seconds(args.ours_python, ours_dir / "model.joblib", OURS_IMPORTS),
             "MLServer": one_load_seconds(args.mlserver_python, theirs_dir / "model.joblib", THEIR_IMPORTS)}
    Path(args.out).write_text(report(cells, loads, args, (ours_dir / "model.joblib").stat().st_size / 2 ** 20))
    print("wrote", args.out)
    return 0


def report(cells: List[Cell], loads: Dict[str, float], args: argparse.Namespace, model_mib: float) -> str:
    names = sorted({cell.server for cell in cells}, key=[c.server for c in cells].index)
    ours = peers.versions(args.ours_python, ["scikit-learn", "numpy", "gunicorn", "gevent"])
    theirs = peers.versions(args.mlserver_python, ["mlserver", "mlserver-sklearn", "scikit-learn", "numpy", "uvloop"])
    lines = [
        "# Memory and time to ready", "",
        "`bench/memory.py`, one run: {} reps, the servers' order alternating; each cell is the worst rep (highest), "
        "with the spread over reps. A scikit-learn random forest, {:.0f} MB pickled. One load of it, `joblib.load` "
        "alone / a whole process (the interpreter's start, the server's imports, the load): {:.2f} s / {:.2f} s with "
        "md-runtime's Python, {:.2f} s / {:.2f} s with MLServer's.".format(
            args.reps, model_mib, *loads["md-runtime"], *loads["MLServer"]),
        "", "Machine: {}.".format(machine()),
        "md-runtime: {}. MLServer: {}.".format(", ".join("{} {}".format(k, v) for k, v in ours.items()),
                                               ", ".join("{} {}".format(k, v) for k, v in theirs.items())), "",
        "Replica memory: the PSS of the server's whole process tree once every worker has answered predictions, MiB.", "",
        "| server | " + " | ".join("{} worker(s)".format(n) for n in WORKERS) + " | 4 workers / 1 |", "|---" * (len(WORKERS) + 2) + "|",
    ]
    for name in names:
        worst = {n: max(c.pss_mib for c in cells if c.server == name and c.workers == n) for n in WORKERS}
        spread = {n: max(c.pss_mib for c in cells if c.server == name and c.workers == n)
                  - min(c.pss_mib for c in cells if c.server == name and c.workers == n) for n in WORKERS}
        lines.append("| {} | ".format(name) + " | ".join("{:.0f} (±{:.0f})".format(worst[n], spread[n] / 2) for n in WORKERS)
                     + " | {:.2f}x |".format(worst[4] / worst[1]))
    lines += ["", "Time to ready: seconds from start until every worker holds the model; the last column divides the "
              "4 workers' time by one whole-process load with the same server's imports.", "",
              "| server | " + " | ".join("{} worker(s)".format(n) for n in WORKERS) + " | 4 workers / 1 | 4 workers / one load |",
              "|---" * (len(WORKERS) + 3) + "|"]
    for name in names:
        worst = {n: max(c.ready_seconds for c in cells if c.server == name and c.workers == n) for n in WORKERS}
        spread = {n: statistics.pstdev([c.ready_seconds for c in cells if c.server == name and c.workers == n]) for n in WORKERS}
        one_load = loads["md-runtime" if name.startswith("md-runtime") else "MLServer"][1]
        lines.append("| {} | ".format(name) + " | ".join("{:.2f} (sd {:.2f})".format(worst[n], spread[n]) for n in WORKERS)
                     + " | {:.2f}x | {:.2f}x |".format(worst[4] / worst[1], worst[4] / one_load))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
