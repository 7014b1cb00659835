"""Decoding through the shared model interface (encode / decode_step / reorder_cache): greedy search,
and batching for beam search (seq2seq/beam.py)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from seq2seq.beam import Hypothesis, beam_search
from seq2seq.config import DecodingParams
from seq2seq.data import pad_batch
from seq2seq.tokenizer import BOS_ID, EOS_ID


@torch.inference_mode()
def greedy_decode(model, src: torch.Tensor, max_len: torch.Tensor) -> list[list[int]]:
    """Batched greedy search: the most likely token at each step, until EOS or `max_len` [B] tokens.

    Rows that finish are dropped from the batch so later steps only compute live sentences.
    """
    model.eval()
    batch = src.size(0)
    memory = model.encode(src)
    cache = model.init_cache()
    prev = torch.full((batch,), BOS_ID, dtype=torch.long, device=src.device)
    live = torch.arange(batch, device=src.device)  # original row of each live row
    out: list[list[int]] = [[] for _ in range(batch)]
    max_len = max_len.to(src.device)
    for step in range(int(max_len.max())):
        log_probs, cache = model.decode_step(prev, memory, cache)
        prev = log_probs.argmax(dim=-1)
        tokens = prev.tolist()
        for row, tok in zip(live.tolist(), tokens, strict=True):
            if tok != EOS_ID:
                out[row].append(tok)
        keep = (prev != EOS_ID) & (max_len[live] > step + 1)
        if not bool(keep.any()):
            break
        if not bool(keep.all()):
            index = keep.nonzero().squeeze(1)
            live, prev = live[index], prev[index]
            memory = memory.index_select(index)
            cache = model.reorder_cache(cache, index)
    return out


def translate_ids(
    model,
    sources: Sequence[Sequence[int]],
    batch_size: int,
    max_len_a: float,
    max_len_b: int,
    device: torch.device,
) -> list[list[int]]:
    """Greedy-translate id sequences in length-sorted batches; results come back in input order."""
    lengths = np.array([len(s) for s in sources])
    order = np.argsort(lengths, kind="stable")
    results: list[list[int]] = [[] for _ in sources]
    max_positions = model.cfg.max_positions
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        # keep room for EOS within the model's positions; longer inputs are truncated by the caller
        seqs = [np.asarray(sources[i][: max_positions - 1], dtype=np.int64) for i in idx]
        src = pad_batch(seqs, suffix=EOS_ID).to(device)
        src_len = torch.tensor([len(s) + 1 for s in seqs])
        max_len = torch.clamp((max_len_a * src_len + max_len_b).long(), max=max_positions)
        for i, hyp in zip(idx, greedy_decode(model, src, max_len), strict=True):
            results[i] = hyp
    return results


def token_batches(lengths: Sequence[int], max_tokens: int, max_sentences: int) -> list[np.ndarray]:
    """Indices of length-sorted batches: each holds at most `max_sentences` rows and `max_tokens`
    padded tokens (rows x its longest); a longer single sentence gets a batch of its own."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        end = start + 1
        while (
            end < len(order) and end - start < max_sentences and (end + 1 - start) * lengths[order[end]] <= max_tokens
        ):
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


def translate_nbest(
    model, sources: Sequence[Sequence[int]], opts: DecodingParams, device: torch.device
) -> list[list[Hypothesis]]:
    """Beam-search id sequences in length-sorted token batches; n-best lists come back in input order.

    Sources longer than the model's positions are cut to fit (callers that can name the line warn first).
    """
    max_positions = model.cfg.max_positions
    seqs = [np.asarray(s[: max_positions - 1], dtype=np.int64) for s in sources]  # room for EOS
    results: list[list[Hypothesis]] = [[] for _ in sources]
    for idx in token_batches([len(s) + 1 for s in seqs], opts.max_tokens, opts.batch_size):
        batch = [seqs[i] for i in idx]
        src = pad_batch(batch, suffix=EOS_ID).to(device)
        src_len = torch.tensor([len(s) + 1 for s in batch])
        max_len = torch.clamp((opts.max_len_a * src_len + opts.max_len_b).long(), max=max_positions)
        hyps = beam_search(model, src, max_len, opts.beam_size, opts.length_penalty, opts.nbest)
        for i, h in zip(idx, hyps, strict=True):
            results[i] = h
    return results
