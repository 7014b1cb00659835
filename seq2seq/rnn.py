"""The RNN encoder-decoder (Sutskever et al. 2014, "Sequence to Sequence Learning with Neural Networks").

An LSTM (or GRU, Cho et al. 2014) reads the source; its final state is the context vector that
initialises a second LSTM which writes the target. Options from the paper and its successors:
several layers, dropout between layers (Zaremba et al. 2014), a bidirectional encoder (each
direction gets half of `hidden`, the two final states are concatenated), and reading the
source backwards (Sutskever et al., section 3.3).

The attention RNN (seq2seq/attention_rnn.py) shares the encoder (`RNNEncoder`, `RNNMemory`), the output
layer (`OutputLayer`) and the decoding methods (`RNNEncoderDecoder`) defined here.
Interface shared with every family (see seq2seq/transformer.py):
  encode(src) -> RNNMemory;  init_cache() -> {};  decode_step(prev, memory, cache) -> (log_probs, cache)
  reorder_cache(cache, index);  forward(src, tgt_in) -> logits
The decoder state is taken from the memory on the first decode_step, so init_cache needs no memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from seq2seq.config import RNNConfig
from seq2seq.loss import output_loss
from seq2seq.tokenizer import PAD_ID


@dataclass
class RNNMemory:
    """Encoder states [B, S, H], source mask [B, S] (True = real token) and the final state per layer.

    `h`/`c` are batch-first [B, L, H] so that index_select(0) reorders them like everything else;
    `c` is None for a GRU.
    """

    states: torch.Tensor
    src_mask: torch.Tensor
    h: torch.Tensor
    c: torch.Tensor | None

    def index_select(self, index: torch.Tensor) -> RNNMemory:
        return RNNMemory(
            self.states.index_select(0, index),
            self.src_mask.index_select(0, index),
            self.h.index_select(0, index),
            None if self.c is None else self.c.index_select(0, index),
        )


def stacked_rnn(cfg: RNNConfig, input_size: int, hidden: int, bidirectional: bool = False) -> nn.LSTM | nn.GRU:
    """cfg.layers of LSTM or GRU cells, batch first, with dropout between layers (Zaremba et al. 2014)."""
    rnn_class = nn.LSTM if cfg.cell == "lstm" else nn.GRU
    return rnn_class(
        input_size,
        hidden,
        num_layers=cfg.layers,
        dropout=cfg.dropout if cfg.layers > 1 else 0.0,
        bidirectional=bidirectional,
        batch_first=True,
    )


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each row's first `lengths[i]` positions of x [B, S] or [B, S, H], leaving the padding at the end."""
    positions = torch.arange(x.size(1), device=x.device).expand(x.size(0), -1)
    index = torch.where(positions < lengths[:, None], lengths[:, None] - 1 - positions, positions)
    if x.dim() == 3:
        index = index[:, :, None].expand_as(x)
    return x.gather(1, index)


