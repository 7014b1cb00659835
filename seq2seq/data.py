"""Token-id arrays on disk (a flat memmap + offsets, like nanoGPT's train.bin) and token-bucket batches.

`<prefix>.bin` holds every sentence's ids back to back; `<prefix>.idx` holds n+1 int64 offsets,
so sentence i is bin[idx[i]:idx[i+1]]. No BOS/EOS is stored: `collate` adds them.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias, TypeVar

import numpy as np

from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID

if TYPE_CHECKING:  # torch is imported where tensors are made: the tokenize stage and its workers never need it
    import torch

Batch: TypeAlias = "tuple[torch.Tensor, torch.Tensor, torch.Tensor]"  # source + EOS, BOS + target, target + EOS
T = TypeVar("T")


def _with(prefix: Path, ext: str) -> Path:
    # not Path.with_suffix: prefixes such as "train.en" already have a dot
    return prefix.with_name(prefix.name + ext)


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


class TokenArrayWriter:
    """Append sentences to `<prefix>.bin`/`.idx` as they come (nothing is kept in memory); both files appear,
    renamed from temp files, only on close()."""

    def __init__(self, prefix: Path, dtype: np.dtype):
        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        self._bin_tmp = self.prefix.with_name(f".{self.prefix.name}.bin.tmp")
        self._idx_tmp = self.prefix.with_name(f".{self.prefix.name}.idx.tmp")
        self._bin = self._bin_tmp.open("wb")
        self._idx = self._idx_tmp.open("wb")
        self._idx.write(np.zeros(1, dtype=np.int64).tobytes())
        self.sentences = self.tokens = 0

    def write(self, sentences: Iterable[Sequence[int]]) -> None:
        sentences = list(sentences)
        lengths = np.fromiter(map(len, sentences), dtype=np.int64, count=len(sentences))
        # np.array (not fromiter) so that an id the dtype cannot hold raises instead of wrapping around
        self.write_arrays(np.array(list(itertools.chain.from_iterable(sentences)), dtype=self.dtype), lengths)

    def write_arrays(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append sentences given as all their ids back to back and the length of each."""
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes())
        ends = self.tokens + np.cumsum(lengths, dtype=np.int64)
        self._idx.write(ends.tobytes())
        self.sentences += len(lengths)
        self.tokens += int(lengths.sum())

    def close(self) -> None:
        for f in (self._bin, self._idx):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        os.replace(self._bin_tmp, _with(self.prefix, ".bin"))
        os.replace(self._idx_tmp, _with(self.prefix, ".idx"))

    def abort(self) -> None:
        for f, tmp in ((self._bin, self._bin_tmp), (self._idx, self._idx_tmp)):
            f.close()
            tmp.unlink(missing_ok=True)


