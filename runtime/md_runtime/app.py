"""App: the HTTP adapters. Routes parse bytes into frames and format results into bytes; the core does the rest.

One predict path, several protocols: /predict (records, split, MLflow payloads, CSV), SageMaker's /ping and
/invocations, the Open Inference Protocol's /v2 routes, and /explain for custom explanations.

`create_app(settings, model)` builds the Flask app (nothing is built at import). `create_wsgi_app()` is
gunicorn's entry point: it reads settings, loads the model in the worker, and on failure records a one-line
reason for the master and exits with gunicorn's boot/app-load code so the master halts instead of looping.
"""

import logging
import os
import platform
import sys
import time
from pathlib import Path
from urllib.parse import quote
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Optional, Tuple

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.wsgi import get_content_length

from . import __version__, codecs, inference_protocol, openapi
from .boot.resources import THREADS_VARIABLE, set_worker_threads
from .boot.run_dir import MEMORY_FILE, OVERLAY_FILE, RunDir
from .errors import (
    V2_PROTOCOL,
    IncompleteBodyError,
    InternalError,
    MdError,
    NotFoundError,
    PayloadTooLargeError,
    RoutingError,
    UnsupportedEncodingError,
    error_body,
)
from .loader import LoadedModel, load_model, preloaded
from .metrics import create_metrics
from .core import Core, Prediction
from .settings import Settings, read_settings

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("md_runtime.app")

DROPPED_COLUMNS_HEADER = "X-MD-Dropped-Columns"  # request columns that are not model.yaml inputs
MAX_DROPPED_NAMES = 50
BODY_READ_SIZE = 1024 * 1024
DEPENDENCIES = ("flask", "werkzeug", "gunicorn", "gevent", "pydantic", "numpy", "pandas", "prometheus-flask-exporter")


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
    """The HTTP adapters: one method per handler named in openapi.ROUTES, which binds them to paths."""

    def __init__(self, settings: Settings, core: Core) -> None:
        self.settings = settings
        self.core = core
        self.model_name = settings.model_name or Path(settings.model_dir).resolve().name
        self.dependencies = _versions(DEPENDENCIES)
        self.limits = codecs.Limits(settings.max_columns, settings.max_json_depth)
        run_dir = RunDir(settings.metrics_dir) if settings.metrics_dir is not None else None
        self.overlay = run_dir.read_record(OVERLAY_FILE) if run_dir else None
        self.memory = run_dir.read_record(MEMORY_FILE) if run_dir else None  # the master's plan (master.py)
        if self.overlay is not None and not self.overlay["from_cache"]:
            core.metrics.install_seconds.set(self.overlay["install_seconds"])
            core.metrics.install_attempts.set(self.overlay["attempts"])

    def _body(self, environ: Dict[str, Any]) -> bytes:
        encoding = environ.get("HTTP_CONTENT_ENCODING", "identity").strip().lower()
        if encoding != "identity":
            raise UnsupportedEncodingError(encoding)
        return read_whole_body(environ["wsgi.input"], get_content_length(environ), self.settings.max_request_bytes)

    def _decoded_body(self, model: LoadedModel, environ: Dict[str, Any]) -> "pd.DataFrame":
        return codecs.decode(self._body(environ), environ.get("CONTENT_TYPE", ""), model.spec.inputs, self.limits)

    def predict(self) -> Response:
        accepted = request.accept_mimetypes.best_match(codecs.SUPPORTED_TYPES) or codecs.JSON
        body, content_type, headers = self.predict_bytes(request.environ, accepted)
        return Response(body, status=200, content_type=content_type, headers=headers)

    def predict_bytes(self, environ: Dict[str, Any], accepted: str) -> Tuple[bytes, str, Dict[str, str]]:
        """POST /predict, from the request's WSGI environ to the answer's body, content type and headers."""
        with self.core.request() as model:
            prediction = self.core.predict(model, self._decoded_body(model, environ))
            body, content_type = codecs.encode(prediction.output, accepted)
        return body, content_type, _dropped_header(prediction)

    def v2_infer(self, model_name: str) -> Response:
        self._check_model_name(model_name)
        with self.core.request() as model:
            header_length = request.headers.get(inference_protocol.HEADER_LENGTH)
            infer = inference_protocol.decode_infer(self._body(request.environ), header_length, model.spec.inputs, self.limits)
            prediction = self.core.predict(model, infer.frame)
            body, headers = inference_protocol.encode_infer(self.model_name, infer, prediction.output)
        return Response(body, status=200, headers=dict(headers, **_dropped_header(prediction)))

    def explain(self, explanation_name: str) -> Response:
        with self.core.request(self.core.explain_timer(explanation_name)) as model:
            result = self.core.explain(model, explanation_name, self._decoded_body(model, request.environ))
            body = codecs.encode_result(result, "explain_custom()")
        return Response(body, status=200, content_type=codecs.JSON)

    def _check_model_name(self, model_name: str) -> None:
        if model_name != self.model_name:
            raise NotFoundError("no model named {!r}; this server serves {!r}".format(model_name, self.model_name))

    def v2_server(self) -> Response:
        return jsonify(name="md-runtime", version=__version__, extensions=["binary_tensor_data"])

    def v2_live(self) -> Response:
        return jsonify(live=True)

    def v2_ready(self) -> Response:
        self.core.check_ready()
        return jsonify(ready=True)

    def v2_model(self, model_name: str) -> Response:
        self._check_model_name(model_name)
        model = self.core.ready_model()
        metadata = inference_protocol.model_metadata(
            self.model_name, model.spec.types, model.spec.inputs, model.spec.outputs, model.seen_dtypes
        )
        platform_info = model.spec.platform_info()
        return jsonify(dict(metadata, parameters=platform_info) if platform_info else metadata)

    def v2_model_ready(self, model_name: str) -> Response:
        self._check_model_name(model_name)
        return self.v2_ready()

    def openapi_document(self) -> Response:
        model = self.core.model
        values = {"model_name": [self.model_name], "explanation_name": model.explanation_names() if model else None}
        if model is None:
            return jsonify(openapi.document(values))
        return jsonify(openapi.document(values, model.spec.inputs, model.spec.types))

    def health(self) -> Response:
        return jsonify(status="alive")

    def ready(self) -> Response:
        self.core.check_ready()
        return jsonify(status=self.core.state.value)

    def info(self) -> Response:
        model = self.core.model
        return jsonify(
            model_dir=str(model.model_dir if model else self.settings.model_dir),
            state=self.core.state.value,
            package_sha256=model.package_hash if model else None,
            inputs=(model.spec.inputs or None) if model else None,
            output_columns=model.output_columns if model else None,
            model=model.spec.platform_info() if model else None,
            warnings=model.warnings if model else [],
            runtime_version=__version__,
            python_version=platform.python_version(),
            dependencies=self.dependencies,
            overrides=self._overrides_info(),
            memory=self.memory,
        )

    def _overrides_info(self) -> Optional[Dict[str, Any]]:
        if self.overlay is None:
            return None
        installed = [{"name": name, "version": version} for name, version in self.overlay["overrides"]]
        return {"from_cache": self.overlay["from_cache"], "overlay": self.overlay["path"], "installed": installed}


