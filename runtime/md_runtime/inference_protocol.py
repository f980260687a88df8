"""Open Inference Protocol (KServe v2, REST): infer requests -> DataFrame, DataFrame -> infer responses.

The codecs of the v2 routes. Each input tensor of shape [N] or [N, 1] is one column named after the tensor;
a tensor of shape [N, K] is K columns, named by its `parameters.columns` or, when it is the only input, by
model.yaml `inputs`. Each output column is one tensor of shape [N]. Both JSON `data` and the binary tensor
extension (`Inference-Header-Content-Length`, what tritonclient sends by default) are read and written.
"""

import math
import struct
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from .codecs import Limits, dumps_json, loads_json, require_table
from .errors import PayloadError

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY = "application/octet-stream"

NUMPY_TYPES: Dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
    "BYTES": np.object_,
}
DATATYPES = tuple(NUMPY_TYPES)
_BY_DTYPE = {np.dtype(t).str: name for name, t in NUMPY_TYPES.items() if name != "BYTES"}
# model.yaml's platform data-types, for metadata before any prediction
_DECLARED = {"float": "FP64", "int": "INT64", "bool": "BOOL", "str": "BYTES", "category": "BYTES"}


class InferRequest(NamedTuple):
    id: Optional[str]
    frame: pd.DataFrame
    outputs: Optional[List[Tuple[str, bool]]]  # requested (name, binary); None means every column
    binary_outputs: bool  # the request-wide default


def _fail(problem: str) -> PayloadError:
    return PayloadError("an inference request", problem)


def decode_infer(
    body: bytes, header_length: Optional[str], columns: Sequence[str] = (), limits: Limits = Limits()
) -> InferRequest:
    head, binary = _split_binary(body, header_length)
    doc = loads_json(head, limits)
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise _fail('expected {"inputs": [{"name": ..., "shape": [...], "datatype": ..., "data": [...]}, ...]}')
    arrays = []
    for tensor in doc["inputs"]:
        raw, binary = _take_binary(tensor, binary)
        arrays.append((tensor, _tensor_array(tensor, raw)))
    binary_outputs = bool(_parameters(doc).get("binary_data_output", False))
    request_id = doc.get("id")
    return InferRequest(
        str(request_id) if request_id is not None else None,
        require_table(_frame(arrays, list(columns)), "an inference request", limits),
        _requested_outputs(doc.get("outputs"), binary_outputs),
        binary_outputs,
    )


def _parameters(item: Any) -> Dict[str, Any]:
    """An object's `parameters`, or {} when it has none (or they are not an object)."""
    parameters = item.get("parameters") if isinstance(item, dict) else None
    return parameters if isinstance(parameters, dict) else {}


def _split_binary(body: bytes, header_length: Optional[str]) -> Tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        length = -1
    if not 0 < length <= len(body):
        raise _fail("{} is {!r}, not the length of the JSON part of the body".format(HEADER_LENGTH, header_length))
    return body[:length], body[length:]


def _take_binary(tensor: Any, binary: bytes) -> Tuple[Optional[bytes], bytes]:
    """The tensor's bytes from the binary part (in input order), and what remains of it."""
    size = _parameters(tensor).get("binary_data_size")
    if size is None:
        return None, binary
    if not isinstance(size, int) or size < 0 or size > len(binary):
        raise _fail("input {!r} has binary_data_size {!r} but {} bytes remain".format(tensor.get("name"), size, len(binary)))
    return binary[:size], binary[size:]


def _tensor_array(tensor: Any, raw: Optional[bytes]) -> np.ndarray:
    if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
        raise _fail("each input must be an object with a name, shape, datatype and data")
    name, datatype, shape = tensor["name"], tensor.get("datatype"), tensor.get("shape")
    if datatype not in NUMPY_TYPES:
        raise _fail("input {!r} has datatype {!r}; use one of {}".format(name, datatype, ", ".join(DATATYPES)))
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _fail("input {!r} needs a shape, a list of non-negative integers".format(name))
    array = _from_bytes(name, datatype, raw) if raw is not None else _from_data(name, datatype, tensor.get("data"))
    holds = math.prod(shape)  # Python's integers: numpy's product overflows int64 and wraps around
    if array.size != holds:
        raise _fail("input {!r} has {} values, but shape {} holds {}".format(name, array.size, shape[:8], holds))
    try:
        return array.reshape(shape)
    except ValueError as exc:  # more dimensions than numpy takes, or dimensions past its index range
        raise _fail("input {!r} cannot have shape {}: {}".format(name, shape[:8], exc)) from None


def _from_data(name: str, datatype: str, data: Any) -> np.ndarray:
    if not isinstance(data, list):
        raise _fail("input {!r} needs `data`, a list of values (or binary data)".format(name))
    try:
        array = np.array(data, dtype=NUMPY_TYPES[datatype])
    except (ValueError, TypeError, OverflowError) as exc:
        raise _fail("input {!r}: the data are not {} values ({})".format(name, datatype, exc)) from None
    return array.reshape(-1)


def _from_bytes(name: str, datatype: str, raw: bytes) -> np.ndarray:
    if datatype == "BYTES":
        return np.array(_unpack_strings(name, raw), dtype=np.object_)
    dtype = np.dtype(NUMPY_TYPES[datatype]).newbyteorder("<")
    if len(raw) % dtype.itemsize:
        raise _fail("input {!r}: {} bytes is not a whole number of {} values".format(name, len(raw), datatype))
    return np.frombuffer(raw, dtype=dtype)


def _unpack_strings(name: str, raw: bytes) -> List[str]:
    """BYTES in binary form: each element is a 4-byte little-endian length, then that many bytes."""
    values, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise _fail("input {!r}: truncated BYTES element".format(name))
        (size,) = struct.unpack_from("<I", raw, at)
        values.append(raw[at + 4:at + 4 + size].decode("utf-8", "replace"))
        at += 4 + size
    return values


