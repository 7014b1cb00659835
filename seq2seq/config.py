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
MAX_DECODING_ROWS = 4096  # batch_size x beam_size: see DecodingParams


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
    def langs(self) -> tuple[str, str]:
        """(source language, target language)."""
        return self.src_lang, self.tgt_lang

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
    """What is published about a file; every field given is checked."""

    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    md5: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{32}$")
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
    # Extraction bounds: a small gzip member can expand to gigabytes, or to one endless line. WMT'14's
    # largest member (giga-fren, ~4 GiB per side) and longest line (~60 KB, in the UN corpus) fit well inside.
    max_member_bytes: int = Field(default=16 << 30, ge=1)  # decompressed bytes of one file or archive member
    max_line_bytes: int = Field(default=1 << 20, ge=1)  # bytes of one line (one segment of a .sgm file)

    def effective_mirror(self) -> str | None:
        return os.environ.get(MIRROR_ENV) or self.mirror or None


class CleanParams(Strict):
    normalization: Literal["NFC", "NFKC", "none"]
    min_tokens: int = Field(ge=1)
    max_tokens: int = Field(ge=1)
    max_length_ratio: float = Field(gt=1.0)
    dedup: bool
    langid: bool
    chunk_lines: int = Field(ge=1)  # pairs per chunk of work
    processes: int = Field(ge=0)  # worker processes; 0 = every core

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
    num_threads: int = Field(ge=0)  # SentencePiece training threads; 0 = every core
    processes: int = Field(ge=0)  # encoding worker processes; 0 = every core


class ModelShape(Strict):
    """The fields every model family has; each family's section below declares the rest."""

    d_model: int = Field(ge=8)  # embedding width
    dropout: float = Field(ge=0.0, lt=1.0)
    max_positions: int = Field(ge=16)  # longest source or target sequence in tokens
    share_embeddings: bool  # one matrix for source, target and output embeddings


class TransformerConfig(ModelShape):
    """model.transformer: the Transformer (seq2seq/transformer.py)."""

    n_heads: int = Field(ge=1)
    n_encoder_layers: int = Field(ge=1)
    n_decoder_layers: int = Field(ge=1)
    d_ff: int = Field(ge=8)
    pre_norm: bool
    positions: Literal["sinusoidal", "learned"]

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TransformerConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        return self


class RNNConfig(ModelShape):
    """model.rnn: the RNN encoder-decoder (seq2seq/rnn.py); also the base of model.attention_rnn."""

    cell: Literal["lstm", "gru"]
    hidden: int = Field(ge=8)  # decoder state size; a bidirectional encoder gives each direction half
    layers: int = Field(ge=1)
    bidirectional: bool
    reverse_source: bool

    @model_validator(mode="after")
    def _directions_split_hidden(self) -> RNNConfig:
        if self.bidirectional and self.hidden % 2:
            raise ValueError(f"hidden ({self.hidden}) must be even with bidirectional (half per direction)")
        return self


class AttentionRNNConfig(RNNConfig):
    """model.attention_rnn: the RNN encoder-decoder with attention (seq2seq/attention_rnn.py)."""

    attention: Literal["bahdanau", "luong"]


ModelConfig = TransformerConfig | RNNConfig | AttentionRNNConfig


class ModelParams(Strict):
    """One section per family, all validated; `family` picks the one that is built (see `config`).

    Every family keeps its own section, so switching is one line (`-S model.family=rnn`) and a checkpoint
    stores just the section it was built from.
    """

    family: Literal["transformer", "rnn", "attention_rnn"]
    transformer: TransformerConfig
    rnn: RNNConfig
    attention_rnn: AttentionRNNConfig

    @property
    def config(self) -> ModelConfig:
        """The chosen family's section: what its model class takes."""
        return {"transformer": self.transformer, "rnn": self.rnn, "attention_rnn": self.attention_rnn}[self.family]


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
    """How to translate: beam search and batching (evaluate, the exported model, the translate CLI).

    Every field has an upper bound: serving requests may set them, and a request must not be able to ask
    for unbounded work or memory. Each decoding step holds [batch_size x beam_size, vocabulary] scores, so
    the two are bounded together: 4096 rows x a 32k vocabulary x 4 bytes is 512 MiB.
    """

    batch_size: int = Field(ge=1, le=1024)  # most sentences per batch
    max_tokens: int = Field(ge=1, le=65536)  # most source tokens per batch, padding included (before beam expansion)
    beam_size: int = Field(ge=1, le=16)  # 1 = greedy
    length_penalty: float = Field(ge=0.0, le=5.0)  # GNMT alpha: hypotheses ranked by log P / ((5 + len) / 6) ** alpha
    nbest: int = Field(ge=1)  # hypotheses kept per sentence (evaluate scores the first); at most beam_size
    max_len_a: float = Field(ge=0, le=10)  # max output length = a * src_len + b (and never above max_positions)
    max_len_b: int = Field(ge=1, le=1024)
    quantize: Literal["none", "int8"]  # int8: int8 weights on the CPU (seq2seq/cpu.py), ~1.5x faster beam search

    @model_validator(mode="after")
    def _nbest_fits_beam(self) -> DecodingParams:
        if self.nbest > self.beam_size:
            raise ValueError(f"nbest ({self.nbest}) must be <= beam_size ({self.beam_size})")
        if self.batch_size * self.beam_size > MAX_DECODING_ROWS:
            raise ValueError(
                f"batch_size x beam_size = {self.batch_size * self.beam_size} rows decoded at once; "
                f"at most {MAX_DECODING_ROWS}"
            )
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

    def registered_name(self) -> str:
        """export.registered_model_name with {src} and {tgt} filled in from data."""
        return self.export.registered_model_name.format(src=self.data.src_lang, tgt=self.data.tgt_lang)


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message names the file and key path."""


def key_errors(err: ValidationError, prefix: str = "") -> list[str]:
    """Each error of `err` as "key.path: message", the key path under `prefix`."""
    return [f"{prefix}{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in err.errors()]


def _format_errors(path: Path, err: ValidationError) -> str:
    return "\n  ".join([f"{path}: invalid parameters", *key_errors(err)])


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
    except IsADirectoryError:
        raise ParamsError(f"{path}: a directory, not a params file") from None
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ParamsError(f"{path}:{line}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ParamsError(f"{path}: cannot be read ({err.strerror})") from None
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
