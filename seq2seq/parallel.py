"""Big text files cut into line-aligned byte ranges, and ordered work on them over a pool of processes.

The main process only finds where each range of lines starts and ends (`line_ranges`, a scan for newlines);
workers read their range (`read_range`), do the work and send back compact results (large ones through a
shared file, `SlotFile`); `ordered_map` hands the results back in input order. So a stage's output is the
same, byte for byte, whatever the number of processes, and its memory holds a few chunks at a time whatever
the corpus size.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import mmap
import multiprocessing
import multiprocessing.forkserver
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from seq2seq.textio import TextFormatError

T = TypeVar("T")
R = TypeVar("R")
BLOCK_BYTES = 1 << 22  # read size of the newline scan
NEWLINE_WINDOW = 1 << 18  # bytes of a block whose newlines are counted at once
IN_FLIGHT_PER_WORKER = 2  # tasks per worker process that ordered_map keeps submitted


def worker_count(processes: int) -> int:
    """processes, or every core this process may run on when it is 0."""
    return processes or len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class LineRange:
    """Lines first_line .. first_line + lines - 1 (1-based) of `path`: its bytes start .. end."""

    path: Path
    start: int
    end: int
    first_line: int
    lines: int


def line_ranges(path: Path, lines_per_range: int) -> list[LineRange]:
    """`path` cut into ranges of `lines_per_range` lines (the last may be shorter); a last line needs no newline."""
    path = Path(path)
    ranges: list[LineRange] = []
    start, pending, offset = 0, 0, 0  # the open range: its first byte, its newlines so far; bytes read
    last = b"\n"
    block = bytearray(BLOCK_BYTES)  # read into, again and again: a new 4 MB bytes per read costs page faults
    with path.open("rb", buffering=0) as f:
        while size := f.readinto(block):
            # numpy marks the newlines (bytes.count is 4x slower) and counts them a window at a time; only in a
            # window where a range ends does it list them all to find exactly where.
            newline = np.frombuffer(block, dtype=np.uint8, count=size) == ord("\n")
            for window_start in range(0, size, NEWLINE_WINDOW):
                window = newline[window_start : window_start + NEWLINE_WINDOW]
                newlines = int(np.count_nonzero(window))
                if pending + newlines >= lines_per_range:
                    ends = offset + window_start + np.flatnonzero(window) + 1
                    for end in ends[lines_per_range - pending - 1 :: lines_per_range].tolist():
                        ranges.append(LineRange(path, start, end, len(ranges) * lines_per_range + 1, lines_per_range))
                        start = end
                pending = (pending + newlines) % lines_per_range
            offset += size
            last = bytes(block[size - 1 : size])
    if offset > start:  # the lines after the last full range, the last one perhaps without a newline
        lines = pending + (last != b"\n")
        ranges.append(LineRange(path, start, offset, len(ranges) * lines_per_range + 1, lines))
    return ranges


def aligned_ranges(src: Path, tgt: Path, lines_per_range: int) -> list[tuple[LineRange, LineRange]]:
    """Ranges of the same lines of two aligned files; raise naming both files if their line counts differ."""
    a, b = line_ranges(src, lines_per_range), line_ranges(tgt, lines_per_range)
    n_a, n_b = sum(r.lines for r in a), sum(r.lines for r in b)
    if n_a != n_b:
        short, long_, n = (src, tgt, n_a) if n_a < n_b else (tgt, src, n_b)
        raise TextFormatError(f"misaligned corpus: {short} ends after {n} lines but {long_} has a line {n + 1}")
    return list(zip(a, b, strict=True))


def range_bytes(r: LineRange) -> bytes:
    """The bytes of a range, as they are in the file."""
    with r.path.open("rb") as f:
        f.seek(r.start)
        return f.read(r.end - r.start)


def line_offsets(data: bytes) -> np.ndarray:
    """Where each line of `data` (a range's bytes) starts, then where the last one ends: line i is
    data[offsets[i] : offsets[i + 1]], its newline included (the file's last line may have none). Found by numpy,
    without a Python object per line."""
    ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == ord("\n")) + 1
    if not data.endswith(b"\n"):
        ends = np.append(ends, len(data))  # the file's last line, without a newline
    return np.concatenate([[0], ends]).astype(np.int64)


def read_range(r: LineRange) -> list[str]:
    """The lines of a range without their newline (nor a "\\r" before it), decoded strictly as UTF-8."""
    data = range_bytes(r)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        lineno = r.first_line + data.count(b"\n", 0, err.start)
        raise TextFormatError(
            f"{r.path}:{lineno}: not valid UTF-8 ({err.reason} at byte {err.start - line_start})"
        ) from None
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    if "\r" in text:
        lines = [line.rstrip("\r") for line in lines]
    return lines


def start_server(fn: Callable[..., Any], processes: int) -> None:
    """Start, in the background, the server that `ordered_map(fn, ..., processes)` will fork its workers from.

    Its start-up (a new interpreter importing fn's module) then runs beside whatever the caller does first,
    such as cutting the inputs into ranges, instead of before the first chunk. Nothing to do for one process.
    """
    if worker_count(processes) > 1:
        _preload(fn)
        multiprocessing.forkserver.ensure_running()


def _preload(fn: Callable[..., Any]) -> multiprocessing.context.BaseContext:
    # forkserver: workers start from a clean process, not a copy of one whose threads (torch, pyarrow, rich's
    # refresh) may hold locks; the module that defines fn is imported once, in the server, not in every worker.
    context = multiprocessing.get_context("forkserver")
    if fn.__module__ != "__main__":
        context.set_forkserver_preload([fn.__module__])
    return context


def ordered_map(
    fn: Callable[[T], R],
    tasks: Iterable[T],
    processes: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
) -> Iterator[R]:
    """fn(task) for every task, in order, on `processes` worker processes (0 = every core).

    One process runs everything here, in this process. Otherwise at most IN_FLIGHT_PER_WORKER tasks per worker
    are in flight, so results never pile up in memory; task i + IN_FLIGHT_PER_WORKER * n is submitted only once the
    caller has taken result i and asks for the next (what `SlotFile` relies on). A worker's exception is raised
    here, and the pool is shut down.
    """
    n = worker_count(processes)
    if n == 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, tasks)
        return
    context = _preload(fn)
    pending: collections.deque[Future[R]] = collections.deque()
    with ProcessPoolExecutor(n, mp_context=context, initializer=initializer, initargs=initargs) as pool:
        try:
            for task in tasks:
                if len(pending) >= IN_FLIGHT_PER_WORKER * n:
                    yield pending.popleft().result()
                pending.append(pool.submit(fn, task))
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


class SlotFile:
    """A memory-mapped file of equal slots, one per task that `ordered_map` keeps in flight, into which worker
    processes put their results and from which the main process reads them: instead of a result going through
    the pool's pipe (pickled, copied into and out of the pipe, unpickled), which for clean's 3 MB chunks was
    most of what two processes cost over one.

    Task i uses slot i % slots. ordered_map submits task i + slots only after the caller has taken result i and
    asked for the next one, so by then the caller is done with slot i.
    """

    def __init__(self, path: Path, slots: int, slot_bytes: int) -> None:
        self.path, self.slots, self.slot_bytes = Path(path), slots, slot_bytes
        self._map: mmap.mmap | None = None

    @classmethod
    def create(cls, path: Path, processes: int, slot_bytes: int) -> SlotFile:
        """A new file at `path` with a slot of `slot_bytes` per task in flight on `processes` workers."""
        slots = IN_FLIGHT_PER_WORKER * worker_count(processes)
        with open(path, "xb") as f:
            f.truncate(slots * slot_bytes)
            try:  # the blocks on disk now: a full disk fails here, not as a SIGBUS in a worker writing to the map
                os.posix_fallocate(f.fileno(), 0, slots * slot_bytes)
            except AttributeError:  # not on macOS
                pass
            except OSError as err:
                if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # a file system without it: sparse, then
                    raise
        return cls(path, slots, slot_bytes)

    def __getstate__(self) -> tuple[Path, int, int]:  # sent to the workers: the path, not the map
        return self.path, self.slots, self.slot_bytes

    def __setstate__(self, state: tuple[Path, int, int]) -> None:
        self.__init__(*state)

    @property
    def buffer(self) -> mmap.mmap:
        if self._map is None:
            with open(self.path, "r+b") as f:
                self._map = mmap.mmap(f.fileno(), self.slots * self.slot_bytes)
        return self._map

    def put(self, task_index: int, blocks: list[bytes]) -> list[int] | None:
        """Copy `blocks` one after the other into the task's slot: where each starts, or None if they do not fit."""
        if sum(map(len, blocks)) > self.slot_bytes:
            return None
        offset, offsets = (task_index % self.slots) * self.slot_bytes, []
        for block in blocks:
            self.buffer[offset : offset + len(block)] = block
            offsets.append(offset)
            offset += len(block)
        return offsets

    def view(self, start: int, end: int) -> memoryview:
        return memoryview(self.buffer)[start:end]

    def close(self) -> None:
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view still held (by an error's traceback) unmaps it later
                self._map.close()
            self._map = None
