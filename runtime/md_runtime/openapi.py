"""OpenAPI: the route table, declared once, and the document generated from it at /openapi.json.

ROUTES lists every endpoint with its method, handler, summary, request body, success content and error
statuses; `app` registers its routes from it and `document` turns it into OpenAPI 3. A test fuzzes the
running server from the document. Path parameters are enumerated with this server's own values (its model
name, its declared explanations), so that clients and fuzzers generated from the document reach the model.
"""

import re
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from . import __version__
from .inference_protocol import DATATYPES

JSON = "application/json"
CSV = "text/csv"


def _ref(name: str) -> Dict[str, str]:
    return {"$ref": "#/components/schemas/" + name}


def _json(schema: Dict[str, Any]) -> Dict[str, Any]:
    return {JSON: {"schema": schema}}


def _errors(schema: str, *codes: int) -> Dict[str, Any]:
    reasons = {
        400: "The request cannot be read; the message names the problem.",
        404: "No such model or explanation.",
        413: "The body exceeds MD_MAX_REQUEST_BYTES.",
        415: "Unsupported Content-Type.",
        422: "A column model.yaml declares as an input is missing.",
        500: "The model's own code raised, or returned an output that cannot be encoded.",
        503: "The model is not loaded yet.",
    }
    return {str(code): {"description": reasons[code], "content": _json(_ref(schema))} for code in codes}


_PREDICT_ERRORS = (400, 413, 415, 422, 500, 503)

STRING: Dict[str, Any] = {"type": "string"}
OBJECT: Dict[str, Any] = {"type": "object"}


def _object(required: List[str], **properties: Any) -> Dict[str, Any]:
    schema: Dict[str, Any] = {"type": "object", "properties": properties}
    if required:  # OpenAPI 3.0 does not allow an empty `required`
        schema["required"] = required
    return schema


def _array(items: Dict[str, Any], **constraints: Any) -> Dict[str, Any]:
    return dict({"type": "array", "items": items}, **constraints)


_DATATYPE = {"type": "string", "enum": list(DATATYPES)}

SCHEMAS: Dict[str, Any] = {
    "Error": _object(["error", "message"], error=STRING, message=STRING),
    "V2Error": _object(["error"], error=STRING),
    "Records": _array(OBJECT, minItems=1),
    "Split": _object(["columns", "data"], columns={"type": "array"}, data=_array({"type": "array"})),
    "MLflowPayload": dict(
        _object([], dataframe_split=_ref("Split"), dataframe_records=_ref("Records"),
                instances={"oneOf": [{"type": "array"}, OBJECT]}, inputs={"oneOf": [{"type": "array"}, OBJECT]}),
        description="MLflow scoring-server payload: exactly one of these keys.",
        minProperties=1,
    ),
    "Frame": {"oneOf": [_ref("InputRecords"), _ref("Split"), _ref("MLflowPayload")]},
    "Status": _object(["status"], status=STRING),
    "Tensor": _object(
        ["name", "shape", "datatype"], name=STRING, shape=_array({"type": "integer", "minimum": 0}),
        datatype=_DATATYPE, parameters=OBJECT, data={"type": "array"},
    ),
    "InferRequest": _object(
        ["inputs"], id=STRING, parameters=OBJECT, inputs=_array(_ref("Tensor"), minItems=1),
        outputs=_array(_object(["name"], name=STRING, parameters=OBJECT)),
    ),
    "InferResponse": _object(["model_name", "outputs"], model_name=STRING, id=STRING, outputs=_array(_ref("Tensor"))),
    "TensorMetadata": _object(["name", "datatype", "shape"], name=STRING, datatype=_DATATYPE, shape=_array({"type": "integer"})),
    "ModelMetadata": _object(
        ["name", "platform", "inputs", "outputs"], name=STRING, versions=_array(STRING), platform=STRING,
        inputs=_array(_ref("TensorMetadata")), outputs=_array(_ref("TensorMetadata")),
    ),
    "ServerMetadata": _object(["name", "version", "extensions"], name=STRING, version=STRING, extensions=_array(STRING)),
    "V2Live": _object(["live"], live={"type": "boolean"}),
    "V2Ready": _object(["ready"], ready={"type": "boolean"}),
}


FRAME_BODY = {"required": True, "content": {JSON: {"schema": _ref("Frame")}, CSV: {"schema": {"type": "string"}}}}
INFER_BODY = {"required": True, "content": _json(_ref("InferRequest"))}
ROWS_OUT = {JSON: {"schema": _ref("Records")}, CSV: {"schema": {"type": "string"}}}
ANY_JSON = _json({})
V2_PREFIX = "/v2"  # the Open Inference Protocol's routes, whose errors are {"error": message}


