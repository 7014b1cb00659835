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
        from seq2seq import cpu
        from seq2seq.checkpoint import load_model
        from seq2seq.tokenizer import Tokenizer

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # exports from before `quantize` existed decode in fp32
        self.decoding = {"quantize": "none", **json.loads(Path(context.artifacts["decoding"]).read_text())}
        model = load_model(Path(context.artifacts["checkpoint"]), self.device)[0]
        self.model = cpu.for_decoding(model, self.decoding["quantize"])  # fixed at load: requests cannot change it
        self.tokenizer = Tokenizer(context.artifacts["tokenizer"])

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        """Translations of a list of strings (or a one-column DataFrame); `params` override decoding options."""
        from seq2seq.config import DecodingParams
        from seq2seq.translate import translate_texts

        if isinstance(model_input, pd.DataFrame):
            texts = model_input.iloc[:, 0].tolist()
        elif isinstance(model_input, str):
            texts = [model_input]
        else:
            texts = list(model_input)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("input must be a list of strings")
        # serving answers with the best translation only
        opts = DecodingParams.model_validate({**self.decoding, **(params or {}), "nbest": 1})
        if opts.quantize != self.decoding["quantize"]:
            raise ValueError(
                f"quantize is {self.decoding['quantize']!r} for this model: it is fixed when the model loads"
            )
        return [n[0].text for n in translate_texts(self.model, self.tokenizer, texts, opts, self.device)]
