"""The params.yaml schema: one pydantic model, validated before any stage does work.

params.yaml is the single source of every default; nothing here re-declares them,
so every field is required. `load_params` names the offending key path on error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

LANG_RE = re.compile(r"^[a-z]{2,3}$")
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
MIRROR_ENV = "NMT_MIRROR"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(Strict):
    """Which language pair and which datasets (by name, from download.datasets) make each split."""

    src_lang: str
    tgt_lang: str
    train: list[str] = Field(min_length=1)
    dev: str
    test: list[str] = Field(min_length=1)

    @field_validator("src_lang", "tgt_lang")
    @classmethod
    def _lang_code(cls, v: str) -> str:
        if not LANG_RE.match(v):
            raise ValueError(f"language code must be 2-3 lower-case letters, got {v!r}")
        return v

    @model_validator(mode="after")
    def _distinct(self) -> DataParams:
        if self.src_lang == self.tgt_lang:
            raise ValueError("src_lang and tgt_lang must differ")
        if len(set(self.test)) != len(self.test):
            raise ValueError("test set names must be unique")
        return self

    @property
    def pair(self) -> str:
        return f"{self.src_lang}-{self.tgt_lang}"


class DatasetSource(Strict):
    """Where one dataset's files come from for one language pair.

    With `archive`, each value of `files` is a member path inside that archive
    (.tgz/.tar.gz/.tar; a member may itself be .gz or .sgm). Without it, each value
    is a URL of a plain, .gz or .sgm file.
    """

    archive: str | None = None
    files: dict[str, str] = Field(min_length=2)


class Checksum(Strict):
    sha256: str | None = None
    size: int | None = Field(default=None, ge=0)


class DownloadParams(Strict):
    mirror: str | None  # local directory or base URL with the same file names; env NMT_MIRROR overrides
    retries: int = Field(ge=0, le=20)
    backoff_seconds: float = Field(ge=0)
    timeout_seconds: float = Field(gt=0)
    # dataset name -> language pair ("en-fr", either order matches) -> source
    datasets: dict[str, dict[str, DatasetSource]]
    # file name (last URL component) -> known size/sha256
    checksums: dict[str, Checksum]

    def effective_mirror(self) -> str | None:
        return os.environ.get(MIRROR_ENV) or self.mirror or None


class CleanParams(Strict):
    normalization: Literal["NFC", "NFKC", "none"]
    min_tokens: int = Field(ge=1)
    max_tokens: int = Field(ge=1)
    max_length_ratio: float = Field(gt=1.0)
    dedup: bool
    langid: bool
    chunk_lines: int = Field(ge=1)

    @model_validator(mode="after")
    def _range(self) -> CleanParams:
        if self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must be <= max_tokens")
        return self


class TokenizeParams(Strict):
    vocab_size: int = Field(ge=100, le=1_000_000)
    model_type: Literal["unigram", "bpe"]
    character_coverage: float = Field(gt=0.0, le=1.0)
    input_sentence_size: int = Field(ge=0)  # 0 = use every sentence to train SentencePiece
    num_threads: int = Field(ge=1)


class ModelParams(Strict):
    """One flat section for every family (seq2seq/models.py); each family reads the fields it needs."""

    family: Literal["transformer", "rnn", "attention_rnn"]
    d_model: int = Field(ge=8)  # embedding width, all families
    dropout: float = Field(ge=0.0, lt=1.0)
    max_positions: int = Field(ge=16)  # longest source or target sequence, all families
    share_embeddings: bool
    # transformer
    n_heads: int = Field(ge=1)
    n_encoder_layers: int = Field(ge=1)
    n_decoder_layers: int = Field(ge=1)
    d_ff: int = Field(ge=8)
    pre_norm: bool
    positions: Literal["sinusoidal", "learned"]
    # rnn and attention_rnn
    rnn_cell: Literal["lstm", "gru"]
    rnn_hidden: int = Field(ge=8)
    rnn_layers: int = Field(ge=1)
    rnn_bidirectional: bool
    rnn_reverse_source: bool
    attention: Literal["bahdanau", "luong"]  # attention_rnn only

    @model_validator(mode="after")
    def _family_shapes(self) -> ModelParams:
        if self.family == "transformer" and self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.family != "transformer" and self.rnn_bidirectional and self.rnn_hidden % 2:
            raise ValueError(f"rnn_hidden ({self.rnn_hidden}) must be even with rnn_bidirectional (half per direction)")
        return self


class TrainParams(Strict):
    seed: int
    max_tokens: int = Field(ge=16)  # target+source tokens per batch (token-bucket batches)
    max_steps: int = Field(ge=1)
    max_minutes: float = Field(gt=0)  # wall-clock budget; training stops at whichever comes first
    lr: float = Field(gt=0)
    warmup_steps: int = Field(ge=0)
    label_smoothing: float = Field(ge=0.0, lt=1.0)
    weight_decay: float = Field(ge=0.0)
    clip_norm: float = Field(gt=0)
    max_len: int = Field(ge=2)  # longer training pairs are skipped (counted, logged)
    log_every: int = Field(ge=1)
    device: Literal["auto", "cpu", "cuda"]
    threads: int = Field(ge=0)  # torch CPU threads; 0 = torch's default
    lr_schedule: Literal["inverse_sqrt", "cosine"]
    min_lr: float = Field(ge=0)  # cosine: the lr reached at max_steps
    grad_accum: int = Field(ge=1)  # micro-batches per optimizer step
    compile: bool  # torch.compile the model
    eval_every: int = Field(ge=1)  # steps between validations (dev loss/ppl, greedy BLEU)
    eval_bleu_sentences: int = Field(ge=0)  # dev sentences for the quick greedy BLEU; 0 = skip it
    early_stop_metric: Literal["dev_loss", "dev_bleu"]  # also picks the best checkpoint
    patience: int = Field(ge=0)  # validations without improvement before stopping; 0 = never stop early
    save_every: int = Field(ge=1)  # steps between resumable checkpoints
    keep_last: int = Field(ge=1)  # resumable checkpoints kept (plus best.pt)
    final_model: Literal["last", "best", "average"]  # average = mean of the last keep_last checkpoints
    checkpoint_dir: str = Field(min_length=1)  # resumable checkpoints go to <checkpoint_dir>/<run key>/

    @model_validator(mode="after")
    def _bleu_needs_sentences(self) -> TrainParams:
        if self.early_stop_metric == "dev_bleu" and self.eval_bleu_sentences == 0:
            raise ValueError("early_stop_metric dev_bleu needs eval_bleu_sentences > 0")
        return self


class DecodingParams(Strict):
    """How to translate: beam search and batching (evaluate, the exported model, the translate CLI)."""

    batch_size: int = Field(ge=1)  # most sentences per batch
    max_tokens: int = Field(ge=1)  # most source tokens per batch, padding included (before beam expansion)
    beam_size: int = Field(ge=1)  # 1 = greedy
    length_penalty: float  # GNMT alpha: hypotheses ranked by log P / ((5 + len) / 6) ** alpha
    nbest: int = Field(ge=1)  # hypotheses kept per sentence (evaluate scores the first)
    max_len_a: float = Field(ge=0)  # max output length = a * src_len + b
    max_len_b: int = Field(ge=1)

    @model_validator(mode="after")
    def _nbest_fits_beam(self) -> DecodingParams:
        if self.nbest > self.beam_size:
            raise ValueError(f"nbest ({self.nbest}) must be <= beam_size ({self.beam_size})")
        return self


class EvaluateParams(DecodingParams):
    chrf_word_order: Literal[0, 2]  # 0 = chrF, 2 = chrF++
    bootstrap_samples: int = Field(ge=0)  # resamples for BLEU's 95% confidence interval; 0 = none
    length_buckets: list[int] = Field(min_length=1)  # source-word bounds of the BLEU-by-length buckets (+ one above)

    def decoding(self) -> DecodingParams:
        return DecodingParams.model_validate(self.model_dump(include=set(DecodingParams.model_fields)))


class ExportParams(Strict):
    registered_model_name: str = Field(min_length=1)
    promotion_margin: float = Field(ge=0)  # BLEU a challenger must add over the champion to be promoted


class MlflowParams(Strict):
    tracking_uri: str = Field(min_length=1)
    experiment: str = Field(min_length=1)


class Params(Strict):
    data: DataParams
    download: DownloadParams
    clean: CleanParams
    tokenize: TokenizeParams
    model: ModelParams
    train: TrainParams
    evaluate: EvaluateParams
    export: ExportParams
    mlflow: MlflowParams

    @model_validator(mode="after")
    def _datasets_exist(self) -> Params:
        for name in [*self.data.train, self.data.dev, *self.data.test]:
            self.source_for(name)  # raises naming the dataset and pair
        return self

    def source_for(self, dataset: str) -> DatasetSource:
        """The download source of `dataset` for this run's language pair."""
        if dataset not in self.download.datasets:
            raise ValueError(f"data: dataset {dataset!r} is not defined under download.datasets")
        by_pair = self.download.datasets[dataset]
        want = {self.data.src_lang, self.data.tgt_lang}
        for pair, source in by_pair.items():
            if set(pair.split("-")) == want:
                missing = want - set(source.files)
                if missing:
                    raise ValueError(f"download.datasets.{dataset}.{pair}.files lacks language(s) {sorted(missing)}")
                return source
        raise ValueError(
            f"download.datasets.{dataset} has no source for {self.data.pair} (it has: {', '.join(by_pair)})"
        )


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message names the file and key path."""


def _format_errors(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid parameters"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {key}: {e['msg']}")
    return "\n".join(lines)


def parse_params(raw: Any, path: Path | str = "params.yaml") -> Params:
    """Validate an already-loaded mapping; errors name `path` and each bad key path."""
    path = Path(path)
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_errors(path, err)) from None


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run from the repository root)") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    return parse_params(raw, path)


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in a nested mapping, creating nothing new above the leaf's parent."""
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            raise ParamsError(f"override {key!r}: {part!r} is not a mapping in params")
        node = node[part]
    node[parts[-1]] = value


def flatten(params: BaseModel | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten to dotted keys (for MLflow params)."""
    data = params.model_dump() if isinstance(params, BaseModel) else params
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
