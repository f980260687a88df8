"""Codecs: request bytes -> DataFrame, DataFrame -> response bytes. No HTTP here, no per-row Python loops.

Requests: JSON records `[{"col": v}, ...]`, JSON split `{"columns": [...], "data": [[...]]}`, MLflow's
scoring payloads (`dataframe_split`, `dataframe_records`, `instances`, `inputs`), or CSV with or without a
header row (SageMaker sends none). Responses: JSON records (NaN -> null, numpy scalars as numbers, datetimes
as ISO 8601) or CSV. `columns` (model.yaml inputs) names the columns of headerless CSV and bare tensors.
"""

import contextlib
import csv
import functools
import io
import json
import math
import re
import threading
import warnings
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from .errors import ModelOutputError, PayloadError, UnsupportedMediaTypeError, some_names

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

    def dumps_json(doc: Any) -> bytes:
        return orjson.dumps(doc)

except ImportError:  # pragma: no cover - depends on the environment

    def _loads(body: bytes) -> Any:
        return json.loads(body)

    def dumps_json(doc: Any) -> bytes:
        return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def map_json_buffers() -> None:
    """Parse once, so that what the parser maps on its first use is in place: orjson before 3.11 maps an 8 MiB
    buffer, mostly never touched, which a worker's data limit would otherwise count as a request's growth."""
    _loads(b"[0]")


_RAGGED_WARNING = getattr(np, "exceptions", np).VisibleDeprecationWarning  # numpy.exceptions from 1.25 on
QUICK_RECORDS = 64  # past this many records, pandas reads them as fast as the checks of _numeric_records take
RAISE_COLUMNS = "raise it if the model takes that many"


class Limits(NamedTuple):
    """What one request may hold (MD_MAX_COLUMNS, MD_MAX_JSON_DEPTH): past these, a client's mistake would
    occupy a worker for seconds or exhaust the parser's recursion."""

    columns: int = 10000
    json_depth: int = 32


def media_type(content_type: str) -> str:
    """`application/json; charset=utf-8` -> `application/json`; a missing type is taken as JSON."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind in ("", JSON) or kind.endswith("+json"):
        return JSON
    if kind in (CSV, "application/csv"):
        return CSV
    raise UnsupportedMediaTypeError(content_type, SUPPORTED_TYPES)


def decode(body: bytes, content_type: str, columns: Sequence[str] = (), limits: Limits = Limits()) -> pd.DataFrame:
    kind = media_type(content_type)
    fmt = "CSV" if kind == CSV else "JSON"
    if not body.strip():
        raise PayloadError(fmt, "the body is empty")
    if kind == CSV:
        frame = _decode_csv(body, _csv_header(content_type), list(columns), limits)
    else:
        frame = numeric_split(body, limits) if len(body) >= NUMERIC_SPLIT_BYTES else None
        if frame is None:
            frame = frame_from_json(loads_json(body, limits), list(columns), limits)
    return require_table(frame, fmt, limits)


def require_table(frame: pd.DataFrame, fmt: str, limits: Limits) -> pd.DataFrame:
    """At least one row, at most `limits.columns` columns, and no column name twice."""
    if len(frame) == 0:
        raise PayloadError(fmt, "it holds no rows; send at least one row")
    require_columns(fmt, frame.columns, limits)
    return frame


def require_columns(fmt: str, names: Sequence[Any], limits: Limits) -> None:
    if len(names) > limits.columns:
        raise PayloadError(fmt, "it holds {} columns, more than MD_MAX_COLUMNS ({}); {}".format(
            len(names), limits.columns, RAISE_COLUMNS))
    with contextlib.suppress(TypeError):  # an unhashable name: pandas finds the repeats
        if len(set(names)) == len(names):  # the common case, in a microsecond instead of pandas' 30-45
            return
    repeated = pd.Index(names)
    repeated = repeated[repeated.duplicated()].unique()
    if len(repeated):
        raise PayloadError(fmt, "column names appear more than once: {}".format(some_names(list(repeated))))


def loads_json(body: bytes, limits: Limits = Limits()) -> Any:
    deepest = json_depth(body, limits.json_depth)
    if deepest > limits.json_depth:
        raise PayloadError("JSON", "it is nested {} deep, more than MD_MAX_JSON_DEPTH ({}); send flat records".format(
            deepest, limits.json_depth))
    try:
        return _loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PayloadError("JSON", str(exc)) from None
    except RecursionError:  # MD_MAX_JSON_DEPTH set beyond what the parser can take
        raise PayloadError("JSON", "it is nested too deeply to parse") from None


_ESCAPED = re.compile(rb"\\.", re.DOTALL)
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'[]{}"')  # what json_depth drops before it scans
_NESTING = np.zeros(256, dtype=np.int8)
_NESTING[[ord("["), ord("{")]] = 1
_NESTING[[ord("]"), ord("}")]] = -1
_QUOTE = ord('"')
_DEPTH_BLOCK = 1024 * 1024


def json_depth(body: bytes, limit: int) -> int:
    """How deeply the body's arrays and objects nest, brackets inside strings not counted. Only when there are
    more brackets than `limit` at all (a one-row request has few), and only over the brackets and quotes, which
    bytes.translate keeps in one pass: scanning every byte of a 10,000-row body took longer than parsing it."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return 0
    text = _ESCAPED.sub(b"", body) if b"\\" in body else body  # an escaped quote does not end its string
    marks = text.translate(None, _NOT_STRUCTURE)
    depth = deepest = 0
    in_string = False
    for start in range(0, len(marks), _DEPTH_BLOCK):  # a block at a time: the sums of a whole body could take GBs
        chars = np.frombuffer(marks, dtype=np.uint8, count=min(_DEPTH_BLOCK, len(marks) - start), offset=start)
        inside = np.bitwise_xor.accumulate(chars == _QUOTE) ^ in_string
        levels = np.cumsum(np.where(inside, 0, _NESTING[chars]), dtype=np.int32) + depth
        deepest, depth, in_string = max(deepest, int(levels.max())), int(levels[-1]), bool(inside[-1])
    return deepest


