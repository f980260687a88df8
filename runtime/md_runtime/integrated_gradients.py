"""Integrated gradients: the platform's `ig` explanation, from the model's own hooks. Part of the core.

The model object provides transform_to_attributable_input(df) -> {layer: array}, get_ig_baseline(df) -> df,
compute_gradients({layer: array}) -> [{layer: gradients}, ...] (one entry per output) and
project_attributions(df, attributions), and optionally get_settings() with ig_start_steps, ig_max_steps and
ig_min_error_pct. Attributions integrate the gradients along the straight path from the baseline to the
input (midpoint rule); the step count doubles until the completeness error (how far the attributions' sum is
from predict(input) - predict(baseline), in percent) is under ig_min_error_pct, or ig_max_steps is reached.
"""

from typing import TYPE_CHECKING, Any, Dict, List, NamedTuple

import numpy as np
import pandas as pd

from .errors import ModelOutputError
from .user_code import user_code

if TYPE_CHECKING:
    from .loader import LoadedModel

DEFAULTS = {"ig_start_steps": 32, "ig_max_steps": 4096, "ig_min_error_pct": 5.0}

Layers = Dict[str, np.ndarray]


class Integral(NamedTuple):
    attributions: List[Layers]  # one {layer: attribution} per output
    steps: int
    error_pct: float


def settings_of(model: Any) -> Dict[str, float]:
    given = model.get_settings() if callable(getattr(model, "get_settings", None)) else {}
    return {key: float((given or {}).get(key, default)) for key, default in DEFAULTS.items()}


def explain(loaded: "LoadedModel", frame: pd.DataFrame) -> Dict[str, Any]:
    model = loaded.model
    with user_code("integrated gradients", model_dir=loaded.model_dir):
        settings = settings_of(model)
        baseline = model.get_ig_baseline(frame)
        start, end = _layers(model.transform_to_attributable_input(baseline)), _layers(model.transform_to_attributable_input(frame))
    if set(start) != set(end):
        raise ModelOutputError("gave layers {} for the baseline but {} for the input".format(sorted(start), sorted(end)),
                               "transform_to_attributable_input()")
    deltas = _output_deltas(loaded, frame, baseline)
    integral = integrate(lambda point: _gradients(loaded, point), start, end, deltas, settings)
    with user_code("project_attributions()", model_dir=loaded.model_dir):
        projected = model.project_attributions(frame, integral.attributions)
    return {
        "explanation": projected,
        "completeness_error_pct": integral.error_pct,
        "steps": integral.steps,
        "converged": integral.error_pct <= settings["ig_min_error_pct"],
    }


def integrate(gradients: Any, start: Layers, end: Layers, deltas: np.ndarray, settings: Dict[str, float]) -> Integral:
    """Double the steps from ig_start_steps until the completeness error is small enough or ig_max_steps."""
    steps = max(1, int(settings["ig_start_steps"]))
    while True:
        attributions = _riemann(gradients, start, end, steps)
        error = completeness_error_pct(attributions, deltas)
        if error <= settings["ig_min_error_pct"] or steps * 2 > settings["ig_max_steps"]:
            return Integral(attributions, steps, error)
        steps *= 2


def _riemann(gradients: Any, start: Layers, end: Layers, steps: int) -> List[Layers]:
    totals: List[Layers] = []
    for k in range(steps):
        alpha = (k + 0.5) / steps
        point = {name: start[name] + alpha * (end[name] - start[name]) for name in end}
        for index, by_layer in enumerate(gradients(point)):
            if index == len(totals):
                totals.append({name: np.zeros(np.broadcast(end[name], start[name]).shape) for name in end})
            for name in end:
                totals[index][name] = totals[index][name] + np.asarray(by_layer[name], dtype=float)
    return [{name: (end[name] - start[name]) * total[name] / steps for name in end} for total in totals]


def completeness_error_pct(attributions: List[Layers], deltas: np.ndarray) -> float:
    """The largest gap, over rows and outputs, between the attributions' sum and the change in the output,
    in percent of that change."""
    worst = 0.0
    for index, by_layer in enumerate(attributions):
        sums = sum(_row_sums(values) for values in by_layer.values())
        delta = deltas[:, index]
        gap = np.abs(sums - delta)
        scale = np.maximum(np.abs(delta), 1e-12)
        worst = max(worst, float(np.max(gap / scale)) * 100.0)
    return worst


def _row_sums(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    return values.reshape(len(values), -1).sum(axis=1) if values.ndim > 1 else values


def _layers(value: Any) -> Layers:
    if not isinstance(value, dict):
        raise ModelOutputError("returned {} instead of a dict of layer name -> values".format(type(value).__name__),
                               "transform_to_attributable_input()")
    return {str(name): np.asarray(array, dtype=float) for name, array in value.items()}


def _gradients(loaded: "LoadedModel", point: Layers) -> List[Layers]:
    with user_code("compute_gradients()", model_dir=loaded.model_dir):
        result = loaded.model.compute_gradients(point)
    if isinstance(result, dict):
        result = [result]
    if not isinstance(result, list) or not all(isinstance(item, dict) for item in result):
        raise ModelOutputError("returned {} instead of a list of dicts, one per output".format(type(result).__name__),
                               "compute_gradients()")
    return result


def _output_deltas(loaded: "LoadedModel", frame: pd.DataFrame, baseline: pd.DataFrame) -> np.ndarray:
    """predict(input) - predict(baseline), rows x outputs; a one-row baseline applies to every row."""
    start, end = _numeric(loaded.predict(baseline)), _numeric(loaded.predict(frame))
    return end - start


def _numeric(output: pd.DataFrame) -> np.ndarray:
    try:
        return output.to_numpy(dtype=float)
    except (TypeError, ValueError):
        raise ModelOutputError("returned non-numeric outputs; integrated gradients needs numbers") from None

