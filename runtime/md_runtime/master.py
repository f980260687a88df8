"""Master: what gunicorn's master does before it forks the workers. Load the model once (MD_PRELOAD), measure
the replica's memory, and start as many workers as fit.

gunicorn_conf's on_starting hook calls start(), after gevent has patched the standard library and before the
port opens. With preloading the model is loaded here, without OpenMP thread pools (GNU OpenMP's do not
survive a fork), and each worker forked from the master shares its pages; a worker respawned after a crash
gets them again without loading. Then a trial worker, forked once, predicts on the model's rows: its private
memory is what each worker adds, and its finishing shows the model's libraries survive the fork.

MD_PRELOAD=auto loads in each worker instead when package.py imports a library that does not survive a fork
(bench/fork_safety.py: TensorFlow), and re-executes the master that way when loading brought one in, or
when the trial worker hung or crashed. `md-runtime check` measures the same way, in its own process.
"""

import contextlib
import gc
import json
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, NoReturn, Optional, Tuple

from . import codecs, versions
from .app import create_app
from .boot import GUNICORN_RUN
from .boot import sizing
from .boot.resources import (
    THREADS_VARIABLE,
    anonymous_mib,
    mapped_file_kib,
    memory_limit_mib,
    no_thread_pools,
    private_anonymous_mib,
    process_memory,
    restore_ieee_floats,
    set_worker_threads,
)
from .boot.run_dir import MEMORY_FILE, RunDir
from .checks import rows_to_check
from .errors import CheckError, MdError, StartupError
from .loader import LoadedModel, keep_preloaded, load_model
from .settings import PROMETHEUS_MULTIPROC_DIR, Settings, replace, serialized_environ

log = logging.getLogger("md_runtime.master")

NOT_FORK_SAFE = ("tensorflow", "keras", "tf_keras")  # their runtime's threads are made at import: bench/fork_safety.py
STOP_SHARE = 0.9  # a load is stopped when its anonymous memory reaches this share of the container's limit
POLL_SECONDS = 0.01
DRY_REQUEST = b'[{"x": 1.0, "label": "a"}, {"x": 2.0, "label": "b"}]'
OUTGREW = "it outgrew the container's memory"
TRIAL_SECONDS = 60.0  # a trial prediction taking longer (or longer than MD_REQUEST_TIMEOUT) hung on the fork


class Trial(NamedTuple):
    worker_mib: float  # what the trial worker wrote (its private dirty pages) once it had predicted
    files_mib: float  # the parts of files it held that the master did not (the libraries it imported)
    predicted: bool
    failed: Optional[str] = None  # why the trial worker did not finish: it hung or crashed
    outgrew: bool = False  # it was stopped short of the container's limit
    load_error: Optional[str] = None  # it could not load the model (the workers will say why, as they fail)


class MemoryPlan(NamedTuple):
    """What the master decided, for the log, /info and each worker's memory guard (the run directory's memory.json)."""

    preload: bool
    preload_reason: str
    workers: int
    limit_mib: Optional[float]
    footprint: Optional[sizing.Footprint]
    worker_share_mib: Optional[float]

    def record(self) -> Dict[str, Any]:
        record = {name: value for name, value in self._asdict().items() if name != "footprint"}
        if self.footprint is not None and self.worker_share_mib is not None:
            record.update(worker_recycle_mib=round(sizing.recycle_mib(self.footprint, self.worker_share_mib), 1))
        if self.footprint is not None:
            record.update(master_mib=round(self.footprint.master_mib, 1), worker_mib=round(self.footprint.worker_mib, 1),
                          files_mib=round(self.footprint.files_mib, 1), replica_mib=round(sizing.replica_mib(self.footprint, self.workers), 1))
        return record


class ForkUnsafeError(MdError):
    """MD_PRELOAD=auto found out too late that the model does not survive a fork: start again without preloading."""


# --- preloading ------------------------------------------------------------------------------------------


def preload_decision(settings: Settings) -> Tuple[bool, str]:
    if settings.preload != "auto":
        return settings.preload == "true", "MD_PRELOAD={}".format(settings.preload)
    try:
        imported = versions.imported_modules(Path(settings.model_dir).resolve())
    except (OSError, SyntaxError, ValueError):  # loading will say what is wrong with package.py
        imported = set()
    unsafe = sorted(set(NOT_FORK_SAFE) & imported)
    if unsafe:
        return False, "package.py imports {}, which does not survive a fork".format(", ".join(unsafe))
    return True, "MD_PRELOAD=auto"


