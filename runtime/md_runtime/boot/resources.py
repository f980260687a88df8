"""Resources: what CPU, memory and open files this process may really use, read from cgroups (v2, then v1)
and rlimits; and the CPU's floating-point mode, which a library can change for the whole process.

A container's limits are not what os.cpu_count() says: a 250-millicore replica on a 16-core node must not
start 16 workers. `root` lets tests point every read at a fake /sys and /proc tree.
"""

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import math
import os
import re
import resource
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, MutableMapping, NamedTuple, Optional, Tuple

log = logging.getLogger("md_runtime.boot")


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroup_paths(root: Path, controller: str) -> Iterator[Path]:
    """The cgroup directories this process sits in, innermost first, then their parents (limits nest)."""
    text = _read(root / "proc/self/cgroup") or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controller == "" and controllers == "":
            base = root / "sys/fs/cgroup"
        elif controller and controller in controllers.split(","):
            base = root / "sys/fs/cgroup" / controllers
        else:
            continue
        here = Path(rel.lstrip("/"))
        while True:
            yield base / here
            if str(here) in ("", "."):
                break
            here = here.parent


def _v2_cpu_quota(root: Path) -> Optional[float]:
    limits = []
    for directory in _own_cgroup_paths(root, ""):
        text = _read(directory / "cpu.max")
        if text and not text.startswith("max"):
            quota, _, period = text.partition(" ")
            limits.append(int(quota) / int(period or "100000"))
    return min(limits) if limits else None


def _v1_cpu_quota(root: Path) -> Optional[float]:
    candidates = list(_own_cgroup_paths(root, "cpu")) + [root / "sys/fs/cgroup/cpu", root / "sys/fs/cgroup/cpu,cpuacct"]
    for directory in candidates:
        quota = _read(directory / "cpu.cfs_quota_us")
        period = _read(directory / "cpu.cfs_period_us")
        if quota and period and int(quota) > 0:
            return int(quota) / int(period)
    return None


def cpu_quota(root: Path = Path("/")) -> Optional[float]:
    """CPUs granted by the cgroup quota (0.25 for 250 millicores), or None when unlimited."""
    quota = _v2_cpu_quota(root)
    return quota if quota is not None else _v1_cpu_quota(root)


def available_cpus(root: Path = Path("/")) -> float:
    """The CPUs this process may use: the cgroup quota, capped by the CPUs it may be scheduled on."""
    try:
        online = float(len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        online = float(os.cpu_count() or 1)
    quota = cpu_quota(root)
    return min(online, quota) if quota is not None else online


def default_workers(root: Path = Path("/")) -> int:
    """One gevent worker per CPU the process may really use, rounded up, at least one."""
    return max(1, math.ceil(available_cpus(root)))


# Read by OpenMP (scikit-learn, xgboost, lightgbm), MKL and OpenBLAS (numpy), numexpr, torch and TensorFlow.
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "TF_NUM_INTRAOP_THREADS",
)
THREADS_VARIABLE = "MD_CPU_THREADS"  # what package.py templates pass to a library's own nthreads argument


