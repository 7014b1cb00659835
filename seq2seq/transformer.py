"""The Transformer encoder-decoder (Vaswani et al. 2017, "Attention Is All You Need").

Names follow the paper. Layers are pre-norm by default (LayerNorm before each sublayer, as in
Wang et al. 2019 / tensor2tensor's later default), which trains stably without long warm-up;
`pre_norm=False` gives the paper's post-norm, LayerNorm(x + Sublayer(x)). Positions are the paper's
sinusoids or learned embeddings (Gehring et al. 2017). Attention uses torch's fused
scaled_dot_product_attention. Base and big are just parameters (params.yaml, presets/transformer-big.yaml).

Interface shared with every decoder-side caller (greedy/beam search, evaluation, serving):
  encode(src) -> Memory
  decode_step(prev_tokens, memory, cache) -> (log_probs, cache)   # one target position
  forward(src, tgt_in) -> logits                                  # teacher forcing
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from seq2seq.config import TransformerConfig
from seq2seq.cpu import Dropout, Linear
from seq2seq.tokenizer import PAD_ID


@dataclass
class Memory:
    """Encoder output and the source padding mask (True = real token), shape [B, 1, 1, S]."""

    states: torch.Tensor
    src_mask: torch.Tensor
    # Per decoder layer, the cross-attention keys and values of `states`, projected on the first
    # decode_step. They live here, not in the per-step cache, because beam search reorders the cache
    # every step but the memory only when sentences leave the batch: all beams of a sentence share them.
    cross_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None

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

    def __init__(self, d_model: int, n_heads: int, dropout: float, cross: bool):
        super().__init__()
        self.n_heads, self.d_head, self.cross = n_heads, d_model // n_heads, cross
        if cross:
            self.q_proj, self.kv_proj = Linear(d_model, d_model), Linear(d_model, 2 * d_model)
        else:
            self.qkv_proj = Linear(d_model, 3 * d_model)
        self.out_proj = Linear(d_model, d_model)
        self.dropout = dropout

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        """Checkpoints written before the projections were fused hold q_proj, k_proj and v_proj apart."""
        fused, parts = ("kv_proj", ("k_proj", "v_proj")) if self.cross else ("qkv_proj", ("q_proj", "k_proj", "v_proj"))
        if f"{prefix}k_proj.weight" in state_dict:
            for kind in ("weight", "bias"):
                state_dict[f"{prefix}{fused}.{kind}"] = torch.cat(
                    [state_dict.pop(f"{prefix}{p}.{kind}") for p in parts]
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.d_head).transpose(1, 2)  # [B, H, T, Dh]

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention: queries, keys and values of x, split into heads."""
        return tuple(self.split_heads(part) for part in self.qkv_proj(x).chunk(3, dim=-1))

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention: keys and values of the encoder states, split into heads."""
        return tuple(self.split_heads(part) for part in self.kv_proj(memory).chunk(2, dim=-1))

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool = False
    ) -> torch.Tensor:
        """q, k, v already projected and split into heads."""
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )
        b, h, t, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, h * d))

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor | None, mask: torch.Tensor | None, is_causal: bool = False
    ) -> torch.Tensor:
        """Self-attention over x (memory None), or cross-attention from x to the encoder's memory."""
        if self.cross:
            return self.attend(self.split_heads(self.q_proj(x)), *self.project_kv(memory), mask)
        return self.attend(*self.project_qkv(x), mask, is_causal)


class FeedForward(nn.Module):
    """Section 3.3: FFN(x) = max(0, x W1 + b1) W2 + b2."""

    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.w1, self.w2, self.dropout = Linear(d_model, d_ff), Linear(d_ff, d_model), Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.dropout(F.relu(self.w1(x))))


class Sublayer(nn.Module):
    """Residual connection with LayerNorm around a sublayer: pre-norm x + f(LN(x)) or post-norm LN(x + f(x))."""

    def __init__(self, d_model: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.norm, self.dropout, self.pre_norm = nn.LayerNorm(d_model), Dropout(dropout), pre_norm

    def forward(self, x: torch.Tensor, f) -> torch.Tensor:
        if self.pre_norm:
            return x + self.dropout(f(self.norm(x)))
        return self.norm(x + self.dropout(f(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.dropout, cross=False)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.sub1, self.sub2 = (Sublayer(cfg.d_model, cfg.dropout, cfg.pre_norm) for _ in range(2))

    def forward(self, x: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        x = self.sub1(x, lambda h: self.self_attn(h, None, src_mask))
        return self.sub2(x, self.ffn)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.dropout, cross=False)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.dropout, cross=True)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.sub1, self.sub2, self.sub3 = (Sublayer(cfg.d_model, cfg.dropout, cfg.pre_norm) for _ in range(3))

    def forward(self, y: torch.Tensor, memory: Memory) -> torch.Tensor:
        """Teacher forcing over the whole target: causal self-attention."""
        y = self.sub1(y, lambda h: self.self_attn(h, None, None, is_causal=True))
        y = self.sub2(y, lambda h: self.cross_attn(h, memory.states, memory.src_mask))
        return self.sub3(y, self.ffn)

    def step(
        self,
        y: torch.Tensor,
        memory: Memory,
        cache: dict[str, torch.Tensor],
        cross_kv: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """One new target position [B, 1, D]; `cache` holds this layer's self-attention keys/values so far."""

        def self_attention(h: torch.Tensor) -> torch.Tensor:
            q, k, v = self.self_attn.project_qkv(h)
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
            return self.self_attn.attend(q, k, v, None)

        def cross_attention(h: torch.Tensor) -> torch.Tensor:
            cross = self.cross_attn
            return cross.attend(cross.split_heads(cross.q_proj(h)), *cross_kv, memory.src_mask)

        y = self.sub1(y, self_attention)
        y = self.sub2(y, cross_attention)
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
        self.generator = Linear(cfg.d_model, vocab_size, bias=False)
        self.dropout = Dropout(cfg.dropout)
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

    def decode(self, tgt_in: torch.Tensor, memory: Memory) -> torch.Tensor:
        """Logits for every target position (teacher forcing)."""
        y = self.embed(self.tgt_embed, tgt_in)
        for layer in self.decoder_layers:
            y = layer(y, memory)
        return self.generator(self.decoder_norm(y))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.decode(tgt_in, self.encode(src))

    def init_cache(self) -> list[dict[str, torch.Tensor]]:
        return [{} for _ in self.decoder_layers]

    def decode_step(
        self, prev: torch.Tensor, memory: Memory, cache: list[dict[str, torch.Tensor]]
    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """Log-probabilities [B, V] of the next token given the last one `prev` [B]."""
        step = cache[0]["k"].size(2) if "k" in cache[0] else 0
        y = self.embed(self.tgt_embed, prev[:, None], offset=step)
        if memory.cross_kv is None:  # the encoder side is fixed during decoding: project it once
            memory.cross_kv = [layer.cross_attn.project_kv(memory.states) for layer in self.decoder_layers]
        for layer, layer_cache, kv in zip(self.decoder_layers, cache, memory.cross_kv, strict=True):
            y = layer.step(y, memory, layer_cache, kv)
        return F.log_softmax(self.generator(self.decoder_norm(y[:, -1])).float(), dim=-1), cache

    @staticmethod
    def reorder_cache(cache: list[dict[str, torch.Tensor]], index: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Select batch rows of every cached tensor (for beam search / dropping finished rows)."""
        return [{k: v.index_select(0, index) for k, v in layer.items()} for layer in cache]