def load_once(settings: Settings) -> LoadedModel:
    """The model, loaded in this process with no thread pools, watched so that the kernel never kills the load."""
    with no_thread_pools(), _watched_load(_cgroup_stop_mib(), settings):
        model = load_model(settings.model_dir)
    unsafe = sorted(name for name in NOT_FORK_SAFE if name in sys.modules)
    if unsafe:
        raise ForkUnsafeError("loading the model imported {}, which does not survive a fork".format(", ".join(unsafe)))
    # NOTE: the collector writes to every object it scans, which would copy the shared pages into each worker
    # at its first collection; frozen, the master's objects are never scanned again.
    gc.collect()
    gc.freeze()
    return model


def _cgroup_stop_mib() -> Optional[float]:
    limit = memory_limit_mib()
    return None if limit is None else limit * STOP_SHARE


@contextlib.contextmanager
def _watched_load(stop_mib: Optional[float], settings: Settings) -> Iterator[None]:
    """A thread (a real one, under gevent) watches this process's memory while it loads and, past `stop_mib`,
    ends it with the one-line error the kernel's OOM kill would not give."""
    if stop_mib is None:
        yield
        return
    sleep, running = _original("time", "sleep"), _original("_thread", "allocate_lock")()
    loading = [True]

    def watch() -> None:
        try:
            while loading[0]:
                seen = anonymous_mib()
                if seen is not None and seen > stop_mib:
                    error = sizing.stopped_load_error(seen, stop_mib / STOP_SHARE, settings.workers or 1, "loading the model")
                    print("md-runtime: error: {}".format(error.message), file=sys.stderr, flush=True)
                    os._exit(error.exit_code)
                sleep(POLL_SECONDS)
        finally:
            running.release()

    running.acquire()  # held until the thread ends: only this thread may cross the fork that follows
    _original("_thread", "start_new_thread")(watch, ())
    try:
        yield
    finally:
        loading[0] = False
        running.acquire()


def _original(module: str, name: str) -> Any:
    """The standard library's own function, also where gevent has patched it (importing gevent here would
    turn flush-to-zero on in `md-runtime check`, see resources.restore_ieee_floats)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None:
        return monkey.get_original(module, name)
    return getattr(__import__(module), name)


# --- measuring -------------------------------------------------------------------------------------------


def measure(settings: Settings, model: Optional[LoadedModel]) -> Tuple[sizing.Footprint, Trial]:
    """This process's memory (the master, holding `model` if preloaded), then a trial worker forked from it."""
    master = process_memory()
    master_mib = master.rss if master else 0.0  # before any fork: what it holds alone, as in a container
    master_anonymous = master.rss - master.file_rss if master else 0.0
    trial = trial_worker(settings, model, stop_mib=_cgroup_stop_mib(), master_anonymous_mib=master_anonymous)
    footprint = sizing.Footprint(master_mib, trial.worker_mib, trial.files_mib, trial.predicted, model is not None)
    return footprint, trial


