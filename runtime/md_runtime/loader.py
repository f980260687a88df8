"""Loader: import a model directory's package.py, check its contract, and run its predict safely.

The contract: package.py defines get_model(); the object it returns has predict(DataFrame) -> DataFrame
with one output row per input row, and optionally transform_input(DataFrame) applied first, and
explain_custom(name, DataFrame) for custom explanations. model.yaml may declare `inputs` and `outputs`
column names (enforced), their data types, and the names of the custom `explanations`.
"""

import contextlib
import hashlib
import importlib.util
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Type

import pandas as pd

from .errors import (
    ColumnMismatchError,
    ContractError,
    ModelDirError,
    NotFoundError,
    ModelOutputError,
    ModelSpecError,
    UserCodeError,
    UserLoadError,
)

log = logging.getLogger("md_runtime.loader")

PACKAGE_MODULE = "package"


@contextlib.contextmanager
def user_code(stage: str, error: Type[UserCodeError] = UserCodeError, model_dir: Optional[Path] = None) -> Iterator[None]:
    """Run package.py code: log its traceback (trimmed to package.py frames) and raise a typed error."""
    try:
        yield
    except Exception as exc:
        log.error("%s raised:\n%s", stage, _trimmed_traceback(exc, model_dir))
        raise error(stage, exc) from exc


def _trimmed_traceback(exc: BaseException, model_dir: Optional[Path]) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if model_dir is not None:
        inside = str(model_dir.resolve())
        mine = [f for f in frames if f.filename.startswith(inside)]
        frames = traceback.StackSummary.from_list(mine or frames[-1:])
    return "".join(traceback.format_list(frames) + traceback.format_exception_only(type(exc), exc)).rstrip()


class ModelSpec:
    """Column names declared in model.yaml; empty lists mean "not declared"."""

    def __init__(self, inputs: Optional[List[str]] = None, outputs: Optional[List[str]] = None,
                 batching: Optional[Dict[str, float]] = None, types: Optional[Dict[str, str]] = None,
                 explanations: Optional[List[str]] = None) -> None:
        self.inputs = list(inputs or [])
        self.outputs = list(outputs or [])
        self.batching = batching  # {"max_batch_size": rows, "max_delay_ms": ms} when model.yaml opts in
        self.types = dict(types or {})  # column -> the platform's data-type (float, int, bool, str, category)
        self.explanations = list(explanations or [])

    @classmethod
    def read(cls, model_dir: Path) -> "ModelSpec":
        path = model_dir / "model.yaml"
        if not path.is_file():
            return cls()
        try:
            import yaml
        except ImportError:
            raise ModelSpecError(path, "PyYAML is needed to read it; add pyyaml to requirements.txt") from None
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ModelSpecError(path, "not valid YAML ({})".format(exc)) from None
        if not isinstance(doc, dict):
            raise ModelSpecError(path, "expected a mapping with `inputs` and `outputs`")
        body = doc.get("model", doc) if isinstance(doc.get("model"), dict) else doc
        types = dict(_column_types(body, "inputs"), **_column_types(body, "outputs"))
        return cls(_column_names(path, body, "inputs"), _column_names(path, body, "outputs"), _batching(path, doc),
                   types, _explanations(path, doc))


def _explanations(path: Path, doc: dict) -> List[str]:
    names = doc.get("explanations") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ModelSpecError(path, "`explanations` must be a list of explanation names")
    return names


def _column_types(body: dict, key: str) -> Dict[str, str]:
    items = body.get(key)
    if not isinstance(items, list):
        return {}
    return {
        str(item.get("column-name", item.get("name"))): str(item["data-type"])
        for item in items
        if isinstance(item, dict) and "data-type" in item
    }


def _batching(path: Path, doc: dict) -> Optional[Dict[str, float]]:
    """`batching: true`, or `batching: {max_batch_size: 64, max_delay_ms: 2}`; absent or false means off."""
    value = doc.get("batching")
    if value in (None, False):
        return None
    if value is True:
        return {}
    if not isinstance(value, dict) or set(value) - {"max_batch_size", "max_delay_ms"}:
        raise ModelSpecError(path, "`batching` must be true or a mapping with max_batch_size and max_delay_ms")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value.values()):
        raise ModelSpecError(path, "`batching` values must be positive numbers")
    return dict(value)


def _column_names(path: Path, body: dict, key: str) -> List[str]:
    """Accepts `[a, b]` or the platform's `[{column-name: a, data-type: float}, ...]`."""
    items = body.get(key) or []
    if not isinstance(items, list):
        raise ModelSpecError(path, "`{}` must be a list of column names".format(key))
    names = []
    for item in items:
        name = item.get("column-name", item.get("name")) if isinstance(item, dict) else item
        if not isinstance(name, (str, int)):
            raise ModelSpecError(path, "`{}` entry {!r} has no column name".format(key, item))
        names.append(str(name))
    return names


