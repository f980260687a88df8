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

SCHEMAS: Dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "message"],
        "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
    },
    "V2Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "Records": {"type": "array", "minItems": 1, "items": {"type": "object"}},
    "Split": {
        "type": "object",
        "required": ["columns", "data"],
        "properties": {"columns": {"type": "array"}, "data": {"type": "array", "items": {"type": "array"}}},
    },
    "MLflowPayload": {
        "type": "object",
        "description": "MLflow scoring-server payload: exactly one of these keys.",
        "minProperties": 1,
        "properties": {
            "dataframe_split": _ref("Split"),
            "dataframe_records": _ref("Records"),
            "instances": {"oneOf": [{"type": "array"}, {"type": "object"}]},
            "inputs": {"oneOf": [{"type": "array"}, {"type": "object"}]},
        },
    },
    "Frame": {"oneOf": [_ref("InputRecords"), _ref("Split"), _ref("MLflowPayload")]},
    "Status": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
    "Tensor": {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "datatype": {"type": "string", "enum": list(DATATYPES)},
            "parameters": {"type": "object"},
            "data": {"type": "array"},
        },
    },
    "InferRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object"},
            "inputs": {"type": "array", "minItems": 1, "items": _ref("Tensor")},
            "outputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
                },
            },
        },
    },
    "InferResponse": {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "id": {"type": "string"},
            "outputs": {"type": "array", "items": _ref("Tensor")},
        },
    },
    "TensorMetadata": {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string", "enum": list(DATATYPES)},
            "shape": {"type": "array", "items": {"type": "integer"}},
        },
    },
    "ModelMetadata": {
        "type": "object",
        "required": ["name", "platform", "inputs", "outputs"],
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": _ref("TensorMetadata")},
            "outputs": {"type": "array", "items": _ref("TensorMetadata")},
        },
    },
    "ServerMetadata": {
        "type": "object",
        "required": ["name", "version", "extensions"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}},
        },
    },
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
    row: Dict[str, Any] = {"type": "object"}
    if inputs:
        row["required"] = list(inputs)
        row["additionalProperties"] = False  # other columns get 422
        row["properties"] = {
            name: {"type": JSON_TYPES[types[name]]} if types.get(name) in JSON_TYPES else {} for name in inputs
        }
    return {"type": "array", "minItems": 1, "items": row}


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
    schemas = dict(
        SCHEMAS,
        InputRecords=_input_records(inputs or [], types or {}),
        V2Live={"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}},
        V2Ready={"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}},
    )
    return {
        "openapi": "3.0.3",
        "info": {"title": "md-runtime", "version": __version__, "description": "Serves one package.py model."},
        "paths": paths,
        "components": {"schemas": schemas},
    }
