"""The Transformer encoder-decoder (Vaswani et al. 2017, "Attention Is All You Need").

Names follow the paper. Layers are pre-norm by default (LayerNorm before each sublayer, as in
Wang et al. 2019 / tensor2tensor's later default), which trains stably without long warm-up;
`pre_norm=False` gives the paper's post-norm, LayerNorm(x + Sublayer(x)). Positions are the paper's
sinusoids or learned embeddings (Gehring et al. 2017). Attention uses torch's fused
scaled_dot_product_attention (with a faster dropout when training on the CPU, seq2seq/cpu.py). Base and big
are just parameters (params.yaml, presets/transformer-big.yaml).

Interface shared with every decoder-side caller (greedy/beam search, evaluation, serving):
  encode(src) -> Memory
  decode_step(prev_tokens, memory, cache) -> (log_probs, cache)   # one target position
  forward(src, tgt_in) -> logits                                  # teacher forcing
  forward(src, tgt_in, tgt_out, label_smoothing) -> loss          # the training loss, summed
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from seq2seq import cpu
from seq2seq.config import TransformerConfig
from seq2seq.loss import output_loss
from seq2seq.tokenizer import PAD_ID

KeysValues = tuple[torch.Tensor, torch.Tensor]  # each [B, H, S, Dh]


@dataclass
class Memory:
    """Encoder output and the source padding mask (True = real token), shape [B, 1, 1, S]."""

    states: torch.Tensor
    src_mask: torch.Tensor
    # Per decoder layer, the cross-attention keys and values of `states`, projected once (Transformer.cross_kv).
    # They live here, not in the per-step cache, because beam search reorders the cache every step but the
    # memory only when sentences leave the batch: all beams of a sentence share them.
    cross_kv: list[KeysValues] | None = None

    def index_select(self, index: torch.Tensor) -> Memory:
        cross_kv = None
        if self.cross_kv is not None:
            cross_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross_kv]
        return Memory(self.states.index_select(0, index), self.src_mask.index_select(0, index), cross_kv)


class MultiHeadAttention(nn.Module):
    """Section 3.2.2: h parallel scaled dot-product attentions over learned projections.

    The per-head projections W^Q, W^K, W^V are stored as one matrix (fairseq's in_proj, nanoGPT's c_attn):
    one [D, 3D] matmul is cheaper than three [D, D] ones. Cross-attention projects queries from the
    decoder and keys/values from the encoder, so it keeps W^Q apart and fuses W^K with W^V.
    """

    def __init__(self, cfg: TransformerConfig, cross: bool):
        super().__init__()
        d_model = cfg.d_model
        self.heads, self.d_head, self.cross = cfg.n_heads, d_model // cfg.n_heads, cross
        if cross:
            self.q_proj, self.kv_proj = nn.Linear(d_model, d_model), nn.Linear(d_model, 2 * d_model)
        else:
            self.qkv_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = cfg.dropout

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.d_head).transpose(1, 2)  # [B, H, T, Dh]

    def project_kv(self, states: torch.Tensor) -> KeysValues:
        """Cross-attention: keys and values of the encoder states, split into heads."""
        return tuple(self.split_heads(part) for part in self.kv_proj(states).chunk(2, dim=-1))

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool = False
    ) -> torch.Tensor:
        """q, k, v already projected and split into heads."""
        out = cpu.scaled_dot_product_attention(  # torch's, with the faster dropout of seq2seq/cpu.py
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )
        b, h, t, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, h * d))

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        cache: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Self-attention over x. With a `cache` (decoding one position at a time), x's keys and values are
        appended to those of the earlier positions kept there, and x attends to all of them."""
        q, k, v = (self.split_heads(part) for part in self.qkv_proj(x).chunk(3, dim=-1))
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        return self.attend(q, k, v, mask, is_causal)

    def to_memory(self, x: torch.Tensor, kv: KeysValues, src_mask: torch.Tensor) -> torch.Tensor:
        """Cross-attention: queries from x, keys and values of the encoder states (`project_kv`)."""
        return self.attend(self.split_heads(self.q_proj(x)), *kv, src_mask)


