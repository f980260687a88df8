"""Iris classifier: a scikit-learn pipeline saved with joblib by train.py.

get_model() runs once per worker at start-up; predict() runs per request with a DataFrame of the inputs
declared in model.yaml and returns one probability column per class, in class order. explain_custom()
serves POST /explain/feature_contributions: each feature's share of the logit of the predicted class.
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

    def explain_custom(self, explanation_name: str, input_df: pd.DataFrame) -> pd.DataFrame:
        # the names are declared in model.yaml `explanations`; the runtime answers 404 for any other
        scaler, classifier = self.pipeline[0], self.pipeline[-1]
        scaled = scaler.transform(input_df)
        predicted = classifier.predict(scaled)
        contributions = scaled * classifier.coef_[predicted]
        return pd.DataFrame(contributions, columns=list(input_df.columns))


def get_model() -> IrisModel:
    return IrisModel()
