"""Codecs: request bytes -> DataFrame, DataFrame -> response bytes. No HTTP here, no per-row Python loops.

Requests: JSON records `[{"col": v}, ...]`, JSON split `{"columns": [...], "data": [[...]]}`, or CSV.
Responses: JSON records (NaN -> null, numpy scalars as numbers, datetimes as ISO 8601) or CSV.
"""

import io
import json
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import pandas as pd

from .errors import ModelOutputError, PayloadError, UnsupportedMediaTypeError

JSON = "application/json"
CSV = "text/csv"
SUPPORTED_TYPES = (JSON, CSV)

try:  # optional speed-up; the stdlib parser is the fallback (and the one that accepts NaN literals)
    import orjson

    def _loads(body: bytes) -> Any:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            return json.loads(body)

except ImportError:  # pragma: no cover - depends on the environment

    def _loads(body: bytes) -> Any:
        return json.loads(body)


def media_type(content_type: str) -> str:
    """`application/json; charset=utf-8` -> `application/json`; a missing type is taken as JSON."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind in ("", JSON) or kind.endswith("+json"):
        return JSON
    if kind in (CSV, "application/csv"):
        return CSV
    raise UnsupportedMediaTypeError(content_type, SUPPORTED_TYPES)


def decode(body: bytes, content_type: str) -> pd.DataFrame:
    kind = media_type(content_type)
    if not body.strip():
        raise PayloadError("CSV" if kind == CSV else "JSON", "the body is empty")
    return _DECODERS[kind](body)


def _decode_json(body: bytes) -> pd.DataFrame:
    try:
        doc = _loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PayloadError("JSON", str(exc)) from None
    return frame_from_json(doc)


def frame_from_json(doc: Any) -> pd.DataFrame:
    """A parsed JSON document in records or split orientation -> DataFrame."""
    if isinstance(doc, list):
        return _from_records(doc)
    if isinstance(doc, dict) and "columns" in doc and "data" in doc:
        return _from_split(doc["columns"], doc["data"])
    raise PayloadError(
        "JSON", 'expected records [{"col": value, ...}, ...] or split {"columns": [...], "data": [[...], ...]}'
    )


def _from_records(records: list) -> pd.DataFrame:
    if not records:
        raise PayloadError("JSON", "the records list is empty; send at least one row")
    if not isinstance(records[0], dict):
        raise PayloadError("JSON", "records must be objects like {{\"col\": value}}, got {}".format(type(records[0]).__name__))
    try:
        return pd.DataFrame(records)
    except (TypeError, ValueError, AttributeError) as exc:
        raise PayloadError("JSON records", str(exc)) from None


def _from_split(columns: Any, data: Any) -> pd.DataFrame:
    if not isinstance(columns, list) or not isinstance(data, list):
        raise PayloadError("JSON split", "`columns` and `data` must both be lists")
    ragged = next((i for i, row in enumerate(data) if not isinstance(row, list) or len(row) != len(columns)), None)
    if ragged is not None:
        raise PayloadError("JSON split", "row {} of `data` is not a list of {} values, one per column".format(ragged, len(columns)))
    numeric = _numeric_matrix(data, len(columns))
    if numeric is not None:
        return pd.DataFrame(numeric, columns=columns)
    try:
        return pd.DataFrame(data, columns=columns)
    except (TypeError, ValueError, AssertionError) as exc:
        raise PayloadError("JSON split", str(exc)) from None


def _numeric_matrix(data: list, width: int) -> Optional[np.ndarray]:
    """All-number rows as one 2-D array (several times faster than pandas reading the lists), else None."""
    if not data or not isinstance(data[0], list) or any(isinstance(v, bool) for v in data[0]):
        return None
    try:
        matrix = np.array(data)
    except ValueError:  # ragged rows: pandas names the problem
        return None
    return matrix if matrix.ndim == 2 and matrix.shape[1] == width and matrix.dtype.kind in "if" else None


def _decode_csv(body: bytes) -> pd.DataFrame:
    try:
        return pd.read_csv(io.BytesIO(body))
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise PayloadError("CSV", str(exc).strip()) from None


_DECODERS: Dict[str, Callable[[bytes], pd.DataFrame]] = {JSON: _decode_json, CSV: _decode_csv}


def encode(frame: pd.DataFrame, kind: str = JSON) -> Tuple[bytes, str]:
    """The output frame as (body, content type), rows in the frame's order."""
    try:
        if kind == CSV:
            return frame.to_csv(index=False).encode("utf-8"), CSV
        # 15 decimal places is pandas' maximum: an absolute error under 1e-15, at C speed.
        return frame.to_json(orient="records", date_format="iso", double_precision=15).encode("utf-8"), JSON
    except (TypeError, ValueError, OverflowError) as exc:
        raise ModelOutputError("returned values that cannot be encoded as {}: {}".format(kind, exc)) from None
