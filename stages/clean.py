"""clean: normalise every split, filter the training pairs, write data/clean and metrics/clean.json.

Train pairs go through the rules below (first failing rule is counted); dev and test sets are only
normalised, line for line, so they stay aligned with their references.

The input is cut into chunks of clean.chunk_lines pairs, spread over clean.processes worker processes
(0 = every core). A worker normalises its chunk, applies the length rules, hashes the surviving pairs and
(with clean.langid) identifies their language; the main process takes the chunks back in order, drops
pairs already seen in earlier chunks and writes. The only state that grows with the corpus is that set of
hashes, a table of 8-byte slots sized for the number of train pairs (`HashSet`). The output is the same
whatever the number of processes. A worker leaves its chunk's lines in a memory-mapped file (`SlotFile`) and
sends back only their sizes and hashes.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import re
import sys
import tempfile
import time
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from hashlib import blake2b
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from seq2seq import cli, paths
from seq2seq.config import CleanParams, Params, ParamsError, load_params
from seq2seq.parallel import (
    LineRange,
    SlotFile,
    aligned_ranges,
    line_offsets,
    ordered_map,
    range_bytes,
    read_range,
    start_server,
    worker_count,
)
from seq2seq.progress import Progress
from seq2seq.textio import TextFormatError, atomic_write, write_json

DROP_RULES = ("empty", "too_short", "too_long", "length_ratio", "duplicate", "langid")


# --- normalisation ---------------------------------------------------------------------------


def _char_class(chars: Iterable[str]) -> str:
    """A regex character class of literal characters, as ranges (same meaning for Python re and RE2)."""
    cps = sorted(ord(c) for c in chars)
    parts = []
    for _, run in itertools.groupby(enumerate(cps), key=lambda p: p[1] - p[0]):
        run_cps = [cp for _, cp in run]
        first, last = chr(run_cps[0]), chr(run_cps[-1])
        parts.append(first if first == last else f"{first}-{last}")
    return "[" + "".join(parts) + "]"


@functools.cache
def _patterns() -> tuple[str, str]:
    """(invisible, whitespace-run) patterns, built once from this Python's Unicode tables.

    The whitespace pattern matches only the runs that must change: any run holding a whitespace character
    other than a plain space, or two or more spaces. A single space stays as it is, which is what replacing
    every run by one space would do too, but most lines then have nothing to replace.
    """
    # Every code point but the surrogates (category Cs, not whitespace) as one string, scanned below by C loops:
    # every worker process builds these patterns, and Python loops over 1.1M code points take twice as long.
    code_points = np.arange(sys.maxunicode + 1, dtype="<u4")
    all_chars = code_points[(code_points < 0xD800) | (code_points > 0xDFFF)].tobytes().decode("utf-32-le")
    # Whitespace is everything str.isspace() accepts (Python's \s is exactly that): tab, CR, VT, FF, U+0085,
    # NBSP, U+2028, ... . Whitespace controls become a space (not nothing) so words they separated stay
    # separate, and no Unicode line break survives to split a line for a later reader.
    whitespace = re.findall(r"\s", all_chars)
    # Every other control (Cc) or format (Cf) char is invisible noise: BOM U+FEFF, zero-width
    # space/joiners U+200B-U+200D, bidi marks, soft hyphen. (Removing ZWJ/ZWNJ is wrong for
    # scripts that need them, e.g. Persian; fine for the European pairs this pipeline targets.)
    controls = itertools.compress(all_chars, map({"Cc", "Cf"}.__contains__, map(unicodedata.category, all_chars)))
    invisible = [c for c in controls if not c.isspace()]
    # Literal characters rather than \s or \uXXXX: pyarrow's RE2 engine runs these, and its \s would
    # miss most Unicode whitespace (tests check every code point against str.isspace and unicodedata).
    space, other_space = _char_class(whitespace), _char_class([c for c in whitespace if c != " "])
    return _char_class(invisible), f"{other_space}{space}*| {space}+"


def normalize_array(lines: pa.Array, form: str, patterns: tuple[str, str] | None = None) -> pa.Array:
    """Remove invisible chars, Unicode-normalise (NFC/NFKC/none), collapse whitespace to one space, strip.
    `patterns`: _patterns(), if the caller has them already."""
    invisible, whitespace_run = patterns or _patterns()
    # Invisibles go first so that e.g. "e<ZWSP><combining acute>" still composes to "é".
    lines = pc.replace_substring_regex(lines, invisible, "")
    if form != "none":
        lines = _unicode_normalize(lines, form)
    # After normalising, because NFKC turns NBSP, ideographic space etc. into plain spaces.
    return pc.utf8_trim(pc.replace_substring_regex(lines, whitespace_run, " "), " ")


def _unicode_normalize(lines: pa.Array, form: str) -> pa.Array:
    """unicodedata.normalize on each line that is not pure ASCII (ASCII is the same in every form).

    Not pyarrow's utf8_normalize: pyarrow 25 returns "à" decomposed for NFC.
    """
    non_ascii = pc.invert(pc.string_is_ascii(lines))
    todo = lines.filter(non_ascii).to_pylist()
    if not todo:
        return lines
    done = _string_array([unicodedata.normalize(form, line) for line in todo]).cast(lines.type)
    return pc.replace_with_mask(lines, non_ascii, done)


def _string_array(strings: list[str]) -> pa.Array:
    """An Arrow string array made from the strings' UTF-8 bytes. Not pa.array, nor a comparison with a str
    scalar: those import pandas (0.2 s), in every worker process."""
    encoded = [s.encode() for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
    return pa.LargeStringArray.from_buffers(len(encoded), pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded)))


def normalize(lines: Sequence[str], form: str) -> list[str]:
    """normalize_array for Python strings."""
    return normalize_array(pa.array(lines, type=pa.large_string()), form).to_pylist()


def token_counts(lines: pa.Array) -> np.ndarray:
    """Whitespace-token counts of already-normalised lines (single spaces, stripped; "" counts 0).

    Read from the array's buffers, as the spaces before a line's end minus those before its start: 4x faster
    than pc.count_substring, and Array.to_numpy would import pandas in every worker process.
    """
    lines = lines.cast(pa.large_string())
    _, offsets_buffer, data = lines.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int64)[lines.offset : lines.offset + len(lines) + 1]
    spaces = np.flatnonzero(np.frombuffer(data if data is not None else b"", dtype=np.uint8) == ord(" "))
    counts = np.diff(np.searchsorted(spaces, offsets)) + 1
    counts[np.diff(offsets) == 0] = 0
    return counts


# --- deduplication -----------------------------------------------------------------------------


class HashSet:
    """A set of uint64 hashes: an open-addressing table (linear probing) in one numpy array, looked up and
    filled a whole batch at a time. 8 bytes per slot, at most 3/4 of the slots used (a Python set of ints
    takes ~70 bytes per element); sized once from the number of pairs to expect, doubled if that was short.

    Each round of a lookup reads every pending hash's slot: found where it holds the hash, absent where it is
    empty (0), otherwise the hash moves on to the next slot. About 1.5 rounds per hash at half load, whatever
    the set's size (sorted runs and binary search took 5x longer at 4M pairs, and grew with the corpus).
    """

    MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing spreads even non-random keys over the slots

    def __init__(self, expected: int = 0) -> None:
        bits = max(10, math.ceil(math.log2(max(expected, 1) * 4 / 3)))
        self._slots = np.zeros(1 << bits, dtype=np.uint64)  # 0 = empty; a power of two
        self._used = 0
        self._has_zero = False  # the hash 0 itself, which cannot be stored as it marks empty slots

    def __len__(self) -> int:
        return self._used + self._has_zero

    def _home(self, hashes: np.ndarray) -> np.ndarray:
        """Each hash's first slot: the top bits of hash x MULTIPLIER (mod 2^64)."""
        bits = len(self._slots).bit_length() - 1
        return ((hashes * self.MULTIPLIER) >> np.uint64(64 - bits)).astype(np.intp)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """Boolean mask: which of `hashes` are in the set."""
        found = np.zeros(len(hashes), dtype=bool)
        found[hashes == 0] = self._has_zero
        pending = np.flatnonzero(hashes)
        slot, last = self._home(hashes[pending]), len(self._slots) - 1
        while len(pending):
            held = self._slots[slot]
            hit = held == hashes[pending]
            found[pending[hit]] = True
            probe_on = ~hit & (held != 0)
            pending, slot = pending[probe_on], (slot[probe_on] + 1) & last
        return found

    def add(self, hashes: np.ndarray) -> None:
        """Add distinct hashes that are not in the set yet."""
        if (hashes == 0).any():
            self._has_zero, hashes = True, hashes[hashes != 0]
        while 4 * (self._used + len(hashes)) > 3 * len(self._slots):
            old = self._slots[self._slots != 0]
            self._slots = np.zeros(2 * len(self._slots), dtype=np.uint64)
            self._place(old)
        self._place(hashes)
        self._used += len(hashes)

    def _place(self, hashes: np.ndarray) -> None:
        slot, last = self._home(hashes), len(self._slots) - 1
        while len(hashes):
            empty = self._slots[slot] == 0
            self._slots[slot[empty]] = hashes[empty]  # where several hashes want one slot, one of them gets it
            unplaced = self._slots[slot] != hashes
            hashes, slot = hashes[unplaced], (slot[unplaced] + 1) & last


