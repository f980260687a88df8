"""Checks: `md-runtime check` loads a model in-process and runs it once, to catch mistakes before deploying.

It uses the same load and predict path as serving (so the same contract errors), plus checks only a
dry run can make, such as predict() modifying its input frame.
"""

import resource
import sys
import time
from pathlib import Path
from typing import List, Optional

import pandas as pd

from . import codecs
from .errors import CheckError, PayloadError, UserCodeError
from .loader import LoadedModel, load_model


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


def peak_memory_mib() -> float:
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak_kib / 1024.0 if sys.platform != "darwin" else peak_kib / 1024.0 / 1024.0


def _dry_run(model: LoadedModel, frame: pd.DataFrame) -> pd.DataFrame:
    before = frame.copy(deep=True)
    output = model.predict(frame)
    if not frame.equals(before):
        raise CheckError("predict() modified its input DataFrame in place; work on a copy: input_df = input_df.copy()")
    return output


def _predict_line(model: LoadedModel, frame: pd.DataFrame) -> str:
    started = time.perf_counter()
    output = _dry_run(model, frame)
    return "predict: {} rows in -> {} rows out in {:.3f}s; output columns: {}".format(
        len(frame), len(output), time.perf_counter() - started, ", ".join(map(str, output.columns))
    )


def _empty_frame_line(model: LoadedModel) -> str:
    """Many frameworks reject zero rows, so without a sample a failure here is a note, not an error."""
    frame = pd.DataFrame({name: pd.Series(dtype="float64") for name in model.spec.inputs})
    try:
        return _predict_line(model, frame)
    except UserCodeError as exc:
        return "predict on an empty frame of the model.yaml inputs: {}; pass --sample FILE to run it on rows".format(
            exc.message
        )


def run_check(model_dir: Path, sample: Optional[Path] = None) -> List[str]:
    """Report lines when the model holds; raises an MdError naming the first mistake otherwise."""
    model = load_model(model_dir)
    lines = ["loaded {} in {:.2f}s (package.py sha256 {})".format(model.model_dir, model.load_seconds, model.package_hash[:12])]
    if sample is not None:
        lines.append(_predict_line(model, read_sample(sample)))
    elif model.spec.inputs:
        lines.append(_empty_frame_line(model))
    else:
        lines.append("no --sample and no model.yaml inputs: predict was not run")
    lines.append("peak memory: {:.0f} MiB".format(peak_memory_mib()))
    return lines