def read_whole_body(stream: Any, declared: Optional[int], limit: int) -> bytes:
    """The whole body or an error: never a prefix of it, and never more than `limit` + 1 bytes read."""
    if declared is not None and declared > limit:
        raise PayloadTooLargeError(declared, limit)
    wanted = limit + 1 if declared is None else declared
    parts = []
    received = 0
    while received < wanted:
        part = stream.read(min(BODY_READ_SIZE, wanted - received))
        if not part:
            break
        parts.append(part)
        received += len(part)
    if received > limit:
        raise PayloadTooLargeError(None, limit)
    if declared is not None and received < declared:  # a server whose reader returns short (the worker raises)
        raise IncompleteBodyError(received, declared)
    return b"".join(parts)


def _dropped_header(prediction: Prediction) -> Dict[str, str]:
    """The dropped column names, percent-encoded: they come from the client and a header must stay ASCII,
    on one line, and short."""
    if not prediction.dropped:
        return {}
    names = [quote(name, safe="") for name in prediction.dropped[:MAX_DROPPED_NAMES]]
    more = len(prediction.dropped) - len(names)
    return {DROPPED_COLUMNS_HEADER: ",".join(names + (["...{} more".format(more)] if more else []))}


def _protocol() -> str:
    """The protocol whose error shape a response takes: its route's, or for a path no route matched, the one
    whose prefix it is under (a v2 client reads v2 errors even from a mistyped path)."""
    path = request.url_rule.rule if request.url_rule is not None else request.path
    return V2_PROTOCOL if openapi.is_v2(path) else "native"


