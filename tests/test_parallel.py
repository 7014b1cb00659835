"""Line-aligned byte ranges (and the SentencePiece sample drawn from them), the ordered process map, and progress
lines without a terminal."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest

from seq2seq import parallel
from seq2seq.parallel import aligned_ranges, line_ranges, ordered_map, read_range
from seq2seq.progress import Progress
from seq2seq.textio import TextFormatError, read_lines
from stages.tokenize import SAMPLE_SEED, sample_sentences


@pytest.mark.parametrize(
    "data",
    [b"", b"\n", b"a\nb\nc\n", b"a\nb\nc", b"one\r\ntwo\r\n\r\nfour", b"\n\n\n\n\n\n\n", "é\nü\n€\n".encode()],
)
@pytest.mark.parametrize("per_range", [1, 2, 3, 100])
@pytest.mark.parametrize("block_bytes, window", [(2, 1), (5, 2), (1 << 22, 3)])
def test_ranges_hold_every_line_once_as_read_lines_sees_them(
    tmp_path: Path, data: bytes, per_range: int, block_bytes: int, window: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ranges that end inside, at and across read blocks, and in any newline search window of a block
    monkeypatch.setattr(parallel, "BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(parallel, "NEWLINE_WINDOW", window)
    path = tmp_path / "text"
    path.write_bytes(data)
    ranges = line_ranges(path, per_range)
    assert [line for r in ranges for line in read_range(r)] == list(read_lines(path))
    assert all(r.lines == len(read_range(r)) for r in ranges)
    assert all(r.lines == per_range for r in ranges[:-1])
    assert [r.first_line for r in ranges] == [1 + i * per_range for i in range(len(ranges))]
    assert all(a.end == b.start for a, b in itertools.pairwise(ranges))  # contiguous: no byte read twice or skipped


@pytest.mark.parametrize("size", [0, 1, 4, 9, 100])
def test_the_sentencepiece_sample_is_exactly_the_chosen_lines(tmp_path: Path, size: int) -> None:
    texts = {
        tmp_path / "train.en": b"one\r\ntwo\n\nfour\nfive",
        tmp_path / "train.fr": "un\ndeux\n\xe9\nquatre\n".encode(),
    }
    for path, data in texts.items():
        path.write_bytes(data)
    lines = [line for path in texts for line in read_lines(path)]  # 9 lines in all
    chosen = np.sort(np.random.default_rng(SAMPLE_SEED).choice(len(lines), min(size, len(lines)), replace=False))

    out = tmp_path / "sample.txt"
    assert sample_sentences({path: line_ranges(path, 2) for path in texts}, size, out) == len(chosen)
    assert out.read_bytes() == "".join(lines[i] + "\n" for i in chosen).encode()


def test_invalid_utf8_is_named_by_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "train.fr"
    path.write_bytes(b"un\ndeux\ntrois\nqu\xe9tre\ncinq\n")
    third_range = line_ranges(path, 2)[1]  # lines 3-4
    with pytest.raises(
        TextFormatError, match=re.escape(f"{path}:4: not valid UTF-8 (invalid continuation byte at byte 2)")
    ):
        read_range(third_range)


@pytest.mark.parametrize("n_en, n_fr, per_range", [(3, 2, 2), (2, 3, 2), (10, 7, 3), (7, 10, 3), (9, 8, 3), (1, 0, 5)])
def test_aligned_ranges_name_both_files_when_line_counts_differ(
    tmp_path: Path, n_en: int, n_fr: int, per_range: int
) -> None:
    (tmp_path / "a.en").write_text("".join(f"{i}\n" for i in range(n_en)))
    (tmp_path / "a.fr").write_text("".join(f"{i}\n" for i in range(n_fr)))
    short, long_ = ("en", "fr") if n_en < n_fr else ("fr", "en")
    n = min(n_en, n_fr)
    with pytest.raises(TextFormatError, match=rf"a\.{short} ends after {n} lines but .*a\.{long_} has a line {n + 1}"):
        list(aligned_ranges(tmp_path / "a.en", tmp_path / "a.fr", per_range))


def test_aligned_ranges_are_the_two_files_ranges_side_by_side(tmp_path: Path) -> None:
    (tmp_path / "a.en").write_text("".join(f"{i}\n" for i in range(10)))
    (tmp_path / "a.fr").write_text("".join(f"ligne {i}\n" for i in range(9)) + "la dernière")
    pairs = list(aligned_ranges(tmp_path / "a.en", tmp_path / "a.fr", 3))
    assert pairs == list(zip(line_ranges(tmp_path / "a.en", 3), line_ranges(tmp_path / "a.fr", 3), strict=True))
    assert [r.lines for r, _ in pairs] == [3, 3, 3, 1]


def _square(x: int) -> int:
    if x == 13:
        raise ValueError("no thirteen")
    return x * x


@pytest.mark.parametrize("processes", [1, 2])
def test_ordered_map_keeps_the_input_order_and_raises_a_workers_error(processes: int) -> None:
    assert list(ordered_map(_square, range(12), processes)) == [x * x for x in range(12)]
    with pytest.raises(ValueError, match="no thirteen"):
        list(ordered_map(_square, range(20), processes))


def test_progress_without_a_terminal_prints_a_line_per_tenth(capsys: pytest.CaptureFixture[str]) -> None:
    with Progress("clean", total=1000, unit="pairs") as progress:
        for _ in range(100):
            progress.advance(10)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10
    assert lines[0].startswith("clean: 10% (100 pairs of 1,000 pairs) in ")
    assert lines[-1].startswith("clean: 100% (1,000 pairs of 1,000 pairs) in ")


def test_progress_of_a_failed_step_does_not_say_done(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RuntimeError), Progress("sentencepiece", total=None):
        raise RuntimeError("out of memory")
    with Progress("sentencepiece", total=None):
        pass
    assert capsys.readouterr().err.splitlines() == ["sentencepiece: done in 0s"]
