"""Sizing: the replica memory a number of workers needs, from what the master measured at start-up.

With preloading, the gunicorn master loads the model once and forks the workers, which share its pages until
they write to them. A replica then holds the master (its resident memory, the model loaded, before any fork)
plus, per worker, the pages that worker writes (its private dirty pages after a first prediction, measured in
a trial worker forked at start-up), plus once the files the workers map beyond the master's (libraries
imported on the first prediction, which they share). So replica = master + files + workers x worker.
Without preloading each worker holds its own copy of the model, and the trial worker's pages include it. The check asks for that figure with HEADROOM on the workers' part, rounded
up to what the platform accepts; while serving, each worker is kept within its share of the limit.
"""

import math
from typing import List, NamedTuple, Optional

from ..errors import MemoryLimitError

HEADROOM = 1.1  # what the allocator and larger requests add to a worker's one measured prediction
ASK_MARGIN = 1.03  # what one start's measurement differs from the next one's: the memory asked for always fits
ASK_STEP = 8  # MiB
GUARD_SHARE = 0.95  # the workers' shares add up to this part of the limit, less the master: the kernel's OOM killer never acts
RECYCLE_AT = 0.8  # a worker is replaced this far from its measured memory to its share: before it fails requests
PLATFORM_MIB = (150, 16384)  # the memory a deployment may ask for


class Footprint(NamedTuple):
    master_mib: float  # the master's resident memory (with the model, when preloaded), before any fork
    worker_mib: float  # what a worker writes: its private dirty pages after a first prediction
    files_mib: float  # files the workers map beyond the master's, shared between them (counted once)
    predicted: bool  # the trial worker made a prediction (no rows to predict on: its figure lacks one)
    preloaded: bool


def replica_mib(footprint: Footprint, workers: int) -> float:
    """The replica memory `workers` workers were measured to take."""
    return footprint.master_mib + footprint.files_mib + workers * footprint.worker_mib


def needed_mib(footprint: Footprint, workers: int) -> float:
    """The measured figure with headroom for the workers, which grow as they serve (the master does not)."""
    return footprint.master_mib + footprint.files_mib + workers * footprint.worker_mib * HEADROOM


def ask_mib(footprint: Footprint, workers: int) -> int:
    """The memory to deploy with: what is needed, rounded up, at least the platform's minimum."""
    asked = needed_mib(footprint, workers) * ASK_MARGIN
    return max(PLATFORM_MIB[0], int(math.ceil(asked / ASK_STEP) * ASK_STEP))


def fit_workers(footprint: Footprint, workers: int, limit_mib: float) -> int:
    """`workers`, or the most that fit under the limit; MemoryLimitError when not even one does."""
    fitting = [n for n in range(workers, 0, -1) if needed_mib(footprint, n) <= limit_mib]
    if not fitting:
        raise MemoryLimitError(limit_mib, workers, [ask_mib(footprint, 1), ask_mib(footprint, workers)], _parts(footprint),
                               PLATFORM_MIB[1])
    return fitting[0]


def worker_share_mib(footprint: Footprint, workers: int, limit_mib: float) -> float:
    """The private memory each worker may hold while serving; past it the worker is recycled."""
    return (limit_mib * GUARD_SHARE - footprint.master_mib) / workers  # the files count in each worker's USS


def recycle_mib(footprint: Footprint, share_mib: float) -> float:
    """The private memory at which a worker is replaced: most of the way from what a worker was measured to hold
    to its share, so that a worker at its measured size is never replaced, however tight the fit."""
    measured = footprint.worker_mib + footprint.files_mib
    return measured + RECYCLE_AT * max(share_mib - measured, 0.0)


def asks(footprint: Footprint, most: int) -> List[str]:
    """One line per worker count, 1..most: what `md-runtime check` prints."""
    lines = ["memory ({}): {}".format("the model loaded once, shared by the workers" if footprint.preloaded
                                      else "each worker loads its own copy of the model", _parts(footprint))]
    for workers in range(1, most + 1):
        lines.append("  {} worker(s): {:.0f} MiB measured; deploy with memory={}".format(
            workers, replica_mib(footprint, workers), ask_mib(footprint, workers)))
    if not footprint.predicted:
        lines.append("  (no rows to predict on: a prediction's memory is not included; add a sample.csv)")
    return lines


def _parts(footprint: Footprint) -> str:
    return "master {:.0f} MiB + {:.0f} MiB per worker".format(footprint.master_mib + footprint.files_mib, footprint.worker_mib)


def stopped_load_error(seen_mib: float, limit_mib: float, workers: int, what: str) -> MemoryLimitError:
    """`what` (loading the model, or a first prediction) was stopped short of the limit, at `seen_mib`."""
    return MemoryLimitError(limit_mib, workers, [], "{} took more than {:.0f} MiB before it was stopped".format(what, seen_mib),
                            PLATFORM_MIB[1])


def limit_mib(configured: Optional[int], cgroup: Optional[float]) -> Optional[float]:
    """The memory the replica has: MD_MEMORY_MIB, else the container's limit."""
    return float(configured) if configured else cgroup