def _error_response(exc: MdError) -> Tuple[Response, int]:
    return jsonify(error_body(exc, _protocol())), exc.status_code


def _routing_error(exc: HTTPException) -> Tuple[Response, int]:
    return _error_response(RoutingError(exc.code or 500, exc.name or "error", exc.description or ""))


def _unexpected_error(exc: Exception) -> Tuple[Response, int]:
    log.exception("unexpected error while serving %s %s", request.method, request.path)
    return _error_response(InternalError(exc))


WsgiApp = Callable[[Dict[str, Any], Callable[..., Any]], Iterable[bytes]]
# Accept headers the predict lane answers itself, and the type each picks (werkzeug's best_match would agree)
LANE_ACCEPTS = {"": codecs.JSON, "*/*": codecs.JSON, codecs.JSON: codecs.JSON, codecs.CSV: codecs.CSV}


class PredictLane:
    """POST /predict in front of Flask, which would spend a third of a batched 1-row request's CPU on its
    request context, URL map and hooks around the same work. It answers as the Flask route does (a test
    compares the two, errors included, which Flask's error map renders); a request off its lane (another
    path or method, an Accept header it does not know) goes to Flask."""

    def __init__(self, app: Flask, routes: Routes) -> None:
        self.app = app
        self.flask: WsgiApp = app.wsgi_app
        self.routes = routes

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        accepted = LANE_ACCEPTS.get(environ.get("HTTP_ACCEPT", ""))
        if accepted is None or environ.get("PATH_INFO") != "/predict" or environ.get("REQUEST_METHOD") != "POST":
            return self.flask(environ, start_response)
        started = time.perf_counter()
        try:
            body, content_type, headers = self.routes.predict_bytes(environ, accepted)
        except Exception as exc:  # noqa: BLE001 - rendered by the one error map, as Flask would
            return self._error(environ, start_response, exc, started)
        start_response("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))]
                       + list(headers.items()))
        self.routes.core.metrics.record_response("POST", "predict", 200, time.perf_counter() - started)
        return [body]

    def _error(self, environ: Dict[str, Any], start_response: Callable[..., Any], exc: Exception,
               started: float) -> Iterable[bytes]:
        with self.app.request_context(environ):
            response, status = _error_response(exc) if isinstance(exc, MdError) else _unexpected_error(exc)
        response.status_code = status
        self.routes.core.metrics.record_response("POST", "predict", status, time.perf_counter() - started)
        return response(environ, start_response)  # type: ignore[no-any-return]


def create_app(settings: Settings, model: Optional[LoadedModel] = None) -> Flask:
    app = Flask("md_runtime")
    core = Core(settings, create_metrics(app, settings.metrics_dir))
    routes = Routes(settings, core)
    for route in openapi.ROUTES:
        if route.handler is not None:  # /metrics is the exporter's
            app.add_url_rule(route.path, endpoint=route.handler, view_func=getattr(routes, route.handler),
                             methods=[route.method])
    # Flask picks the handler of the nearest class in the exception's MRO: the error map has three entries.
    app.register_error_handler(MdError, _error_response)
    app.register_error_handler(HTTPException, _routing_error)
    app.register_error_handler(Exception, _unexpected_error)
    app.wsgi_app = PredictLane(app, routes)  # type: ignore[method-assign]
    app.extensions["md_runtime"] = core
    if model is not None:
        core.serve(model)
    return app


def create_wsgi_app() -> Flask:
    """gunicorn's entry point, called in each worker: settings from MD_*, then the model (the one the master
    preloaded, or loaded here), then serve."""
    settings = read_settings()
    app = create_app(settings)
    try:
        app.extensions["md_runtime"].serve(preloaded_model(settings) or load_model(settings.model_dir))
    except MdError as exc:
        exit_on_boot_error(settings, exc)
    return app


def preloaded_model(settings: Settings) -> Optional[LoadedModel]:
    """The master's model, its libraries' thread pools given this worker's threads again (the master loaded it
    with none, see boot.resources.no_thread_pools)."""
    model = preloaded(settings.model_dir)
    if model is not None:
        set_worker_threads(int(os.environ.get(THREADS_VARIABLE, "1")))
    return model


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