class LoadedModel:
    """A model object from get_model(), with its spec, and the one predict path every protocol uses."""

    def __init__(self, model_dir: Path, model: Any, spec: ModelSpec, package_hash: str, load_seconds: float) -> None:
        self.model_dir = model_dir
        self.model = model
        self.spec = spec
        self.package_hash = package_hash
        self.load_seconds = load_seconds
        self.output_columns: Optional[List[str]] = list(spec.outputs) or None
        self.seen_dtypes: Optional[Tuple[pd.Series, pd.Series]] = None  # (input, output) dtypes of the first predict
        self._transform: Optional[Callable[[pd.DataFrame], pd.DataFrame]] = getattr(model, "transform_input", None)

    def check_inputs(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Enforce model.yaml inputs, and hand them to the model in the declared order."""
        if not self.spec.inputs:
            return frame
        declared = self.spec.inputs
        columns = [str(c) for c in frame.columns]
        if columns == declared:
            return frame
        missing, unexpected = set(declared) - set(columns), set(columns) - set(declared)
        if missing or unexpected:
            raise ColumnMismatchError(missing, unexpected)
        return frame[declared]

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        frame = self.check_inputs(frame)
        if self._transform is not None:
            with user_code("transform_input()", model_dir=self.model_dir):
                frame = self._transform(frame)
        with user_code("predict()", model_dir=self.model_dir):
            output = self.model.predict(frame)
        self.check_output(output, len(frame))
        if self.seen_dtypes is None:
            self.seen_dtypes = (frame.dtypes, output.dtypes)
        return output

    def explanation_names(self) -> Optional[List[str]]:
        """Declared custom explanations (model.yaml or the model's custom_explanation_names); None without any."""
        if not callable(getattr(self.model, "explain_custom", None)):
            return None
        declared = getattr(self.model, "custom_explanation_names", None) or self.spec.explanations
        return [str(name) for name in declared]

    def explain(self, name: str, frame: pd.DataFrame) -> Any:
        names = self.explanation_names()
        if names is None:
            raise NotFoundError(
                "this model has no custom explanations; define explain_custom(explanation_name, input_df) on the "
                "object get_model() returns"
            )
        if names and name not in names:
            raise NotFoundError("no explanation named {!r}; available: {}".format(name, ", ".join(names)))
        frame = self.check_inputs(frame)
        with user_code("explain_custom()", model_dir=self.model_dir):
            return self.model.explain_custom(name, frame)

    def check_output(self, output: Any, rows: int) -> None:
        if not isinstance(output, pd.DataFrame):
            raise ModelOutputError(
                "returned {} instead of a pandas DataFrame; wrap it: pd.DataFrame(..., columns=[...])".format(
                    type(output).__name__
                )
            )
        if len(output) != rows:
            raise ModelOutputError("returned {} rows for {} input rows; return one row per input row".format(len(output), rows))
        columns = [str(c) for c in output.columns]
        if self.spec.outputs and set(columns) != set(self.spec.outputs):
            raise ModelOutputError(
                "returned columns {} but model.yaml declares outputs {}".format(columns, self.spec.outputs)
            )
        if self.output_columns != columns:
            self.output_columns = columns


def _import_package(model_dir: Path) -> Any:
    package_py = model_dir / "package.py"
    spec = importlib.util.spec_from_file_location(PACKAGE_MODULE, str(package_py))
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[PACKAGE_MODULE] = module
    with _scoped_import_context(model_dir, package_py):
        with user_code("importing package.py", UserLoadError, model_dir):
            spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@contextlib.contextmanager
def _scoped_import_context(model_dir: Path, package_py: Path) -> Iterator[None]:
    """package.py may import its sibling modules, and must not see gunicorn's command line."""
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(package_py)]
    sys.path.insert(0, str(model_dir))
    try:
        yield
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path


def check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise ModelDirError(model_dir, "no such directory; mount the model at /app/model or pass MODEL_DIR")
    if not (model_dir / "package.py").is_file():
        raise ModelDirError(model_dir, "no package.py found; the model directory needs a package.py defining get_model()")


def load_model(model_dir: Path) -> LoadedModel:
    """Import package.py, call get_model() and check the contract, before anything is served."""
    model_dir = Path(model_dir).resolve()
    check_model_dir(model_dir)
    started = time.perf_counter()
    spec = ModelSpec.read(model_dir)
    module = _import_package(model_dir)
    get_model = getattr(module, "get_model", None)
    if not callable(get_model):
        raise ContractError("no get_model() function", "define `def get_model():` returning an object with predict(df)")
    with _scoped_import_context(model_dir, model_dir / "package.py"):
        with user_code("get_model()", UserLoadError, model_dir):
            model = get_model()
    if not callable(getattr(model, "predict", None)):
        raise ContractError(
            "get_model() returned a {} with no predict() method".format(type(model).__name__),
            "return an object with `def predict(self, input_df): -> pandas.DataFrame`",
        )
    package_hash = hashlib.sha256((model_dir / "package.py").read_bytes()).hexdigest()
    loaded = LoadedModel(model_dir, model, spec, package_hash, time.perf_counter() - started)
    log.info("loaded model from %s in %.2fs", model_dir, loaded.load_seconds)
    return loaded
