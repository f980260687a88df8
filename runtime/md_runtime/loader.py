"""Loader: import a model directory's package.py, check its contract, and run its predict safely.

The contract, as the platform has it: package.py defines get_model(); the object it returns has
predict(DataFrame) -> DataFrame with one output row per input row, and that is all the server calls to
predict. transform_input() is the model's own helper (its predict calls it; explainers may too), never called
here before predict. Optionally explain_custom(name, DataFrame) serves custom explanations, and the
integrated-gradients hooks serve `ig`. model.yaml (the platform's `model:` document, or plain lists) may
declare `inputs` and `outputs` (enforced), their data types, value ranges, the task, targets and class order,
and the names of the custom explanations.
"""

import contextlib
import hashlib
import importlib.util
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

import pandas as pd

from . import integrated_gradients, versions
from .boot import check_model_dir
from .errors import (
    ColumnMismatchError,
    ContractError,
    NotFoundError,
    ModelOutputError,
    UserLoadError,
    VersionMismatchError,
)
from .spec import ModelSpec
from .user_code import user_code

log = logging.getLogger("md_runtime.loader")

PACKAGE_MODULE = "package"
MODEL_PACKAGE = "md_model"  # package.py's parent package when the model directory has an __init__.py
IG_NAMES = ("ig", "ig_flex")  # the platform's names for integrated gradients
IG_HOOKS = ("transform_to_attributable_input", "get_ig_baseline", "compute_gradients", "project_attributions")


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
        self.warnings: List[str] = []  # what loading warned about, such as models pickled by other library versions

    def select_inputs(self, frame: pd.DataFrame) -> Tuple[pd.DataFrame, List[str]]:
        """model.yaml's inputs in the declared order, and the names of the other columns, which are dropped.

        Requests often carry more than the model takes (a target, an id): the platform hands predict the
        declared inputs only. A declared input that is missing is the client's mistake (422)."""
        declared = self.spec.inputs
        if not declared:
            return frame, []
        columns = [str(c) for c in frame.columns]
        if columns == declared:
            return frame, []
        missing = set(declared) - set(columns)
        if missing:
            raise ColumnMismatchError(missing, ())
        dropped = [c for c in columns if c not in set(declared)]
        if dropped:
            log.debug("dropped columns model.yaml does not declare as inputs: %s", ", ".join(dropped))
        return frame[declared], dropped

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        return self.predict_selected(self.select_inputs(frame)[0])

    def predict_selected(self, frame: pd.DataFrame) -> pd.DataFrame:
        """predict() on a frame select_inputs() already made (the request path selects once, then batches)."""
        with user_code("predict()", model_dir=self.model_dir):
            output = self.model.predict(frame)
        self.check_output(output, len(frame))
        if self.seen_dtypes is None:
            self.seen_dtypes = (frame.dtypes, output.dtypes)
        return output

    def has_integrated_gradients(self) -> bool:
        return all(callable(getattr(self.model, hook, None)) for hook in IG_HOOKS)

    def explanation_names(self) -> Optional[List[str]]:
        """The explanations this model answers (custom names, then integrated gradients); None without any.
        An empty list: explain_custom takes any name, none declared."""
        built_in = list(IG_NAMES) if self.has_integrated_gradients() else []
        if not callable(getattr(self.model, "explain_custom", None)):
            return built_in or None
        declared = getattr(self.model, "custom_explanation_names", None) or self.spec.explanations
        return [str(name) for name in declared] + built_in if declared else []

    def explain(self, name: str, frame: pd.DataFrame) -> Any:
        names = self.explanation_names()
        if names is None:
            raise NotFoundError(
                "this model has no explanations; define explain_custom(explanation_name, input_df) or the "
                "integrated-gradients hooks ({}) on the object get_model() returns".format(", ".join(IG_HOOKS))
            )
        if names and name not in names:
            raise NotFoundError("no explanation named {!r}; available: {}".format(name, ", ".join(names)))
        frame = self.select_inputs(frame)[0]
        if name in IG_NAMES and self.has_integrated_gradients():
            return integrated_gradients.explain(self, frame)
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
    with _scoped_import_context(model_dir, package_py):
        with user_code("importing package.py", UserLoadError, model_dir):
            if (model_dir / "__init__.py").is_file():
                return _import_as_submodule(model_dir)
            return _exec_module(PACKAGE_MODULE, package_py)


def _exec_module(name: str, path: Path, search: Optional[List[str]] = None) -> Any:
    spec = importlib.util.spec_from_file_location(name, str(path), submodule_search_locations=search)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _import_as_submodule(model_dir: Path) -> Any:
    """A model directory with __init__.py is a package, so package.py's relative imports (`from .features
    import ...`) work. It is also registered as `package`, the name pickles made beside it refer to."""
    _exec_module(MODEL_PACKAGE, model_dir / "__init__.py", [str(model_dir)])
    name = MODEL_PACKAGE + "." + PACKAGE_MODULE
    module = sys.modules.get(name) or _exec_module(name, model_dir / "package.py")
    sys.modules[PACKAGE_MODULE] = module
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


_preloaded: List[LoadedModel] = []  # the master's model (MD_PRELOAD), which the workers it forks inherit


def keep_preloaded(model: LoadedModel) -> None:
    _preloaded[:] = [model]


def preloaded(model_dir: Path) -> Optional[LoadedModel]:
    """The model the master loaded before forking this worker, if it loaded this directory's."""
    model = next(iter(_preloaded), None)
    return model if model is not None and model.model_dir == Path(model_dir).resolve() else None


def load_model(model_dir: Path) -> LoadedModel:
    """Import package.py, call get_model() and check the contract, before anything is served."""
    model_dir = Path(model_dir).resolve()
    check_model_dir(model_dir)
    started = time.perf_counter()
    spec = ModelSpec.read(model_dir)
    with _version_diagnosis() as caught:
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
    loaded.warnings = _version_warnings(caught)
    log.info("loaded model from %s in %.2fs", model_dir, loaded.load_seconds)
    return loaded


@contextlib.contextmanager
def _version_diagnosis() -> Iterator[List[warnings.WarningMessage]]:
    """Loading errors and warnings that come from other library versions become one message with the fix.
    The other warnings are shown as they would have been."""
    caught: List[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:  # type: ignore[assignment]
            warnings.simplefilter("always", UserWarning)  # the libraries' version warnings are UserWarnings
            try:
                yield caught
            except UserLoadError as exc:
                mismatches = versions.diagnose(versions.exception_texts(exc.__cause__) + versions.warning_texts(caught))
                if mismatches:
                    raise VersionMismatchError(exc.stage, versions.advice(mismatches)) from exc
                raise
    finally:  # a failed load's warnings may say why, so they are shown then too
        for item in caught:
            if not versions.diagnose(versions.warning_texts([item])):
                warnings.showwarning(item.message, item.category, item.filename, item.lineno)


def _version_warnings(caught: List[warnings.WarningMessage]) -> List[str]:
    mismatches = versions.diagnose(versions.warning_texts(caught))
    if not mismatches:
        return []
    message = "loading warned: " + versions.advice(mismatches)
    log.warning("%s", message)
    return [message]
