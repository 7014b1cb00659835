"""Tiny Transformers trained in a few seconds on the toy language of pipeline_fixtures, for decoding tests."""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F

from seq2seq.config import TransformerConfig
from seq2seq.data import pad_batch
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer, train_sentencepiece
from seq2seq.transformer import Transformer
from tests.pipeline_fixtures import toy_pair


def toy_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [toy_pair(rng) for _ in range(n)]


def toy_tokenizer(directory: Path, pairs: list[tuple[str, str]]) -> Tokenizer:
    """A joint SentencePiece model of the toy corpus (vocabulary ~120)."""
    directory.mkdir(parents=True, exist_ok=True)
    text = directory / "corpus.txt"
    text.write_text("".join(f"{e}\n{f}\n" for e, f in pairs), encoding="utf-8")
    train_sentencepiece([text], directory / "spm.model", 120, "unigram", 1.0, 0, 1)
    return Tokenizer(directory / "spm.model")


def tiny_transformer(vocab_size: int, seed: int, max_positions: int = 64) -> Transformer:
    torch.manual_seed(seed)
    cfg = TransformerConfig(
        d_model=32,
        n_heads=2,
        n_encoder_layers=1,
        n_decoder_layers=1,
        d_ff=64,
        dropout=0.0,
        max_positions=max_positions,
        share_embeddings=True,
        pre_norm=True,
        positions="sinusoidal",
    )
    return Transformer(cfg, vocab_size).eval()


def train_tiny(
    model: Transformer, sources: list[list[int]], targets: list[list[int]], steps: int, seed: int = 0
) -> Transformer:
    """Teacher-forced cross-entropy with Adam on random batches of 32 pairs."""
    rng = random.Random(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        idx = [rng.randrange(len(sources)) for _ in range(32)]
        src = pad_batch([sources[i] for i in idx], suffix=EOS_ID)
        tgt_in = pad_batch([targets[i] for i in idx], prefix=BOS_ID)
        tgt_out = pad_batch([targets[i] for i in idx], suffix=EOS_ID)
        logits = model(src, tgt_in)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt_out.reshape(-1), ignore_index=PAD_ID)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.inference_mode()
def sequence_log_prob(model, source: list[int], tokens: list[int], with_eos: bool = True) -> float:
    """log P(tokens [+ EOS] | source) by teacher forcing: the number beam search should report."""
    src = torch.tensor([[*source, EOS_ID]])
    target = [*tokens, EOS_ID] if with_eos else list(tokens)
    logits = model(src, torch.tensor([[BOS_ID, *target[:-1]]]))
    log_probs = F.log_softmax(logits.float(), dim=-1)[0]
    return float(log_probs[torch.arange(len(target)), torch.tensor(target)].sum())