class RNNEncoder(nn.Module):
    """Embedding + (bi)directional multi-layer LSTM/GRU over the packed (padding-free) source."""

    def __init__(self, cfg: RNNConfig, embed: nn.Embedding):
        super().__init__()
        self.cfg, self.embed = cfg, embed
        directions = 2 if cfg.bidirectional else 1
        self.rnn = stacked_rnn(cfg, cfg.d_model, cfg.hidden // directions, bidirectional=cfg.bidirectional)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, src: torch.Tensor) -> RNNMemory:
        if src.size(1) > self.cfg.max_positions:
            raise ValueError(f"source of {src.size(1)} tokens exceeds model.max_positions={self.cfg.max_positions}")
        src_mask = src != PAD_ID
        lengths = src_mask.sum(1).clamp(min=1)
        if self.cfg.reverse_source:
            src = reverse_padded(src, lengths)
        x = self.dropout(self.embed(src))
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, state = self.rnn(packed)
        states, _ = pad_packed_sequence(out, batch_first=True, total_length=src.size(1))
        if self.cfg.reverse_source:  # attention sees states in source order
            states = reverse_padded(states, lengths)
        h, c = state if isinstance(state, tuple) else (state, None)
        return RNNMemory(states, src_mask, self.join_directions(h), None if c is None else self.join_directions(c))

    def join_directions(self, h: torch.Tensor) -> torch.Tensor:
        """[L * D, B, H / D] final states -> [B, L, H], forward and backward concatenated per layer."""
        layers, batch = self.cfg.layers, h.size(1)
        directions = 2 if self.cfg.bidirectional else 1
        h = h.view(layers, directions, batch, -1).permute(2, 0, 1, 3)
        return h.reshape(batch, layers, -1)


class OutputLayer(nn.Module):
    """From decoder outputs [..., hidden] to vocabulary logits: dropout, a projection to the embedding
    width (so that the generator can be the target embedding matrix when embeddings are shared), generator."""

    def __init__(self, cfg: RNNConfig, vocab_size: int):
        super().__init__()
        self.dropout = nn.Dropout(cfg.dropout)
        self.out_proj = nn.Linear(cfg.hidden, cfg.d_model, bias=False)
        self.generator = nn.Linear(cfg.d_model, vocab_size, bias=False)

    def forward(
        self, outputs: torch.Tensor, tgt_out: torch.Tensor | None = None, label_smoothing: float = 0.0
    ) -> torch.Tensor:
        """The logits; or, given `tgt_out`, the training loss summed over the real target tokens (seq2seq/loss.py)."""
        hidden = self.out_proj(self.dropout(outputs))
        if tgt_out is None:
            return self.generator(hidden)
        return output_loss(hidden, self.generator.weight, tgt_out, label_smoothing)


def to_rnn_state(h: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Batch-first [B, L, H] -> what nn.LSTM/nn.GRU take as the initial state ([L, B, H])."""
    h = h.transpose(0, 1).contiguous()
    return h if c is None else (h, c.transpose(0, 1).contiguous())


def store_rnn_state(cache: dict[str, torch.Tensor], state) -> None:
    """Keep nn.LSTM/nn.GRU's final state in `cache` as batch-first `h` (and `c` for an LSTM)."""
    h, c = state if isinstance(state, tuple) else (state, None)
    cache["h"] = h.transpose(0, 1)
    if c is not None:
        cache["c"] = c.transpose(0, 1)


def make_embeddings(cfg: RNNConfig, vocab_size: int) -> tuple[nn.Embedding, nn.Embedding]:
    src = nn.Embedding(vocab_size, cfg.d_model, padding_idx=PAD_ID)
    return src, src if cfg.share_embeddings else nn.Embedding(vocab_size, cfg.d_model, padding_idx=PAD_ID)


def uniform_init(model: nn.Module) -> None:
    """Sutskever et al. section 3.4: every parameter uniform in [-0.08, 0.08]; padding embeddings zero."""
    for p in model.parameters():
        nn.init.uniform_(p, -0.08, 0.08)
    for m in model.modules():
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()


class RNNEncoderDecoder(nn.Module):
    """The methods both RNN families share. Each family builds its own modules in __init__: the order they
    are built in fixes the random initial weights for a given seed."""

    cfg: RNNConfig
    encoder: RNNEncoder

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def check_target_length(self, tgt_in: torch.Tensor) -> None:
        if tgt_in.size(1) > self.cfg.max_positions:
            raise ValueError(f"target of {tgt_in.size(1)} tokens exceeds model.max_positions")

    def encode(self, src: torch.Tensor) -> RNNMemory:
        return self.encoder(src)

    def init_cache(self) -> dict[str, torch.Tensor]:
        return {}

    @staticmethod
    def reorder_cache(cache: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Select batch rows of every cached tensor (for beam search / dropping finished rows)."""
        return {k: v.index_select(0, index) for k, v in cache.items()}


class RNNSeq2Seq(RNNEncoderDecoder):
    def __init__(self, cfg: RNNConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.src_embed, self.tgt_embed = make_embeddings(cfg, vocab_size)
        self.encoder = RNNEncoder(cfg, self.src_embed)
        self.decoder = stacked_rnn(cfg, cfg.d_model, cfg.hidden)
        self.dropout = nn.Dropout(cfg.dropout)
        self.output = OutputLayer(cfg, vocab_size)
        uniform_init(self)
        if cfg.share_embeddings:
            self.output.generator.weight = self.tgt_embed.weight

    def forward(
        self, src: torch.Tensor, tgt_in: torch.Tensor, tgt_out: torch.Tensor | None = None, label_smoothing: float = 0.0
    ) -> torch.Tensor:
        """Teacher forcing: logits, or the training loss given `tgt_out` (see OutputLayer)."""
        self.check_target_length(tgt_in)
        memory = self.encode(src)
        outputs, _ = self.decoder(self.dropout(self.tgt_embed(tgt_in)), to_rnn_state(memory.h, memory.c))
        return self.output(outputs, tgt_out, label_smoothing)

    def decode_step(
        self, prev: torch.Tensor, memory: RNNMemory, cache: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Log-probabilities [B, V] of the next token given the last one `prev` [B]."""
        h, c = (cache["h"], cache.get("c")) if cache else (memory.h, memory.c)
        out, state = self.decoder(self.dropout(self.tgt_embed(prev[:, None])), to_rnn_state(h, c))
        store_rnn_state(cache, state)
        return F.log_softmax(self.output(out[:, -1]).float(), dim=-1), cache
