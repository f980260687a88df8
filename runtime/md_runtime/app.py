"""App: the HTTP surface. Routes parse and format only; the model's loader holds the predict path.

One predict path, several protocols: /predict (records, split, MLflow payloads, CSV), SageMaker's /ping and
/invocations, the Open Inference Protocol's /v2 routes, and /explain for custom explanations.

`create_app(settings, model)` builds the Flask app (nothing is built at import). `create_wsgi_app()` is
gunicorn's entry point: it reads settings, loads the model in the worker, and on failure records a one-line
reason for the master and exits with gunicorn's boot/app-load code so the master halts instead of looping.
"""

import enum
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Dict, Optional, Tuple

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from . import __version__, codecs, inference_protocol, openapi
from .batching import Batcher
from .boot.run_dir import RunDir
from .errors import (
    V2_PROTOCOL,
    InternalError,
    MdError,
    NotFoundError,
    NotReadyError,
    PayloadTooLargeError,
    RoutingError,
    error_body,
)
from .loader import LoadedModel, load_model
from .metrics import Metrics, create_metrics
from .settings import Settings, read_settings

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("md_runtime.app")

V2_PREFIX = "/v2"  # where the Open Inference Protocol's routes live
DROPPED_COLUMNS_HEADER = "X-MD-Dropped-Columns"  # request columns that are not model.yaml inputs
DEFAULT_BATCH_ROWS = 64  # when model.yaml says `batching: true`
DEPENDENCIES = ("flask", "werkzeug", "gunicorn", "gevent", "pydantic", "numpy", "pandas", "prometheus-flask-exporter")


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"


def _versions(names: Tuple[str, ...]) -> Dict[str, Optional[str]]:
    from importlib import metadata

    found: Dict[str, Optional[str]] = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


