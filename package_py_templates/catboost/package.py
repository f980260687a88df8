"""CatBoost model in its native .cbm format. Image: md-base/python/machine-learning.

Save it with `model.save_model("model.cbm")`. Categorical columns stay strings in the request; CatBoost
handles them itself. A classifier answers one probability column per class; for a regressor set
PREDICTION_TYPE = "RawFormulaVal" and one output column.
"""
import os
from pathlib import Path

import catboost
import pandas as pd

PACKAGE_PATH = Path(__file__).parent
MODEL_FILE = PACKAGE_PATH / "model.cbm"  # CHANGE: your model's file name
INPUT_COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]  # CHANGE: the training columns, in order
OUTPUT_COLUMNS = ["proba_0", "proba_1", "proba_2"]  # CHANGE: one name per output
PREDICTION_TYPE = "Probability"  # CHANGE: "RawFormulaVal" for a regressor
THREADS = int(os.environ.get("MD_CPU_THREADS", "1"))  # this worker's share of the replica's CPUs


class Model:
    def __init__(self):
        self.model = catboost.CatBoost()
        self.model.load_model(str(MODEL_FILE))

    def predict(self, input_df: pd.DataFrame) -> pd.DataFrame:
        # selecting columns copies the frame (0.1 ms a request): skip it when they already come in this order
        ordered = input_df if list(input_df.columns) == INPUT_COLUMNS else input_df[INPUT_COLUMNS]
        scores = self.model.predict(ordered, prediction_type=PREDICTION_TYPE, thread_count=THREADS)
        return pd.DataFrame(scores.reshape(len(input_df), -1), columns=OUTPUT_COLUMNS)


def get_model():
    return Model()
