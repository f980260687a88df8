"""Settings: the first stage. One pydantic model, read once from MD_* environment variables.

Every setting is written once, as a field below with its type, default and description; the CLI flags, the
README table and `md-runtime config` are derived from these fields. This is the only module that reads
os.environ. It works with pydantic 1.10 and 2.x: plain BaseModel plus one reader function, because
BaseSettings moved to a separate package in pydantic 2.
"""

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional

# NOTE: typing_extensions (a dependency of every pydantic) rather than typing: pydantic 1.10 fails on
# typing.Literal of Python 3.9.0-3.9.2 ("issubclass() arg 1 must be a class"), Debian bullseye's Python.
from typing_extensions import Literal
from pydantic import BaseModel, Field, ValidationError

from .errors import SettingsError

ENV_PREFIX = "MD_"

# Names other tools use for the same thing. MD_* wins; these are read only when it is absent.
FOREIGN_ENV = {
    "port": ("PORT",),
    "workers": ("WEB_CONCURRENCY",),
    "metrics_dir": ("PROMETHEUS_MULTIPROC_DIR",),
}
PROMETHEUS_MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
# The settings `md-runtime serve` resolved, as one JSON object: what gunicorn and its workers read back.
SERIALIZED_ENV = "MD_SETTINGS"
XDG_CACHE_HOME = "XDG_CACHE_HOME"


class Settings(BaseModel):
    model_dir: Path = Field(Path("/app/model"), description="Model directory holding package.py.")
    model_name: Optional[str] = Field(
        None,
        description="The model's name in Open Inference Protocol (v2) paths; default: the model directory's name.",
    )
    host: str = Field("0.0.0.0", description="Address to listen on.")
    port: int = Field(8080, ge=1, le=65535, description="Port to listen on (also read from PORT).")
    workers: Optional[int] = Field(
        None,
        ge=1,
        description="gevent worker processes (also WEB_CONCURRENCY); default: the CPUs the cgroup quota grants, "
        "rounded up, at least 1.",
    )
    worker_connections: int = Field(
        4096,
        ge=1,
        description="Concurrent connections each worker accepts; the open-files limit is raised to match, where the "
        "hard limit allows.",
    )
    timeout: int = Field(
        120, ge=1, description="Seconds a worker may block (e.g. in one predict call) before it is restarted."
    )
    request_timeout: float = Field(
        60.0,
        ge=0,
        description="Seconds a predict or explain call may wait (on I/O, a lock, a batch) before its request gets "
        "504; 0 waits forever. A call busy on the CPU is stopped only by MD_TIMEOUT.",
    )
    drain_seconds: float = Field(
        5.0,
        ge=0,
        description="On SIGTERM, seconds /ready answers 503 while new requests are still accepted and served (so "
        "a load balancer stops sending them first); then in-flight requests get MD_GRACEFUL_TIMEOUT to finish.",
    )
    graceful_timeout: int = Field(30, ge=0, description="Seconds in-flight requests get to finish on SIGTERM, after the drain.")
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        "info", description="Log level (debug, info, warning, error, critical)."
    )
    log_format: Literal["text", "json"] = Field("text", description="Log lines as plain text or JSON objects.")
    access_log: bool = Field(False, description="Log one line per request.")
    read_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds a request (line, headers and body) may take to arrive once its first byte has; slower "
        "ones get 408 and are closed.",
    )
    max_request_bytes: int = Field(
        100 * 1024 * 1024, ge=1, description="Largest request body accepted, in bytes; larger ones get 413."
    )
    max_columns: int = Field(10000, ge=1, description="Most columns a request may hold; more get 400.")
    max_json_depth: int = Field(
        32, ge=2, le=500, description="Deepest nesting of arrays and objects a JSON request may have; deeper get 400."
    )
    metrics_dir: Optional[Path] = Field(
        None,
        description="Directory for Prometheus multiprocess files and the server's run files (also "
        "PROMETHEUS_MULTIPROC_DIR); default: a fresh temporary directory per server, removed when it exits.",
    )
    env_cache: Optional[Path] = Field(
        None,
        description="Cache of requirements.txt overlays, shared by replicas; default: $XDG_CACHE_HOME/md-runtime/envs "
        "(~/.cache/md-runtime/envs).",
    )
    install_retries: Optional[int] = Field(
        None,
        ge=0,
        description="Retries of a requirements.txt install after a network failure; default: as many as "
        "MD_INSTALL_TIMEOUT allows.",
    )
    install_timeout: int = Field(900, ge=1, description="Seconds the whole requirements.txt install may take, retries included.")
    install_backoff: float = Field(
        2.0, ge=0, description="Seconds of the first retry's backoff; each retry doubles it up to 30 s, with full jitter."
    )
    offline: bool = Field(False, description="Install requirements.txt only from MODEL_DIR/wheels, never from an index.")
    max_batch_size: int = Field(
        0,
        ge=0,
        description="Rows a worker may gather from concurrent requests into one predict call; 0 leaves batching "
        "off unless model.yaml has `batching:` (only for models whose rows do not affect each other).",
    )
    max_batch_delay_ms: float = Field(
        2.0, ge=0, description="Milliseconds the first request of a batch waits for others to join it."
    )
    memory_mib: Optional[int] = Field(
        None,
        ge=1,
        description="Memory of this replica in MiB, for the memory check and guard; default: the container's limit.",
    )
    memory_check: bool = Field(
        True,
        description="At start, measure the master and a trial worker and fit the workers into the memory (fewer "
        "workers, or a clear error, never the kernel's OOM kill); while serving, recycle a worker that outgrows "
        "its share and answer 507 to a request that would.",
    )
    preload: Literal["auto", "true", "false"] = Field(
        "auto",
        description="Load the model once in the gunicorn master and fork the workers from it, sharing its memory "
        "(auto, true, false). auto does, unless the model uses TensorFlow (which does not survive a fork) or a trial "
        "worker hangs.",
    )


