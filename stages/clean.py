"""clean: normalise every split, filter the training pairs, write data/clean and metrics/clean.json.

Reads data/raw/<dataset>.<lang>. Train pairs go through the rules below (first failing rule is counted);
dev and test sets are only normalised, line for line, so they stay aligned with their references. Input
is streamed in chunks of clean.chunk_lines pairs; the only state that grows with the corpus is the dedup
hash set.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import sys
import time
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

from seq2seq import cli, paths
from seq2seq.config import CleanParams, Params, ParamsError, load_params
from seq2seq.progress import Progress
from seq2seq.textio import TextFormatError, atomic_write, count_lines, read_aligned, write_json

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
    """(invisible, whitespace-run) patterns, built once from this Python's Unicode tables."""
    all_chars = [chr(cp) for cp in range(sys.maxunicode + 1)]
    # Whitespace is everything str.isspace() accepts: tab, CR, VT, FF, U+0085, NBSP, U+2028, ... .
    # Whitespace controls become a space (not nothing) so words they separated stay separate,
    # and no Unicode line break survives to split a line for a later reader.
    whitespace = [c for c in all_chars if c.isspace()]
    # Every other control (Cc) or format (Cf) char is invisible noise: BOM U+FEFF, zero-width
    # space/joiners U+200B-U+200D, bidi marks, soft hyphen. (Removing ZWJ/ZWNJ is wrong for
    # scripts that need them, e.g. Persian; fine for the European pairs this pipeline targets.)
    invisible = [c for c in all_chars if unicodedata.category(c) in ("Cc", "Cf") and not c.isspace()]
    # Literal characters rather than \s or \uXXXX: pandas then runs these on pyarrow's RE2 engine,
    # whose \s would miss most Unicode whitespace (tests check both engines agree on every char).
    return _char_class(invisible), _char_class(whitespace) + "+"


def normalize(lines: pd.Series, form: str) -> pd.Series:
    """Remove invisible chars, Unicode-normalise (NFC/NFKC/none), collapse whitespace to one space, strip."""
    invisible, whitespace_run = _patterns()
    # Invisibles go first so that e.g. "e<ZWSP><combining acute>" still composes to "é".
    lines = lines.str.replace(invisible, "", regex=True)
    if form != "none":
        lines = lines.str.normalize(form)
    # After normalising, because NFKC turns NBSP, ideographic space etc. into plain spaces.
    return lines.str.replace(whitespace_run, " ", regex=True).str.strip(" ")


def token_counts(lines: pd.Series) -> np.ndarray:
    """Whitespace-token counts of already-normalised lines (single spaces, stripped; "" counts 0)."""
    counts = lines.str.count(" ").to_numpy(dtype=np.int64) + 1
    counts[(lines == "").to_numpy(dtype=bool)] = 0
    return counts


# --- deduplication -----------------------------------------------------------------------------


class HashSet:
    """A growing set of uint64 hashes kept as sorted numpy runs: 8 bytes per hash, unlike a Python set."""

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(run) for run in self._runs)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """Boolean mask: which of `hashes` are in the set."""
        found = np.zeros(len(hashes), dtype=bool)
        for run in self._runs:
            pos = np.searchsorted(run, hashes).clip(max=len(run) - 1)
            found |= run[pos] == hashes
        return found

    def add(self, hashes: np.ndarray) -> None:
        """Add distinct hashes that are not in the set yet."""
        if len(hashes) == 0:
            return
        self._runs.append(np.sort(hashes))
        # Merge runs of similar size (LSM-style): O(log n) runs to search, O(n log n) total merge work.
        while len(self._runs) > 1 and len(self._runs[-2]) <= 2 * len(self._runs[-1]):
            newer, older = self._runs.pop(), self._runs.pop()
            self._runs.append(np.sort(np.concatenate([older, newer]), kind="stable"))


def pair_hashes(src: pd.Series, tgt: pd.Series) -> np.ndarray:
    """64-bit hash of each (source, target) pair."""
    frame = pd.DataFrame({"src": src.to_numpy(), "tgt": tgt.to_numpy()})
    return pd.util.hash_pandas_object(frame, index=False).to_numpy(dtype=np.uint64)


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


# --- streaming ---------------------------------------------------------------------------------


def chunks(src: Path, tgt: Path, size: int) -> Iterator[tuple[pd.Series, pd.Series]]:
    """Aligned (source, target) line Series of at most `size` pairs each."""
    pairs = read_aligned(src, tgt)
    while chunk := list(itertools.islice(pairs, size)):
        src_lines, tgt_lines = zip(*chunk, strict=True)
        yield pd.Series(src_lines, dtype="str"), pd.Series(tgt_lines, dtype="str")


def write_lines(f: IO[str], lines: Iterable[str]) -> None:
    """Write each line followed by a newline."""
    f.writelines(line + "\n" for line in lines)