class Route(NamedTuple):
    path: str  # Flask's syntax: /explain/<explanation_name>
    method: str
    handler: Optional[str]  # the app's method serving it (and the metrics' endpoint label); None: /metrics
    summary: str
    ok: Dict[str, Any]  # the content of its 200 response
    errors: Tuple[int, ...] = ()
    body: Optional[Dict[str, Any]] = None


def _schema(name: str) -> Dict[str, Any]:
    return _json(_ref(name))


ROUTES = (
    Route("/predict", "POST", "predict", "Predict: a frame in (JSON records, split, MLflow payloads, or CSV), a frame out.",
          ROWS_OUT, _PREDICT_ERRORS, FRAME_BODY),
    Route("/invocations", "POST", "predict", "SageMaker's invocations: the same as /predict; CSV may have no header row.",
          ROWS_OUT, _PREDICT_ERRORS, FRAME_BODY),
    Route("/explain/<explanation_name>", "POST", "explain",
          "An explanation: explain_custom(explanation_name, input frame), or integrated gradients (ig, ig_flex).",
          ANY_JSON, (400, 404, 413, 415, 422, 500, 503), FRAME_BODY),
    Route("/health", "GET", "health", "Liveness: the worker answers.", _schema("Status")),
    Route("/ready", "GET", "ready", "Readiness: the model is loaded.", _schema("Status"), (503,)),
    Route("/ping", "GET", "ready", "SageMaker's health check: 200 once the model is loaded.", _schema("Status"), (503,)),
    Route("/info", "GET", "info", "The model, runtime and library versions.", _json({"type": "object"})),
    Route("/metrics", "GET", None, "Prometheus metrics.", {"text/plain": {"schema": {"type": "string"}}}),
    Route("/openapi.json", "GET", "openapi_document", "This document.", _json({"type": "object"})),
    Route("/v2", "GET", "v2_server", "Open Inference Protocol: server metadata.", _schema("ServerMetadata")),
    Route("/v2/health/live", "GET", "v2_live", "Open Inference Protocol: liveness.", _schema("V2Live")),
    Route("/v2/health/ready", "GET", "v2_ready", "Open Inference Protocol: readiness.", _schema("V2Ready"), (503,)),
    Route("/v2/models/<model_name>", "GET", "v2_model", "Open Inference Protocol: model metadata.",
          _schema("ModelMetadata"), (404,)),
    Route("/v2/models/<model_name>/ready", "GET", "v2_model_ready", "Open Inference Protocol: model readiness.",
          _schema("V2Ready"), (404, 503)),
    Route("/v2/models/<model_name>/infer", "POST", "v2_infer",
          "Open Inference Protocol: infer. Tensors of shape [N] or [N, 1] are columns; [N, K] needs column names.",
          _schema("InferResponse"), (400, 404, 413, 422, 500, 503), INFER_BODY),
)


def is_v2(path: str) -> bool:
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def _path_parameter(name: str, values: Optional[List[str]]) -> Dict[str, Any]:
    schema: Dict[str, Any] = {"type": "string"}
    if values:
        schema["enum"] = values
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _operation(route: Route) -> Dict[str, Any]:
    responses = dict({"200": {"description": "OK", "content": route.ok}},
                     **_errors("V2Error" if is_v2(route.path) else "Error", *route.errors))
    operation: Dict[str, Any] = {"summary": route.summary, "responses": responses}
    if route.body is not None:
        operation["requestBody"] = route.body
    return operation


JSON_TYPES = {"float": "number", "int": "integer", "bool": "boolean", "str": "string", "category": "string"}


def _input_records(inputs: List[str], types: Dict[str, str]) -> Dict[str, Any]:
    """Records holding the model's declared input columns (typed when model.yaml gives data-types); other
    columns may come too, and are dropped."""
    if not inputs:
        return SCHEMAS["Records"]
    typed = {name: {"type": JSON_TYPES[types[name]]} if types.get(name) in JSON_TYPES else {} for name in inputs}
    return _array(_object(list(inputs), **typed), minItems=1)


def document(parameters: Dict[str, Optional[List[str]]], inputs: Optional[List[str]] = None,
             types: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """OpenAPI 3 of ROUTES; `parameters` gives each path parameter's values (None: any string)."""
    paths: Dict[str, Dict[str, Any]] = {}
    for route in ROUTES:
        names = re.findall(r"<(\w+)>", route.path)
        item = paths.setdefault(re.sub(r"<(\w+)>", r"{\1}", route.path), {})
        if names:
            item["parameters"] = [_path_parameter(name, parameters.get(name)) for name in names]
        item[route.method.lower()] = _operation(route)
    schemas = dict(SCHEMAS, InputRecords=_input_records(inputs or [], types or {}))
    return {
        "openapi": "3.0.3",
        "info": {"title": "md-runtime", "version": __version__, "description": "Serves one package.py model."},
        "paths": paths,
        "components": {"schemas": schemas},
    }
