"""scikit-learn model saved with joblib (or pickle). Image: md-base/python/machine-learning.

Save it with `joblib.dump(model, "model.joblib")` from the same scikit-learn version as the image (1.1.1),
or pin yours in requirements.txt. Classifiers answer one probability column per class; regressors one column.
"""
import os
from pathlib import Path

import joblib
import pandas as pd

PACKAGE_PATH = Path(__file__).parent
MODEL_FILE = PACKAGE_PATH / "model.joblib"  # CHANGE: your model's file name
INPUT_COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]  # CHANGE: the columns it was fit on
THREADS = int(os.environ.get("MD_CPU_THREADS", "1"))  # this worker's share of the replica's CPUs


class Model:
    def __init__(self):
        self.model = joblib.load(MODEL_FILE)
        if hasattr(self.model, "n_jobs"):
            self.model.n_jobs = THREADS
        classes = getattr(self.model, "classes_", None)
        # CHANGE: output names; by default proba_<class> for classifiers, prediction for regressors
        names = ["proba_{}".format(c) for c in classes] if classes is not None else ["prediction"]
        self.output_columns = pd.Index(names)  # built once: from a list, each response's frame would build it

    def predict(self, input_df: pd.DataFrame) -> pd.DataFrame:
        # selecting columns copies the frame (0.1 ms a request): skip it when they already come in this order
        features = input_df if list(input_df.columns) == INPUT_COLUMNS else input_df[INPUT_COLUMNS]
        if hasattr(self.model, "predict_proba"):
            return pd.DataFrame(self.model.predict_proba(features), columns=self.output_columns)
        return pd.DataFrame({"prediction": self.model.predict(features)})


def get_model():
    return Model()
