"""Tokenizer round trip, token arrays on disk and token-bucket batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seq2seq.data import TokenArray, TokenArrayWriter, collate, dtype_for, pad_batch, token_batches
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer, train_sentencepiece
from tests.pipeline_fixtures import toy_pair


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    import random

    rng = random.Random(0)
    tmp = tmp_path_factory.mktemp("spm")
    pairs = [toy_pair(rng) for _ in range(300)]
    (tmp / "train.en").write_text("".join(e + "\n" for e, _ in pairs))
    (tmp / "train.fr").write_text("".join(f + "\n" for _, f in pairs) + "Élodie mange une pomme à Noël.\n")
    train_sentencepiece([tmp / "train.en", tmp / "train.fr"], tmp / "spm.model", 100, "unigram", 1.0, 0, num_threads=1)
    return Tokenizer(tmp / "spm.model")


def test_tokenizer_round_trip(tokenizer: Tokenizer) -> None:
    texts = ["the big dog sees a red ball .", "Élodie mange une pomme à Noël.", ""]
    ids = tokenizer.encode(texts)
    assert all(PAD_ID not in s and EOS_ID not in s for s in ids)
    assert tokenizer.decode(ids) == texts


def test_token_array_round_trip(tmp_path) -> None:
    sentences = [[5, 6, 7], [], [70000, 8]]
    writer = TokenArrayWriter(tmp_path / "train.en", dtype_for(80000))
    writer.write(sentences)
    writer.close()
    arr = TokenArray(tmp_path / "train.en", dtype_for(80000))
    assert [arr[i].tolist() for i in range(len(arr))] == sentences
    assert arr.lengths.tolist() == [3, 0, 2]
    assert dtype_for(8000) == np.uint16 and dtype_for(80000) == np.uint32


def test_token_array_detects_truncated_bin(tmp_path) -> None:
    writer = TokenArrayWriter(tmp_path / "dev.fr", np.dtype(np.uint16))
    writer.write([[1, 2, 3, 4]])
    writer.close()
    with (tmp_path / "dev.fr.bin").open("r+b") as f:
        f.truncate(4)
    with pytest.raises(ValueError, match=r"dev\.fr\.bin"):
        TokenArray(tmp_path / "dev.fr", np.dtype(np.uint16))


def test_aborted_writer_leaves_nothing(tmp_path) -> None:
    writer = TokenArrayWriter(tmp_path / "train.en", np.dtype(np.uint16))
    writer.write([[1, 2]])
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_token_batches_respect_budget_and_cover_every_sentence() -> None:
    rng = np.random.default_rng(0)
    src_len = rng.integers(1, 40, size=500)
    tgt_len = rng.integers(1, 40, size=500)
    batches = token_batches(src_len, tgt_len, max_tokens=300, rng=np.random.default_rng(1))
    seen = np.sort(np.concatenate(batches))
    assert seen.tolist() == list(range(500))
    for b in batches:
        padded = len(b) * (src_len[b].max() + 1 + tgt_len[b].max() + 1)
        assert padded <= 300 or len(b) == 1
    # same seed, same batches: what exact resume relies on
    again = token_batches(src_len, tgt_len, max_tokens=300, rng=np.random.default_rng(1))
    assert all((a == b).all() for a, b in zip(batches, again, strict=True))


def test_collate_adds_bos_eos_and_pads(tmp_path) -> None:
    for lang, sentences in (("en", [[5, 6], [7], []]), ("fr", [[8], [9, 10, 11], [12]])):
        writer = TokenArrayWriter(tmp_path / f"train.{lang}", np.dtype(np.uint16))
        writer.write(sentences)
        writer.close()
    src, tgt = (TokenArray(tmp_path / f"train.{lang}", np.dtype(np.uint16)) for lang in ("en", "fr"))
    s, t_in, t_out = collate(src, tgt, np.array([0, 1]))
    assert s.tolist() == [[5, 6, EOS_ID], [7, EOS_ID, PAD_ID]]
    assert t_in.tolist() == [[BOS_ID, 8, PAD_ID, PAD_ID], [BOS_ID, 9, 10, 11]]
    assert t_out.tolist() == [[8, EOS_ID, PAD_ID, PAD_ID], [9, 10, 11, EOS_ID]]
    assert s.dtype == t_in.dtype == t_out.dtype == torch.int64
    s, t_in, _ = collate(src, tgt, np.array([2, 1]))  # any order, an empty sentence
    assert s.tolist() == [[EOS_ID, PAD_ID], [7, EOS_ID]]
    assert t_in.tolist() == [[BOS_ID, 12, PAD_ID, PAD_ID], [BOS_ID, 9, 10, 11]]


def reference_pad_batch(seqs: list[np.ndarray], prefix: int | None = None, suffix: int | None = None) -> np.ndarray:
    """pad_batch as it was before it was vectorised: a loop over the rows."""
    extra = (prefix is not None) + (suffix is not None)
    out = np.full((len(seqs), max(len(s) for s in seqs) + extra), PAD_ID, dtype=np.int64)
    for row, s in enumerate(seqs):
        col = 0
        if prefix is not None:
            out[row, 0] = prefix
            col = 1
        out[row, col : col + len(s)] = s
        if suffix is not None:
            out[row, col + len(s)] = suffix
    return out


@pytest.mark.parametrize("prefix, suffix", [(None, None), (BOS_ID, None), (None, EOS_ID), (BOS_ID, EOS_ID)])
def test_pad_batch_equals_the_row_by_row_loop(prefix: int | None, suffix: int | None) -> None:
    rng = np.random.default_rng(0)
    seqs = [rng.integers(4, 1000, n) for n in [0, 5, 1, 17, 0, 3]]
    assert pad_batch(seqs, prefix, suffix).numpy().tolist() == reference_pad_batch(seqs, prefix, suffix).tolist()


def reference_token_batches(
    src_lengths: np.ndarray, tgt_lengths: np.ndarray, max_tokens: int, rng: np.random.Generator | None = None
) -> list[np.ndarray]:
    """token_batches as it was before it was vectorised: a Python loop over the sorted sentences."""
    src_lengths = np.asarray(src_lengths) + 1
    tgt_lengths = np.asarray(tgt_lengths) + 1
    tie = rng.random(len(src_lengths)) if rng is not None else np.arange(len(src_lengths))
    order = np.lexsort((tie, src_lengths, tgt_lengths))
    batches: list[np.ndarray] = []
    start, max_s, max_t = 0, 0, 0
    for pos, i in enumerate(order):
        s, t = int(src_lengths[i]), int(tgt_lengths[i])
        new_s, new_t = max(max_s, s), max(max_t, t)
        if pos > start and (pos - start + 1) * (new_s + new_t) > max_tokens:
            batches.append(order[start:pos])
            start, new_s, new_t = pos, s, t
        max_s, max_t = new_s, new_t
    if start < len(order):
        batches.append(order[start:])
    if rng is not None:
        rng.shuffle(batches)
    return batches


LENGTH_CASES = {
    "random": (np.random.default_rng(2).integers(0, 120, 3000), np.random.default_rng(3).integers(0, 120, 3000)),
    "empty": (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)),
    "one": (np.array([7]), np.array([9])),
    "all equal": (np.full(500, 10), np.full(500, 10)),
    "zero lengths": (np.zeros(200, dtype=np.int64), np.zeros(200, dtype=np.int64)),
    "some over budget": (np.array([5, 400, 3, 900, 2, 2, 2]), np.array([4, 10, 800, 1, 3, 3, 3])),
    "long tail": (
        np.random.default_rng(4).zipf(1.6, 2000).clip(max=1000),
        np.random.default_rng(5).zipf(1.6, 2000).clip(max=1000),
    ),
}


@pytest.mark.parametrize("case", LENGTH_CASES)
@pytest.mark.parametrize("max_tokens", [1, 2, 50, 300, 4096])
@pytest.mark.parametrize("seed", [None, 0, 7])
def test_vectorised_token_batches_equal_the_reference_loop(case: str, max_tokens: int, seed: int | None) -> None:
    src_len, tgt_len = LENGTH_CASES[case]
    rng = None if seed is None else np.random.default_rng(seed)
    ref_rng = None if seed is None else np.random.default_rng(seed)
    got = token_batches(src_len, tgt_len, max_tokens, rng)
    want = reference_token_batches(src_len, tgt_len, max_tokens, ref_rng)
    assert [b.tolist() for b in got] == [b.tolist() for b in want]
    if rng is not None:  # the generator is left in the same state, so the next epoch's batches match too
        assert rng.random() == ref_rng.random()


def test_prefetched_gives_the_items_in_order_then_the_producers_end_or_error() -> None:
    import itertools
    import threading

    from seq2seq.data import Prefetched

    assert list(Prefetched(iter(range(500)), depth=3)) == list(range(500))

    def failing():
        yield from (1, 2)
        raise ValueError("bad batch file")

    items = Prefetched(failing(), depth=4)
    assert [next(items), next(items)] == [1, 2]
    with pytest.raises(ValueError, match="bad batch file"):
        next(items)

    endless = Prefetched(itertools.count(), depth=2)
    assert [next(endless) for _ in range(5)] == [0, 1, 2, 3, 4]
    endless.close()
    assert not endless.thread.is_alive() and "prefetch" not in [t.name for t in threading.enumerate()]
