"""The model families by name: params.yaml's model.family -> (its config section, its model class).

Every model class takes its family's validated config section and the vocabulary size:
`Transformer(params.model.transformer, vocab_size)`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from torch import nn

from seq2seq.attention_rnn import AttentionRNN
from seq2seq.config import AttentionRNNConfig, ModelParams, RNNConfig, TransformerConfig
from seq2seq.rnn import RNNSeq2Seq
from seq2seq.transformer import Transformer

FAMILIES: dict[str, tuple[type[BaseModel], type[nn.Module]]] = {
    "transformer": (TransformerConfig, Transformer),
    "rnn": (RNNConfig, RNNSeq2Seq),
    "attention_rnn": (AttentionRNNConfig, AttentionRNN),
}


def build_model(params: ModelParams, vocab_size: int) -> nn.Module:
    """A freshly initialised model of the chosen family."""
    _, model_class = FAMILIES[params.family]
    return model_class(params.config, vocab_size)


def model_from_config(family: str, config: dict[str, Any], vocab_size: int) -> nn.Module:
    """Rebuild a model from the (family, config section) a checkpoint stores.

    The section is validated by the family's params model: pydantic's ValidationError names a field that
    does not fit.
    """
    config_class, model_class = FAMILIES[family]
    return model_class(config_class.model_validate(config), vocab_size)