def pair_hashes(src: Sequence[bytes], tgt: Sequence[bytes]) -> np.ndarray:
    """A 64-bit hash (BLAKE2b) of each (source, target) pair of UTF-8 lines (lines hold no newline)."""
    digests = b"".join(blake2b(s + b"\n" + t, digest_size=8).digest() for s, t in zip(src, tgt, strict=True))
    return np.frombuffer(digests, dtype=np.uint64)


def first_occurrences(hashes: np.ndarray) -> np.ndarray:
    """Boolean mask of the first occurrence of each distinct hash."""
    first = np.zeros(len(hashes), dtype=bool)
    first[np.unique(hashes, return_index=True)[1]] = True
    return first


# --- language identification -------------------------------------------------------------------


def language_identifier(src_lang: str, tgt_lang: str) -> Any:
    """A langid classifier restricted to the two languages; clear error if the extra is missing."""
    try:
        from langid.langid import LanguageIdentifier, model
    except ImportError:
        raise ParamsError(
            "clean.langid is true but the optional package `langid` is not installed: "
            "run pip install '.[langid]' (or set clean.langid: false)"
        ) from None
    # Our own instance rather than langid's module-level one, so we do not change global state.
    identifier = LanguageIdentifier.from_modelstring(model, norm_probs=False)
    try:
        identifier.set_languages([src_lang, tgt_lang])
    except ValueError as err:
        raise ParamsError(f"clean.langid: langid cannot identify {src_lang!r}/{tgt_lang!r}: {err}") from None
    return identifier


