"""OpenAPI: the contract of every endpoint, served at /openapi.json. A test checks it against the routes
and fuzzes the running server from it, so it stays true.

Path parameters are enumerated with this server's own values (its model name, its declared explanations),
so that clients and fuzzers generated from the document reach the model.
"""

from typing import Any, Dict, List, Optional

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
        422: "The columns do not match model.yaml inputs.",
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


def _frame_body() -> Dict[str, Any]:
    return {
        "required": True,
        "content": {JSON: {"schema": _ref("Frame")}, CSV: {"schema": {"type": "string"}}},
    }


def _predict_operation(summary: str) -> Dict[str, Any]:
    ok = {"description": "One output row per input row.", "content": {JSON: {"schema": _ref("Records")}, CSV: {"schema": {"type": "string"}}}}
    return {"post": {"summary": summary, "requestBody": _frame_body(), "responses": dict({"200": ok}, **_errors("Error", *_PREDICT_ERRORS))}}


def _get(summary: str, schema: str, *errors: int, error_schema: str = "Error") -> Dict[str, Any]:
    responses = dict({"200": {"description": "OK", "content": _json(_ref(schema))}}, **_errors(error_schema, *errors))
    return {"get": {"summary": summary, "responses": responses}}


def _path_parameter(name: str, values: Optional[List[str]]) -> Dict[str, Any]:
    schema: Dict[str, Any] = {"type": "string"}
    if values:
        schema["enum"] = values
    return {"name": name, "in": "path", "required": True, "schema": schema}


JSON_TYPES = {"float": "number", "int": "integer", "bool": "boolean", "str": "string", "category": "string"}


def _input_records(inputs: List[str], types: Dict[str, str]) -> Dict[str, Any]:
    """Records of the model's declared input columns (typed when model.yaml gives data-types)."""
    if not inputs:
        return SCHEMAS["Records"]
    typed = {name: {"type": JSON_TYPES[types[name]]} if types.get(name) in JSON_TYPES else {} for name in inputs}
    row = dict(_object(list(inputs), **typed), additionalProperties=False)  # other columns get 422
    return _array(row, minItems=1)


def document(model_name: str, explanations: Optional[List[str]], inputs: Optional[List[str]] = None,
             types: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    model = [_path_parameter("model_name", [model_name])]
    infer_responses = dict(
        {"200": {"description": "Output tensors, one per output column.", "content": _json(_ref("InferResponse"))}},
        **_errors("V2Error", 400, 404, 413, 422, 500, 503),
    )
    explain_ok = {"200": {"description": "What explain_custom() returned, as JSON.", "content": _json({})}}
    paths = {
        "/predict": _predict_operation("Predict: a frame in (JSON records, split, MLflow payloads, or CSV), a frame out."),
        "/invocations": _predict_operation("SageMaker's invocations: the same as /predict; CSV may have no header row."),
        "/explain/{explanation_name}": {
            "parameters": [_path_parameter("explanation_name", explanations)],
            "post": {
                "summary": "A custom explanation: explain_custom(explanation_name, input frame).",
                "requestBody": _frame_body(),
                "responses": dict(explain_ok, **_errors("Error", 400, 404, 413, 415, 422, 500, 503)),
            },
        },
        "/health": _get("Liveness: the worker answers.", "Status"),
        "/ready": _get("Readiness: the model is loaded.", "Status", 503),
        "/ping": _get("SageMaker's health check: 200 once the model is loaded.", "Status", 503),
        "/info": {"get": {"summary": "The model, runtime and library versions.", "responses": {"200": {"description": "OK", "content": _json({"type": "object"})}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics.", "responses": {"200": {"description": "Prometheus text format.", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {"summary": "This document.", "responses": {"200": {"description": "OpenAPI 3.0", "content": _json({"type": "object"})}}}},
        "/v2": _get("Open Inference Protocol: server metadata.", "ServerMetadata"),
        "/v2/health/live": _get("Open Inference Protocol: liveness.", "V2Live"),
        "/v2/health/ready": _get("Open Inference Protocol: readiness.", "V2Ready", 503, error_schema="V2Error"),
        "/v2/models/{model_name}": dict(
            {"parameters": model}, **_get("Open Inference Protocol: model metadata.", "ModelMetadata", 404, error_schema="V2Error")
        ),
        "/v2/models/{model_name}/ready": dict(
            {"parameters": model}, **_get("Open Inference Protocol: model readiness.", "V2Ready", 404, 503, error_schema="V2Error")
        ),
        "/v2/models/{model_name}/infer": {
            "parameters": model,
            "post": {
                "summary": "Open Inference Protocol: infer. Tensors of shape [N] or [N, 1] are columns; [N, K] needs column names.",
                "requestBody": {"required": True, "content": _json(_ref("InferRequest"))},
                "responses": infer_responses,
            },
        },
    }
    schemas = dict(SCHEMAS, InputRecords=_input_records(inputs or [], types or {}))
    return {
        "openapi": "3.0.3",
        "info": {"title": "md-runtime", "version": __version__, "description": "Serves one package.py model."},
        "paths": paths,
        "components": {"schemas": schemas},
    }
