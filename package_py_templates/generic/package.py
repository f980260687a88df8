"""Minimal package.py: the contract, with no framework. Fits every md-base image.

get_model() runs once at start-up (in the server's master, which forks the workers); predict() runs per request with a DataFrame of the request's
rows and returns one output row per input row. Replace the arithmetic with your model.
"""
from pathlib import Path

import pandas as pd

PACKAGE_PATH = Path(__file__).parent  # load your files relative to this, never to the working directory
INPUT_COLUMNS = ["x1", "x2"]  # CHANGE: your input columns (keep model.yaml in step)
OUTPUT_COLUMNS = ["score"]  # CHANGE: your output columns


class Model:
    def __init__(self):
        self.weights = pd.Series([0.5, -0.25], index=INPUT_COLUMNS)  # CHANGE: load your model here

    def predict(self, input_df: pd.DataFrame) -> pd.DataFrame:
        # selecting columns copies the frame (0.1 ms a request): skip it when they already come in this order
        ordered = input_df if list(input_df.columns) == INPUT_COLUMNS else input_df[INPUT_COLUMNS]
        features = ordered.astype("float64")
        return pd.DataFrame({OUTPUT_COLUMNS[0]: features.dot(self.weights).to_numpy()})


def get_model():
    return Model()
