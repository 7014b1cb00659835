"""tokenize: train a joint SentencePiece model on the cleaned train split, encode every split to token arrays.

Reads data/clean/{train,dev}.<lang> and data/clean/test/<name>.<lang>; writes data/tokenized/spm.model,
<split>.<lang>.bin/.idx (see seq2seq/data.py) and meta.json.

SentencePiece trains on at most tokenize.input_sentence_size sentences, a uniform random sample of the
training text (both languages) drawn here with a fixed seed, on tokenize.num_threads threads (0 = every
core): its time and memory stop growing with the corpus, and the model is the same on every run
(SentencePiece's own sampling is not: it differs from one process to the next).
Encoding cuts every file into chunks of ENCODE_CHUNK_LINES lines for tokenize.processes worker processes
(0 = every core); each worker encodes with its own copy of the model, on one thread, and sends back flat id
arrays, which the main process appends to the outputs in order. The .bin/.idx files are the same whatever
the number of processes.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm

from seq2seq import cli, paths
from seq2seq.config import Params, ParamsError, TokenizeParams, load_params
from seq2seq.data import TokenArrayWriter, dtype_for
from seq2seq.parallel import (
    LineRange,
    line_offsets,
    line_ranges,
    ordered_map,
    range_bytes,
    read_range,
    start_server,
    worker_count,
)
from seq2seq.progress import Progress
from seq2seq.textio import TextFormatError, write_json
from seq2seq.tokenizer import Tokenizer, train_sentencepiece

ENCODE_CHUNK_LINES = 10_000  # lines per chunk of encoding work (1M pairs, 2 processes: 8.7 s; 9.2 s at 50k)
SAMPLE_SEED = 1


def split_texts(params: Params, clean_dir: Path) -> dict[str, dict[str, Path]]:
    """Split name -> language -> the cleaned text file."""
    prefixes = {"train": clean_dir / "train", "dev": clean_dir / "dev"}
    prefixes.update({f"test/{name}": clean_dir / "test" / name for name in params.data.test})
    return {
        split: {lang: prefix.with_name(f"{prefix.name}.{lang}") for lang in params.data.langs}
        for split, prefix in prefixes.items()
    }


# --- SentencePiece training --------------------------------------------------------------------------


def text_ranges(texts: list[Path]) -> dict[Path, list[LineRange]]:
    """Each text cut into ranges of ENCODE_CHUNK_LINES lines: one scan, shared by sampling and encoding."""
    return {text: line_ranges(text, ENCODE_CHUNK_LINES) for text in texts}


def sample_sentences(texts: dict[Path, list[LineRange]], size: int, out: Path, seed: int = SAMPLE_SEED) -> int:
    """Write `size` lines drawn uniformly at random without replacement from all lines of `texts` (each file's
    `text_ranges`) to `out`, in file order; returns how many (all lines if there are fewer).

    In this process: reading a range and cutting out its picked lines takes about a millisecond, less than
    handing it to a worker process and back (4M pairs: 0.6 s here, 1.2-1.3 s on two worker processes).
    """
    ranges = [r for per_text in texts.values() for r in per_text]
    total = sum(r.lines for r in ranges)
    size = min(size, total)
    chosen = np.sort(np.random.default_rng(seed).choice(total, size, replace=False))
    first_lines = np.cumsum([0] + [r.lines for r in ranges])  # index of each range's first line among all lines
    with out.open("wb") as f, Progress("sample", total=total, unit="sentences") as progress:
        for r, first in zip(ranges, first_lines[:-1].tolist(), strict=True):
            picked = chosen[np.searchsorted(chosen, first) : np.searchsorted(chosen, first + r.lines)] - first
            f.write(pick_lines(r, picked))
            progress.advance(r.lines)
    return size


def pick_lines(r: LineRange, picked: np.ndarray) -> bytes:
    """The lines of a range at the given 0-based indices (sorted), each with its newline."""
    if not len(picked):
        return b""
    data = range_bytes(r)
    offsets = line_offsets(data)  # a bytes object only for each picked line, not for every line
    spans = zip(offsets[picked].tolist(), offsets[picked + 1].tolist(), strict=True)
    return b"".join(data[start:end].removesuffix(b"\n").removesuffix(b"\r") + b"\n" for start, end in spans)


def train_model(train_text: dict[Path, list[LineRange]], model_path: Path, p: TokenizeParams) -> float:
    """Train the joint SentencePiece model on a sample of `train_text` (each file's ranges), with progress while
    it runs; returns the seconds SentencePiece's trainer took (without the sampling)."""
    sample = model_path.with_name("spm-sample.txt")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    if p.input_sentence_size:
        sampled = sample_sentences(train_text, p.input_sentence_size, sample)
        inputs, what = [sample], f"{sampled:,} sampled sentences"
    else:
        inputs, what = list(train_text), "every sentence"
    threads = worker_count(p.num_threads)
    start = time.perf_counter()
    try:
        with (
            Progress("sentencepiece", total=None) as progress,
            _ticking(progress, f"training on {what}, {threads} threads"),
        ):
            train_sentencepiece(
                inputs,
                model_path,
                vocab_size=p.vocab_size,
                model_type=p.model_type,
                character_coverage=p.character_coverage,
                input_sentence_size=0,
                num_threads=threads,
            )
    finally:
        sample.unlink(missing_ok=True)
    return time.perf_counter() - start


@contextlib.contextmanager
def _ticking(progress: Progress, status: str) -> Iterator[None]:
    """Update `progress` every second from a thread while the body runs: SentencePiece says nothing until it is
    done, but it releases the GIL while it trains."""
    done = threading.Event()

    def tick() -> None:
        while not done.wait(1.0):
            progress.update(0, status)

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


# --- encoding, in worker processes -------------------------------------------------------------------

_processor: spm.SentencePieceProcessor | None = None  # one per worker process
_dtype: np.dtype | None = None


def _start_encoder(model_path: str, dtype: str) -> None:
    global _processor, _dtype
    _processor = spm.SentencePieceProcessor(model_file=model_path)
    _dtype = np.dtype(dtype)


def _encode_chunk(lines: LineRange) -> tuple[np.ndarray, np.ndarray]:
    """The chunk's sentences as (all ids back to back, length of each)."""
    assert _processor is not None and _dtype is not None, "_start_encoder runs first in every worker"
    # One thread: the worker processes are the parallelism (SentencePiece's default would use every core in
    # every worker, and one process would not be one core).
    # As numpy arrays: joined in C, not one Python int per token.
    ids = _processor.encode(read_range(lines), out_type="numpy", num_threads=1)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    tokens = np.concatenate(ids).astype(_dtype) if ids else np.empty(0, dtype=_dtype)
    return tokens, lengths


def encode_files(
    model_path: Path,
    texts: dict[Path, Path],
    dtype: np.dtype,
    processes: int,
    chunks: dict[Path, list[LineRange]] | None = None,
) -> dict[Path, dict[str, int]]:
    """Encode each text file into `<prefix>.bin/.idx` (texts: text file -> output prefix; chunks: their
    `text_ranges`, if already cut); the sentences and tokens of each."""
    chunks = chunks if chunks is not None else text_ranges(list(texts))
    tasks = [r for text in texts for r in chunks[text]]
    writers = {text: TokenArrayWriter(prefix, dtype) for text, prefix in texts.items()}
    try:
        with Progress("encode", total=sum(r.lines for r in tasks), unit="sentences") as progress:
            results = ordered_map(_encode_chunk, tasks, processes, _start_encoder, (str(model_path), dtype.name))
            for task, (tokens, lengths) in zip(tasks, results, strict=True):
                writers[task.path].write_arrays(tokens, lengths)
                progress.advance(len(lengths))
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for writer in writers.values():
        writer.close()
    return {text: {"sentences": w.sentences, "tokens": w.tokens} for text, w in writers.items()}


# --- the stage ---------------------------------------------------------------------------------------


def tokenize(params: Params, clean_dir: Path = paths.CLEAN, out_dir: Path = paths.TOKENIZED) -> dict:
    """Train the joint SentencePiece model and encode all splits; returns the meta dict written to meta.json."""
    p, langs = params.tokenize, params.data.langs
    texts = split_texts(params, clean_dir)
    for by_lang in texts.values():
        for text in by_lang.values():
            if not text.is_file():
                raise FileNotFoundError(f"{text}: cleaned text not found (run the clean stage)")
    empty = [str(text) for text in texts["train"].values() if text.stat().st_size == 0]
    if empty:  # SentencePiece would fail with a C++ error about its input
        raise TextFormatError(f"{', '.join(empty)}: empty training text; nothing to train SentencePiece on")
    # Build into a sibling temp dir and swap at the end: a failure leaves the previous outputs intact.
    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    start_server(_encode_chunk, p.processes)  # the encoding workers' server starts while SentencePiece trains
    try:
        t0 = time.perf_counter()
        ranges = text_ranges([text for by_lang in texts.values() for text in by_lang.values()])
        training_seconds = train_model(
            {text: ranges[text] for text in texts["train"].values()}, tmp_dir / "spm.model", p
        )
        vocab_size = Tokenizer(tmp_dir / "spm.model").vocab_size
        spm_seconds = time.perf_counter() - t0
        dtype = dtype_for(vocab_size)
        outputs = {
            text: tmp_dir / f"{split}.{lang}" for split, by_lang in texts.items() for lang, text in by_lang.items()
        }
        counts = encode_files(tmp_dir / "spm.model", outputs, dtype, p.processes, ranges)
        meta: dict = {"vocab_size": vocab_size, "dtype": dtype.name, "langs": list(langs), "splits": {}}
        for split, by_lang in texts.items():
            meta["splits"][split] = {lang: counts[text] for lang, text in by_lang.items()}
        meta["seconds"] = {
            "sentencepiece": round(spm_seconds, 2),  # cutting the texts into ranges, sampling, training
            "sentencepiece_training": round(training_seconds, 2),
            "total": round(time.perf_counter() - t0, 2),
        }
        write_json(tmp_dir / "meta.json", meta)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp_dir.rename(out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return meta


def main(argv: list[str] | None = None) -> None:
    args = cli.stage_parser("tokenize", __doc__).parse_args(argv)
    try:
        meta = tokenize(load_params(args.params))
    except (ParamsError, TextFormatError, FileNotFoundError) as err:
        cli.fail("tokenize", err)
    train = meta["splits"]["train"]
    print(f"tokenize: vocab {meta['vocab_size']}, train {train}")


if __name__ == "__main__":
    main()
