"""The MLflow pyfunc model: strings in, translations out (weights + SentencePiece + decoding config)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
import torch


class Translator(mlflow.pyfunc.PythonModel):
    """Loads the checkpoint and tokenizer bundled as artifacts; `predict` translates a list of sentences."""

    def load_context(self, context: Any) -> None:
        from seq2seq.checkpoint import load_model
        from seq2seq.tokenizer import Tokenizer

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, _ = load_model(Path(context.artifacts["checkpoint"]), self.device)
        self.tokenizer = Tokenizer(context.artifacts["tokenizer"])
        self.decoding = json.loads(Path(context.artifacts["decoding"]).read_text())

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        from seq2seq.decoding import translate_ids

        if isinstance(model_input, pd.DataFrame):
            texts = model_input.iloc[:, 0].tolist()
        elif isinstance(model_input, str):
            texts = [model_input]
        else:
            texts = list(model_input)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("input must be a list of strings")
        d = {**self.decoding, **(params or {})}
        ids = translate_ids(
            self.model, self.tokenizer.encode(texts), d["batch_size"], d["max_len_a"], d["max_len_b"], self.device
        )
        return self.tokenizer.decode(ids)
