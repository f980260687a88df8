"""TensorFlow / Keras model exported as a SavedModel folder. Image: md-base/python/deep-learning.

Export it with `tf.saved_model.save(model, "saved_model")` (TensorFlow 2.x), or `model.export("saved_model")`
with Keras 3. The low-level `tf.saved_model.load` reads both and needs no Keras at serving time.
"""
import os
from pathlib import Path

import pandas as pd
import tensorflow as tf

PACKAGE_PATH = Path(__file__).parent
MODEL_DIR = PACKAGE_PATH / "saved_model"  # CHANGE: your SavedModel folder
INPUT_COLUMNS = ["x1", "x2", "x3", "x4"]  # CHANGE: the feature columns, in the order the model expects
OUTPUT_COLUMNS = ["score_0", "score_1"]  # CHANGE: one name per output unit
BATCH_SIZE = 1024  # rows per call: bounds memory for large requests
THREADS = int(os.environ.get("MD_CPU_THREADS", "1"))  # this worker's share of the replica's CPUs


class Model:
    def __init__(self):
        tf.config.threading.set_intra_op_parallelism_threads(THREADS)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        self.loaded = tf.saved_model.load(str(MODEL_DIR))
        self.serve = self.loaded.signatures["serving_default"]
        self.input_name = next(iter(self.serve.structured_input_signature[1]))

    def predict(self, input_df: pd.DataFrame) -> pd.DataFrame:
        # selecting columns copies the frame (0.1 ms a request): skip it when they already come in this order
        ordered = input_df if list(input_df.columns) == INPUT_COLUMNS else input_df[INPUT_COLUMNS]
        features = ordered.to_numpy(dtype="float32")
        batches = []
        for start in range(0, len(features), BATCH_SIZE):
            result = self.serve(**{self.input_name: tf.constant(features[start:start + BATCH_SIZE])})
            batches.append(next(iter(result.values())).numpy().reshape(-1, len(OUTPUT_COLUMNS)))
        rows = [row for batch in batches for row in batch]
        return pd.DataFrame(rows, columns=OUTPUT_COLUMNS, dtype="float64")


def get_model():
    return Model()