def threads_per_worker(workers: int, root: Path = Path("/")) -> int:
    """Each worker's share of the CPUs, at least one: a 250-millicore replica must not run 16 BLAS threads."""
    return max(1, int(available_cpus(root) // max(workers, 1)))


def thread_environ(workers: int, environ: Mapping[str, str], root: Path = Path("/")) -> Dict[str, str]:
    """Thread-count variables for the workers; any the user set already are left as they are."""
    threads = str(threads_per_worker(workers, root))
    return {name: threads for name in THREAD_VARIABLES + (THREADS_VARIABLE,) if not environ.get(name)}


OPENMP_RUNTIMES = re.compile(r"/lib(gomp|omp|iomp5)([-.][^/]*)?\.so[^/]*$")  # GNU, LLVM and Intel, vendored copies too
POOL_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # read once, when an OpenMP or MKL runtime loads


@contextlib.contextmanager
def no_thread_pools(environ: MutableMapping[str, str] = os.environ) -> Iterator[None]:
    """Load a model that the workers will share through fork without starting OpenMP's thread pool: GNU
    OpenMP's pool does not survive a fork (a child using OpenMP after its parent did waits forever for
    threads it does not have). bench/fork_safety.py shows which frameworks need it."""
    saved = {name: environ.get(name) for name in POOL_VARIABLES}
    environ.update({name: "1" for name in POOL_VARIABLES})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                del environ[name]
            else:
                environ[name] = value


def set_worker_threads(threads: int) -> List[str]:
    """In a worker forked from a no_thread_pools() load: give every OpenMP runtime this process has loaded,
    and torch, `threads` threads again. Returns the OpenMP runtimes' paths."""
    runtimes = sorted({line.split()[-1] for line in (_read(Path("/proc/self/maps")) or "").splitlines()
                       if OPENMP_RUNTIMES.search(line)})
    for path in runtimes:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(path).omp_set_num_threads(ctypes.c_int(threads))
    torch = sys.modules.get("torch")
    if torch is not None and callable(getattr(torch, "set_num_threads", None)):
        torch.set_num_threads(threads)
    return runtimes


def thread_count() -> int:
    """This process's OS threads; -1 where /proc does not tell."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return -1


def memory_limit_mib(root: Path = Path("/")) -> Optional[float]:
    """The cgroup memory limit in MiB (v2 memory.max, else v1 memory.limit_in_bytes), or None when unlimited."""
    limits = []
    for directory in _own_cgroup_paths(root, ""):
        text = _read(directory / "memory.max")
        if text and text != "max":
            limits.append(int(text))
    if not limits:
        candidates = list(_own_cgroup_paths(root, "memory")) + [root / "sys/fs/cgroup/memory"]
        for directory in candidates:
            text = _read(directory / "memory.limit_in_bytes")
            if text and int(text) < 2 ** 60:  # "unlimited" is a page-rounded 2**63
                limits.append(int(text))
                break
    return min(limits) / 2 ** 20 if limits else None


class ProcessMemory(NamedTuple):
    """A process's memory in MiB, from the kernel's page counts."""

    rss: float  # resident: what it would hold alone (in a container, its PSS)
    pss: float  # proportional: each page shared with other processes split between them
    uss: float  # private: what it alone maps, which it would free by exiting
    written: float  # private and dirty: what it allocated or copied on writing (Private_Dirty)
    anonymous_pss: float  # its share of the anonymous (not file-backed) pages
    file_rss: float  # resident pages of mapped files: libraries, memory-mapped model files


def process_memory(pid: str = "self") -> Optional[ProcessMemory]:
    """From /proc/PID/smaps_rollup (Linux 4.14+); None once the process is gone."""
    kib: Dict[str, int] = {}
    for line in (_read(Path("/proc") / pid / "smaps_rollup") or "").splitlines():
        name, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            kib[name] = int(value.split()[0])
    if "Rss" not in kib:
        return None
    mib = {name: count / 1024 for name, count in kib.items()}
    private = mib.get("Private_Clean", 0) + mib.get("Private_Dirty", 0) + mib.get("Private_Hugetlb", 0)
    return ProcessMemory(mib["Rss"], mib.get("Pss", mib["Rss"]), private, mib.get("Private_Dirty", 0),
                         mib.get("Pss_Anon", mib.get("Pss", mib["Rss"])), mib["Rss"] - mib.get("Anonymous", 0))


def private_anonymous_mib(pid: str = "self") -> Optional[float]:
    """The anonymous pages only this process maps, in MiB: what it allocated or copied on writing. Unlike
    Private_Dirty, without a file's dirty cached pages that it alone maps so far (a library installed moments
    ago, not yet written back), which the next process to map that file shares. From /proc/PID/smaps, which
    lists each mapping's Private_Dirty before its Anonymous; None once the process is gone."""
    text = _read(Path("/proc") / pid / "smaps")
    if not text:
        return None
    kib = private_dirty = 0
    for line in text.splitlines():
        if line.startswith("Private_Dirty:"):
            private_dirty = int(line.split()[1])
        elif line.startswith("Anonymous:"):
            kib += min(private_dirty, int(line.split()[1]))
    return kib / 1024


def mapped_file_kib(pid: str = "self") -> Dict[Tuple[str, str], int]:
    """Each part of a file this process maps, by (path, offset), with its resident pages of the file itself in
    KiB (not the anonymous copies it wrote over them). Another process may map the same parts: these tell what
    one adds to the other, which PSS and USS cannot on a machine where other programs map the same libraries."""
    parts: Dict[Tuple[str, str], int] = {}
    part, rss = None, 0
    for line in (_read(Path("/proc") / pid / "smaps") or "").splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
            part = (fields[5], fields[2]) if len(fields) > 5 and fields[5].startswith("/") else None
        elif part is not None and fields[0] == "Rss:":
            rss = int(fields[1])
        elif part is not None and fields[0] == "Anonymous:":
            parts[part] = max(parts.get(part, 0), rss - int(fields[1]))
    return parts


def anonymous_mib(pid: str = "self") -> Optional[float]:
    """A process's resident anonymous memory in MiB, from /proc/PID/statm (cheap); None once it is gone. Unlike
    the pages of mapped files, which the kernel can drop and read again, these are what an OOM kill is about."""
    text = _read(Path("/proc") / pid / "statm")
    if not text:
        return None
    resident, shared = (int(field) for field in text.split()[1:3])
    return (resident - shared) * resource.getpagesize() / 2 ** 20


def data_bytes() -> Optional[int]:
    """This process's private writable memory, mapped or not (VmData): what RLIMIT_DATA bounds."""
    for line in (_read(Path("/proc/self/status")) or "").splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024
    return None


def limit_data_growth(most_bytes: int) -> Optional[int]:
    """Let this process map at most `most_bytes` more private memory: an allocation past it fails (numpy raises
    MemoryError) instead of taking the replica over its limit. Returns the new limit."""
    now = data_bytes()
    if now is None:
        return None
    hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
    limit = now + max(most_bytes, 0)
    limit = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    return limit


FILES_PER_WORKER = 128  # beyond its connections: the model's files, libraries, the metrics files, pipes


def raise_open_files_limit(worker_connections: int) -> int:
    """Raise this process's soft limit on open files (the workers inherit it) so each worker can hold its
    connections; 1024 is common on hosts, and slow clients holding 1024 connections would stall a worker.
    Returns the limit now in force."""
    wanted = worker_connections + FILES_PER_WORKER
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning("open files are limited to %d (ulimit -n): each worker holds at most about %d connections",
                    soft, soft - FILES_PER_WORKER)
    return soft


SMALLEST_NORMAL = 2.2250738585072014e-308


def restore_ieee_floats() -> bool:
    """Undo flush-to-zero. gevent 21.12's wheels (the images' pin) are linked with -ffast-math, so loading them
    makes the CPU flush subnormal floats to zero in the whole process: a model computed tiny values as 0.0
    on the images' stack and not on current releases. Resets the C floating-point environment to its default
    (FE_DFL_ENV, which glibc and musl both define as (fenv_t *) -1); True if flush-to-zero was on."""
    if SMALLEST_NORMAL / 2 != 0.0:
        return False
    libm = _libm()
    if libm is not None:
        libm.fesetenv(ctypes.c_void_p(-1))
    return True


@functools.lru_cache(maxsize=None)
def _libm() -> Optional[ctypes.CDLL]:
    """Found once: find_library runs ldconfig, which must not happen inside gevent's event loop."""
    try:
        return ctypes.CDLL("libm.so.6")
    except OSError:
        name = ctypes.util.find_library("m")
        return ctypes.CDLL(name) if name else None
