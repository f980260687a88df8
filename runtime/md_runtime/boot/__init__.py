"""Boot: everything between reading the settings and exec'ing gunicorn, as one launch plan.

settings -> the model's overlay (overrides) -> the workers the CPU quota allows (resources) -> the run
directory -> the environment gunicorn starts with. The memory is measured later, in gunicorn's master once
the model is loaded (master.py, with boot/sizing.py's arithmetic). `md-runtime serve` parses its flags,
makes the plan and execs it; tests call make_plan in-process. The child processes read the settings back
from the plan's one serialized form (settings.SERIALIZED_ENV) and share files only through the RunDir.
"""

import errno
import socket
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional

from .. import overrides
from ..errors import ModelDirError, SettingsError, StartupError
from ..settings import PROMETHEUS_MULTIPROC_DIR, Settings, replace, serialized_environ
from .resources import default_workers, raise_open_files_limit, thread_environ
from .run_dir import OVERLAY_FILE, RunDir

DEFAULT_MODEL_DIR = Path("/app/model")  # where the images expect it
GUNICORN_RUN = "from gunicorn.app.wsgiapp import run; run()"
GUNICORN_APP = "md_runtime.app:create_wsgi_app()"
GUNICORN_CONF = "python:md_runtime.gunicorn_conf"


class LaunchPlan(NamedTuple):
    settings: Settings  # as the workers will read them: workers and the run directory filled in
    overlay: Optional[overrides.Overlay]
    run_dir: RunDir
    python: str  # the overlay's interpreter, or this one
    argv: List[str]
    env: Dict[str, str]


def check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        advice = "mount the model there or pass MODEL_DIR" if model_dir == DEFAULT_MODEL_DIR else "check the path"
        raise ModelDirError(model_dir, "no such directory; " + advice)
    if not (model_dir / "package.py").is_file():
        raise ModelDirError(model_dir, "no package.py found; the model directory needs a package.py defining get_model()")


def prepare_overlay(settings: Settings) -> Optional[overrides.Overlay]:
    if settings.env_cache is None:  # read_settings derives it; a Settings built by hand may lack it
        raise SettingsError("MD_ENV_CACHE", None, "no overlay cache directory; set MD_ENV_CACHE")
    return overrides.prepare(
        settings.model_dir,
        settings.env_cache,
        retries=settings.install_retries,
        timeout=settings.install_timeout,
        backoff=settings.install_backoff,
        offline=settings.offline,
    )


def check_port(host: str, port: int) -> None:
    """Bind the address as gunicorn will, before minutes of installing: gunicorn itself would retry for 5 s,
    then exit with a traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            reason = "is already in use (another server?)" if exc.errno == errno.EADDRINUSE else "cannot be bound: " + str(exc.strerror)
            raise StartupError("{}:{} {}; stop that server or choose another port with MD_PORT".format(host, port, reason)) from None


def make_plan(settings: Settings, environ: Mapping[str, str]) -> LaunchPlan:
    check_model_dir(settings.model_dir)
    check_port(settings.host, settings.port)
    overlay = prepare_overlay(settings)
    python = str(overlay.python) if overlay else sys.executable
    workers = settings.workers or default_workers()  # the master may start fewer, see master.py
    raise_open_files_limit(settings.worker_connections)
    run_dir = RunDir.create(settings.metrics_dir)
    run_dir.write_record(OVERLAY_FILE, overlay_record(overlay))
    settings = replace(settings, workers=workers, metrics_dir=run_dir.path)
    env = dict(environ)
    env.update(thread_environ(workers, env))
    env.update(serialized_environ(settings))
    env[PROMETHEUS_MULTIPROC_DIR] = str(run_dir.path)
    return LaunchPlan(settings, overlay, run_dir, python, [python, "-c", GUNICORN_RUN, "-c", GUNICORN_CONF, GUNICORN_APP], env)


def overlay_record(overlay: Optional[overrides.Overlay]) -> Optional[Dict[str, Any]]:
    return None if overlay is None else dict(overlay._asdict(), path=str(overlay.path))