EXPECTED_JSON = (
    'expected records [{"col": value, ...}, ...], split {"columns": [...], "data": [[...], ...]}, or an MLflow '
    "payload with one of: dataframe_split, dataframe_records, instances, inputs"
)
MLFLOW_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")


def frame_from_json(doc: Any, columns: Sequence[str] = (), limits: Limits = Limits()) -> pd.DataFrame:
    """A parsed JSON document in records, split or MLflow form -> DataFrame."""
    if isinstance(doc, list):
        return _from_records(doc, limits)
    if not isinstance(doc, dict):
        raise PayloadError("JSON", EXPECTED_JSON)
    if "columns" in doc and "data" in doc:
        return _from_split(doc["columns"], doc["data"], limits)
    found = [key for key in MLFLOW_KEYS if key in doc]
    if len(found) != 1:
        problem = "more than one of {}; send exactly one".format(", ".join(found)) if found else EXPECTED_JSON
        raise PayloadError("JSON", problem)
    return _from_mlflow(found[0], doc[found[0]], columns, limits)


def _from_mlflow(key: str, value: Any, columns: Sequence[str], limits: Limits) -> pd.DataFrame:
    """MLflow's scoring-server payloads: a split or records frame, or instances/inputs as rows, columns or a tensor."""
    if key == "dataframe_split":
        if not isinstance(value, dict) or "columns" not in value or "data" not in value:
            raise PayloadError("JSON dataframe_split", 'expected {"columns": [...], "data": [[...], ...]}')
        return _from_split(value["columns"], value["data"], limits)
    if key == "dataframe_records" or (isinstance(value, list) and value and isinstance(value[0], dict)):
        if not isinstance(value, list):
            raise PayloadError("JSON " + key, 'expected a list of records [{"col": value, ...}, ...]')
        return _from_records(value, limits)
    if isinstance(value, dict):
        return _from_columns(key, value)
    return _from_tensor(key, value, columns)


def _from_columns(key: str, columns: Dict[str, Any]) -> pd.DataFrame:
    """{"col": [values...], ...}: one list per column, all of one length."""
    if not columns:
        raise PayloadError("JSON " + key, "no columns given")
    lengths = {name: len(v) if isinstance(v, list) else None for name, v in columns.items()}
    if None in lengths.values() or len(set(lengths.values())) != 1:
        raise PayloadError("JSON " + key, "each column must be a list of values, all of one length (got {})".format(lengths))
    return pd.DataFrame(columns)


