"""Hugging Face transformers text classifier from a local folder. Image: md-base/python/deep-learning.

Save both the model and its tokenizer into one folder: `model.save_pretrained("hf_model")` and
`tokenizer.save_pretrained("hf_model")`. Nothing is downloaded at serving time (local_files_only).
Answers one probability column per label, named from the model config's id2label.
"""
import os
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

PACKAGE_PATH = Path(__file__).parent
MODEL_DIR = PACKAGE_PATH / "hf_model"  # CHANGE: the folder holding config, weights and tokenizer files
TEXT_COLUMN = "text"  # CHANGE: the request column with the text to classify
MAX_LENGTH = 128  # tokens per text; longer texts are truncated
BATCH_SIZE = 32  # texts per forward pass
THREADS = int(os.environ.get("MD_CPU_THREADS", "1"))  # this worker's share of the replica's CPUs


class Model:
    def __init__(self):
        torch.set_num_threads(THREADS)
        self.tokenizer = AutoTokenizer.from_pretrained(str(MODEL_DIR), local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(str(MODEL_DIR), local_files_only=True)
        self.model.eval()
        labels = self.model.config.id2label
        self.output_columns = ["proba_{}".format(labels[i]) for i in range(len(labels))]

    def predict(self, input_df: pd.DataFrame) -> pd.DataFrame:
        texts = input_df[TEXT_COLUMN].astype(str).tolist()
        rows = []
        with torch.inference_mode():
            for start in range(0, len(texts), BATCH_SIZE):
                batch = self.tokenizer(texts[start:start + BATCH_SIZE], padding=True, truncation=True,
                                       max_length=MAX_LENGTH, return_tensors="pt")
                rows.extend(torch.softmax(self.model(**batch).logits, dim=-1).tolist())
        return pd.DataFrame(rows, columns=self.output_columns, dtype="float64")


def get_model():
    return Model()
