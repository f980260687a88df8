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

import sys  # noqa: E402,I001

from gevent.server import StreamServer  # noqa: E402
from gunicorn import glogging  # noqa: E402
from gunicorn.workers import ggevent  # noqa: E402

from md_runtime import logs as _logs  # noqa: E402
from md_runtime import metrics as _metrics  # noqa: E402
from md_runtime.boot.run_dir import RunDir  # noqa: E402
from md_runtime.settings import read_settings  # noqa: E402

_settings = read_settings()  # as `md-runtime serve` resolved them (settings.SERIALIZED_ENV)
_run_dir = RunDir(_settings.metrics_dir) if _settings.metrics_dir is not None else None

bind = ["[{}]:{}".format(_settings.host, _settings.port) if ":" in _settings.host else "{}:{}".format(_settings.host, _settings.port)]
workers = _settings.workers
worker_class = "md_runtime.gunicorn_conf.GeventWorker"
logger_class = "md_runtime.gunicorn_conf.Logger"
worker_connections = _settings.worker_connections
timeout = _settings.timeout
graceful_timeout = _settings.graceful_timeout
logconfig_dict = _logs.logging_config(_settings)
accesslog = "-" if _settings.access_log else None
loglevel = _settings.log_level
proc_name = "md-runtime"
if _run_dir is not None:
    # gunicorn 25+ listens for `gunicornc` on one path per user ($HOME/.gunicorn), which a second server on the
    # machine takes over and a read-only home refuses; each server gets its own in its run directory instead.
    control_socket = str(_run_dir.control_socket)

# With several workers gunicorn lets each accept one connection per event-loop turn, so that no worker takes a
# whole burst. Under load a turn runs every ready request (30 ms at 64 connections), so the last of a burst of
# new connections waited dozens of turns: the first requests of 64 new keep-alive connections took up to
# 1.3 s, against 30 ms for the rest. A few per turn keeps that wait to a turn or two.
# Fewer per turn (2 or 4) shares a small burst between idle workers more evenly, but the tail at 64 connections
# grew to 6-15x p50; taking more once a worker is busy made the busiest worker take most of a burst.
ACCEPTS_PER_TURN = 8


class _FairAcceptServer(StreamServer):
    _max_accept = StreamServer.max_accept  # gevent's default (100) when gunicorn leaves it alone: one worker

    @property
    def max_accept(self) -> int:
        return self._max_accept

    @max_accept.setter
    def max_accept(self, value: int) -> None:
        self._max_accept = max(value, ACCEPTS_PER_TURN)


class GeventWorker(ggevent.GeventWorker):
    """gunicorn's gevent worker, accepting up to ACCEPTS_PER_TURN connections per turn (see above)."""

    def run(self) -> None:
        ggevent.StreamServer = _FairAcceptServer  # type: ignore[misc]  # run() builds its servers from this name
        super().run()


class Logger(glogging.Logger):
    """gunicorn's logger, minus the access line nobody reads. With a logconfig_dict set, gunicorn formats every
    request's access line and leaves it to the level to drop it: 3% of a 1-row request's time."""

    def access(self, resp, req, environ, request_time):  # type: ignore[no-untyped-def]
        if _settings.access_log:
            super().access(resp, req, environ, request_time)


def when_ready(server):  # type: ignore[no-untyped-def]
    server.log.info(
        "md-runtime serving %s on %s with %d gevent worker(s)", _settings.model_dir, ", ".join(bind), workers
    )


def child_exit(server, worker):  # type: ignore[no-untyped-def]
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