# --- one chunk, in a worker process ------------------------------------------------------------------


def length_rules(src: pa.Array, tgt: pa.Array, cfg: CleanParams) -> tuple[np.ndarray, dict[str, int]]:
    """Which normalised pairs pass the length rules, and how many each rule dropped (first failing rule)."""
    alive = np.ones(len(src), dtype=bool)
    dropped = {}

    def drop(rule: str, mask: np.ndarray) -> None:
        hit = alive & mask
        dropped[rule] = int(hit.sum())
        alive[hit] = False

    n_src, n_tgt = token_counts(src), token_counts(tgt)
    drop("empty", (n_src == 0) | (n_tgt == 0))
    drop("too_short", (n_src < cfg.min_tokens) | (n_tgt < cfg.min_tokens))
    drop("too_long", (n_src > cfg.max_tokens) | (n_tgt > cfg.max_tokens))
    # Multiplied out instead of divided; no zero counts are left at this point.
    drop("length_ratio", np.maximum(n_src, n_tgt) > cfg.max_length_ratio * np.minimum(n_src, n_tgt))
    return alive, dropped


@dataclass(frozen=True)
class ChunkTask:
    """One chunk of an aligned pair of files, the index-th of the stage; `train` chunks are filtered, dev/test
    ones only normalised."""

    src: LineRange
    tgt: LineRange
    train: bool
    index: int


@dataclass
class CleanedChunk:
    """What a worker sends back: the pairs still in the running (normalised) and what it dropped."""

    pairs: int  # input pairs in the chunk
    dropped: dict[str, int]
    src: Lines  # the surviving pairs
    tgt: Lines
    hashes: np.ndarray | None  # pair hash of each surviving pair (clean.dedup)
    wrong_language: np.ndarray | None  # per surviving pair (clean.langid)


