"""tokenize: train a joint SentencePiece model on the cleaned train split, encode every split to token arrays.

Reads data/clean/{train,dev}.<lang> and data/clean/test/<name>.<lang>; writes data/tokenized/spm.model,
<split>.<lang>.bin/.idx (see seq2seq/data.py) and meta.json.
"""

from __future__ import annotations

import itertools
import shutil
import time
from pathlib import Path

from seq2seq import cli, paths
from seq2seq.config import Params, ParamsError, load_params
from seq2seq.data import TokenArrayWriter, dtype_for
from seq2seq.progress import Progress
from seq2seq.textio import TextFormatError, count_lines, read_lines, write_json
from seq2seq.tokenizer import Tokenizer, train_sentencepiece

ENCODE_CHUNK = 50_000  # lines per SentencePiece batch call


def split_texts(params: Params, clean_dir: Path) -> dict[str, dict[str, Path]]:
    """Split name -> language -> the cleaned text file."""
    prefixes = {"train": clean_dir / "train", "dev": clean_dir / "dev"}
    prefixes.update({f"test/{name}": clean_dir / "test" / name for name in params.data.test})
    return {
        split: {lang: prefix.with_name(f"{prefix.name}.{lang}") for lang in params.data.langs}
        for split, prefix in prefixes.items()
    }


def encode_file(
    tokenizer: Tokenizer, text: Path, prefix: Path, num_threads: int, progress: Progress
) -> tuple[int, int]:
    """Encode a text file into `<prefix>.bin/.idx`; returns (sentences, tokens)."""
    writer = TokenArrayWriter(prefix, dtype_for(tokenizer.vocab_size))
    n_sent = n_tok = 0
    try:
        lines = read_lines(text)
        while chunk := list(itertools.islice(lines, ENCODE_CHUNK)):
            ids = tokenizer.encode(chunk, num_threads=num_threads)
            writer.write(ids)
            n_sent += len(ids)
            n_tok += sum(map(len, ids))
            progress.advance(len(ids))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return n_sent, n_tok


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
    try:
        t0 = time.perf_counter()
        train_sentencepiece(
            list(texts["train"].values()),
            tmp_dir / "spm.model",
            vocab_size=p.vocab_size,
            model_type=p.model_type,
            character_coverage=p.character_coverage,
            input_sentence_size=p.input_sentence_size,
            num_threads=p.num_threads,
        )
        tokenizer = Tokenizer(tmp_dir / "spm.model")
        spm_seconds = time.perf_counter() - t0
        meta: dict = {
            "vocab_size": tokenizer.vocab_size,
            "dtype": dtype_for(tokenizer.vocab_size).name,
            "langs": list(langs),
            "splits": {},
        }
        total = sum(count_lines(text) for by_lang in texts.values() for text in by_lang.values())
        with Progress("tokenize: encode", total, unit="sentences") as progress:
            for split, by_lang in texts.items():
                entry = {}
                for lang, text in by_lang.items():
                    prefix = tmp_dir / f"{split}.{lang}"
                    n_sent, n_tok = encode_file(tokenizer, text, prefix, p.num_threads, progress)
                    entry[lang] = {"sentences": n_sent, "tokens": n_tok}
                meta["splits"][split] = entry
        meta["seconds"] = {"sentencepiece": round(spm_seconds, 2), "total": round(time.perf_counter() - t0, 2)}
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