class TrainFilter:
    """Applies the train rules chunk by chunk, counting drops per rule; holds the dedup hashes."""

    def __init__(self, params: Params) -> None:
        self.cfg = params.clean
        self.dropped = dict.fromkeys(DROP_RULES, 0)
        # The only state that grows with corpus size: one 8-byte hash per distinct kept pair.
        self.seen = HashSet()
        self.langs = params.data.langs
        self.identifier = language_identifier(*self.langs) if self.cfg.langid else None

    def keep_mask(self, src: pd.Series, tgt: pd.Series) -> np.ndarray:
        """Which normalised pairs to keep; each dropped pair is counted under the first rule it fails."""
        cfg = self.cfg
        alive = np.ones(len(src), dtype=bool)

        def drop(rule: str, mask: np.ndarray) -> None:
            hit = alive & mask
            self.dropped[rule] += int(hit.sum())
            alive[hit] = False

        n_src, n_tgt = token_counts(src), token_counts(tgt)
        drop("empty", (n_src == 0) | (n_tgt == 0))
        drop("too_short", (n_src < cfg.min_tokens) | (n_tgt < cfg.min_tokens))
        drop("too_long", (n_src > cfg.max_tokens) | (n_tgt > cfg.max_tokens))
        # Multiplied out instead of divided; no zero counts are left at this point.
        drop("length_ratio", np.maximum(n_src, n_tgt) > cfg.max_length_ratio * np.minimum(n_src, n_tgt))

        if cfg.dedup:
            # Against earlier pairs (in earlier chunks or earlier in this one) that passed the rules above.
            # Checked before langid so that langid classifies each distinct pair only once.
            idx = np.flatnonzero(alive)
            hashes = pair_hashes(src.iloc[idx], tgt.iloc[idx])
            dup = self.seen.contains(hashes) | pd.Series(hashes).duplicated().to_numpy()
            drop("duplicate", _scatter(len(src), idx, dup))
            self.seen.add(hashes[~dup])

        if self.identifier is not None:
            idx = np.flatnonzero(alive)
            want_src, want_tgt = self.langs
            wrong = [
                self.identifier.classify(s)[0] != want_src or self.identifier.classify(t)[0] != want_tgt
                for s, t in zip(src.iloc[idx], tgt.iloc[idx], strict=True)
            ]
            drop("langid", _scatter(len(src), idx, np.array(wrong, dtype=bool)))
        return alive


def _scatter(n: int, idx: np.ndarray, values: np.ndarray) -> np.ndarray:
    """A length-n boolean mask that is `values` at positions `idx` and False elsewhere."""
    mask = np.zeros(n, dtype=bool)
    mask[idx] = values
    return mask


# --- the stage ---------------------------------------------------------------------------------


def clean(
    params: Params,
    raw_dir: Path = paths.RAW,
    out_dir: Path = paths.CLEAN,
    metrics_path: Path = paths.METRICS / "clean.json",
) -> dict:
    """Clean train, normalise dev/test, write outputs atomically (all or none) and return the metrics."""
    raw_dir, out_dir, metrics_path = Path(raw_dir), Path(out_dir), Path(metrics_path)
    data, cfg = params.data, params.clean
    langs = data.langs

    def raw(name: str) -> tuple[Path, Path]:
        return raw_dir / f"{name}.{langs[0]}", raw_dir / f"{name}.{langs[1]}"

    # Fail on what can be checked up front before any output directory or temp file is created.
    missing = [str(p) for name in [*data.train, data.dev, *data.test] for p in raw(name) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing raw input(s) (run the download stage first): {', '.join(missing)}")
    train_filter = TrainFilter(params)
    total = sum(count_lines(raw(name)[0]) for name in [*data.train, data.dev, *data.test])  # a fast pass: no decoding

    # Every output is an atomic writer held open until all inputs are processed: an exception
    # anywhere (misaligned or undecodable input) unwinds them all and leaves only the old files.
    with contextlib.ExitStack() as stack:
        progress = stack.enter_context(Progress("clean", total, unit="pairs"))

        def open_pair(stem: Path) -> tuple[IO[str], IO[str]]:
            src_f = stack.enter_context(atomic_write(stem.with_name(f"{stem.name}.{langs[0]}")))
            tgt_f = stack.enter_context(atomic_write(stem.with_name(f"{stem.name}.{langs[1]}")))
            return src_f, tgt_f

        train_out = open_pair(out_dir / "train")
        train_counts = {}
        kept = 0
        for name in data.train:
            train_counts[name] = 0
            for src, tgt in chunks(*raw(name), cfg.chunk_lines):
                train_counts[name] += len(src)
                src, tgt = normalize(src, cfg.normalization), normalize(tgt, cfg.normalization)
                keep = train_filter.keep_mask(src, tgt)
                write_lines(train_out[0], src[keep])
                write_lines(train_out[1], tgt[keep])
                kept += int(keep.sum())
                progress.advance(len(src))

        dev_lines = {data.dev: normalize_only(*raw(data.dev), open_pair(out_dir / "dev"), cfg, progress)}
        test_lines = {
            name: normalize_only(*raw(name), open_pair(out_dir / "test" / name), cfg, progress) for name in data.test
        }

        report = {
            "input_pairs": sum(train_counts.values()),
            "kept_pairs": kept,
            "dropped": train_filter.dropped,
            "train_datasets": train_counts,
            "dev_lines": dev_lines,
            "test_lines": test_lines,
        }
        # Still inside the stack, so a failure here aborts the data files too; they are renamed right after.
        write_json(metrics_path, report)
    return report


def normalize_only(src: Path, tgt: Path, out: tuple[IO[str], IO[str]], cfg: CleanParams, progress: Progress) -> int:
    """Normalise an aligned dev/test pair line for line (no line dropped or added); return its line count."""
    n = 0
    for src_lines, tgt_lines in chunks(src, tgt, cfg.chunk_lines):
        n += len(src_lines)
        write_lines(out[0], normalize(src_lines, cfg.normalization))
        write_lines(out[1], normalize(tgt_lines, cfg.normalization))
        progress.advance(len(src_lines))
    return n


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
