"""Where a 1-row request's time goes in md-runtime: its steps timed in-process, and py-spy on its workers.

Used by bench.py for the profile section of bench/RESULTS.md.
"""

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict

from peers import Server

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
    "encode (DataFrame -> JSON records)": lambda: codecs.encode(output),
}
print(json.dumps({name: min(timeit.repeat(step, number=500, repeat=5)) / 500 * 1e6 for name, step in steps.items()}))
'''

# Where a sampled stack's time goes: the first of these met walking from the innermost frame outwards.
PROFILE_PARTS = (
    ("package.py: the wrapper's pandas work and the pipeline", re.compile(r"\(package\.py:")),
    ("md-runtime codecs (bytes <-> DataFrame)", re.compile(r"\(md_runtime/(codecs|inference_protocol)\.py:")),
    ("Prometheus metrics", re.compile(r"\(prometheus_")),
    ("md-runtime routes, batching and worker", re.compile(r"\(md_runtime/")),
    ("Flask and werkzeug (request, routing, response)", re.compile(r"\((flask|werkzeug)/")),
    ("gunicorn (HTTP parsing and writing)", re.compile(r"\(gunicorn/")),
)


def in_process(python: str, model_dir: Path, body: bytes) -> Dict[str, float]:
    """Microseconds of each step, best of 5 x 500 calls."""
    done = subprocess.run([python, "-c", BREAKDOWN, str(model_dir), body.decode()], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def sampled(py_spy: str, server: Server, script: Path, work: Path, seconds: int = 8) -> Dict[str, float]:
    """Share of the workers' busy samples per part, with py-spy on every worker while wrk drives c=1, 1 row."""
    workers = subprocess.run(["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True).stdout.split()
    load = subprocess.Popen(["wrk", "-t", "1", "-c", "1", "-d", "{}s".format(seconds + 2), "-s", str(script), server.url],
                            stdout=subprocess.DEVNULL)
    outputs = [work / "py-spy-{}.txt".format(pid) for pid in workers]
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


def section(baseline: Dict[str, float], steps: Dict[str, float], shares: Dict[str, float]) -> str:
    lines = ["", "## Where a 1-row request's time goes", "",
             "HTTP stack alone, p50 of the cheapest GET at c=1 (no model work): " + ", ".join(
                 "{} {:.3f} ms".format(name, ms) for name, ms in baseline.items()) + ".", "",
             "md-runtime's steps in-process, 1 row (best of 5 x 500 calls):", "",
             "| step | microseconds |", "| --- | ---: |"]
    lines += ["| {} | {:.0f} |".format(name, us) for name, us in steps.items()]
    if shares:
        lines += ["", "py-spy on md-runtime's workers (batching off) at c=1, 1-row requests, share of busy samples:", "",
                  "| part | share |", "| --- | ---: |"]
        lines += ["| {} | {:.0f}% |".format(name, share) for name, share in shares.items()]
    return "\n".join(lines) + "\n"
