"""Decoding through the shared model interface (encode / decode_step / reorder_cache): greedy search, and
one batching path that runs it, or beam search (seq2seq/beam.py), over many sentences."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from seq2seq.beam import Hypothesis, beam_search
from seq2seq.config import DecodingParams
from seq2seq.data import pad_batch
from seq2seq.progress import Progress
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


def source_batches(lengths: Sequence[int], max_sentences: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """Indices of length-sorted batches of source sentences for decoding: each holds at most `max_sentences`
    rows and, with `max_tokens`, at most that many padded tokens (rows x its longest); a longer single
    sentence gets a batch of its own. (Training batches pair sources with targets: seq2seq.data.token_batches.)"""
    order = np.argsort(np.asarray(lengths), kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        end = start + 1
        while (
            end < len(order)
            and end - start < max_sentences
            and (max_tokens is None or (end + 1 - start) * lengths[order[end]] <= max_tokens)
        ):
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


def decode_in_batches(
    model,
    sources: Sequence[Sequence[int]],
    batches: list[np.ndarray],
    max_len_a: float,
    max_len_b: int,
    search: Callable[[torch.Tensor, torch.Tensor], list],
    device: torch.device,
    progress: Progress | None = None,
) -> list:
    """search(src, max_len) on each batch of `sources`; the results come back in input order.

    Sources longer than the model's positions are cut to fit, keeping one for EOS (callers that can name
    the line warn first). A sentence may have a * (source tokens + EOS) + b target tokens at most.
    """
    max_positions = model.cfg.max_positions
    results: list = [None] * len(sources)
    for idx in batches:
        batch = [np.asarray(sources[i][: max_positions - 1], dtype=np.int64) for i in idx]
        src = pad_batch(batch, suffix=EOS_ID).to(device)
        src_len = torch.tensor([len(s) + 1 for s in batch])
        max_len = torch.clamp((max_len_a * src_len + max_len_b).long(), max=max_positions)
        for i, result in zip(idx, search(src, max_len), strict=True):
            results[i] = result
        if progress is not None:
            progress.advance(len(idx))
    return results


def translate_ids(
    model,
    sources: Sequence[Sequence[int]],
    batch_size: int,
    max_len_a: float,
    max_len_b: int,
    device: torch.device,
) -> list[list[int]]:
    """Greedy-translate id sequences in length-sorted batches of `batch_size`; results come back in input order."""
    batches = source_batches([len(s) for s in sources], batch_size)

    def greedy(src: torch.Tensor, max_len: torch.Tensor) -> list[list[int]]:
        return greedy_decode(model, src, max_len)

    return decode_in_batches(model, sources, batches, max_len_a, max_len_b, greedy, device)


def translate_nbest(
    model,
    sources: Sequence[Sequence[int]],
    opts: DecodingParams,
    device: torch.device,
    progress: Progress | None = None,
) -> list[list[Hypothesis]]:
    """Beam-search id sequences in length-sorted batches (opts.batch_size sentences, opts.max_tokens source
    tokens); n-best lists come back in input order."""
    lengths = [min(len(s), model.cfg.max_positions - 1) + 1 for s in sources]  # as decoded: cut to fit, plus EOS
    batches = source_batches(lengths, opts.batch_size, opts.max_tokens)

    def beam(src: torch.Tensor, max_len: torch.Tensor) -> list[list[Hypothesis]]:
        return beam_search(model, src, max_len, opts.beam_size, opts.length_penalty, opts.nbest)

    return decode_in_batches(model, sources, batches, opts.max_len_a, opts.max_len_b, beam, device, progress)
