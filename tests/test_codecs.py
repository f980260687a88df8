"""codecs: request files in tests/fixtures/requests paired with the frame or the error they must give."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from md_runtime import codecs
from md_runtime.errors import ModelOutputError, PayloadError, UnsupportedMediaTypeError

CORPUS = Path(__file__).parent / "fixtures" / "requests"
VALID = sorted(p for p in (CORPUS / "valid").iterdir() if not p.name.endswith(".expected.json"))
INVALID = sorted(p for p in (CORPUS / "invalid").iterdir() if p.suffix != ".error")


@pytest.mark.parametrize("body, depth", [
    (b'[{"a": 1}]', 2),
    (b'{"a": "[[[[{{", "b": [[[1]]]}', 4),  # brackets in strings do not count
    (b'{"a": "\\"[[[[", "b": [[[1]]]}', 4),  # nor do they after an escaped quote
    (b"[" * 50 + b"]" * 50, 50),
    (b"[" + b'"[[",' * 400000 + b"[[[1]]]]", 4),  # strings and nesting carried across the scan's 1 MiB blocks
    (b"[" + b'"[[[[",' * 400000 + b'"]", [[[1]]]]', 4),
])
def test_json_depth_counts_nesting_outside_strings(body, depth):
    assert codecs.json_depth(body, limit=1) == depth
    assert codecs.json_depth(body, limit=10 ** 7) == 0, "not scanned when there are too few brackets to pass the limit"


def content_type(path: Path) -> str:
    return codecs.CSV if path.suffix == ".csv" else codecs.JSON


@pytest.mark.parametrize("request_file", VALID, ids=[p.name for p in VALID])
def test_valid_request_decodes_to_expected_frame(request_file):
    expected_doc = json.loads(request_file.with_name(request_file.stem + ".expected.json").read_text())
    expected = pd.DataFrame(expected_doc["data"], columns=expected_doc["columns"])
    frame = codecs.decode(request_file.read_bytes(), content_type(request_file))
    pd.testing.assert_frame_equal(as_objects(frame.reset_index(drop=True)), as_objects(expected))


def as_objects(frame: pd.DataFrame) -> pd.DataFrame:
    """Compare values, not dtypes: missing values of any kind become None."""
    return frame.astype(object).where(frame.notna(), None)


@pytest.mark.parametrize("request_file", INVALID, ids=[p.name for p in INVALID])
def test_invalid_request_names_the_problem(request_file):
    with pytest.raises(PayloadError) as caught:
        codecs.decode(request_file.read_bytes(), content_type(request_file))
    assert caught.value.status_code == 400
    assert request_file.with_suffix(".error").read_text().strip() in caught.value.message


@pytest.mark.parametrize(
    "header,expected",
    [("application/json", codecs.JSON), ("application/json; charset=utf-8", codecs.JSON), ("", codecs.JSON),
     ("application/vnd.api+json", codecs.JSON), ("text/csv", codecs.CSV), ("TEXT/CSV; charset=utf-8", codecs.CSV)],
)
def test_media_type_accepts_json_and_csv_spellings(header, expected):
    assert codecs.media_type(header) == expected


def test_unsupported_media_type_lists_what_is_supported():
    with pytest.raises(UnsupportedMediaTypeError) as caught:
        codecs.decode(b"a=1", "application/x-www-form-urlencoded")
    assert caught.value.status_code == 415
    assert "application/json, text/csv" in caught.value.message


def test_encode_records_maps_nan_numpy_scalars_and_datetimes():
    frame = pd.DataFrame(
        {
            "f": np.array([0.5, np.nan], dtype="float32"),
            "i": np.array([1, 2], dtype="int64"),
            "s": ["a", None],
            "t": pd.to_datetime(["2024-01-02T03:04:05", "2024-12-31T00:00:00"]),
            "b": [True, False],
        }
    )
    body, kind = codecs.encode(frame)
    assert kind == codecs.JSON
    rows = json.loads(body)
    assert rows[0] == {"f": 0.5, "i": 1, "s": "a", "t": rows[0]["t"], "b": True}
    assert rows[1]["f"] is None and rows[1]["s"] is None
    assert rows[0]["t"].startswith("2024-01-02T03:04:05")


def test_explanations_map_nan_and_infinity_to_null_wherever_they_are():
    result = {"plain": [1.5, float("nan")], "array": np.array([[np.inf, 2.0]]), "scalar": np.float32("nan"),
              "series": pd.Series([np.nan, 3]), "nested": ({"deep": -np.inf},), "label": "ok", "count": np.int64(2)}
    assert json.loads(codecs.encode_result(result, "explain_custom()")) == {
        "plain": [1.5, None], "array": [[None, 2.0]], "scalar": None, "series": [None, 3.0],
        "nested": [{"deep": None}], "label": "ok", "count": 2,
    }
    with pytest.raises(ModelOutputError, match="cannot be encoded as JSON"):
        codecs.encode_result({"model": object()}, "explain_custom()")


def test_encode_keeps_float_precision_to_1e_15():
    values = np.array([6.203777137248186e-08, 1 / 3, 0.1, 123.456789012345])
    body, _ = codecs.encode(pd.DataFrame({"p": values}))
    decoded = np.array([row["p"] for row in json.loads(body)])
    np.testing.assert_allclose(decoded, values, rtol=0, atol=1e-15)


def test_encode_csv_round_trips():
    frame = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    body, kind = codecs.encode(frame, codecs.CSV)
    assert kind == codecs.CSV
    assert body.decode() == "a,b\n1,x\n2,y\n"


def test_encode_refuses_duplicate_columns_with_a_model_error():
    frame = pd.DataFrame([[1, 2]], columns=["p", "p"])
    with pytest.raises(ModelOutputError) as caught:
        codecs.encode(frame)
    assert "cannot be encoded" in caught.value.message


def test_split_numbers_take_the_fast_path_and_mixed_rows_keep_their_types():
    numeric = codecs.decode(b'{"columns": ["a", "b"], "data": [[1, 2.5], [3, 4]]}', "application/json")
    assert numeric["a"].tolist() == [1.0, 3.0] and numeric["b"].tolist() == [2.5, 4.0]
    mixed = codecs.decode(b'{"columns": ["a", "b"], "data": [[1, "x"], [true, "y"]]}', "application/json")
    assert mixed["b"].tolist() == ["x", "y"] and mixed["a"].tolist() == [1, True]
    with pytest.raises(PayloadError, match="row 1 of `data` is not a list of 2 values"):
        codecs.decode(b'{"columns": ["a", "b"], "data": [[1, 2], [3]]}', "application/json")


@pytest.mark.parametrize("body", [b"a,\rb\n1,2\n", b"a,\"b\n1,2\n"], ids=["bare carriage return", "open quote"])
def test_a_header_line_the_csv_module_cannot_read_is_a_400_not_a_500(body):
    """Found by the fuzz: the check for repeated names read the header with the csv module, which raised."""
    try:
        frame = codecs.decode(body, "text/csv")
    except PayloadError:
        return
    assert len(frame) >= 1


VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=False), st.integers(-2 ** 70, 2 ** 70), st.booleans(),
                   st.none(), st.text(max_size=3))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from("abc"), VALUES, min_size=1), min_size=1, max_size=5))
def test_records_read_quickly_give_the_frame_pandas_reads(records):
    pd.testing.assert_frame_equal(codecs.frame_from_json(records), pd.DataFrame(records))


NUMERIC_SPLITS = [  # (body, read by numeric_split: else it leaves the body to the general path)
    (b'{"columns": ["a", "b"], "data": [[1, 2], [3, 4]]}', True),  # integers stay integers
    (b'{"columns": ["a", "b"], "data": [[1, 2.5], [3, 4]]}', True),
    (b' \n{"columns":["a","b"],"data":[[-0.0,5e-324],[9.2e18,-4]],"index":[0,1]}', True),
    (b'{"dataframe_split": {"columns": ["a"], "data": [[1.5], [2]]}}', True),
    (b'{"columns": ["a", "b"], "data": [[9223372036854775807, -9223372036854775808]]}', True),
    (b'{"columns": ["a", "b"], "data": [[9223372036854775808, 1]]}', False),  # numpy reads it as uint64
    (b'{"columns": ["a", "b"], "data": [[1.7976931348623157e308, 1.5]]}', False),  # as big: left alone too
    (b'{"columns": ["a", "b"], "data": [[[1], 2], [3, 4]]}', False),  # a list in a cell: as many numbers
    (b'{"columns": ["\\u005b", "b"], "data": [[[1], 2], [3, 4]]}', False),  # and a bracket to hide it
    (b'{"columns": ["a", "b"], "data": [[1, 2, 3], [4]]}', False),  # ragged, as many numbers
    (b'{"columns": ["a", "b"], "data": [[1, 2], 3]}', False),
    (b'{"columns": ["a", "b"], "data": [[1, null], [3, 4]]}', False),
    (b'{"columns": ["a", "b"], "data": [[1, true], [3, 4]]}', False),
    (b'{"columns": ["a", "b"], "data": [[1, "x"], [3, 4]]}', False),
    (b'{"columns": ["a[", "b"], "data": [[1, 2], [3, 4]]}', False),
    (b'{"columns": [1, 2], "data": [[1, 2]]}', False),
    (b'{"columns": ["a", "b"], "data": [[1, 2]], "index": [[0]]}', False),
    (b'{"columns": ["a", "b"], "data": [[1, 2]], "data": [[3, 4]]}', False),  # parsers keep the last
    (b'{"columns": ["a", "b"], "data": [[1, 2]], "columns": "ab"}', False),  # simdjson the first
    (b'{"columns": ["a", "b"], "data": [[1, 2]], "note": "x"}', False),
    (b'{"columns": ["a", "b"], "data": [[1e400, 2]]}', False),
    (b'{"columns": ["a", "b"], "data": [[-9223372036854775809, 2]]}', False),  # found by the fuzz
    (b'{"columns": ["a", "b"], "data": [[1, 2]], "index": [18446744073709551616]}', False),
    (b'{"columns": ["a", "b"], "data": [[NaN, 2]]}', False),
    (b'{"columns": ["a", "b"], "data": []}', False),
    (b'[{"a": 1, "b": 2}]', False),
]


@pytest.mark.parametrize("body, read", NUMERIC_SPLITS)
def test_a_split_of_numbers_read_by_simdjson_is_the_frame_the_general_path_reads(body, read):
    frame = codecs.numeric_split(body)
    assert (frame is not None) == read
    if frame is not None:
        general = codecs.frame_from_json(codecs.loads_json(body))
        pd.testing.assert_frame_equal(frame, general, check_exact=True)


NUMBERS = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-2 ** 65, 2 ** 65))


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 4).flatmap(lambda width: st.lists(st.lists(NUMBERS, min_size=width, max_size=width),
                                                         min_size=1, max_size=6)),
       st.sampled_from([(",", ":"), (", ", ": ")]))
def test_any_matrix_of_numbers_reads_as_the_general_path_reads_it(rows, separators):
    body = json.dumps({"columns": ["c{}".format(i) for i in range(len(rows[0]))], "data": rows},
                      separators=separators).encode()
    frame = codecs.numeric_split(body)
    values = [value for row in rows for value in row]
    if all(isinstance(value, int) for value in values):  # read as int64, if they fit
        left_alone = any(not -2 ** 63 <= value < 2 ** 63 for value in values)
    else:  # read as float64: from 2**63 on, the general path (numpy makes uint64 of such integers)
        left_alone = any(abs(float(value)) >= 2 ** 63 for value in values)
    assert (frame is None) == left_alone
    if frame is not None:
        pd.testing.assert_frame_equal(frame, codecs.frame_from_json(codecs.loads_json(body)), check_exact=True)


def test_decode_reads_a_split_of_numbers_without_the_general_path(monkeypatch):
    monkeypatch.setattr(codecs, "frame_from_json", None)  # the general path would fail on calling it
    body = json.dumps({"columns": ["a", "b"], "data": [[0.5, 1]] * 1000}).encode()
    assert codecs.decode(body, codecs.JSON)["b"].sum() == 1000


RETAINED = r'''
import ctypes, json, sys
from md_runtime import codecs

def resident_mib():
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what malloc only keeps for reuse goes back first
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2 ** 20

body = json.dumps({"columns": ["a", "b"], "data": [[0.5, 1.5]] * 500000}).encode()
before = resident_mib()
frame = codecs.numeric_split(body)
assert frame is not None and len(frame) == 500000
del frame
print(json.dumps({"body_mib": len(body) / 2 ** 20, "kept_mib": resident_mib() - before}))
'''


def test_a_big_body_does_not_leave_the_parsers_buffers_behind():
    """The shared parser keeps buffers several times the largest body it read; bodies past
    SHARED_PARSER_BYTES get one of their own, freed with the request."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", RETAINED], capture_output=True, text=True, check=True)
    measured = json.loads(done.stdout)
    assert measured["body_mib"] * 1024 * 1024 > codecs.SHARED_PARSER_BYTES
    assert measured["kept_mib"] < measured["body_mib"], measured


LAZY = r'''
import json, sys
from md_runtime import app, codecs
assert "simdjson" not in sys.modules, "imported at start"
codecs.decode(json.dumps({"columns": ["a"], "data": [[0.5]]}).encode(), codecs.JSON)
assert "simdjson" not in sys.modules, "imported for a small body"
codecs.decode(json.dumps({"columns": ["a"], "data": [[0.5]] * 1000}).encode(), codecs.JSON)
assert "simdjson" in sys.modules, "not used for a big one"
'''


def test_simdjson_is_imported_by_the_first_body_big_enough_to_use_it():
    """Its library adds over a MiB to every process that imports it: a master that preloads, and each worker.
    At the smallest replica (150 MiB) that was the headroom a worker's first requests needed."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", LAZY], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
