"""The model families by name: params.yaml's model.family -> (config dataclass, model class).

Each config dataclass names its fields as params.yaml's model section does, plus vocab_size,
so a family's config is those fields picked from the validated ModelParams.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from seq2seq.attention_rnn import AttentionRNN, AttentionRNNConfig
from seq2seq.config import ModelParams
from seq2seq.rnn import RNNConfig, RNNSeq2Seq
from seq2seq.transformer import Transformer, TransformerConfig

FAMILIES: dict[str, tuple[type, type[nn.Module]]] = {
    "transformer": (TransformerConfig, Transformer),
    "rnn": (RNNConfig, RNNSeq2Seq),
    "attention_rnn": (AttentionRNNConfig, AttentionRNN),
}


def model_config(params: ModelParams, vocab_size: int) -> Any:
    """The family's config dataclass filled from params (fields by name) and the vocabulary size."""
    config_class, _ = FAMILIES[params.family]
    values = params.model_dump()
    return config_class(
        **{f.name: values[f.name] for f in dataclasses.fields(config_class) if f.name != "vocab_size"},
        vocab_size=vocab_size,
    )


def build_model(params: ModelParams, vocab_size: int) -> nn.Module:
    """A freshly initialised model of the configured family."""
    _, model_class = FAMILIES[params.family]
    return model_class(model_config(params, vocab_size))


def model_from_config(family: str, config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from the (family, config dict) a checkpoint stores; KeyError/TypeError if they don't fit."""
    config_class, model_class = FAMILIES[family]
    return model_class(config_class(**config))