class Routes:
    """The route table. Each method is one endpoint; the table below binds them to paths."""

    TABLE = (
        ("/predict", "predict", ("POST",)),
        ("/invocations", "predict", ("POST",)),
        ("/explain/<explanation_name>", "explain", ("POST",)),
        ("/health", "health", ("GET",)),
        ("/ready", "ready", ("GET",)),
        ("/ping", "ready", ("GET",)),
        ("/info", "info", ("GET",)),
        ("/openapi.json", "openapi_document", ("GET",)),
        ("/v2", "v2_server", ("GET",)),
        ("/v2/health/live", "v2_live", ("GET",)),
        ("/v2/health/ready", "v2_ready", ("GET",)),
        ("/v2/models/<model_name>", "v2_model", ("GET",)),
        ("/v2/models/<model_name>/ready", "v2_model_ready", ("GET",)),
        ("/v2/models/<model_name>/infer", "v2_infer", ("POST",)),
    )

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.model_name = settings.model_name or Path(settings.model_dir).resolve().name
        self.state = State.STARTING
        self.model: Optional[LoadedModel] = None
        self.batcher: Optional[Batcher] = None
        self.in_flight = 0  # /predict requests this worker is handling (greenlets share it, no lock needed)
        self.dependencies = _versions(DEPENDENCIES)
        self.overlay = RunDir(settings.metrics_dir).read_overlay() if settings.metrics_dir is not None else None
        if self.overlay is not None and not self.overlay["from_cache"]:
            metrics.install_seconds.set(self.overlay["install_seconds"])
            metrics.install_attempts.set(self.overlay["attempts"])

    def serve(self, model: LoadedModel) -> None:
        self.model = model
        self.batcher = batcher_for(self.settings, model, self.metrics.batched_requests.inc, lambda: self.in_flight)
        self.metrics.model_load_seconds.set(model.load_seconds)
        self.state = State.READY

    def _ready_model(self) -> LoadedModel:
        if self.model is None:
            raise NotReadyError(self.state.value)
        return self.model

    def _body(self) -> bytes:
        limit = self.settings.max_request_bytes
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLargeError(request.content_length, limit)
        try:
            return request.get_data(cache=False)
        except RequestEntityTooLarge:
            raise PayloadTooLargeError(None, limit) from None

    def _predicting(self, handler: Callable[[LoadedModel], Response], timer: Optional[ContextManager[None]] = None) -> Response:
        """Every protocol's predict or explain request: counted, timed, and given its turn."""
        # NOTE: yield once per request (time.sleep is gevent's in a worker). gunicorn's gevent worker reads the
        # next keep-alive request without yielding when it has already arrived, so under load a few
        # connections were served over and over while the others starved for seconds (p99 >> p50).
        self.in_flight += 1  # counted before yielding, so a batch leader knows this request is coming
        try:
            time.sleep(0)
            with timer or self.metrics.predict_timer():
                return handler(self._ready_model())
        finally:
            self.in_flight -= 1

    def _predict_frame(self, model: LoadedModel, frame: "pd.DataFrame") -> "Tuple[pd.DataFrame, Dict[str, str]]":
        """The prediction, and the headers that say which request columns model.yaml's inputs left out."""
        frame, dropped = model.select_inputs(frame)
        output = self.batcher.predict(frame) if self.batcher else model.predict_selected(frame)
        self.metrics.predict_rows.inc(len(frame))
        return output, {DROPPED_COLUMNS_HEADER: ",".join(dropped)} if dropped else {}

    def _decoded_body(self, model: LoadedModel) -> "pd.DataFrame":
        return codecs.decode(self._body(), request.content_type or "", model.spec.inputs)

    def predict(self) -> Response:
        return self._predicting(self._predict)

    def _predict(self, model: LoadedModel) -> Response:
        output, headers = self._predict_frame(model, self._decoded_body(model))
        accepted = request.accept_mimetypes.best_match(codecs.SUPPORTED_TYPES) or codecs.JSON
        body, content_type = codecs.encode(output, accepted)
        return Response(body, status=200, content_type=content_type, headers=headers)

    def v2_infer(self, model_name: str) -> Response:
        self._check_model_name(model_name)
        return self._predicting(self._infer)

    def _infer(self, model: LoadedModel) -> Response:
        header_length = request.headers.get(inference_protocol.HEADER_LENGTH)
        infer = inference_protocol.decode_infer(self._body(), header_length, model.spec.inputs)
        output, dropped = self._predict_frame(model, infer.frame)
        body, headers = inference_protocol.encode_infer(self.model_name, infer, output)
        return Response(body, status=200, headers=dict(headers, **dropped))

    def explain(self, explanation_name: str) -> Response:
        known = (self.model.explanation_names() if self.model is not None else None) or []
        # a label per declared name only: names a client makes up must not grow the metrics without bound
        label = explanation_name if explanation_name in known else "undeclared"
        return self._predicting(lambda model: self._explain(model, explanation_name), self.metrics.explain_timer(label))

    def _explain(self, model: LoadedModel, explanation_name: str) -> Response:
        result = model.explain(explanation_name, self._decoded_body(model))
        return Response(codecs.encode_result(result, "explain_custom()"), status=200, content_type=codecs.JSON)

    def _check_model_name(self, model_name: str) -> None:
        if model_name != self.model_name:
            raise NotFoundError("no model named {!r}; this server serves {!r}".format(model_name, self.model_name))

    def v2_server(self) -> Response:
        return jsonify(name="md-runtime", version=__version__, extensions=["binary_tensor_data"])

    def v2_live(self) -> Response:
        return jsonify(live=True)

    def v2_ready(self) -> Response:
        self._ready_model()
        return jsonify(ready=True)

    def v2_model(self, model_name: str) -> Response:
        self._check_model_name(model_name)
        model = self._ready_model()
        metadata = inference_protocol.model_metadata(
            self.model_name, model.spec.types, model.spec.inputs, model.spec.outputs, model.seen_dtypes
        )
        platform_info = model.spec.platform_info()
        return jsonify(dict(metadata, parameters=platform_info) if platform_info else metadata)

    def v2_model_ready(self, model_name: str) -> Response:
        self._check_model_name(model_name)
        return self.v2_ready()

    def openapi_document(self) -> Response:
        model = self.model
        if model is None:
            return jsonify(openapi.document(self.model_name, None))
        return jsonify(openapi.document(self.model_name, model.explanation_names(), model.spec.inputs, model.spec.types))

    def health(self) -> Response:
        return jsonify(status="alive")

    def ready(self) -> Response:
        self._ready_model()
        return jsonify(status=self.state.value)

    def info(self) -> Response:
        model = self.model
        return jsonify(
            model_dir=str(model.model_dir if model else self.settings.model_dir),
            state=self.state.value,
            package_sha256=model.package_hash if model else None,
            inputs=(model.spec.inputs or None) if model else None,
            output_columns=model.output_columns if model else None,
            model=model.spec.platform_info() if model else None,
            warnings=model.warnings if model else [],
            runtime_version=__version__,
            python_version=platform.python_version(),
            dependencies=self.dependencies,
            overrides=self._overrides_info(),
        )

    def _overrides_info(self) -> Optional[Dict[str, Any]]:
        if self.overlay is None:
            return None
        installed = [{"name": name, "version": version} for name, version in self.overlay["overrides"]]
        return {"from_cache": self.overlay["from_cache"], "overlay": self.overlay["path"], "installed": installed}


