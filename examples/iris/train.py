"""Train the iris example deterministically and save it next to package.py (model.joblib is not committed)."""

from pathlib import Path

import joblib
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

HERE = Path(__file__).parent


def main() -> None:
    data = load_iris(as_frame=True)
    features = data.frame[data.feature_names].rename(columns=lambda c: c.replace(" (cm)", "").replace(" ", "_"))
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, random_state=0))
    model.fit(features, data.target)
    joblib.dump(model, HERE / "model.joblib")
    features.head(5).to_csv(HERE / "sample.csv", index=False)
    print("trained {} on {} rows -> {}".format(type(model[-1]).__name__, len(features), HERE / "model.joblib"))


if __name__ == "__main__":
    main()
