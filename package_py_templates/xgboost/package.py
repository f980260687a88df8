"""XGBoost model in its native JSON format. Image: md-base/python/machine-learning.

Save it with `model.save_model("model.json")` (sklearn API) or `booster.save_model("model.json")`.
A multi-class model answers one probability column per class; binary and regression models one column.
"""
import os
from pathlib import Path

import pandas as pd
import xgboost

PACKAGE_PATH = Path(__file__).parent
MODEL_FILE = PACKAGE_PATH / "model.json"  # CHANGE: your model's file name
INPUT_COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]  # CHANGE: the training columns, in order
OUTPUT_COLUMNS = ["proba_0", "proba_1", "proba_2"]  # CHANGE: one name per output (one for binary/regression)
THREADS = int(os.environ.get("MD_CPU_THREADS", "1"))  # this worker's share of the replica's CPUs


class Model:
    def __init__(self):
        self.booster = xgboost.Booster(params={"nthread": THREADS}, model_file=str(MODEL_FILE))

    def predict(self, input_df: pd.DataFrame) -> pd.DataFrame:
        # selecting columns copies the frame (0.1 ms a request): skip it when they already come in this order
        ordered = input_df if list(input_df.columns) == INPUT_COLUMNS else input_df[INPUT_COLUMNS]
        features = xgboost.DMatrix(ordered.astype("float32"), nthread=THREADS)
        scores = self.booster.predict(features)
        return pd.DataFrame(scores.reshape(len(input_df), -1), columns=OUTPUT_COLUMNS)


def get_model():
    return Model()
