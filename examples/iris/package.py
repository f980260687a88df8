"""Iris classifier: a scikit-learn pipeline saved with joblib by train.py.

get_model() runs once per worker at start-up; predict() runs per request with a DataFrame of the inputs
declared in model.yaml and returns one probability column per class, in class order.
"""

from pathlib import Path

import joblib
import pandas as pd

PACKAGE_PATH = Path(__file__).parent
OUTPUT_COLUMNS = ["proba_setosa", "proba_versicolor", "proba_virginica"]


class IrisModel:
    def __init__(self) -> None:
        self.pipeline = joblib.load(PACKAGE_PATH / "model.joblib")

    def predict(self, input_df: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame(self.pipeline.predict_proba(input_df), columns=OUTPUT_COLUMNS)


def get_model() -> IrisModel:
    return IrisModel()