def _from_tensor(key: str, values: Any, columns: Sequence[str]) -> pd.DataFrame:
    """A list of rows (or of scalars, one per row): columns named by model.yaml inputs, else 0, 1, ..."""
    if not isinstance(values, list) or not values:
        raise PayloadError("JSON " + key, "expected a non-empty list of rows")
    # NOTE: checked here because numpy before 1.24 turns ragged rows into an object array instead of failing
    widths = {len(row) if isinstance(row, list) else None for row in values}
    if len(widths) > 1:
        raise PayloadError("JSON " + key, "rows must all be lists of one length, or all single values")
    array = _array(values)
    if array is None or (array.dtype == object and any(isinstance(v, (list, dict)) for v in array.flat)):
        raise PayloadError("JSON " + key, "rows hold values of different shapes; send rows of single values")
    if array.ndim == 1:
        array = array.reshape(-1, 1)
    if array.ndim != 2:
        raise PayloadError("JSON " + key, "a tensor of shape {} cannot be a table; send rows".format(list(array.shape)))
    names = list(columns) if len(columns) == array.shape[1] else None
    return pd.DataFrame(array, columns=names)


def _from_records(records: list, limits: Limits) -> pd.DataFrame:
    if not records:
        raise PayloadError("JSON", "the records list is empty; send at least one row")
    if not isinstance(records[0], dict):
        raise PayloadError("JSON", "records must be objects like {{\"col\": value}}, got {}".format(type(records[0]).__name__))
    require_columns("JSON records", list(records[0]), limits)
    quick = _numeric_records(records) if len(records) <= QUICK_RECORDS else None
    if quick is not None:
        return quick
    try:
        return pd.DataFrame(records)
    except (TypeError, ValueError, AttributeError) as exc:
        raise PayloadError("JSON records", str(exc)) from None


def _numeric_records(records: list) -> Optional[pd.DataFrame]:
    """Records with the same keys and numbers of one kind (all floats, or all ints), as one array: the frame
    pandas would read, in 24 microseconds for a row instead of 140. Anything else is left to pandas."""
    keys = records[0].keys()
    if not all(isinstance(record, dict) and record.keys() == keys for record in records):
        return None
    kinds = {type(value) for record in records for value in record.values()}
    if kinds != {float} and kinds != {int}:
        return None
    names = list(keys)
    matrix = _array([[record[name] for name in names] for record in records])
    # integers past int64 are not one array's: numpy 1.x makes them all floats, pandas keeps each column's type
    if matrix is None or matrix.ndim != 2 or matrix.dtype != (np.int64 if kinds == {int} else np.float64):
        return None
    return pd.DataFrame(matrix, columns=_column_index(names), copy=False)  # the array is ours: pandas 3 copies it


def _from_split(columns: Any, data: Any, limits: Limits) -> pd.DataFrame:
    if not isinstance(columns, list) or not isinstance(data, list):
        raise PayloadError("JSON split", "`columns` and `data` must both be lists")
    odd_names = [c for c in columns if not isinstance(c, (str, int, float))]
    if odd_names:
        raise PayloadError("JSON split", "column names must be strings or numbers, got {}".format(type(odd_names[0]).__name__))
    require_columns("JSON split", columns, limits)
    numeric = _numeric_matrix(data, len(columns))  # a matrix of the right width has no ragged row
    if numeric is not None:
        return pd.DataFrame(numeric, columns=_column_index(columns), copy=False)
    ragged = next((i for i, row in enumerate(data) if not isinstance(row, list) or len(row) != len(columns)), None)
    if ragged is not None:
        raise PayloadError("JSON split", "row {} of `data` is not a list of {} values, one per column".format(ragged, len(columns)))
    try:
        return pd.DataFrame(data, columns=columns)
    except (TypeError, ValueError, AssertionError) as exc:
        raise PayloadError("JSON split", str(exc)) from None


SPLIT_KEYS = {"columns", "data", "index"}
NUMERIC_SPLIT_BYTES = 4096  # below about 20 rows of 20 numbers, its checks cost more than they save


