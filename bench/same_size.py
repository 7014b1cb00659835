"""Our Transformer's config and a Hugging Face MarianMTModel of the same dimensions, for the benchmarks.

Both benchmarks (`train_throughput.py`, `decode_speed.py`) build their pair of models from here, so the
peer is sized, regularised and tokenised the same way in each.
"""

from __future__ import annotations

from seq2seq.config import TransformerConfig
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID


def demo_size_config(
    d_model: int, heads: int, layers: int, d_ff: int, dropout: float, max_positions: int = 256
) -> TransformerConfig:
    """Our pre-norm, shared-embedding Transformer at the given sizes (the demo preset's by default)."""
    return TransformerConfig(
        d_model=d_model,
        n_heads=heads,
        n_encoder_layers=layers,
        n_decoder_layers=layers,
        d_ff=d_ff,
        dropout=dropout,
        max_positions=max_positions,
        share_embeddings=True,
        pre_norm=True,
        positions="sinusoidal",
    )


def marian_same_size(cfg: TransformerConfig, vocab_size: int):
    """A randomly initialised MarianMTModel with `cfg`'s dimensions, dropout and special ids (no download)."""
    from transformers import MarianConfig, MarianMTModel

    config = MarianConfig(
        vocab_size=vocab_size,
        decoder_vocab_size=vocab_size,
        d_model=cfg.d_model,
        encoder_layers=cfg.n_encoder_layers,
        decoder_layers=cfg.n_decoder_layers,
        encoder_attention_heads=cfg.n_heads,
        decoder_attention_heads=cfg.n_heads,
        encoder_ffn_dim=cfg.d_ff,
        decoder_ffn_dim=cfg.d_ff,
        activation_function="relu",
        max_position_embeddings=cfg.max_positions,
        dropout=cfg.dropout,
        attention_dropout=cfg.dropout,
        activation_dropout=cfg.dropout,  # ours drops out inside the FFN too (tensor2tensor relu_dropout)
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        decoder_start_token_id=BOS_ID,
        forced_eos_token_id=None,
    )
    return MarianMTModel(config)
