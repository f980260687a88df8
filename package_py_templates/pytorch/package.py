"""PyTorch model saved as TorchScript. Image: md-base/python/deep-learning.

Save it with `torch.jit.save(torch.jit.script(model), "model.pt")` (or torch.jit.trace). TorchScript needs
no module code at load time. To load a state_dict instead, put your nn.Module class in a sibling module
(e.g. net.py), `from net import Net`, and replace the load line with
`self.model = Net(); self.model.load_state_dict(torch.load(MODEL_FILE, map_location="cpu"))`.
"""
import os
from pathlib import Path

import pandas as pd
import torch

PACKAGE_PATH = Path(__file__).parent
MODEL_FILE = PACKAGE_PATH / "model.pt"  # CHANGE: your model's file name
INPUT_COLUMNS = ["x1", "x2", "x3", "x4"]  # CHANGE: the feature columns, in the order the model expects
OUTPUT_COLUMNS = ["score_0", "score_1"]  # CHANGE: one name per output unit
BATCH_SIZE = 1024  # rows per forward pass: bounds memory for large requests
THREADS = int(os.environ.get("MD_CPU_THREADS", "1"))  # this worker's share of the replica's CPUs


class Model:
    def __init__(self):
        torch.set_num_threads(THREADS)
        self.model = torch.jit.load(str(MODEL_FILE), map_location="cpu")
        self.model.eval()

    def predict(self, input_df: pd.DataFrame) -> pd.DataFrame:
        # selecting columns copies the frame (0.1 ms a request): skip it when they already come in this order
        ordered = input_df if list(input_df.columns) == INPUT_COLUMNS else input_df[INPUT_COLUMNS]
        features = torch.tensor(ordered.to_numpy(dtype="float32"))
        with torch.inference_mode():
            outputs = [self.model(batch) for batch in torch.split(features, BATCH_SIZE)] if len(features) else []
        scores = torch.cat(outputs).numpy() if outputs else features.new_zeros((0, len(OUTPUT_COLUMNS))).numpy()
        return pd.DataFrame(scores.reshape(len(input_df), -1), columns=OUTPUT_COLUMNS)


def get_model():
    return Model()