@dataclass
class Lines:
    """Lines as one UTF-8 block, each followed by a newline, and the byte length of each (newline included).

    The block is `data`, or, when a worker process made it, at `offset` in the stage's `SlotFile`, which the
    main process reads without the block passing through the pool's pipe.
    """

    data: bytes
    sizes: np.ndarray
    offset: int | None = None

    @classmethod
    def of(cls, encoded: list[bytes]) -> Lines:
        sizes = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)) + 1
        return cls(b"\n".join(encoded) + b"\n" if encoded else b"", sizes)

    def runs(self, keep: np.ndarray) -> list[tuple[int, int]]:
        """(start, end) bytes of each run of consecutive lines where `keep` is true (one run where the whole
        chunk is kept: only duplicates of earlier chunks and langid's rejects are dropped at this point)."""
        ends = np.cumsum(self.sizes)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], keep.view(np.int8), [0]])))  # run i: lines edges[2i]..
        firsts, lasts = edges[0::2], edges[1::2] - 1
        return list(zip((ends - self.sizes)[firsts].tolist(), ends[lasts].tolist(), strict=True))

    def write(self, out: IO[bytes], keep: np.ndarray, slots: SlotFile | None = None) -> None:
        """Append the lines where `keep` is true to `out`: the block as it is when it is kept whole, else its runs
        of kept lines joined (one write rather than hundreds)."""
        if self.offset is None:
            block = memoryview(self.data)
        else:
            block = slots.view(self.offset, self.offset + int(self.sizes.sum()))
        runs = self.runs(keep)
        out.write(block[runs[0][0] : runs[0][1]] if len(runs) == 1 else b"".join(block[s:e] for s, e in runs))

    def to_slots(self, offset: int) -> None:
        """The block is now at `offset` in the SlotFile (`SlotFile.put`), and not sent with these lines."""
        self.data, self.offset = b"", offset


class ChunkCleaner:
    """A worker's state: the clean params, the normalisation patterns, with clean.langid its own language
    identifier, and the stage's SlotFile, if any."""

    def __init__(self, params: Params, slots: SlotFile | None = None, patterns: tuple[str, str] | None = None) -> None:
        self.cfg = params.clean
        self.langs = params.data.langs
        self.patterns = patterns or _patterns()
        self.identifier = language_identifier(*self.langs) if self.cfg.langid else None
        self.slots = slots  # where a worker process puts the chunks' lines (None: they go back with the result)

    def clean(self, task: ChunkTask) -> CleanedChunk:
        chunk = self._clean(task)
        if self.slots is not None:
            offsets = self.slots.put(task.index, [chunk.src.data, chunk.tgt.data])
            if offsets is not None:  # else (more bytes than a slot holds) the lines go back with the result
                chunk.src.to_slots(offsets[0])
                chunk.tgt.to_slots(offsets[1])
        return chunk

    def _clean(self, task: ChunkTask) -> CleanedChunk:
        src, tgt = (self._normalized(r) for r in (task.src, task.tgt))
        if not task.train:
            return CleanedChunk(len(src), {}, Lines.of(_utf8(src)), Lines.of(_utf8(tgt)), None, None)
        alive, dropped = length_rules(src, tgt, self.cfg)
        src_lines, tgt_lines = _take(_utf8(src), alive), _take(_utf8(tgt), alive)
        hashes = None
        if self.cfg.dedup:
            # Duplicates within the chunk here; the main process checks against earlier chunks. Before langid,
            # so that langid classifies each distinct pair only once.
            hashes = pair_hashes(src_lines, tgt_lines)
            first = first_occurrences(hashes)
            dropped["duplicate"] = int((~first).sum())
            src_lines, tgt_lines, hashes = _take(src_lines, first), _take(tgt_lines, first), hashes[first]
        wrong = None if self.identifier is None else self._wrong_language(src_lines, tgt_lines)
        return CleanedChunk(len(alive), dropped, Lines.of(src_lines), Lines.of(tgt_lines), hashes, wrong)

    def _normalized(self, lines: LineRange) -> pa.Array:
        return normalize_array(arrow_lines(lines), self.cfg.normalization, self.patterns)

    def _wrong_language(self, src: list[bytes], tgt: list[bytes]) -> np.ndarray:
        want_src, want_tgt = self.langs
        classify = self.identifier.classify
        wrong = [
            classify(s.decode())[0] != want_src or classify(t.decode())[0] != want_tgt
            for s, t in zip(src, tgt, strict=True)
        ]
        return np.array(wrong, dtype=bool)