def batcher_for(settings: Settings, model: LoadedModel, on_batch: Callable[[int], None],
                in_flight: Callable[[], int]) -> Optional[Batcher]:
    """Batching when MD_MAX_BATCH_SIZE or model.yaml asks for it; model.yaml's own values win."""
    asked = dict(model.spec.batching or {})
    max_rows = int(asked.get("max_batch_size", settings.max_batch_size or DEFAULT_BATCH_ROWS))
    if not settings.max_batch_size and model.spec.batching is None:
        return None
    delay = float(asked.get("max_delay_ms", settings.max_batch_delay_ms))
    log.info("batching: up to %d rows per predict, waiting at most %.1f ms", max_rows, delay)
    return Batcher(model.predict_selected, max_rows, delay, on_batch, in_flight)


def _protocol() -> str:
    """The protocol whose error shape a response takes: its route's, or for a path no route matched, the one
    whose prefix it is under (a v2 client reads v2 errors even from a mistyped path)."""
    path = request.url_rule.rule if request.url_rule is not None else request.path
    return V2_PROTOCOL if path == V2_PREFIX or path.startswith(V2_PREFIX + "/") else "native"


def _error_response(exc: MdError) -> Tuple[Response, int]:
    return jsonify(error_body(exc, _protocol())), exc.status_code


def _routing_error(exc: HTTPException) -> Tuple[Response, int]:
    return _error_response(RoutingError(exc.code or 500, exc.name or "error", exc.description or ""))


def _unexpected_error(exc: Exception) -> Tuple[Response, int]:
    log.exception("unexpected error while serving %s %s", request.method, request.path)
    return _error_response(InternalError(exc))


def create_app(settings: Settings, model: Optional[LoadedModel] = None) -> Flask:
    app = Flask("md_runtime")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    metrics = create_metrics(app, settings.metrics_dir)
    routes = Routes(settings, metrics)
    for path, name, methods in Routes.TABLE:
        app.add_url_rule(path, endpoint=name, view_func=getattr(routes, name), methods=list(methods))
    # Flask picks the handler of the nearest class in the exception's MRO: the error map has three entries.
    app.register_error_handler(MdError, _error_response)
    app.register_error_handler(HTTPException, _routing_error)
    app.register_error_handler(Exception, _unexpected_error)
    app.extensions["md_runtime"] = routes
    if model is not None:
        routes.serve(model)
    return app


def create_wsgi_app() -> Flask:
    """gunicorn's entry point, called in each worker: settings from MD_*, then the model, then serve."""
    settings = read_settings()
    app = create_app(settings)
    try:
        app.extensions["md_runtime"].serve(load_model(settings.model_dir))
    except MdError as exc:
        exit_on_boot_error(settings, exc)
    return app


def exit_on_boot_error(settings: Settings, exc: MdError) -> None:
    """Exit with gunicorn's boot or app-load code, so that its master halts instead of respawning."""
    first = settings.metrics_dir is None or RunDir(settings.metrics_dir).record_boot_error(exc.message)
    if first:  # the master prints it last, see gunicorn_conf.on_exit
        log.error("%s", exc.message)
        sys.stdout.flush()
        os._exit(exc.exit_code)  # NOTE: not SystemExit, which gunicorn would log again as a traceback
    _wait_for_halt()


def _wait_for_halt() -> None:
    """Another worker already failed the same way and the master is about to halt. A second exit with a boot
    code while it halts makes gunicorn raise from its own halt (exit 1 and a traceback), so exit 0 instead,
    after giving the master a moment to reap the first one. Its SIGTERM may already have come and gone
    while this worker was loading, hence the short bound rather than waiting for the signal."""
    import signal

    from gevent import monkey

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    monkey.get_original("time", "sleep")(2.0)
    os._exit(0)