def _frame(arrays: List[Tuple[dict, np.ndarray]], declared: List[str]) -> pd.DataFrame:
    columns: Dict[str, np.ndarray] = {}
    for tensor, array in arrays:
        names = _column_names(tensor, array, declared if len(arrays) == 1 else [])
        for index, column in enumerate(names):
            if column in columns:
                raise _fail("column {!r} is given by more than one input".format(column))
            columns[column] = array[:, index] if array.ndim == 2 else array
    rows = {len(values) for values in columns.values()}
    if len(rows) > 1:
        raise _fail("inputs have different numbers of rows: {}".format(sorted(rows)))
    return pd.DataFrame(columns)


def _column_names(tensor: dict, array: np.ndarray, declared: List[str]) -> List[str]:
    name = tensor["name"]
    if array.ndim == 1 or (array.ndim == 2 and array.shape[1] == 1):
        return [name]
    if array.ndim != 2:
        raise _fail("input {!r} has shape {}; a table column needs shape [rows] or [rows, columns]".format(name, list(array.shape)))
    given = _parameters(tensor).get("columns") or declared
    if not isinstance(given, list) or len(given) != array.shape[1]:
        raise _fail(
            "input {!r} has {} columns; name them in its parameters.columns or in model.yaml inputs, or send one "
            "tensor per column".format(name, array.shape[1])
        )
    return [str(column) for column in given]


def _requested_outputs(outputs: Any, binary_default: bool) -> Optional[List[Tuple[str, bool]]]:
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
        raise _fail('`outputs` must be a list like [{"name": "..."}]')
    requested = []
    for output in outputs:
        requested.append((output["name"], bool(_parameters(output).get("binary_data", binary_default))))
    return requested


def encode_infer(model_name: str, infer: InferRequest, frame: pd.DataFrame) -> Tuple[bytes, Dict[str, str]]:
    """The response body and its headers; binary outputs follow the JSON part, in output order."""
    available = [str(c) for c in frame.columns]
    requested = infer.outputs or [(name, infer.binary_outputs) for name in available]
    unknown = [name for name, _ in requested if name not in available]
    if unknown:
        raise _fail("no output named {}; the outputs are: {}".format(", ".join(unknown), ", ".join(available)))
    by_name = dict(zip(available, frame.columns))
    tensors, chunks = [], []
    for name, binary in requested:
        datatype, values = _output_values(frame[by_name[name]])
        tensor: Dict[str, Any] = {"name": name, "datatype": datatype, "shape": [len(frame)]}
        if binary:
            chunk = _to_bytes(datatype, values)
            tensor["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            tensor["data"] = _to_json_list(values)
        tensors.append(tensor)
    response: Dict[str, Any] = {"model_name": model_name, "outputs": tensors}
    if infer.id is not None:
        response["id"] = infer.id
    head = dumps_json(response)
    if not chunks:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(chunks), {"Content-Type": BINARY, HEADER_LENGTH: str(len(head))}


def _output_values(series: pd.Series) -> Tuple[str, np.ndarray]:
    values = series.to_numpy()
    datatype = _BY_DTYPE.get(values.dtype.newbyteorder("<").str if values.dtype.kind in "biuf" else "")
    if datatype is not None:
        return datatype, values
    if values.dtype.kind == "M":
        return "BYTES", np.datetime_as_string(values)
    return "BYTES", values.astype(np.object_)


def _to_json_list(values: np.ndarray) -> list:
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        listed = values.tolist()
        for index in np.flatnonzero(~np.isfinite(values)):
            listed[index] = None  # JSON has no NaN or infinity: null, as /predict answers
        return listed
    if values.dtype.kind == "O":
        return [_as_text(v) for v in values]
    return values.tolist()


def _to_bytes(datatype: str, values: np.ndarray) -> bytes:
    if datatype != "BYTES":
        return values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes()
    encoded = [(_as_text(v) or "").encode("utf-8") for v in values]
    return b"".join(struct.pack("<I", len(e)) + e for e in encoded)


def _as_text(value: Any) -> Optional[str]:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float) and value != value:
        return None
    return str(value)


def model_metadata(model_name: str, spec_types: Dict[str, str], inputs: List[str], outputs: List[str],
                   seen: Optional[Tuple[pd.Series, pd.Series]]) -> Dict[str, Any]:
    """Inputs and outputs from model.yaml, else from the first prediction this worker made."""
    seen_inputs, seen_outputs = seen if seen is not None else (pd.Series(dtype=object), pd.Series(dtype=object))
    return {
        "name": model_name,
        "versions": [],
        "platform": "md-runtime",
        "inputs": _tensor_specs(inputs or [str(c) for c in seen_inputs.index], spec_types, seen_inputs),
        "outputs": _tensor_specs(outputs or [str(c) for c in seen_outputs.index], spec_types, seen_outputs),
    }


def _tensor_specs(names: List[str], declared: Dict[str, str], seen: pd.Series) -> List[Dict[str, Any]]:
    seen_by_name = {str(k): v for k, v in seen.items()}
    return [{"name": name, "datatype": _datatype_of(name, declared, seen_by_name), "shape": [-1]} for name in names]


def _datatype_of(name: str, declared: Dict[str, str], seen: Dict[str, Any]) -> str:
    if name in declared and declared[name].lower() in _DECLARED:
        return _DECLARED[declared[name].lower()]
    dtype = seen.get(name)
    if isinstance(dtype, np.dtype) and dtype.kind in "biuf":
        return _BY_DTYPE.get(dtype.newbyteorder("<").str, "BYTES")
    return "BYTES"

