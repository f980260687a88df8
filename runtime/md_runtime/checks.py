"""Checks: `md-runtime check` loads a model in-process and predicts on real rows, to catch mistakes before deploying.

It uses the same load and predict path as serving (so the same contract errors), in the environment serve
would use (cli runs it inside the requirements.txt overlay), plus checks only a dry run can make, such as
predict() modifying its input frame. The rows come from --sample, else sample.csv or sample.json in the model
directory, else a few rows generated from model.yaml's declared inputs, as the platform's validator does.
"""

import itertools
import resource
import sys
import time
from pathlib import Path
from typing import Any, List, Optional, Tuple

import pandas as pd

from . import codecs
from .errors import CheckError, PayloadError
from .loader import LoadedModel, load_model
from .spec import ModelSpec

SAMPLE_FILES = ("sample.csv", "sample.json")
GENERATED_ROWS = 3
TIMESTAMPS = ("2024-01-01 00:00:00", "2024-06-15 12:30:00", "2024-12-31 23:59:59")


def read_sample(path: Path) -> pd.DataFrame:
    kind = codecs.CSV if path.suffix.lower() == ".csv" else codecs.JSON
    try:
        body = path.read_bytes()
    except OSError as exc:
        raise CheckError("cannot read sample {}: {}".format(path, exc.strerror)) from None
    try:
        return codecs.decode(body, kind)
    except PayloadError as exc:
        raise CheckError("sample {}: {}".format(path, exc.message)) from None


def generated_rows(spec: ModelSpec, rows: int = GENERATED_ROWS) -> pd.DataFrame:
    """Rows that fit model.yaml's declared inputs: their data-type, possible-values and value range."""
    return pd.DataFrame({name: _column_values(spec.columns.get(name, {}), rows) for name in spec.inputs})


def _column_values(entry: dict, rows: int) -> List[Any]:
    kind = str(entry.get("data-type", "float")).lower()
    choices = entry.get("possible-values")
    if choices:
        return list(itertools.islice(itertools.cycle(choices), rows))
    low, high = entry.get("value-range-min"), entry.get("value-range-max")
    if kind in ("float", "int"):
        low = 0 if low is None else low
        high = low + rows - 1 if high is None else high
        values = [low + (high - low) * i / max(rows - 1, 1) for i in range(rows)]
        return [int(round(v)) for v in values] if kind == "int" else [float(v) for v in values]
    if kind == "bool":
        return [i % 2 == 0 for i in range(rows)]
    if kind == "timestamp":
        return list(itertools.islice(itertools.cycle(TIMESTAMPS), rows))
    return ["value_{}".format(i) for i in range(rows)]


def rows_to_check(model: LoadedModel, sample: Optional[Path]) -> Tuple[pd.DataFrame, str]:
    """(rows, where they came from); a CheckError saying how to give rows when there are none."""
    found = [model.model_dir / name for name in SAMPLE_FILES if (model.model_dir / name).is_file()]
    path = sample if sample is not None else next(iter(found), None)
    if path is not None:
        return read_sample(path), str(path)  # decoding refuses a sample without rows
    if model.spec.inputs:
        untyped = [name for name in model.spec.inputs if name not in model.spec.types]
        note = " (no data-type for {}: floats)".format(", ".join(untyped)) if untyped else ""
        return generated_rows(model.spec), "generated from model.yaml's inputs" + note
    raise CheckError(
        "no rows to predict on, so nothing was checked: pass --sample FILE (.csv or .json), put a sample.csv in "
        "{}, or declare the inputs with their data-types in model.yaml".format(model.model_dir)
    )


def peak_memory_mib() -> float:
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak_kib / 1024.0 if sys.platform != "darwin" else peak_kib / 1024.0 / 1024.0


def _dry_run(model: LoadedModel, frame: pd.DataFrame) -> pd.DataFrame:
    before = frame.copy(deep=True)
    output = model.predict(frame)
    if not frame.equals(before):
        raise CheckError("predict() modified its input DataFrame in place; work on a copy: input_df = input_df.copy()")
    return output


def _predict_line(model: LoadedModel, frame: pd.DataFrame, source: str) -> str:
    started = time.perf_counter()
    output = _dry_run(model, frame)
    return "predict: {} rows in ({}) -> {} rows out in {:.3f}s; output columns: {}".format(
        len(frame), source, len(output), time.perf_counter() - started, ", ".join(map(str, output.columns))
    )


def run_check(model_dir: Path, sample: Optional[Path] = None, model: Optional[LoadedModel] = None) -> List[str]:
    """Report lines when the model holds on real rows; raises an MdError naming the first mistake otherwise.
    `model`: already loaded from model_dir."""
    model = model or load_model(model_dir)
    lines = ["loaded {} in {:.2f}s (package.py sha256 {})".format(model.model_dir, model.load_seconds, model.package_hash[:12])]
    lines += ["warning: " + warning for warning in model.warnings]
    frame, source = rows_to_check(model, sample)
    lines.append(_predict_line(model, frame, source))
    lines.append("peak memory: {:.0f} MiB".format(peak_memory_mib()))
    return lines