def numeric_split(body: bytes, limits: Limits = Limits()) -> Optional[pd.DataFrame]:
    """A split frame (top level or MLflow's dataframe_split) of string column names and rows of numbers only,
    its numbers read by simdjson into one array: a 10,000-row body in a quarter of the time orjson and numpy
    take. None for anything else (or without simdjson): the general path then decodes it, or says what is wrong.
    tests/test_codecs.py holds both paths to the same frames."""
    simdjson = _simdjson()
    if simdjson is None or body.lstrip()[:1] != b"{":
        return None
    if len(body) > SHARED_PARSER_BYTES:
        read = _names_and_numbers(simdjson, simdjson.Parser(), body, limits.json_depth)
    else:
        with _PARSER_LOCK:
            read = _names_and_numbers(simdjson, _shared_parser(), body, limits.json_depth)
    if read is None:
        return None
    names, matrix = read
    require_columns("JSON split", names, limits)
    return pd.DataFrame(matrix, columns=_column_index(names), copy=False)


@functools.lru_cache(maxsize=None)
def _simdjson() -> Any:
    """pysimdjson (optional), imported by the first body that may use it rather than at start: its library adds
    over a MiB to each process, and a worker of the smallest replica (150 MiB) has only a few MiB to spare."""
    try:
        import simdjson
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    return simdjson


# One parser, its buffers kept between requests: a fresh one's first touch of them cost a third of the parse.
# It keeps buffers of about 4-8 times the largest body it read, so a bigger body gets a parser of its own.
# simdjson refuses a new parse while objects of the last are alive, so _names_and_numbers keeps none of them.
SHARED_PARSER_BYTES = 2 * 1024 * 1024
_PARSER_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def _shared_parser() -> Any:
    return _simdjson().Parser()


def _names_and_numbers(simdjson: Any, parser: Any, body: bytes, json_depth: int) -> Optional[Tuple[List[str], np.ndarray]]:
    """The column names and the array of numbers of a split frame the fast path can take, else None."""
    try:
        doc = parser.parse(body)
    except (ValueError, RuntimeError):  # not JSON, a NaN literal, a number past 64 bits: the general path
        return None
    split, depth = (doc, 3) if "columns" in doc and "data" in doc else (_only_value(simdjson, doc, "dataframe_split"), 4)
    if not isinstance(split, simdjson.Object) or not _plain_keys(split) or json_depth < depth:
        return None
    columns, data, index = split["columns"], split["data"], split.get("index")
    if not isinstance(columns, simdjson.Array) or not isinstance(data, simdjson.Array):
        return None
    names = [name for name in columns.as_list() if isinstance(name, str) and "[" not in name]
    if not names or len(names) != len(columns):
        return None
    if index is not None and not (isinstance(index, simdjson.Array) and _no_brackets(index.as_list())):
        return None
    matrix = _rows_of_numbers(data, len(names), body.count(b"[") - (2 if index is None else 3))
    return None if matrix is None else (names, matrix)


def _no_brackets(values: List[Any]) -> bool:
    return not any(isinstance(value, (list, dict)) or (isinstance(value, str) and "[" in value) for value in values)


def _only_value(simdjson: Any, doc: Any, key: str) -> Any:
    keys = list(doc.keys()) if isinstance(doc, simdjson.Object) else []
    return doc[key] if keys == [key] else None


def _plain_keys(split: Any) -> bool:
    """The split's keys are known ones, none twice (simdjson keeps the first of a repeated key, JSON parsers
    the last)."""
    keys = list(split.keys())
    return len(set(keys)) == len(keys) and SPLIT_KEYS.issuperset(keys) and {"columns", "data"} <= set(keys)


def _rows_of_numbers(data: Any, width: int, row_brackets: int) -> Optional[np.ndarray]:
    """`data` as a (rows, width) array when it is a list of `width`-number lists. as_buffer flattens nested
    lists, so the body's bracket count (columns, data and index hold one each) must show none."""
    if len(data) == 0 or len(data) != row_brackets:
        return None
    try:
        if set(map(len, data)) != {width}:  # a number in place of a row has no len(); a string's fails below
            return None
    except TypeError:
        return None
    for kind, dtype in (("i", np.int64), ("d", np.float64)):  # integers stay integers, as numpy reads them
        try:
            matrix = np.frombuffer(data.as_buffer(of_type=kind), dtype=dtype).reshape(len(data), width)
        except (TypeError, ValueError):  # a value of another kind: a string, null, true, or (for "i") a float
            continue
        # numpy makes uint64 of integers from 2**63 on; simdjson's floats of them would differ
        return matrix if kind == "i" or np.all(np.abs(matrix) < 2.0 ** 63) else None
    return None


