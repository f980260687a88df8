"""Slow clients against a good one: how long a good client waits while thousands of connections stall.

Starts `md-runtime serve` (2 workers, default settings) on 127.0.0.1 with a one-line model, opens N
connections that stall (kind `headers`: a request line and part of the headers; kind `body`: whole headers
declaring 1,000 bytes and 5 of them sent), then times a good client's requests, each on a new connection,
while the stalled ones stay open. Several reps per kind, the kinds alternating; the report gives each rep and
the worst. Writes bench/SLOW_CLIENTS.md. Run it with `.venv/bin/python bench/slow_clients.py`.
"""

import argparse
import http.client
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

BENCH = Path(__file__).resolve().parent
WORK = BENCH / ".work" / "slow-clients"
PACKAGE = '''import pandas as pd


class Model:
    def predict(self, input_df):
        return pd.DataFrame({"total": input_df.sum(axis=1, numeric_only=True)})


def get_model():
    return Model()
'''
STALLS = {
    "headers": b"POST /predict HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n",
    "body": b"POST /predict HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n[{\"a\"",
}
GOOD = b'[{"a": 1, "b": 2}]'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(port: int, env: Dict[str, str]) -> subprocess.Popen:
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "model").mkdir(exist_ok=True)
    (WORK / "model" / "package.py").write_text(PACKAGE)
    argv = [sys.executable, "-m", "md_runtime.cli", "serve", str(WORK / "model"), "--host", "127.0.0.1", "--port",
            str(port), "--workers", "2"]
    process = subprocess.Popen(argv, env=env, stdout=open(str(WORK / "server.log"), "w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if good_request(port) is not None:
                return process
        except OSError:
            time.sleep(0.2)
    raise SystemExit("server did not start; see {}".format(WORK / "server.log"))


def good_request(port: int, timeout: float = 60) -> float:
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/predict", body=GOOD, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        body = response.read()
        if response.status != 200 or b'"total":3' not in body:
            raise OSError("bad answer {} {!r}".format(response.status, body[:200]))
    finally:
        connection.close()
    return (time.perf_counter() - started) * 1000


def stall(port: int, kind: str, count: int) -> List[socket.socket]:
    stalled = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(STALLS[kind])
        stalled.append(sock)
    return stalled


def one_rep(port: int, kind: str, count: int, requests: int) -> Dict[str, float]:
    stalled = stall(port, kind, count)
    try:
        times, failures = [], 0
        for _ in range(requests):
            try:
                times.append(good_request(port))
            except OSError:
                failures += 1
        times.sort()
        return {"p50": statistics.median(times) if times else float("nan"),
                "p99": times[int(len(times) * 0.99) - 1] if times else float("nan"),
                "max": times[-1] if times else float("nan"), "failures": failures}
    finally:
        for sock in stalled:
            sock.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000, help="stalled connections per rep")
    parser.add_argument("--requests", type=int, default=200, help="good requests timed per rep")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--worker-connections", help="MD_WORKER_CONNECTIONS for the server (default: the runtime's)")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this client holds every stalled socket
    env = {k: v for k, v in os.environ.items() if not k.startswith("MD_")}
    if args.worker_connections:
        env["MD_WORKER_CONNECTIONS"] = args.worker_connections
    port = free_port()
    server = start(port, env)
    rows = []
    try:
        for rep in range(args.reps):
            for kind in (("headers", "body") if rep % 2 == 0 else ("body", "headers")):
                result = one_rep(port, kind, args.connections, args.requests)
                rows.append((rep + 1, kind, result))
                print(rep + 1, kind, {k: round(v, 2) for k, v in result.items()}, flush=True)
                time.sleep(1)
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(30)
    write_report(rows, args)
    return 0


def write_report(rows: List, args: argparse.Namespace) -> None:
    lines = ["# A good client among slow ones", "",
             "Written by `bench/slow_clients.py` on {} UTC: {} CPUs, Python {}, {} stalled connections per rep, {} good "
             "requests per rep (each on a new connection), worker connections {}.".format(
                 time.strftime("%Y-%m-%d %H:%M", time.gmtime()), os.cpu_count(), platform.python_version(),
                 args.connections, args.requests, args.worker_connections or "default"), "",
             "| rep | stalled in | good p50 ms | good p99 ms | good max ms | failed |", "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for rep, kind, result in rows:
        lines.append("| {} | {} | {:.2f} | {:.2f} | {:.2f} | {} |".format(rep, kind, result["p50"], result["p99"], result["max"],
                                                                      result["failures"]))
    for kind in ("headers", "body"):
        worst = max((r for _, k, r in rows if k == kind), key=lambda r: r["p99"])
        lines.append("")
        lines.append("Worst rep, stalled in {}: p99 {:.2f} ms, {} failed.".format(kind, worst["p99"], worst["failures"]))
    (BENCH / "SLOW_CLIENTS.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
