"""Translate text with a registered model or a checkpoint: stdin to stdout, or files.

    nmt-translate -m models:/nmt-en-fr@champion < input.en > output.fr
    nmt-translate -m models/model.pt --spm data/tokenized/spm.model -i input.en -o output.fr --beam-size 5
    python -m seq2seq.translate -m runs:/<run id>/translator --nbest 3 < input.en    # Moses n-best lines

Decoding options default to the model's bundled decoding config (registry) or params.yaml's `evaluate`
section (checkpoint); the flags override them. The input is read, translated and written 2000 lines at a
time, so memory stays flat. Empty lines give empty lines; lines longer than the model's positions are cut
with a warning naming the line; a line that is not UTF-8 is refused, naming it: before the model is loaded
when it is among the first 2000, else where it is met (an -o file is then not written at all).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from seq2seq import cli, paths
from seq2seq.checkpoint import CheckpointError
from seq2seq.config import DecodingParams, ParamsError, load_params
from seq2seq.decoding import translate_nbest
from seq2seq.progress import Progress
from seq2seq.textio import TextFormatError, atomic_write, count_lines

log = logging.getLogger("seq2seq.translate")
CHUNK_LINES = 2000  # lines read, translated and written at a time, so memory stays flat


@dataclass(frozen=True)
class Translation:
    text: str
    score: float  # length-normalised log-probability (see seq2seq/beam.py)
    log_prob: float


def translate_texts(
    model,
    tokenizer,
    texts: Sequence[str],
    opts: DecodingParams,
    device: torch.device,
    warn: Callable[[str], None] = log.warning,
    first_line: int = 1,
    progress: Progress | None = None,
) -> list[list[Translation]]:
    """The n-best translations of each text, best first; an empty (or blank) text translates to ""."""
    nonempty = [i for i, t in enumerate(texts) if t.strip()]
    results: list[list[Translation]] = [[Translation("", 0.0, 0.0)] for _ in texts]
    if progress is not None:
        progress.advance(len(texts) - len(nonempty))  # empty lines need no decoding
    if not nonempty:
        return results
    ids = tokenizer.encode([texts[i] for i in nonempty])
    limit = model.cfg.max_positions - 1  # one position is kept for EOS
    for j, seq in enumerate(ids):
        if len(seq) > limit:
            warn(f"line {first_line + nonempty[j]}: {len(seq)} subword tokens, truncated to {limit} (max_positions)")
            ids[j] = seq[:limit]
    nbest = translate_nbest(model, ids, opts, device, progress)
    for i, hyps in zip(nonempty, nbest, strict=True):
        texts_out = tokenizer.decode([h.tokens for h in hyps])
        results[i] = [Translation(t, h.score, h.log_prob) for t, h in zip(texts_out, hyps, strict=True)]
    return results


def read_chunks(path: Path | None, size: int) -> Iterator[list[str]]:
    """The lines of a file (or of stdin, for None), `size` at a time, decoded as UTF-8; a line that is not
    UTF-8 is an error naming the file and the line number."""
    name = str(path) if path else "stdin"
    with path.open("rb") if path else contextlib.nullcontext(sys.stdin.buffer) as stream:
        lineno = 0
        while raw := list(itertools.islice(stream, size)):
            chunk = []
            for line in raw:
                lineno += 1
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise TextFormatError(
                        f"{name}:{lineno}: not valid UTF-8 ({err.reason} at byte {err.start}); "
                        "convert the input to UTF-8"
                    ) from None
                chunk.append(text.removesuffix("\n").rstrip("\r"))
            yield chunk


def load_translator(
    model_ref: str, spm: Path | None, params_path: Path, quantize: str | None = None
) -> tuple[Any, Any, DecodingParams]:
    """(model, tokenizer, decoding defaults) from an MLflow model URI or a checkpoint path; `quantize` ("int8"
    or "none") overrides the model's or params.yaml's choice. A registered model's weights are checked
    against the digest recorded at export (seq2seq.registry), a checkpoint's tokenizer against the checkpoint."""
    from seq2seq import cpu

    if ":/" in model_ref:  # models:/name@alias, models:/name/3, runs:/id/translator
        from seq2seq.registry import load_registered

        loaded = load_registered(model_ref)
        defaults, model = loaded.decoding, loaded.model
        if quantize is not None and quantize != defaults.quantize:
            if defaults.quantize == "int8":
                raise ValueError(f"{model_ref} decodes with int8 weights; its fp32 weights are not loaded")
            model = cpu.for_decoding(model, quantize)
        return model, loaded.tokenizer, defaults.model_copy(update={"quantize": quantize or defaults.quantize})
    from seq2seq.checkpoint import check_tokenizer, load_model
    from seq2seq.tokenizer import Tokenizer

    defaults = load_params(params_path).evaluate.decoding()
    defaults = defaults.model_copy(update={"quantize": quantize or defaults.quantize})
    model, state = load_model(Path(model_ref), "cpu")
    tokenizer = Tokenizer(spm or paths.SPM_MODEL)
    check_tokenizer(state, Path(model_ref), tokenizer)
    return cpu.for_decoding(model, defaults.quantize), tokenizer, defaults


