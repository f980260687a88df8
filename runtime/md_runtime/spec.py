"""Spec: what model.yaml declares, part of the loader stage.

The platform's own document (`yaml.dump({'model': ModelInfo.to_dict()})`: every key it writes is accepted;
inputs, outputs, custom-explanation-names, model-task, targets and target-class-order are used) or plain
lists (`inputs: [a, b]`, `outputs`, `explanations`), plus md-runtime's `batching:`. Reading it needs PyYAML.
"""

from pathlib import Path
from typing import Any, Dict, List, Optional

from .errors import ModelSpecError


class ModelSpec:
    """What model.yaml declares; empty lists mean "not declared"."""

    def __init__(self, inputs: Optional[List[str]] = None, outputs: Optional[List[str]] = None,
                 batching: Optional[Dict[str, float]] = None, types: Optional[Dict[str, str]] = None,
                 explanations: Optional[List[str]] = None, columns: Optional[Dict[str, dict]] = None,
                 task: Optional[str] = None, targets: Optional[List[str]] = None,
                 target_class_order: Optional[List[Any]] = None) -> None:
        self.inputs = list(inputs or [])
        self.outputs = list(outputs or [])
        self.batching = batching  # {"max_batch_size": rows, "max_delay_ms": ms} when model.yaml opts in
        self.types = dict(types or {})  # column -> the platform's data-type (float, int, bool, str, category)
        self.explanations = list(explanations or [])
        self.columns = dict(columns or {})  # input column -> its platform entry (possible-values, value-range-*)
        self.task = task
        self.targets = list(targets or [])
        self.target_class_order = target_class_order

    @classmethod
    def read(cls, model_dir: Path) -> "ModelSpec":
        path = model_dir / "model.yaml"
        if not path.is_file():
            return cls()
        doc = _read_yaml(path)
        body = doc["model"] if isinstance(doc.get("model"), dict) else doc
        types = dict(_column_types(body, "inputs"), **_column_types(body, "outputs"))
        return cls(
            _column_names(path, body, "inputs"), _column_names(path, body, "outputs"), _batching(path, doc), types,
            _explanations(path, doc, body), _column_entries(body, "inputs"), _optional_str(body.get("model-task")),
            _column_names(path, body, "targets"), body.get("target-class-order"),
        )

    def platform_info(self) -> Dict[str, Any]:
        """The task, targets and class order, for /info and the v2 metadata (only what model.yaml gives)."""
        info = {"task": self.task, "targets": self.targets or None, "target_class_order": self.target_class_order}
        return {key: value for key, value in info.items() if value is not None}


def _read_yaml(path: Path) -> dict:
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
    return doc


def _optional_str(value: Any) -> Optional[str]:
    return None if value is None else str(value)


def _explanations(path: Path, doc: dict, body: dict) -> List[str]:
    """`explanations:` (ours), or the platform's `custom-explanation-names:` inside `model:`."""
    names = doc.get("explanations") or body.get("custom-explanation-names") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ModelSpecError(path, "`explanations` must be a list of explanation names")
    return names


def _column_entries(body: dict, key: str) -> Dict[str, dict]:
    items = body.get(key)
    if not isinstance(items, list):
        return {}
    return {str(item.get("column-name", item.get("name"))): item for item in items if isinstance(item, dict)}


def _column_types(body: dict, key: str) -> Dict[str, str]:
    return {name: str(item["data-type"]) for name, item in _column_entries(body, key).items() if "data-type" in item}

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