def trial_worker(settings: Settings, model: Optional[LoadedModel], stop_mib: Optional[float], master_anonymous_mib: float) -> Trial:
    """Fork a worker that does what a serving worker does first (load the model unless it has it, build the
    app, answer a prediction on the model's rows), report its private memory, and exit."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child's coverage is not collected)
        os.close(read_end)
        try:
            report = _in_trial(settings, model)
        except BaseException as exc:  # noqa: B902  (whatever it was, the master hears of it)
            report = {"load_error": exc.message if isinstance(exc, MdError) else "{}: {}".format(type(exc).__name__, exc)}
        os.write(write_end, json.dumps(report).encode())
        os._exit(0)
    os.close(write_end)
    try:
        deadline = min(settings.request_timeout or TRIAL_SECONDS, TRIAL_SECONDS) if model is not None else None
        failed, seen = _wait_for_trial(pid, deadline, stop_mib, master_anonymous_mib)
        report = json.loads(os.read(read_end, 1 << 16) or b"{}")
    finally:
        os.close(read_end)
    if failed or not report:
        return Trial(seen, 0.0, False, failed or "it reported nothing", outgrew=failed == OUTGREW)
    if report.get("load_error"):
        return Trial(0.0, 0.0, False, load_error=report["load_error"])
    if report.get("error"):
        log.warning("memory: the trial prediction failed (%s); `md-runtime check` tells why", report["error"])
    return Trial(report["written"], report["files"], report["predicted"], None)


def _wait_for_trial(pid: int, seconds: Optional[float], stop_mib: Optional[float],
                    master_anonymous_mib: float) -> Tuple[Optional[str], float]:
    """(why it failed or None, the most it wrote). It is stopped when its writes and the master's anonymous memory
    near the limit (file pages the kernel can drop). Only a preloaded trial has a deadline: one that loads the
    model takes what loading takes."""
    sleep = _original("time", "sleep")
    deadline = None if seconds is None else time.monotonic() + seconds
    seen = 0.0
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.WIFSIGNALED(status):
                return "it was killed by {}".format(signal.Signals(os.WTERMSIG(status)).name), seen
            return None, seen
        memory = process_memory(str(pid))
        seen = max(seen, memory.written if memory else 0.0)
        if stop_mib is not None and master_anonymous_mib + seen > stop_mib:
            _kill(pid)
            return OUTGREW, seen
        if deadline is not None and time.monotonic() > deadline:
            _kill(pid)
            return "it did not predict within {:g} s".format(seconds or 0), seen
        sleep(POLL_SECONDS)


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _in_trial(settings: Settings, model: Optional[LoadedModel]) -> Dict[str, Any]:  # pragma: no cover (a child)
    logging.disable(logging.CRITICAL)  # the master reports what matters; a trial's own lines would confuse
    _start_as_a_worker_does()
    model = model or load_model(settings.model_dir)
    with tempfile.TemporaryDirectory(prefix="md-runtime-trial-") as metrics_dir:
        os.environ[PROMETHEUS_MULTIPROC_DIR] = metrics_dir  # the trial's counts stay out of the server's
        app = create_app(replace(settings, metrics_dir=metrics_dir), model)
        predicted, error = _trial_prediction(app, model)
        written = private_anonymous_mib() or 0.0
    return {"written": written, "files": _files_beyond_the_masters(), "predicted": predicted, "error": error}


def _files_beyond_the_masters() -> float:  # pragma: no cover (a child)
    """MiB of mapped files this trial holds that the master does not (the libraries it imported), which every
    worker shares. Not its private clean pages: another program on the machine may map the same libraries."""
    master = mapped_file_kib(str(os.getppid()))
    return sum(max(0, kib - master.get(part, 0)) for part, kib in mapped_file_kib().items()) / 1024


def _start_as_a_worker_does() -> None:  # pragma: no cover (a child)
    """What gunicorn's gevent worker does before its app runs: patch the rest, start the hub, set the threads."""
    from gevent import get_hub, monkey

    from .worker import entry_points_read_once

    with entry_points_read_once():
        monkey.patch_all()
    get_hub()
    restore_ieee_floats()
    set_worker_threads(int(os.environ.get(THREADS_VARIABLE, "1")))


def _trial_prediction(app: Any, model: LoadedModel) -> Tuple[bool, Optional[str]]:  # pragma: no cover (a child)
    """A prediction on the model's rows through the app, as a request; with no rows to predict on, a request's
    decoding and encoding without the model."""
    try:
        rows = rows_to_check(model, None)[0]
    except CheckError:
        app.test_client().get("/info")
        codecs.encode(codecs.decode(DRY_REQUEST, codecs.JSON), codecs.JSON)
        return False, None
    answer = app.test_client().post("/predict", data=rows.to_json(orient="records", date_format="iso"),
                                    content_type=codecs.JSON)
    if answer.status_code != 200:
        return False, str((answer.get_json(silent=True) or {}).get("message", answer.status_code))
    return True, None


# --- the plan --------------------------------------------------------------------------------------------


def plan_memory(settings: Settings, wanted: int, preload: bool, reason: str, model: Optional[LoadedModel]) -> MemoryPlan:
    limit = sizing.limit_mib(settings.memory_mib, memory_limit_mib())
    if not settings.memory_check or (limit is None and not preload):  # nothing to fit, and a trial would load again
        return MemoryPlan(preload, reason, wanted, limit, None, None)
    footprint, trial = measure(settings, model)
    if trial.load_error:  # each worker will fail the same way, and say why
        return MemoryPlan(preload, reason, wanted, limit, None, None)
    if trial.outgrew:
        what = "the model loaded in the master and a first prediction" if preload else "loading the model"
        raise sizing.stopped_load_error(footprint.master_mib + trial.worker_mib, limit or 0.0, wanted, what)
    if trial.failed:
        _failed_trial(settings, preload, trial)
    workers = sizing.fit_workers(footprint, wanted, limit) if limit is not None else wanted
    if workers < wanted:
        log.warning("memory: starting %d worker(s) instead of %d: %d need about %.0f MiB and this replica has %.0f MiB; "
                    "deploy with memory=%d for all of them", workers, wanted, wanted,
                    sizing.replica_mib(footprint, wanted), limit, sizing.ask_mib(footprint, wanted))
    share = sizing.worker_share_mib(footprint, workers, limit) if limit is not None else None
    return MemoryPlan(preload, reason, workers, limit, footprint, share)


