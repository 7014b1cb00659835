"""The MLflow pyfunc model: strings in, translations out (weights + SentencePiece + decoding config).

A registered version may also carry CTranslate2 int8 weights (the deliver-champion flow adds them to its
artifacts, beside the checkpoint, once they pass its BLEU check); the model then translates with those,
and with PyTorch otherwise.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
import torch

log = logging.getLogger("seq2seq.serving")
CT2_INT8_DIR = "ctranslate2-int8"  # the directory, beside the checkpoint artifact, that holds the CTranslate2 export


class Translator(mlflow.pyfunc.PythonModel):
    """Loads the checkpoint and tokenizer bundled as artifacts; `predict` translates a list of sentences."""

    def load_context(self, context: Any) -> None:
        from seq2seq import cpu
        from seq2seq.checkpoint import load_model
        from seq2seq.tokenizer import Tokenizer

        self.artifacts = dict(context.artifacts)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # exports from before `quantize` existed decode in fp32
        self.decoding = {"quantize": "none", **json.loads(Path(context.artifacts["decoding"]).read_text())}
        model = load_model(Path(context.artifacts["checkpoint"]), self.device)[0]
        self.model = cpu.for_decoding(model, self.decoding["quantize"])  # fixed at load: requests cannot change it
        self.tokenizer = Tokenizer(context.artifacts["tokenizer"])
        self.ctranslate2 = load_ctranslate2(Path(context.artifacts["checkpoint"]).parent / CT2_INT8_DIR)

    @property
    def backend(self) -> str:
        """What `predict` translates with: "ctranslate2-int8" or "pytorch"."""
        return "ctranslate2-int8" if getattr(self, "ctranslate2", None) is not None else "pytorch"

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
        if self.backend != "pytorch":
            from seq2seq.ctranslate2_export import translate_texts_ctranslate2

            return translate_texts_ctranslate2(
                self.ctranslate2, self.tokenizer, texts, opts, self.model.cfg.max_positions
            )
        return [n[0].text for n in translate_texts(self.model, self.tokenizer, texts, opts, self.device)]


def load_ctranslate2(directory: Path) -> Any | None:
    """A CTranslate2 Translator over `directory` (int8 on the CPU), or None when the version has no such export
    or ctranslate2 is not installed here (then PyTorch translates; the log says why)."""
    if not (directory / "model.bin").is_file():
        return None
    try:
        import ctranslate2
    except ModuleNotFoundError:
        log.warning(
            "%s: CTranslate2 weights present but ctranslate2 is not installed; translating with PyTorch", directory
        )
        return None
    device = "cuda" if ctranslate2.get_cuda_device_count() else "cpu"
    return ctranslate2.Translator(
        str(directory),
        device=device,
        compute_type="int8" if device == "cpu" else "int8_float16",
        intra_threads=torch.get_num_threads(),
    )