class TokenArray:
    """Read-only view of a `<prefix>.bin`/`.idx` pair."""

    def __init__(self, prefix: Path, dtype: np.dtype):
        prefix = Path(prefix)
        idx_path, bin_path = _with(prefix, ".idx"), _with(prefix, ".bin")
        self.offsets = np.fromfile(idx_path, dtype=np.int64)
        n_tokens = int(self.offsets[-1])
        if bin_path.stat().st_size != n_tokens * dtype.itemsize:
            raise ValueError(f"{bin_path}: size does not match {idx_path} (re-run tokenize)")
        # np.memmap refuses empty files
        self.tokens = np.memmap(bin_path, dtype=dtype, mode="r") if n_tokens else np.zeros(0, dtype=dtype)
        self.lengths = np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ids of sentences `indices`, back to back, and the length of each: one read of the memmap."""
        lengths = self.lengths[indices]
        starts = self.offsets[:-1][indices]
        # position j of the output is token (start of its sentence) + (j - where its sentence begins in the output)
        begins = np.cumsum(lengths) - lengths
        positions = np.repeat(starts - begins, lengths) + np.arange(int(lengths.sum()))
        return np.asarray(self.tokens[positions]), lengths


def token_batches(
    src_lengths: np.ndarray,
    tgt_lengths: np.ndarray,
    max_tokens: int,
    rng: np.random.Generator | None = None,
) -> list[np.ndarray]:
    """Group sentence indices into batches of similar length whose padded size fits `max_tokens`.

    The padded size of a batch is n * (max source len + max target len), counting the EOS/BOS
    that `collate` adds. Sorting by length (target, then source, then randomly within equal lengths
    when `rng` is given) keeps padding low; the batch order is shuffled with `rng`, or kept sorted
    without it. A sentence too long for the budget gets a batch of its own.

    One sort, then one cut per batch: along the sorted order the padded size of a batch that starts at
    `start` only grows with its size, so its end is a binary search over a short window, not a loop over
    its sentences.
    """
    src = np.asarray(src_lengths, dtype=np.int64) + 1
    tgt = np.asarray(tgt_lengths, dtype=np.int64) + 1
    tie = rng.random(len(src)) if rng is not None else np.arange(len(src))
    order = np.lexsort((tie, src, tgt))
    src, tgt = src[order], tgt[order]  # tgt is now non-decreasing
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        # k sentences from `start` pad to k * (max of their source lengths + the k-th target length), which is
        # at least k * (src[start] + tgt[start]): no batch can hold more than `most` of them.
        most = max_tokens // int(src[start] + tgt[start])
        end = min(len(order), start + most + 1)
        padded = np.arange(1, end - start + 1) * (np.maximum.accumulate(src[start:end]) + tgt[start:end])
        size = max(1, int(np.searchsorted(padded, max_tokens, side="right")))
        batches.append(order[start : start + size])
        start += size
    if rng is not None:
        rng.shuffle(batches)
    return batches


def pad_batch(seqs: Sequence[np.ndarray], prefix: int | None = None, suffix: int | None = None) -> torch.Tensor:
    """Stack id sequences into a [batch, max_len] int64 tensor padded with PAD_ID."""
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    return _padded(np.concatenate([np.asarray(s) for s in seqs]), lengths, prefix, suffix)


def _padded(ids: np.ndarray, lengths: np.ndarray, prefix: int | None, suffix: int | None) -> torch.Tensor:
    """Sentences given as ids back to back and their lengths, as rows of a PAD_ID-padded int64 tensor, each
    with `prefix` before it and `suffix` after it when given."""
    import torch

    first = int(prefix is not None)
    out = np.full((len(lengths), int(lengths.max()) + first + (suffix is not None)), PAD_ID, dtype=np.int64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.arange(len(ids)) - np.repeat(np.cumsum(lengths) - lengths, lengths) + first
    out[rows, cols] = ids
    if prefix is not None:
        out[:, 0] = prefix
    if suffix is not None:
        out[np.arange(len(lengths)), lengths + first] = suffix
    return torch.from_numpy(out)


def collate(src: TokenArray, tgt: TokenArray, indices: np.ndarray) -> Batch:
    """(source + EOS, BOS + target, target + EOS) padded tensors for teacher forcing."""
    src_ids, src_lengths = src.gather(indices)
    tgt_ids, tgt_lengths = tgt.gather(indices)
    return (
        _padded(src_ids, src_lengths, None, EOS_ID),
        _padded(tgt_ids, tgt_lengths, BOS_ID, None),
        _padded(tgt_ids, tgt_lengths, None, EOS_ID),
    )


class Prefetched(Iterator[T]):
    """`items`, produced `depth` ahead by a daemon thread: what the consumer gets, in the same order, is ready
    when it asks (an exception in the producer is raised at the consumer, in its place). `close` stops it."""

    def __init__(self, items: Iterator[T], depth: int) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._produce, args=(items,), name="prefetch", daemon=True)
        self.thread.start()

    def _produce(self, items: Iterator[T]) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
        except Exception as err:
            self._put(_Failed(err))
            return
        self._put(_Failed(StopIteration()))

    def _put(self, item: object) -> bool:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> T:
        item = self.queue.get()
        if isinstance(item, _Failed):
            self.queue.put(item)  # asked again, it says the same
            raise item.error
        return item

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()


@dataclass(frozen=True)
class _Failed:
    error: Exception  # StopIteration at the end of the items