def _failed_trial(settings: Settings, preload: bool, trial: Trial) -> NoReturn:
    if preload and settings.preload == "auto":
        raise ForkUnsafeError("a trial worker forked from the master failed: {}".format(trial.failed))
    raise StartupError("a trial worker {} failed: {}; {}".format(
        "forked from the master" if preload else "loading the model", trial.failed,
        "set MD_PRELOAD=false (each worker loads the model)" if preload else "run `md-runtime check MODEL_DIR`"))


def start(settings: Settings, run_dir: Optional[RunDir], wanted: int) -> MemoryPlan:
    """gunicorn's on_starting: preload, measure and plan; re-execs the master without preloading when auto's
    preloading failed. Writes the plan where the workers read it."""
    preload, reason = preload_decision(settings)
    try:
        model = load_once(settings) if preload else None
        if model is not None:
            keep_preloaded(model)
        plan = plan_memory(settings, wanted, preload, reason, model)
    except ForkUnsafeError as exc:
        if settings.preload != "auto":
            raise StartupError("MD_PRELOAD=true, but {}; set MD_PRELOAD=false".format(exc.message)) from None
        restart_without_preload(settings, exc.message)
    if run_dir is not None:
        run_dir.write_record(MEMORY_FILE, plan.record())
    log.info("%s", describe(plan))
    return plan


def describe(plan: MemoryPlan) -> str:
    mode = "preloaded in the master ({})".format(plan.preload_reason) if plan.preload else \
        "loaded by each worker ({})".format(plan.preload_reason)
    if plan.footprint is None:
        return "model {}; memory not measured".format(mode)
    measured = "master {:.0f} MiB + {} worker(s) x {:.0f} MiB = {:.0f} MiB".format(
        plan.footprint.master_mib + plan.footprint.files_mib, plan.workers, plan.footprint.worker_mib, sizing.replica_mib(plan.footprint, plan.workers))
    if plan.limit_mib is not None:
        measured += " of {:.0f} MiB; each worker may hold {:.0f} MiB".format(plan.limit_mib, plan.worker_share_mib or 0)
    return "model {}; memory: {}".format(mode, measured)


def restart_without_preload(settings: Settings, why: str) -> NoReturn:
    """Start the master again as a fresh process whose workers each load the model: this one has the library's
    threads running, which its workers would inherit broken."""
    log.warning("MD_PRELOAD=auto: %s; starting again with each worker loading the model (set MD_PRELOAD=false to "
                "skip this first load)", why)
    env = dict(os.environ, **serialized_environ(replace(settings, preload="false")))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-c", GUNICORN_RUN] + sys.argv[1:], env)
    raise AssertionError("execve returned")  # pragma: no cover


def _import_as_the_master_does() -> None:
    """gunicorn and gevent, whose memory the master holds too; gevent 21.12 turns flush-to-zero on as it loads."""
    import gunicorn.arbiter  # noqa: F401

    from . import worker  # noqa: F401  (gevent, gunicorn's gevent worker)

    restore_ieee_floats()


def memory_table(settings: Settings, most: int) -> Tuple[List[str], Optional[LoadedModel]]:
    """For `md-runtime check`: load as serve would (so this process stands for the master), measure, and list
    the memory for 1..most workers; and the model, when it was loaded here."""
    preload = preload_decision(settings)[0]
    _import_as_the_master_does()
    try:
        model = load_once(settings) if preload else None
    except ForkUnsafeError as exc:  # this process now holds the library's threads: a trial forked from it could hang
        return ["memory: not measured: {}; serve loads the model in each worker".format(exc.message)], None
    footprint, trial = measure(settings, model)
    if trial.failed or trial.load_error:
        raise CheckError("a trial worker {} failed: {}".format(
            "forked after loading" if preload else "loading the model", trial.failed or trial.load_error))
    return sizing.asks(footprint, most), model
