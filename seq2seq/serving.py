"""The MLflow pyfunc model: strings in, translations out (weights + SentencePiece + decoding config).

The model is logged as MLflow "models from code" (seq2seq/translator_model.py): the model directory holds
this code as source and the weights, SentencePiece model and decoding options as data files; there is no
pickled Python object to unpickle. The weights file's sha256, recorded at export in the model's
configuration (and as the registry tag `weights_sha256`, see seq2seq/registry.py), is checked before any
weight is read, and the SentencePiece model must be the one the weights were trained with.

Requests are bounded: at most MAX_SENTENCES strings of MAX_CHARS characters each, and decoding options
within DecodingParams' bounds (beam_size <= 16, ...). Anything else is refused as an invalid parameter,
which `mlflow models serve` answers with HTTP 400.

A registered version may also carry CTranslate2 int8 weights (the deliver-champion flow adds them to its
artifacts, beside the checkpoint, once they pass its BLEU check); the model then translates with those,
and with PyTorch otherwise. Their digest (`directory_sha256`) is written beside them (`ctranslate2-int8.sha256`)
and as the registry tag `ctranslate2_int8_sha256`; `load_ctranslate2` refuses a directory that does not match.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
import pydantic
import torch

from seq2seq.checkpoint import CheckpointError
from seq2seq.config import DecodingParams, key_errors
from seq2seq.textio import file_sha256

WEIGHTS_SHA256 = "weights_sha256"  # the model config key (and registry tag) holding the weights file's digest
ARTIFACTS = ("checkpoint", "tokenizer", "decoding")  # the files the model bundles, by artifact name
MAX_SENTENCES = 1000  # strings in one request
MAX_CHARS = 5000  # characters in one string; longer sources are cut to the model's positions anyway
CT2_INT8_DIR = "ctranslate2-int8"  # the directory, beside the checkpoint artifact, that holds the CTranslate2 export
CT2_INT8_SHA256 = "ctranslate2_int8_sha256"  # the registry tag holding that directory's digest
log = logging.getLogger("seq2seq.serving")


def directory_sha256(directory: Path) -> str:
    """One digest for a directory's files: sha256 over the sorted lines "<relative path> <file sha256>"."""
    files = sorted(p for p in Path(directory).rglob("*") if p.is_file())
    lines = "".join(f"{p.relative_to(directory).as_posix()} {file_sha256(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def ct2_digest_file(directory: Path) -> Path:
    """Where the digest of a CTranslate2 export is recorded: beside it, `<directory>.sha256`."""
    return directory.with_name(directory.name + ".sha256")


def verify_weights(path: Path, expected: str, recorded_in: str) -> None:
    """Refuse weights whose sha256 differs from the one recorded at export, naming both digests."""
    actual = file_sha256(path)
    if actual != expected:
        raise CheckpointError(
            f"{path}: weights sha256 {actual} differs from {expected} recorded {recorded_in}; "
            "refusing to load them (the file was replaced or corrupted after export)"
        )


@dataclass(frozen=True)
class LoadedTranslator:
    """A model ready to translate: weights on `device`, its tokenizer and its default decoding options."""

    model: torch.nn.Module
    tokenizer: Any  # seq2seq.tokenizer.Tokenizer
    decoding: DecodingParams
    device: torch.device


def load_translator(files: dict[str, Path], weights_sha256: str, recorded_in: str) -> LoadedTranslator:
    """Load the bundled files (`ARTIFACTS` -> path) after checking the weights against `weights_sha256`."""
    from seq2seq import cpu
    from seq2seq.checkpoint import check_tokenizer, load_model
    from seq2seq.tokenizer import Tokenizer

    verify_weights(files["checkpoint"], weights_sha256, recorded_in)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, state = load_model(files["checkpoint"], device)
    tokenizer = Tokenizer(files["tokenizer"])
    check_tokenizer(state, files["checkpoint"], tokenizer)
    # exports from before `quantize` existed decode in fp32
    stored = json.loads(Path(files["decoding"]).read_text(encoding="utf-8"))
    decoding = DecodingParams.model_validate({"quantize": "none", **stored})
    # int8 or not is fixed at load: requests cannot change it
    return LoadedTranslator(cpu.for_decoding(model, decoding.quantize), tokenizer, decoding, device)


def parse_request(
    model_input: Any, params: dict[str, Any] | None, defaults: DecodingParams
) -> tuple[list[str], DecodingParams]:
    """The texts and decoding options of one request; a ValueError says what is out of bounds."""
    if isinstance(model_input, pd.DataFrame):
        texts = model_input.iloc[:, 0].tolist()
    elif isinstance(model_input, str):
        texts = [model_input]
    else:
        texts = list(model_input)
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("input must be a list of strings")
    if len(texts) > MAX_SENTENCES:
        raise ValueError(f"{len(texts)} sentences in one request; at most {MAX_SENTENCES}")
    too_long = next((i for i, t in enumerate(texts) if len(t) > MAX_CHARS), None)
    if too_long is not None:
        raise ValueError(f"sentence {too_long}: {len(texts[too_long])} characters; at most {MAX_CHARS}")
    # serving answers with the best translation only
    try:
        opts = DecodingParams.model_validate({**defaults.model_dump(), **(params or {}), "nbest": 1})
    except pydantic.ValidationError as err:
        raise ValueError("; ".join(key_errors(err, "params."))) from None
    if opts.quantize != defaults.quantize:
        raise ValueError(f"quantize is {defaults.quantize!r} for this model: it is fixed when the model loads")
    return texts, opts


class Translator(mlflow.pyfunc.PythonModel):
    """Loads the bundled files (checked against the model config's digest); `predict` translates strings."""

    def load_context(self, context: Any) -> None:
        files = {name: Path(context.artifacts[name]) for name in ARTIFACTS}
        recorded_in = "in the model's MLmodel file (model_config)"
        self.artifacts = files
        self.translator = load_translator(files, context.model_config[WEIGHTS_SHA256], recorded_in)
        ct2 = files["checkpoint"].parent / CT2_INT8_DIR
        recorded = ct2_digest_file(ct2)
        expected = recorded.read_text(encoding="ascii").strip() if recorded.is_file() else None
        self.ctranslate2 = load_ctranslate2(ct2, expected, f"in {recorded.name} beside it")

    @property
    def backend(self) -> str:
        """What `predict` translates with: "ctranslate2-int8" or "pytorch"."""
        return "ctranslate2-int8" if getattr(self, "ctranslate2", None) is not None else "pytorch"

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        """Translations of a list of strings (or a one-column DataFrame); `params` override decoding options."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from seq2seq.translate import translate_texts

        t = self.translator
        try:
            texts, opts = parse_request(model_input, params, t.decoding)
        except ValueError as err:  # the scoring server answers an invalid parameter with HTTP 400
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        if self.backend != "pytorch":
            from seq2seq.ctranslate2_export import translate_texts_ctranslate2

            return translate_texts_ctranslate2(self.ctranslate2, t.tokenizer, texts, opts, t.model.cfg.max_positions)
        return [n[0].text for n in translate_texts(t.model, t.tokenizer, texts, opts, t.device)]


def load_ctranslate2(directory: Path, expected: str | None, recorded_in: str) -> Any | None:
    """A CTranslate2 Translator over `directory` (int8 on the CPU), or None when the version has no such export
    or ctranslate2 is not installed here (then PyTorch translates; the log says why). The directory's digest
    must be `expected`: weights with no recorded digest, or another one, are refused naming both."""
    if not (directory / "model.bin").is_file():
        return None
    actual = directory_sha256(directory)
    if expected is None:
        raise CheckpointError(f"{directory}: CTranslate2 weights with no digest recorded {recorded_in}; refusing them")
    if actual != expected:
        raise CheckpointError(
            f"{directory}: CTranslate2 weights sha256 {actual} differs from {expected} recorded {recorded_in}; "
            "refusing to load them (the files were replaced or corrupted after delivery)"
        )
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