class FeedForward(nn.Module):
    """Section 3.3: FFN(x) = max(0, x W1 + b1) W2 + b2."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.w1, self.w2 = nn.Linear(cfg.d_model, cfg.d_ff), nn.Linear(cfg.d_ff, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.dropout(F.relu(self.w1(x))))


class Sublayer(nn.Module):
    """Residual connection with LayerNorm around a sublayer: pre-norm x + f(LN(x)) or post-norm LN(x + f(x))."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm, self.dropout, self.pre_norm = nn.LayerNorm(cfg.d_model), nn.Dropout(cfg.dropout), cfg.pre_norm

    def forward(self, x: torch.Tensor, f) -> torch.Tensor:
        if self.pre_norm:
            return x + self.dropout(f(self.norm(x)))
        return self.norm(x + self.dropout(f(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg, cross=False)
        self.ffn = FeedForward(cfg)
        self.sub1, self.sub2 = Sublayer(cfg), Sublayer(cfg)

    def forward(self, x: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        x = self.sub1(x, lambda h: self.self_attn(h, src_mask))
        return self.sub2(x, self.ffn)


class DecoderLayer(nn.Module):
    """Section 3.1: masked self-attention, attention over the encoder output, feed-forward.

    One path for training and decoding: teacher forcing passes the whole target [B, T, D] and no cache, so
    a causal mask hides later positions; decoding passes only the newest position [B, 1, D] with this
    layer's cache of the earlier positions' keys and values, which may all be seen.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg, cross=False)
        self.cross_attn = MultiHeadAttention(cfg, cross=True)
        self.ffn = FeedForward(cfg)
        self.sub1, self.sub2, self.sub3 = Sublayer(cfg), Sublayer(cfg), Sublayer(cfg)

    def forward(
        self,
        y: torch.Tensor,
        src_mask: torch.Tensor,
        cross_kv: KeysValues,
        cache: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        y = self.sub1(y, lambda h: self.self_attn(h, is_causal=cache is None, cache=cache))
        y = self.sub2(y, lambda h: self.cross_attn.to_memory(h, cross_kv, src_mask))
        return self.sub3(y, self.ffn)


def sinusoidal_positions(n: int, d: int) -> torch.Tensor:
    """Section 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...)."""
    pos = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    pe = torch.zeros(n, d)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div[: d // 2])
    return pe


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.src_embed = nn.Embedding(vocab_size, cfg.d_model, padding_idx=PAD_ID)
        # Section 3.4: with a joint vocabulary, source, target and output embeddings are one matrix.
        self.tgt_embed = (
            self.src_embed if cfg.share_embeddings else nn.Embedding(vocab_size, cfg.d_model, padding_idx=PAD_ID)
        )
        if cfg.positions == "learned":
            self.positions = nn.Parameter(torch.zeros(cfg.max_positions, cfg.d_model))
        else:
            self.register_buffer("positions", sinusoidal_positions(cfg.max_positions, cfg.d_model), persistent=False)
        self.encoder_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_decoder_layers))
        # pre-norm leaves the residual stream unnormalised, so each stack ends with a LayerNorm
        norm = nn.LayerNorm if cfg.pre_norm else nn.Identity
        self.encoder_norm, self.decoder_norm = norm(cfg.d_model), norm(cfg.d_model)
        self.generator = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.reset_parameters()
        if cfg.share_embeddings:
            self.generator.weight = self.tgt_embed.weight

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() > 1:  # fused projections: each of W^Q, W^K, W^V gets its own Xavier range
                for block in p.chunk(3 if "qkv_proj" in name else 2 if "kv_proj" in name else 1, dim=0):
                    nn.init.xavier_uniform_(block)
        for emb in (self.src_embed, self.tgt_embed):
            nn.init.normal_(emb.weight, mean=0.0, std=self.cfg.d_model**-0.5)
            with torch.no_grad():
                emb.weight[PAD_ID].zero_()
        if isinstance(self.positions, nn.Parameter):
            nn.init.normal_(self.positions, mean=0.0, std=self.cfg.d_model**-0.5)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def embed(self, table: nn.Embedding, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Section 3.4: embeddings scaled by sqrt(d_model), plus positional encodings."""
        n = tokens.size(1)
        if offset + n > self.cfg.max_positions:
            raise ValueError(f"sequence of {offset + n} tokens exceeds model.max_positions={self.cfg.max_positions}")
        x = table(tokens) * math.sqrt(self.cfg.d_model) + self.positions[offset : offset + n]
        return self.dropout(x)

    def encode(self, src: torch.Tensor) -> Memory:
        src_mask = (src != PAD_ID)[:, None, None, :]
        x = self.embed(self.src_embed, src)
        for layer in self.encoder_layers:
            x = layer(x, src_mask)
        return Memory(self.encoder_norm(x), src_mask)

    def cross_kv(self, memory: Memory) -> list[KeysValues]:
        """Every decoder layer's cross-attention keys and values of the encoder states, projected once."""
        if memory.cross_kv is None:
            memory.cross_kv = [layer.cross_attn.project_kv(memory.states) for layer in self.decoder_layers]
        return memory.cross_kv

    def decode(
        self, tgt_in: torch.Tensor, memory: Memory, cache: list[dict[str, torch.Tensor]] | None = None
    ) -> torch.Tensor:
        """Decoder states [B, T, D]: of the whole target (teacher forcing, no cache) or of the tokens that
        follow those already in `cache` (decoding)."""
        offset = cache[0]["k"].size(2) if cache and "k" in cache[0] else 0
        y = self.embed(self.tgt_embed, tgt_in, offset)
        caches = cache if cache is not None else [None] * len(self.decoder_layers)
        for layer, kv, layer_cache in zip(self.decoder_layers, self.cross_kv(memory), caches, strict=True):
            y = layer(y, memory.src_mask, kv, layer_cache)
        return y

    def forward(
        self, src: torch.Tensor, tgt_in: torch.Tensor, tgt_out: torch.Tensor | None = None, label_smoothing: float = 0.0
    ) -> torch.Tensor:
        """Teacher forcing: the logits of every target position; or, given `tgt_out`, the training loss (the
        label-smoothed cross-entropy summed over the real target tokens, seq2seq/loss.py)."""
        hidden = self.decoder_norm(self.decode(tgt_in, self.encode(src)))
        if tgt_out is None:
            return self.generator(hidden)
        return output_loss(hidden, self.generator.weight, tgt_out, label_smoothing)

    def init_cache(self) -> list[dict[str, torch.Tensor]]:
        return [{} for _ in self.decoder_layers]

    def decode_step(
        self, prev: torch.Tensor, memory: Memory, cache: list[dict[str, torch.Tensor]]
    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """Log-probabilities [B, V] of the next token given the last one `prev` [B]."""
        y = self.decode(prev[:, None], memory, cache)
        return F.log_softmax(self.generator(self.decoder_norm(y[:, -1])).float(), dim=-1), cache

    @staticmethod
    def reorder_cache(cache: list[dict[str, torch.Tensor]], index: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Select batch rows of every cached tensor (for beam search / dropping finished rows)."""
        return [{k: v.index_select(0, index) for k, v in layer.items()} for layer in cache]
