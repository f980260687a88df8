"""Sizing: fit the gunicorn workers into the replica's memory, before they start.

Each worker loads its own copy of the model, so a replica needs about base + workers x model. When the
memory is known (MD_MEMORY_MIB or the cgroup limit), the model is loaded once in a probe process whose
memory is watched: if it grows past the limit the probe is stopped before the kernel's OOM killer acts.
Then the workers are reduced until they fit, or start-up ends with a message saying how much memory to ask
for. Without the probe, a too-small replica is killed silently (exit 137) while loading.
"""

import json
import logging
import math
import subprocess
import time
from pathlib import Path
from typing import NamedTuple, Optional

from ..errors import MemoryLimitError
from .resources import memory_limit_mib, rss_mib

log = logging.getLogger("md_runtime.boot.sizing")

PROBE_COMMAND = "_probe"  # a hidden `md-runtime` command: load the model, print what it took (cli.probe)
POLL_SECONDS = 0.02
PROBE_SHARE = 0.9  # the probe is stopped at this share of the limit: the kernel must not get there first
HEADROOM = 1.1  # requests, encoders and the allocator's slack on top of the loaded model


class Footprint(NamedTuple):
    base_mib: float  # a process with the runtime imported: what the gunicorn master holds
    model_mib: float  # a process that loaded the model: what each worker holds
    stopped: bool  # the probe outgrew the limit and was stopped; model_mib is a lower bound


def needed_mib(footprint: Footprint, workers: int) -> int:
    """MiB for the master and `workers` workers with headroom, rounded up to a multiple of 16."""
    return int(math.ceil((footprint.base_mib + workers * footprint.model_mib) * HEADROOM / 16.0) * 16)


def fit_workers(model_dir: Path, workers: int, python: str, memory_mib: Optional[int]) -> int:
    """The number of workers to start: `workers`, or fewer when only fewer fit; MemoryLimitError when none fits."""
    limit = float(memory_mib) if memory_mib else memory_limit_mib()
    if limit is None:
        return workers
    footprint = probe(model_dir, python, stop_at_mib=limit * PROBE_SHARE)
    if footprint is None:
        return workers  # the model does not load: the workers report why, with its traceback
    fitting = [n for n in range(workers, 0, -1) if needed_mib(footprint, n) <= limit]
    if footprint.stopped or not fitting:
        raise MemoryLimitError(footprint.model_mib, footprint.base_mib, limit, workers, needed_mib(footprint, 1),
                               footprint.stopped)
    log.info("memory: the model takes about %.0f MiB per worker; %d worker(s) fit in %.0f MiB",
             footprint.model_mib, fitting[0], limit)
    if fitting[0] < workers:
        log.warning("memory: starting %d worker(s) instead of %d: %d need about %d MiB and this replica has "
                    "%.0f MiB; raise memory to at least %d MiB for all of them", fitting[0], workers, workers,
                    needed_mib(footprint, workers), limit, needed_mib(footprint, workers))
    return fitting[0]


def probe(model_dir: Path, python: str, stop_at_mib: float) -> Optional[Footprint]:
    """Load the model in a child process (the overlay's Python) and watch its memory while it does."""
    child = subprocess.Popen([python, "-m", "md_runtime.cli", PROBE_COMMAND, str(model_dir)], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
    seen = 0.0
    while child.poll() is None:
        seen = max(seen, rss_mib(str(child.pid)) or 0.0)
        if seen > stop_at_mib:
            child.kill()
            child.communicate()
            return Footprint(0.0, seen, stopped=True)
        time.sleep(POLL_SECONDS)
    output = child.communicate()[0].decode()
    if child.returncode == -9:  # the kernel got there between two polls
        return Footprint(0.0, max(seen, stop_at_mib), stopped=True)
    if child.returncode != 0:
        return None
    report = json.loads(output.strip().splitlines()[-1])
    return Footprint(report["base_mib"], report["model_mib"], stopped=False)
