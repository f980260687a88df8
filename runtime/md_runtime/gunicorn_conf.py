"""gunicorn config: values from Settings and hooks, nothing else. Loaded with `-c python:md_runtime.gunicorn_conf`.

gevent must patch the standard library before anything else imports it (ssl, threading, socket), so the
patch comes first; tests/test_gunicorn_conf.py asserts that order in a fresh interpreter. See gunicorn #1126.
The master keeps its process management real (`os`, `signal`, `subprocess`): patched, gevent reaps the
workers itself and runs gunicorn 20.1.0's SIGCHLD handler in a greenlet, so a worker that fails to boot is
never seen (or its HaltServer is swallowed) and the master respawns forever. Each gevent worker patches the
rest for itself after the fork, which gevent reports as patching twice; that warning is expected.
"""

import warnings

from gevent import monkey

monkey.patch_all(os=False, signal=False, subprocess=False)
warnings.filterwarnings("ignore", message="Patching more than once", category=monkey.MonkeyPatchWarning)

import math  # noqa: E402,I001
import sys  # noqa: E402

from gunicorn import glogging  # noqa: E402

from md_runtime import logs as _logs  # noqa: E402
from md_runtime import master as _master  # noqa: E402
from md_runtime import metrics as _metrics  # noqa: E402
from md_runtime.boot.run_dir import RunDir  # noqa: E402
from md_runtime.errors import MdError  # noqa: E402
from md_runtime.settings import read_settings  # noqa: E402
from md_runtime.worker import OpenConnections  # noqa: E402

_settings = read_settings()  # as `md-runtime serve` resolved them (settings.SERIALIZED_ENV)
_run_dir = RunDir(_settings.metrics_dir) if _settings.metrics_dir is not None else None
_connections = OpenConnections()

bind = ["[{}]:{}".format(_settings.host, _settings.port) if ":" in _settings.host else "{}:{}".format(_settings.host, _settings.port)]
workers = _settings.workers
worker_class = "md_runtime.worker.GeventWorker"
logger_class = "md_runtime.gunicorn_conf.Logger"
worker_connections = _settings.worker_connections
timeout = _settings.timeout
graceful_timeout = _settings.graceful_timeout + math.ceil(_settings.drain_seconds)  # the master's bound on a stop
logconfig_dict = _logs.logging_config(_settings)
accesslog = "-" if _settings.access_log else None
loglevel = _settings.log_level
proc_name = "md-runtime"
if _run_dir is not None:
    # gunicorn 25+ listens for `gunicornc` on one path per user ($HOME/.gunicorn), which a second server on the
    # machine takes over and a read-only home refuses; each server gets its own in its run directory instead,
    # or none where that path is too long for a unix socket (md-runtime itself never uses it).
    if _run_dir.control_socket is not None:
        control_socket = str(_run_dir.control_socket)
    else:
        control_socket_disable = True

class Logger(glogging.Logger):
    """gunicorn's logger, minus the access line nobody reads. With a logconfig_dict set, gunicorn formats every
    request's access line and leaves it to the level to drop it: 3% of a 1-row request's time."""

    def access(self, resp, req, environ, request_time):  # type: ignore[no-untyped-def]
        if _settings.access_log:
            super().access(resp, req, environ, request_time)


def on_starting(server):  # type: ignore[no-untyped-def]
    """Before the port opens: preload the model and fit the workers into the memory (master.py)."""
    try:
        plan = _master.start(_settings, _run_dir, workers)
    except MdError as exc:
        if _run_dir is not None:
            _run_dir.remove_if_temporary()
        print("md-runtime: error: {}".format(exc.message), file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    server.num_workers = plan.workers
    if plan.preload:
        # gunicorn sleeps up to 0.1 s after each fork, to stagger workers that each load a model; forked from a
        # loaded master they have nothing to stagger.
        server.spawn_workers = lambda: _spawn_back_to_back(server)


def _spawn_back_to_back(server):  # type: ignore[no-untyped-def]
    for _ in range(server.num_workers - len(server.WORKERS)):
        server.spawn_worker()


def when_ready(server):  # type: ignore[no-untyped-def]
    server.log.info(
        "md-runtime serving %s on %s with %d gevent worker(s)", _settings.model_dir, ", ".join(bind), server.num_workers
    )


def pre_fork(server, worker):  # type: ignore[no-untyped-def]
    """The worker's slot among the open-connection counts the workers balance by (worker.OpenConnections)."""
    worker.open_connections = _connections
    worker.connection_slot = _connections.assign(getattr(other, "connection_slot", None) for other in server.WORKERS.values())


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    _connections.release(getattr(worker, "connection_slot", None))
    if _run_dir is not None:
        _metrics.mark_worker_dead(worker.pid, _run_dir.path)


def on_exit(server):  # type: ignore[no-untyped-def]
    if _run_dir is None:
        return
    # A worker that failed to load the model left its one-line reason; make it the last line the user sees.
    reason = _run_dir.read_boot_error()
    _run_dir.remove_if_temporary()
    if reason:
        print("md-runtime: error: {}".format(reason), file=sys.stderr, flush=True)
