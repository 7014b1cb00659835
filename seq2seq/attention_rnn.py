"""The attention RNN encoder-decoder: Bahdanau et al. 2014 (additive) or Luong et al. 2015 (general).

The encoder is the RNN encoder of seq2seq/rnn.py (a bidirectional one, as in both papers); its final
state initialises the decoder. At each target position the decoder attends over all encoder states
(padding masked out) to build a context vector c_t:
  bahdanau: score(s_{t-1}, h_j) = v^T tanh(W s_{t-1} + U h_j), with the previous decoder state as the
            query, and [y_{t-1}; c_t] as the decoder RNN's input (Bahdanau et al., appendix A).
  luong:    score(h_t, h_j) = h_t^T W_a h_j ("general"), with the current decoder state as the query;
            input feeding passes the attentional vector h~_{t-1} with y_{t-1} (Luong et al., section 3.3).
Both produce h~_t = tanh(W_c [c_t; h_t]) from which the next token is predicted (Luong et al., eq. 5);
Bahdanau's maxout readout is replaced by this tanh layer.

Teacher forcing is a loop over target positions because each step's input depends on the previous
step's attention; encoder keys are projected once per batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seq2seq import cpu, luong_loop
from seq2seq.config import AttentionRNNConfig
from seq2seq.rnn import (
    OutputLayer,
    RNNEncoder,
    RNNEncoderDecoder,
    RNNMemory,
    make_embeddings,
    stacked_rnn,
    store_rnn_state,
    to_rnn_state,
    uniform_init,
)


class AdditiveAttention(nn.Module):
    """Bahdanau et al. 2014, eq. 6: e_tj = v^T tanh(W q_t + U h_j)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.W, self.U, self.v = (
            nn.Linear(hidden, hidden, bias=False),
            nn.Linear(hidden, hidden),
            nn.Linear(hidden, 1, bias=False),
        )

    def keys(self, states: torch.Tensor) -> torch.Tensor:
        return self.U(states)

    def scores(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return self.v(torch.tanh(self.W(query)[:, None, :] + keys)).squeeze(2)


class GeneralAttention(nn.Module):
    """Luong et al. 2015, eq. 8 ("general"): score = h_t^T W_a h_j."""

    def __init__(self, hidden: int):
        super().__init__()
        self.W_a = nn.Linear(hidden, hidden, bias=False)

    def keys(self, states: torch.Tensor) -> torch.Tensor:
        return self.W_a(states)

    def scores(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        # a row times a matrix: on the CPU 8x faster than bmm(keys, query[:, :, None]) at 64 x 25 x 256
        return torch.bmm(query[:, None, :], keys.transpose(1, 2)).squeeze(1)


class AttentionRNN(RNNEncoderDecoder):
    def __init__(self, cfg: AttentionRNNConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.input_feeding = cfg.attention == "luong"
        hidden = cfg.hidden
        self.src_embed, self.tgt_embed = make_embeddings(cfg, vocab_size)
        self.encoder = RNNEncoder(cfg, self.src_embed)
        self.attention = AdditiveAttention(hidden) if cfg.attention == "bahdanau" else GeneralAttention(hidden)
        # input: the previous token's embedding plus c_t (Bahdanau) or h~_{t-1} (Luong's input feeding)
        self.decoder = stacked_rnn(cfg, cfg.d_model + hidden, hidden)
        self.W_c = nn.Linear(2 * hidden, hidden, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.output = OutputLayer(cfg, vocab_size)
        uniform_init(self)
        if cfg.share_embeddings:
            self.output.generator.weight = self.tgt_embed.weight

    def context(self, query: torch.Tensor, keys: torch.Tensor, memory: RNNMemory) -> torch.Tensor:
        """c_t = sum_j a_tj h_j with a_t = softmax over the real (non-padding) source positions."""
        scores = self.attention.scores(query, keys).masked_fill(~memory.src_mask, float("-inf"))
        return torch.bmm(F.softmax(scores, dim=1)[:, None, :], memory.states).squeeze(1)

    def step(self, emb: torch.Tensor, memory: RNNMemory, keys: torch.Tensor, state, feed: torch.Tensor):
        """One target position: (h~_t [B, H], new RNN state) from the previous token's embedding [B, E]."""
        if self.input_feeding:
            out, state = self.decoder(torch.cat([emb, feed], dim=1)[:, None], state)
            h_t = out[:, 0]
            c_t = self.context(h_t, keys, memory)
        else:
            previous = state[0] if isinstance(state, tuple) else state
            c_t = self.context(previous[-1], keys, memory)  # the top layer's s_{t-1} is the query
            out, state = self.decoder(torch.cat([emb, c_t], dim=1)[:, None], state)
            h_t = out[:, 0]
        return torch.tanh(self.W_c(torch.cat([c_t, h_t], dim=1))), state

    def forward(
        self, src: torch.Tensor, tgt_in: torch.Tensor, tgt_out: torch.Tensor | None = None, label_smoothing: float = 0.0
    ) -> torch.Tensor:
        """Teacher forcing: logits, or the training loss given `tgt_out` (see rnn.OutputLayer)."""
        self.check_target_length(tgt_in)
        memory = self.encode(src)
        keys = self.attention.keys(memory.states)
        embedded = self.dropout(self.tgt_embed(tgt_in))
        if self.loop_written_out(embedded):
            outputs = luong_loop.decoder_outputs(embedded, keys, memory, self.decoder, self.W_c.weight)
        else:
            state = to_rnn_state(memory.h, memory.c)
            feed = memory.states.new_zeros(src.size(0), self.cfg.hidden)
            steps = []
            for t in range(tgt_in.size(1)):
                feed, state = self.step(embedded[:, t], memory, keys, state, feed)
                steps.append(feed)
            outputs = torch.stack(steps, dim=1)
        return self.output(outputs, tgt_out, label_smoothing)

    def loop_written_out(self, embedded: torch.Tensor) -> bool:
        """Whether teacher forcing runs seq2seq/luong_loop.py: the same loop as one autograd function, for a
        one-layer Luong LSTM in fp32 on the CPU (about 30% faster training steps on the demo model)."""
        cfg = self.cfg
        return cfg.attention == "luong" and cfg.cell == "lstm" and cfg.layers == 1 and cpu.eager_fp32_cpu(embedded)

    def decode_step(
        self, prev: torch.Tensor, memory: RNNMemory, cache: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Log-probabilities [B, V] of the next token given the last one `prev` [B]."""
        if not cache:  # first step: the encoder's final state, keys projected once, h~_0 = 0
            cache = {"h": memory.h, "keys": self.attention.keys(memory.states)}
            if memory.c is not None:
                cache["c"] = memory.c
            cache["feed"] = memory.states.new_zeros(prev.size(0), self.cfg.hidden)
        state = to_rnn_state(cache["h"], cache.get("c"))
        feed, state = self.step(self.dropout(self.tgt_embed(prev)), memory, cache["keys"], state, cache["feed"])
        store_rnn_state(cache, state)
        cache["feed"] = feed
        return F.log_softmax(self.output(feed).float(), dim=-1), cache