def arrow_lines(lines: LineRange) -> pa.Array:
    """A range's lines as an Arrow string array, as read_range reads them (no "\\n", nor "\\r" before it), made
    from the file's bytes without a Python object per line."""
    data = range_bytes(lines)
    offsets = line_offsets(data)
    array = pa.LargeStringArray.from_buffers(len(offsets) - 1, pa.py_buffer(offsets), pa.py_buffer(data))
    try:
        array.validate(full=True)  # UTF-8
    except pa.ArrowInvalid:
        read_range(lines)  # raises naming the file and line
        raise
    return pc.utf8_rtrim(array, "\r\n")  # the line ends; no line holds a "\n" inside


def _utf8(lines: pa.Array) -> list[bytes]:
    return lines.cast(pa.large_binary()).to_pylist()


def _take(items: list[bytes], mask: np.ndarray) -> list[bytes]:
    return list(itertools.compress(items, mask.tolist()))


_cleaner: ChunkCleaner | None = None  # one per worker process


def _start_worker(params: Params, slots: SlotFile | None, patterns: tuple[str, str]) -> None:
    global _cleaner
    _cleaner = ChunkCleaner(params, slots, patterns)


def _clean_chunk(task: ChunkTask) -> CleanedChunk:
    assert _cleaner is not None, "_start_worker runs first in every worker"
    return _cleaner.clean(task)


# --- the main process: chunks in order ---------------------------------------------------------------


class TrainFilter:
    """Finishes the train rules on chunks taken in order: duplicates of earlier chunks, then langid."""

    def __init__(self, pairs: int) -> None:
        self.dropped = dict.fromkeys(DROP_RULES, 0)
        # The only state that grows with corpus size: 11-21 bytes per train pair (HashSet's slots).
        self.seen = HashSet(expected=pairs)

    def keep_mask(self, chunk: CleanedChunk) -> np.ndarray:
        """Which of the chunk's surviving pairs to write; counts what the chunk and this filter dropped."""
        for rule, n in chunk.dropped.items():
            self.dropped[rule] += n
        keep = np.ones(len(chunk.src.sizes), dtype=bool)
        if chunk.hashes is not None:
            earlier = self.seen.contains(chunk.hashes)
            self.dropped["duplicate"] += int(earlier.sum())
            self.seen.add(chunk.hashes[~earlier])
            keep &= ~earlier
        if chunk.wrong_language is not None:
            wrong = keep & chunk.wrong_language
            self.dropped["langid"] += int(wrong.sum())
            keep &= ~wrong
        return keep


# --- the stage ---------------------------------------------------------------------------------

Part = tuple[str, str]  # (split, dataset): ("train", "europarl_v7"), ("dev", "newstest2013"), ...
Plan = dict[Part, list[tuple[LineRange, LineRange]]]  # each part's chunks, in the order they are written


def clean(
    params: Params,
    raw_dir: Path = paths.RAW,
    out_dir: Path = paths.CLEAN,
    metrics_path: Path = paths.METRICS / "clean.json",
) -> dict:
    """Clean train, normalise dev/test, write outputs atomically (all or none) and return the metrics."""
    start_server(_clean_chunk, params.clean.processes)  # the workers' server starts while the inputs are cut
    plan = plan_chunks(params, Path(raw_dir))
    # Every output is an atomic writer held open until all inputs are processed: an exception
    # anywhere (undecodable input) unwinds them all and leaves only the old files.
    with contextlib.ExitStack() as stack:
        outputs = open_outputs(stack, params, Path(out_dir))
        slots = None
        if worker_count(params.clean.processes) > 1:
            spool = stack.enter_context(tempfile.TemporaryDirectory(prefix=".slots-", dir=out_dir))
            slots = SlotFile.create(Path(spool) / "slots", params.clean.processes, slot_bytes(plan))
            stack.callback(slots.close)
        report = clean_chunks(params, plan, outputs, slots)
        # Still inside the stack, so a failure here aborts the data files too; they are renamed right after.
        write_json(Path(metrics_path), report)
    return report