def _column_index(names: List[Any]) -> Any:
    """The columns as a pandas Index, shared between requests that name the same columns. Building one from a
    list took two thirds of a 1-row request's decode; a shared Index also makes batches concatenate faster."""
    try:
        return _shared_index(tuple(names))
    except TypeError:  # an unhashable name (a list, say): pandas reports it, or copes
        return names


@functools.lru_cache(maxsize=256)
def _shared_index(names: Tuple[Any, ...]) -> pd.Index:
    return pd.Index(names)


def _array(values: list) -> Optional[np.ndarray]:
    """np.array(values), or None when its elements have different shapes (a list beside a number): numpy 1.24+
    raises, older numpy warns and makes an object array of the lists."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", _RAGGED_WARNING)
        try:
            return np.array(values)
        except (ValueError, _RAGGED_WARNING):
            return None


def _numeric_matrix(data: list, width: int) -> Optional[np.ndarray]:
    """All-number rows as one 2-D array (several times faster than pandas reading the lists), else None."""
    if not data or not isinstance(data[0], list) or any(isinstance(v, bool) for v in data[0]):
        return None
    matrix = _array(data)
    if matrix is None or matrix.ndim != 2 or matrix.shape[1] != width or matrix.dtype.kind not in "if":
        return None
    return matrix


def _csv_header(content_type: str) -> Optional[bool]:
    """RFC 4180's `header=present|absent` parameter; None when the type does not say."""
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "header":
            return value.strip().lower() != "absent"
    return None


def _decode_csv(body: bytes, header: Optional[bool], columns: List[str], limits: Limits) -> pd.DataFrame:
    """A first row of numbers only is data, not a header (SageMaker's CSV has no header row)."""
    first_line = body.split(b"\n", 1)[0]
    if header is None:
        header = not _all_numbers(first_line)
    if first_line.count(b",") >= limits.columns:
        raise PayloadError("CSV", "it holds more than MD_MAX_COLUMNS ({}) columns; {}".format(limits.columns, RAISE_COLUMNS))
    names = None
    if header:  # pandas would rename a repeated name to `name.1`: the client meant something else
        require_columns("CSV", _header_names(first_line), limits)
    else:
        names = columns if len(columns) == first_line.count(b",") + 1 else None
    try:
        return pd.read_csv(io.BytesIO(body), header=0 if header else None, names=names)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise PayloadError("CSV", str(exc).strip()) from None


def _header_names(line: bytes) -> List[str]:
    try:
        return next(csv.reader([line.decode("utf-8").rstrip("\r")]), [])
    except (UnicodeDecodeError, csv.Error):
        return []  # pandas reports it


def _all_numbers(line: bytes) -> bool:
    try:
        [float(field) for field in line.split(b",")]
    except ValueError:
        return False
    return True


def encode_result(result: Any, stage: str) -> bytes:
    """Any JSON-like result of user code (explanations): DataFrames as records, numpy values as lists, and
    NaN or infinity as null, as in predictions."""
    if isinstance(result, pd.DataFrame):
        return encode(result)[0]
    try:
        return json.dumps(_plain(result), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ModelOutputError("returned a value that cannot be encoded as JSON: {}".format(exc), stage) from None


def _plain(value: Any) -> Any:
    """Plain JSON values, walked element by element: explanations are small, and a NaN can hide anywhere."""
    if isinstance(value, float):  # numpy's float64 too
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, pd.DataFrame):
        return json.loads(encode(value)[0])
    if isinstance(value, (np.ndarray, pd.Series, np.generic)):
        return _plain(value.tolist())
    if callable(getattr(value, "render", None)):  # the platform's GEM explanation objects (fiddler.packtools.gem)
        return _plain(value.render())
    return value


def encode(frame: pd.DataFrame, kind: str = JSON) -> Tuple[bytes, str]:
    """The output frame as (body, content type), rows in the frame's order."""
    try:
        if kind == CSV:
            return frame.to_csv(index=False).encode("utf-8"), CSV
        # 15 decimal places is pandas' maximum: an absolute error under 1e-15, at C speed.
        return frame.to_json(orient="records", date_format="iso", double_precision=15).encode("utf-8"), JSON
    except (TypeError, ValueError, OverflowError) as exc:
        raise ModelOutputError("returned values that cannot be encoded as {}: {}".format(kind, exc)) from None