def main(argv: Sequence[str] | None = None) -> None:
    from seq2seq.redact import redact_all_logs

    redact_all_logs()
    parser = argparse.ArgumentParser(
        prog="nmt-translate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-m", "--model", required=True, help="models:/<name>@<alias>, models:/<name>/<v> or model.pt")
    parser.add_argument("--spm", type=Path, help=f"SentencePiece model for a checkpoint (default: {paths.SPM_MODEL})")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="decoding defaults for a checkpoint")
    parser.add_argument("-i", "--input", type=Path, help="input file, one sentence per line (default: stdin)")
    parser.add_argument("-o", "--output", type=Path, help="output file, written atomically (default: stdout)")
    parser.add_argument("--beam-size", type=int, help="hypotheses kept per sentence; 1 = greedy")
    parser.add_argument("--length-penalty", type=float, help="GNMT alpha: log P / ((5 + len) / 6) ** alpha")
    parser.add_argument("--nbest", type=int, help="> 1 prints Moses n-best lines: index ||| text ||| score")
    parser.add_argument("--max-len-a", type=float, help="longest output = a * source tokens + b: the a")
    parser.add_argument("--max-len-b", type=int, help="longest output = a * source tokens + b: the b")
    parser.add_argument("--batch-size", type=int, help="most sentences per batch")
    parser.add_argument("--max-tokens", type=int, help="most source tokens per batch, padding included")
    parser.add_argument(
        "--quantize",
        choices=["none", "int8"],
        help="int8: int8 weights on the CPU, ~1.5x faster (default: the model's)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = str(args.input) if args.input else "stdin"
    try:
        chunks = read_chunks(args.input, CHUNK_LINES)
        first = next(chunks, [])  # refuse bad input (in the first chunk) before loading anything
        model, tokenizer, defaults = load_translator(args.model, args.spm, args.params, args.quantize)
        flags = {
            "beam_size": args.beam_size,
            "length_penalty": args.length_penalty,
            "nbest": args.nbest,
            "max_len_a": args.max_len_a,
            "max_len_b": args.max_len_b,
            "batch_size": args.batch_size,
            "max_tokens": args.max_tokens,
        }
        opts = DecodingParams.model_validate(
            {**defaults.model_dump(), **{k: v for k, v in flags.items() if v is not None}}
        )
    except (TextFormatError, FileNotFoundError, ParamsError, CheckpointError, ValueError) as err:
        cli.fail("nmt-translate", err)
    device = next(model.parameters()).device

    def warn(message: str) -> None:
        print(f"nmt-translate: warning: {name}: {message}", file=sys.stderr)

    # Read, translate and write a chunk at a time: memory stays flat however long the input, and a bad line
    # further on stops the command (an output file is then not written at all).
    out = atomic_write(args.output) if args.output else contextlib.nullcontext(sys.stdout)
    total = count_lines(args.input) if args.input else None
    try:
        with out as f, Progress("nmt-translate", total, unit="lines") as progress:
            start = 0
            for chunk in itertools.chain([first], chunks):
                translations = translate_texts(model, tokenizer, chunk, opts, device, warn, first_line=start + 1)
                for i, nbest in enumerate(translations):
                    if opts.nbest == 1:
                        f.write(nbest[0].text + "\n")
                    else:
                        f.writelines(f"{start + i} ||| {t.text} ||| {t.score:.4f}\n" for t in nbest)
                f.flush()
                start += len(chunk)
                progress.advance(len(chunk))
    except TextFormatError as err:
        cli.fail("nmt-translate", err)


if __name__ == "__main__":
    main()
