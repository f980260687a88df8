"""Metrics: every Prometheus collector of the runtime, created once per app at start-up.

Under gunicorn the values of all workers are aggregated through prometheus_client's multiprocess mode:
the CLI sets PROMETHEUS_MULTIPROC_DIR (from settings) before gunicorn starts, and gunicorn's child_exit
hook calls mark_worker_dead. In-process (tests, `md-runtime check`) each app gets its own registry.
"""

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .errors import MdError

if TYPE_CHECKING:
    from flask import Flask

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

    @contextlib.contextmanager
    def predict_timer(self) -> Iterator[None]:
        """Time one predict request and count it by error kind when it fails."""
        started = time.perf_counter()
        try:
            yield
        except Exception as exc:
            self.predict_errors.labels(kind=exc.kind if isinstance(exc, MdError) else MdError.kind).inc()
            raise
        finally:
            self.predict_seconds.observe(time.perf_counter() - started)


def create_metrics(app: "Flask", metrics_dir: Optional[Path]) -> Metrics:
    """Attach HTTP request metrics and /metrics to the app; multiprocess mode when metrics_dir is set."""
    # Imported here: prometheus_flask_exporter's multiprocess module wants PROMETHEUS_MULTIPROC_DIR at use.
    from prometheus_flask_exporter import PrometheusMetrics
    from prometheus_flask_exporter.multiprocess import GunicornInternalPrometheusMetrics

    registry = CollectorRegistry(auto_describe=True)
    options = dict(group_by="endpoint", defaults_prefix="md", excluded_paths=["^/metrics$", "^/health$", "^/ready$"])
    if metrics_dir is not None:
        # Exposition goes through a MultiProcessCollector on `registry`; the collectors themselves must live
        # in a separate registry or each worker would also report its own unaggregated values.
        GunicornInternalPrometheusMetrics(app, path="/metrics", registry=registry, **options)
        return Metrics(CollectorRegistry(auto_describe=True))
    PrometheusMetrics(app, path="/metrics", registry=registry, **options)
    return Metrics(registry)


def mark_worker_dead(pid: int, metrics_dir: Path) -> None:
    """gunicorn child_exit: drop a dead worker's live gauges from the aggregate."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(metrics_dir))
