"""Metrics: every Prometheus collector of the runtime, created once per app at start-up.

Under gunicorn the values of all workers are aggregated through prometheus_client's multiprocess mode:
the CLI sets PROMETHEUS_MULTIPROC_DIR (from settings) before gunicorn starts, and gunicorn's child_exit
hook calls mark_worker_dead. In-process (tests, `md-runtime check`) each app gets its own registry.
"""

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Dict, Iterator, Optional, Tuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .errors import MdError

if TYPE_CHECKING:
    from flask import Flask, Response

UNTIMED_ENDPOINTS = frozenset(["health", "ready", "prometheus_metrics"])  # probes and scrapes: noise in the timings

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.model_load_seconds = Gauge(
            "md_model_load_seconds",
            "Seconds package.py took to import and get_model() to return.",
            registry=registry,
            multiprocess_mode="max",
        )
        self.install_seconds = Gauge(
            "md_requirements_install_seconds",
            "Seconds requirements.txt took to install into the overlay (0 when it came from the cache).",
            registry=registry,
            multiprocess_mode="max",
        )
        self.install_attempts = Gauge(
            "md_requirements_install_attempts",
            "pip runs the requirements.txt install took (0 when the overlay came from the cache).",
            registry=registry,
            multiprocess_mode="max",
        )
        self.predict_seconds = Histogram(
            "md_predict_seconds", "Seconds per predict request, decode to encode.", registry=registry, buckets=LATENCY_BUCKETS
        )
        self.predict_rows = Counter("md_predict_rows_total", "Rows predicted.", registry=registry)
        self.batched_requests = Counter(
            "md_batched_requests_total", "Requests answered by a predict call shared with other requests.", registry=registry
        )
        self.predict_errors = Counter(
            "md_predict_errors_total", "Failed predict requests by error kind.", ["kind"], registry=registry
        )
        self.explain_seconds = Histogram(
            "md_explain_seconds", "Seconds per explanation request, decode to encode.", ["explanation"],
            registry=registry, buckets=LATENCY_BUCKETS,
        )
        self.explain_errors = Counter(
            "md_explain_errors_total", "Failed explanation requests by error kind.", ["kind"], registry=registry
        )
        self.worker_memory = Gauge(
            "md_worker_memory_bytes", "Each worker's private memory (USS): what it would free by exiting.",
            registry=registry, multiprocess_mode="liveall",
        )
        self.worker_requests = Gauge(
            "md_worker_requests", "HTTP requests each worker has answered since it started: how evenly the workers "
            "share them.", registry=registry, multiprocess_mode="liveall",
        )
        self.workers_recycled = Counter(
            "md_worker_recycled_total", "Workers stopped and replaced while serving, by reason (memory: it held more "
            "than its share of the replica's memory).", ["reason"], registry=registry,
        )
        # The names, labels and buckets prometheus-flask-exporter gave them, which now only serves /metrics.
        self.http_seconds = Histogram(
            "md_http_request_duration_seconds", "Seconds per HTTP request.", ["method", "endpoint", "status"],
            registry=registry,
        )
        self.http_requests = Counter("md_http_request_total", "HTTP requests.", ["method", "status"], registry=registry)
        self._http_children: Dict[Tuple[str, Optional[str], int], Tuple[Any, Any]] = {}

    def predict_timer(self) -> ContextManager[None]:
        """Time one predict request and count it by error kind when it fails."""
        return _timed(self.predict_seconds, self.predict_errors)

    def explain_timer(self, explanation: str) -> ContextManager[None]:
        """The same for an explanation request; `explanation` is one the model declares, or "unknown"."""
        return _timed(self.explain_seconds.labels(explanation), self.explain_errors)

    def record_response(self, method: str, endpoint: Optional[str], status: int, seconds: float) -> None:
        """One answered HTTP request. Each label set's children are looked up once: labels() validates and
        sorts on every call, and the exporter's own per-request hooks cost 27 µs of a 1-row request."""
        key = (method, endpoint, status)
        children = self._http_children.get(key)
        if children is None:
            children = (self.http_seconds.labels(method, str(endpoint), str(status)), self.http_requests.labels(method, str(status)))
            self._http_children[key] = children
        children[0].observe(seconds)
        children[1].inc()
        self.worker_requests.inc()


@contextlib.contextmanager
def _timed(seconds: Any, errors: Counter) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    except Exception as exc:
        errors.labels(kind=exc.kind if isinstance(exc, MdError) else MdError.kind).inc()
        raise
    finally:
        seconds.observe(time.perf_counter() - started)


def _time_requests(app: "Flask", metrics: Metrics) -> None:
    from flask import request

    def start_clock() -> None:
        request.environ["md_runtime.started"] = time.perf_counter()

    def record(response: "Response") -> "Response":
        started = request.environ.get("md_runtime.started")
        if started is not None and request.endpoint not in UNTIMED_ENDPOINTS:
            metrics.record_response(request.method, request.endpoint, response.status_code, time.perf_counter() - started)
        return response

    app.before_request(start_clock)
    app.after_request(record)


def create_metrics(app: "Flask", metrics_dir: Optional[Path]) -> Metrics:
    """Attach HTTP request metrics and /metrics to the app; multiprocess mode when metrics_dir is set."""
    # Imported here: prometheus_flask_exporter's multiprocess module wants PROMETHEUS_MULTIPROC_DIR at use.
    from prometheus_flask_exporter import PrometheusMetrics
    from prometheus_flask_exporter.multiprocess import GunicornInternalPrometheusMetrics

    # NOTE: no auto_describe here: registering the multiprocess collector would then read every worker's file
    # at boot, and a sibling's file that is still 0 bytes failed the boot (struct.error).
    registry = CollectorRegistry()
    if metrics_dir is not None:
        # Exposition goes through a MultiProcessCollector on `registry`; the collectors themselves must live
        # in a separate registry or each worker would also report its own unaggregated values.
        GunicornInternalPrometheusMetrics(app, path="/metrics", registry=registry, export_defaults=False)
        metrics = Metrics(CollectorRegistry(auto_describe=True))
    else:
        PrometheusMetrics(app, path="/metrics", registry=registry, export_defaults=False)
        metrics = Metrics(registry)
    _time_requests(app, metrics)
    return metrics


def mark_worker_dead(pid: int, metrics_dir: Path) -> None:
    """gunicorn child_exit: drop a dead worker's live gauges from the aggregate."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(metrics_dir))