def plan_chunks(params: Params, raw_dir: Path) -> Plan:
    """Every part's chunks of clean.chunk_lines pairs; fails before any output exists if an input is missing or
    two sides are not aligned (cutting them into chunks counts their lines)."""
    langs = params.data.langs
    parts = [("train", name) for name in params.data.train] + [("dev", params.data.dev)]
    parts += [("test", name) for name in params.data.test]
    raw = {part: tuple(raw_dir / f"{part[1]}.{lang}" for lang in langs) for part in parts}
    missing = [str(p) for files in raw.values() for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing raw input(s) (run the download stage first): {', '.join(missing)}")
    if params.clean.langid:
        language_identifier(*langs)  # a missing package is reported here, not from inside a worker
    return {part: aligned_ranges(*raw[part], params.clean.chunk_lines) for part in parts}


def slot_bytes(plan: Plan) -> int:
    """Room for the cleaned lines of any chunk: its input bytes and a quarter more (normalising seldom lengthens a
    line; a chunk that grows beyond that goes back through the pipe)."""
    chunk_bytes = (s.end - s.start + t.end - t.start for ranges in plan.values() for s, t in ranges)
    return max(chunk_bytes, default=0) * 5 // 4 + 64


def open_outputs(stack: contextlib.ExitStack, params: Params, out_dir: Path) -> dict[Part, tuple[IO[bytes], ...]]:
    """Atomic writers for each part's two sides, held by `stack`; the train datasets share one pair of files."""
    langs = params.data.langs

    def open_pair(stem: Path) -> tuple[IO[bytes], ...]:
        return tuple(stack.enter_context(atomic_write(stem.with_name(f"{stem.name}.{lang}"), "wb")) for lang in langs)

    train = open_pair(out_dir / "train")
    outputs = {("train", name): train for name in params.data.train}
    outputs[("dev", params.data.dev)] = open_pair(out_dir / "dev")
    for name in params.data.test:
        outputs[("test", name)] = open_pair(out_dir / "test" / name)
    return outputs


def clean_chunks(
    params: Params, plan: Plan, outputs: dict[Part, tuple[IO[bytes], ...]], slots: SlotFile | None = None
) -> dict:
    """Clean every chunk in the worker processes, write what is kept in order, and return the metrics."""
    chunks = [(part, s, t) for part, ranges in plan.items() for s, t in ranges]
    tasks = [ChunkTask(s, t, part[0] == "train", i) for i, (part, s, t) in enumerate(chunks)]
    pairs = dict.fromkeys(plan, 0)
    kept = 0
    train_filter = TrainFilter(sum(task.src.lines for task in tasks if task.train))
    # The patterns take 0.08 s to build. Built here, while the workers' server is still importing this module,
    # and handed to each worker, they cost nothing: built in each worker, they delayed its first chunk.
    worker_args = (params, slots, _patterns())
    results = ordered_map(_clean_chunk, tasks, params.clean.processes, _start_worker, worker_args)
    # closing: on an error the pool stops (its running chunks finish) before the slot file goes
    with contextlib.closing(results), Progress("clean", sum(t.src.lines for t in tasks), unit="pairs") as progress:
        for (part, _, _), chunk in zip(chunks, results, strict=True):
            keep = train_filter.keep_mask(chunk) if part[0] == "train" else np.ones(chunk.pairs, dtype=bool)
            src_f, tgt_f = outputs[part]
            chunk.src.write(src_f, keep, slots)
            chunk.tgt.write(tgt_f, keep, slots)
            pairs[part] += chunk.pairs
            kept += int(keep.sum()) if part[0] == "train" else 0
            progress.advance(chunk.pairs)
    data = params.data
    return {
        "input_pairs": sum(pairs[("train", name)] for name in data.train),
        "kept_pairs": kept,
        "dropped": train_filter.dropped,
        "train_datasets": {name: pairs[("train", name)] for name in data.train},
        "dev_lines": {data.dev: pairs[("dev", data.dev)]},
        "test_lines": {name: pairs[("test", name)] for name in data.test},
    }


def main(argv: list[str] | None = None) -> None:
    args = cli.stage_parser("clean", __doc__).parse_args(argv)
    start = time.perf_counter()
    try:
        report = clean(load_params(args.params))
    except (ParamsError, TextFormatError, FileNotFoundError) as err:
        cli.fail("clean", err)
    dropped = ", ".join(f"{rule} {n}" for rule, n in report["dropped"].items() if n)
    print(
        f"clean: kept {report['kept_pairs']} of {report['input_pairs']} train pairs"
        f" (dropped: {dropped or 'none'}) in {time.perf_counter() - start:.1f}s"
    )


if __name__ == "__main__":
    main()