class SettingInfo(NamedTuple):
    name: str
    env: str
    default: Any
    description: str
    choices: Optional[List[str]]
    type_name: str


def _model_fields() -> Dict[str, Any]:
    fields: Any = getattr(Settings, "model_fields", None)  # pydantic 2
    return dict(fields if fields is not None else getattr(Settings, "__fields__"))  # pydantic 1 has __fields__


def _annotation(field: Any) -> Any:
    return field.annotation if hasattr(field, "annotation") else field.outer_type_


def _choices(annotation: Any) -> Optional[List[str]]:
    if getattr(annotation, "__origin__", None) is Literal:
        return [str(c) for c in annotation.__args__]
    return None


def _type_name(annotation: Any) -> str:
    if _choices(annotation):
        return "choice"
    args = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
    base = args[0] if args else annotation
    # subclasses too: pydantic 1 turns `int = Field(ge=1)` into a ConstrainedInt subclass (bool before int)
    names = ((bool, "bool"), (int, "int"), (float, "float"), (Path, "path"))
    return next((name for kind, name in names if isinstance(base, type) and issubclass(base, kind)), "str")


def describe() -> List[SettingInfo]:
    """Every setting, in declaration order: the source for flags, docs and `md-runtime config`."""
    infos = []
    for name, field in _model_fields().items():
        description = field.description if hasattr(field, "description") else field.field_info.description
        annotation = _annotation(field)
        infos.append(
            SettingInfo(
                name, ENV_PREFIX + name.upper(), field.default, description or "", _choices(annotation), _type_name(annotation)
            )
        )
    return infos


def _raw_values(environ: Mapping[str, str]) -> Dict[str, str]:
    raw = {}
    for info in describe():
        for variable in (info.env,) + FOREIGN_ENV.get(info.name, ()):
            value = environ.get(variable)
            if value:
                raw[info.name] = value.lower() if info.choices else value
                break
    return raw


def _source_of(name: str, environ: Mapping[str, str], overrides: Mapping[str, Any]) -> str:
    if name in overrides:
        return "--" + name.replace("_", "-")
    for variable in (ENV_PREFIX + name.upper(),) + FOREIGN_ENV.get(name, ()):
        if environ.get(variable):
            return variable
    return ENV_PREFIX + name.upper()


def read_settings(environ: Optional[Mapping[str, str]] = None, **overrides: Any) -> Settings:
    """Settings from MD_* variables (os.environ by default); keyword overrides (CLI flags) win over env."""
    environ = os.environ if environ is None else environ
    serialized = environ.get(SERIALIZED_ENV)
    values: Dict[str, Any] = json.loads(serialized) if serialized else _raw_values(environ)
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        settings = Settings(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0])
        raise SettingsError(_source_of(name, environ, overrides), values.get(name), first["msg"]) from None
    if settings.env_cache is None:
        cache_home = environ.get(XDG_CACHE_HOME) or str(Path.home() / ".cache")
        settings = replace(settings, env_cache=Path(cache_home) / "md-runtime" / "envs")
    return settings


def replace(settings: Settings, **changes: Any) -> Settings:
    """A copy with some fields changed (validated again); works on pydantic 1 and 2."""
    return Settings(**dict(as_dict(settings), **changes))


def as_dict(settings: Settings) -> Dict[str, Any]:
    return {info.name: getattr(settings, info.name) for info in describe()}


def to_environ(settings: Settings) -> Dict[str, str]:
    """MD_* variables that rebuild these settings in a child process (gunicorn, after exec)."""
    env = {}
    for info in describe():
        value = getattr(settings, info.name)
        if value is not None:
            env[info.env] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def serialized_environ(settings: Settings) -> Dict[str, str]:
    """The one variable that hands these settings, resolved, to the processes gunicorn starts."""
    by_name = {info.name: to_environ(settings).get(info.env) for info in describe()}
    return {SERIALIZED_ENV: json.dumps({k: v for k, v in by_name.items() if v is not None}, sort_keys=True)}
