"""Tests of the clean stage: normalisation, each drop rule, chunking, alignment, atomic failure, the CLI."""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import yaml

from seq2seq.config import Params, ParamsError, parse_params
from seq2seq.parallel import line_ranges, read_range
from seq2seq.textio import TextFormatError
from stages.clean import HashSet, Lines, arrow_lines, clean, normalize, token_counts
from tests.pipeline_fixtures import committed_params

REPO = Path(__file__).resolve().parents[1]
BASE_RAW = committed_params()
# Dataset names only have to exist under download.datasets; clean reads data/raw/<name>.<lang>.
TRAIN, DEV, TEST = "multi30k_train", "multi30k_val", "multi30k_test_2016"


def make_raw(train: list[str] | None = None, test: list[str] | None = None, **clean: Any) -> dict[str, Any]:
    """params.yaml as a mapping, with the Multi30k split names and `clean` overrides."""
    raw = copy.deepcopy(BASE_RAW)
    raw["data"].update(train=train or [TRAIN], dev=DEV, test=test or [TEST])
    raw["clean"].update(clean)
    return raw


def make_params(train: list[str] | None = None, test: list[str] | None = None, **clean: Any) -> Params:
    return parse_params(make_raw(train, test, **clean))


def write_raw(raw_dir: Path, name: str, src: list[str], tgt: list[str]) -> None:
    """Write data/raw/<name>.en and .fr, one segment per line."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    for lang, lines in (("en", src), ("fr", tgt)):
        (raw_dir / f"{name}.{lang}").write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def write_splits(raw_dir: Path, src: list[str], tgt: list[str]) -> None:
    """Train from `src`/`tgt`, plus small valid dev and test sets."""
    write_raw(raw_dir, TRAIN, src, tgt)
    write_raw(raw_dir, DEV, ["a dev line"], ["une ligne dev"])
    write_raw(raw_dir, TEST, ["a test line"], ["une ligne test"])


def run(tmp_path: Path, params: Params) -> dict[str, Any]:
    return clean(params, tmp_path / "raw", tmp_path / "clean", tmp_path / "metrics" / "clean.json")


def read(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


# --- normalisation ---------------------------------------------------------------------------


def norm(lines: list[str], form: str = "NFKC") -> list[str]:
    return normalize(lines, form)


def test_nfkc_folds_compatibility_characters() -> None:
    assert norm(["ﬁne ﬂow", "１２３ Ａ", "x\u3000y", "a\u00a0:\u202fb", "e\u0301"]) == [
        "fine flow",
        "123 A",
        "x y",
        "a : b",
        "é",
    ]
    assert norm(["ﬁne", "e\u0301"], "NFC") == ["ﬁne", "é"]
    assert norm(["ﬁne", "e\u0301"], "none") == ["ﬁne", "e\u0301"]


def test_controls_and_zero_width_removed_and_whitespace_collapsed() -> None:
    raw = "\ufeff  Hello\u200b wor\u200dld\t\tfoo\x00\x07 \u00adbar \r\x0bbaz\u2028qux\x85end  "
    assert norm([raw]) == ["Hello world foo bar baz qux end"]
    # A removed zero-width char must not keep a combining mark from composing.
    assert norm(["e\u200b\u0301"], "NFC") == ["é"]
    assert norm(["", "   ", "\u200b\ufeff", "\t"]) == ["", "", "", ""]


def test_normalize_agrees_with_pure_python_on_every_code_point() -> None:
    """The patterns run on pyarrow's RE2: they must give what Python's str.isspace and unicodedata say."""
    cps = [cp for cp in range(sys.maxunicode + 1) if not 0xD800 <= cp <= 0xDFFF]
    lines = ["".join(chr(cp) + "x" for cp in cps[i : i + 400]) for i in range(0, len(cps), 400)]

    def reference(text: str) -> str:
        kept = "".join(c for c in text if c.isspace() or unicodedata.category(c) not in ("Cc", "Cf"))  # drop invisibles
        return " ".join(kept.split())

    got = normalize(lines, "none")
    assert got == [reference(line) for line in lines]


def test_lines_write_keeps_exactly_the_chosen_lines_in_order() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        lines = [bytes(rng.integers(97, 100, rng.integers(0, 5)).astype(np.uint8)) for _ in range(rng.integers(1, 30))]
        keep = rng.random(len(lines)) < rng.random()
        want = b"".join(line + b"\n" for line, k in zip(lines, keep, strict=True) if k)
        out = io.BytesIO()
        Lines.of(lines).write(out, keep)
        assert out.getvalue() == want


def test_token_counts_are_the_space_separated_words_of_each_line() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        words = [rng.integers(0, 6) for _ in range(rng.integers(1, 20))]  # per line
        lines = [" ".join("ab"[: rng.integers(1, 3)] for _ in range(n)) for n in words]
        want = [len(line.split(" ")) if line else 0 for line in lines]
        start = int(rng.integers(0, len(lines)))  # a sliced array starts inside its buffers
        for type_ in (pa.large_string(), pa.string()):
            array = pa.array(lines, type=type_)
            assert token_counts(array).tolist() == want
            assert token_counts(array.slice(start)).tolist() == want[start:]


def test_a_worker_cleans_a_chunk_without_importing_pandas(tmp_path: Path) -> None:
    """pandas takes 0.2 s to import, in each worker process; pyarrow imports it for pa.array, str scalars and
    to_numpy, so the worker's path must use none of them."""
    write_splits(tmp_path, ["a  b\u00a0c", "é d", "é d", ""], ["x y", "\u200bz é", "\u200bz é", "w"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(make_raw()), encoding="utf-8")
    script = f"""
import sys
from pathlib import Path
from seq2seq.config import load_params
from seq2seq.parallel import aligned_ranges
from stages.clean import ChunkCleaner, ChunkTask
tmp = Path({str(tmp_path)!r})
ranges = aligned_ranges(tmp / "{TRAIN}.en", tmp / "{TRAIN}.fr", 10)[0]
chunk = ChunkCleaner(load_params(tmp / "params.yaml")).clean(ChunkTask(*ranges, train=True, index=0))
assert chunk.dropped["duplicate"] == 1 and chunk.dropped["empty"] == 1, chunk
print("pandas" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# --- train rules -----------------------------------------------------------------------------


def test_each_rule_counted_exactly(tmp_path: Path) -> None:
    pairs = [
        ("a b c", "x y z"),  # kept
        ("", "x"),  # empty (source)
        ("a", "\u200b"),  # empty (target after cleanup)
        ("a", "x y"),  # too_short: source has 1 < 2 tokens
        ("a b c d e f", "x y z"),  # too_long: source 6 > 5
        ("a b", "v w x y z"),  # length_ratio: 5 / 2 = 2.5 > 2
        ("a b", "x y z w"),  # kept: ratio exactly 2 is allowed
        ("a  b   c", "x y\tz"),  # duplicate of the first pair after normalisation
        ("a b c", "x y z"),  # duplicate
        ("a b", "x y z w"),  # duplicate
        ("a b c d e f", "x y z"),  # too_long again (a dropped pair is never "kept", so not a duplicate)
        ("p q", "r s"),  # kept
    ]
    write_splits(tmp_path / "raw", [s for s, _ in pairs], [t for _, t in pairs])
    report = run(tmp_path, make_params(min_tokens=2, max_tokens=5, max_length_ratio=2.0))

    assert report["dropped"] == {
        "empty": 2,
        "too_short": 1,
        "too_long": 2,
        "length_ratio": 1,
        "duplicate": 3,
        "langid": 0,
    }
    assert (report["input_pairs"], report["kept_pairs"]) == (12, 3)
    assert json.loads((tmp_path / "metrics" / "clean.json").read_text()) == report
    assert report["train_datasets"] == {TRAIN: 12}
    assert report["dev_lines"] == {DEV: 1} and report["test_lines"] == {TEST: 1}
    assert read(tmp_path / "clean" / "train.en") == ["a b c", "a b", "p q"]
    assert read(tmp_path / "clean" / "train.fr") == ["x y z", "x y z w", "r s"]


def test_dedup_off_keeps_duplicates(tmp_path: Path) -> None:
    write_splits(tmp_path / "raw", ["a b", "a b", "a b"], ["x y", "x y", "x z"])
    report = run(tmp_path, make_params(dedup=False))
    assert report["kept_pairs"] == 3 and report["dropped"]["duplicate"] == 0


def test_train_datasets_concatenated_in_params_order(tmp_path: Path) -> None:
    raw_dir = tmp_path / "raw"
    write_splits(raw_dir, ["one", "two"], ["un", "deux"])
    write_raw(raw_dir, "europarl_v7", ["three", "one"], ["trois", "un"])  # "one/un" duplicates across datasets
    report = run(tmp_path, make_params(train=[TRAIN, "europarl_v7"]))
    assert read(tmp_path / "clean" / "train.en") == ["one", "two", "three"]
    assert report["train_datasets"] == {TRAIN: 2, "europarl_v7": 2}
    assert report["dropped"]["duplicate"] == 1


def test_chunk_size_and_processes_do_not_change_output(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    words = ["le", "chat", "noir", "dort", "ici", "ﬁn", "１", "\u200b", " ", "\t"]
    src = ["".join(rng.choice(words, rng.integers(0, 8))) for _ in range(300)]
    tgt = [" ".join(rng.choice(words, rng.integers(0, 8))) for _ in range(300)]
    # Exact duplicates far apart, so with chunk_lines=7 they fall into different chunks.
    src += src[:40]
    tgt += tgt[:40]
    # NFKC makes this line 11x longer (U+FDFA is four words): with one pair per chunk, that chunk's lines outgrow
    # the worker's slot of the shared file (input bytes + 1/4) and go back through the pipe instead.
    src += ["\ufdfa" * 20]
    tgt += ["\ufdfa " * 20]
    write_splits(tmp_path / "raw", src, tgt)

    outputs = []
    for chunk_lines, processes in ((1, 1), (1, 2), (7, 1), (7, 2), (1000, 2)):
        out = tmp_path / f"out{chunk_lines}-{processes}"
        params = make_params(chunk_lines=chunk_lines, processes=processes, max_length_ratio=4.0)
        report = clean(params, tmp_path / "raw", out, out / "m.json")
        outputs.append((report, {p.relative_to(out): p.read_bytes() for p in files_under(out)}))
    assert all(output == outputs[0] for output in outputs[1:])
    report, files = outputs[0]
    assert report["input_pairs"] == report["kept_pairs"] + sum(report["dropped"].values()) == 341
    assert files[Path("train.fr")].decode().endswith(" ".join(["صلى الله عليه وسلم"] * 20) + "\n")

    # Without dedup, the kept pairs include the repeats; with it, exactly their first occurrences remain.
    out = tmp_path / "nodedup"
    clean(make_params(dedup=False, max_length_ratio=4.0), tmp_path / "raw", out, out / "m.json")
    all_kept = list(zip(read(out / "train.en"), read(out / "train.fr"), strict=True))
    unique = list(dict.fromkeys(all_kept))
    deduped = list(zip(read(tmp_path / "out7-2" / "train.en"), read(tmp_path / "out7-2" / "train.fr"), strict=True))
    assert deduped == unique
    assert report["dropped"]["duplicate"] == len(all_kept) - len(unique) >= 20


@pytest.mark.parametrize("expected", [0, 100_000])  # grown from the smallest table many times, or sized once
@pytest.mark.parametrize("span", [5_000, 2**64])  # small keys (0 among them) crowd a few slots; random ones spread
def test_hash_set_matches_python_set(expected: int, span: int) -> None:
    rng = np.random.default_rng(1)
    hashes, reference = HashSet(expected), set()
    for _ in range(60):
        batch = np.unique(rng.integers(0, span, rng.integers(0, 400), dtype=np.uint64, endpoint=span < 2**64))
        if reference and len(batch):  # some keys seen in earlier batches
            batch = np.unique(np.concatenate([batch, rng.choice(np.array(sorted(reference), dtype=np.uint64), 20)]))
        new = batch[~hashes.contains(batch)]
        assert set(new.tolist()) == set(batch.tolist()) - reference
        hashes.add(new)
        reference |= set(new.tolist())
    assert len(hashes) == len(reference) > 5_000 // 2
    absent = np.array([5_001, 5_002, 2**64 - 1], dtype=np.uint64)
    assert hashes.contains(absent).tolist() == [int(a) in reference for a in absent]
    everything = np.array(sorted(reference), dtype=np.uint64)
    assert hashes.contains(everything).all()


# --- dev and test --------------------------------------------------------------------------------


def test_dev_and_test_keep_every_line_aligned(tmp_path: Path) -> None:
    raw_dir = tmp_path / "raw"
    write_raw(raw_dir, TRAIN, ["a b"], ["x y"])
    # Lines that train would drop (empty, too long, ratio, duplicate) must all survive in dev/test.
    dev_src = ["ﬁrst  line", "", "\u200b", "a b c d e f g", "same", "same"]
    dev_tgt = ["première", "not empty", "", "x", "même", "même"]
    write_raw(raw_dir, DEV, dev_src, dev_tgt)
    write_raw(raw_dir, TEST, ["t1", "", "t3"], ["", "u2", "u3"])
    write_raw(raw_dir, "newstest2014", ["n1"], ["m1"])
    report = run(tmp_path, make_params(test=[TEST, "newstest2014"], max_tokens=3))

    out = tmp_path / "clean"
    assert read(out / "dev.en") == ["first line", "", "", "a b c d e f g", "same", "same"]
    assert read(out / "dev.fr") == ["première", "not empty", "", "x", "même", "même"]
    assert read(out / "test" / f"{TEST}.en") == ["t1", "", "t3"]
    assert read(out / "test" / f"{TEST}.fr") == ["", "u2", "u3"]
    assert read(out / "test" / "newstest2014.fr") == ["m1"]
    assert report["dev_lines"] == {DEV: 6}
    assert report["test_lines"] == {TEST: 3, "newstest2014": 1}


# --- failures leave nothing behind ---------------------------------------------------------------


def test_misaligned_input_names_both_files_and_writes_nothing(tmp_path: Path) -> None:
    raw_dir = tmp_path / "raw"
    write_raw(raw_dir, TRAIN, ["a", "b"], ["x", "y"])
    write_raw(raw_dir, DEV, ["a"], ["x"])
    write_raw(raw_dir, TEST, ["a", "b", "c"], ["x", "y"])  # processed last: train and dev outputs exist by then
    with pytest.raises(TextFormatError) as err:
        run(tmp_path, make_params())
    assert f"{TEST}.en" in str(err.value) and f"{TEST}.fr" in str(err.value)
    assert files_under(tmp_path / "clean") == []
    assert files_under(tmp_path / "metrics") == []


def test_invalid_utf8_names_file_and_line_and_keeps_old_outputs(tmp_path: Path) -> None:
    raw_dir = tmp_path / "raw"
    write_splits(raw_dir, ["a", "b"], ["x", "y"])
    run(tmp_path, make_params())
    before = {p: p.read_bytes() for p in files_under(tmp_path)}

    (raw_dir / f"{DEV}.fr").write_bytes(b"ok\nbad \xff byte\n")
    (raw_dir / f"{DEV}.en").write_bytes(b"ok\nfine\n")
    (raw_dir / f"{TRAIN}.en").write_text("changed\nb\n", encoding="utf-8")
    with pytest.raises(TextFormatError, match=re.escape(f"{DEV}.fr:2:")):
        run(tmp_path, make_params())
    after = {p: p.read_bytes() for p in files_under(tmp_path) if p.parent != raw_dir}
    assert after == {p: b for p, b in before.items() if p.parent != raw_dir}  # old outputs intact, no temp files


def test_missing_raw_file_is_named(tmp_path: Path) -> None:
    write_splits(tmp_path / "raw", ["a"], ["x"])
    (tmp_path / "raw" / f"{TEST}.fr").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{TEST}.fr")):
        run(tmp_path, make_params())
    assert not (tmp_path / "clean").exists()


# --- langid --------------------------------------------------------------------------------------

HAVE_LANGID = importlib.util.find_spec("langid") is not None


@pytest.mark.skipif(HAVE_LANGID, reason="langid is installed")
def test_langid_without_package_is_a_clear_error(tmp_path: Path) -> None:
    write_splits(tmp_path / "raw", ["a"], ["x"])
    with pytest.raises(ParamsError) as err:
        run(tmp_path, make_params(langid=True))
    assert "clean.langid" in str(err.value) and "pip install '.[langid]'" in str(err.value)
    assert files_under(tmp_path / "clean") == []


@pytest.mark.skipif(not HAVE_LANGID, reason="optional langid package not installed")
def test_langid_drops_pairs_in_the_wrong_language(tmp_path: Path) -> None:
    en = [
        "A man in a blue shirt is riding a bicycle down the street.",
        "Two young children are playing with a dog in the park.",
        "Un homme en chemise bleue fait du vélo dans la rue.",  # French on the English side
        "The woman is reading a book while sitting on the bench.",
    ]
    fr = [
        "Un homme en chemise bleue fait du vélo dans la rue.",
        "Two young children are playing with a dog in the park.",  # English on the French side
        "A man in a blue shirt is riding a bicycle down the street.",
        "La femme lit un livre assise sur le banc.",
    ]
    write_splits(tmp_path / "raw", en, fr)
    report = run(tmp_path, make_params(langid=True))
    assert report["dropped"]["langid"] == 2
    assert read(tmp_path / "clean" / "train.en") == [en[0], en[3]]


# --- command line --------------------------------------------------------------------------------


def run_cli(cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "stages.clean"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_rejects_invalid_params(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(make_raw(max_tokens=-1)), encoding="utf-8")
    result = run_cli(tmp_path)
    assert result.returncode != 0
    assert "clean.max_tokens" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_cleans_from_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(make_raw()), encoding="utf-8")
    write_splits(tmp_path / "data" / "raw", ["a b", "a b"], ["x y", "x y"])
    result = run_cli(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "kept 1 of 2" in result.stdout
    assert read(tmp_path / "data" / "clean" / "train.en") == ["a b"]
    assert json.loads((tmp_path / "metrics" / "clean.json").read_text())["dropped"]["duplicate"] == 1


@pytest.mark.parametrize("data", [b"", b"\n", b"a b\nc", b"one\r\ntwo\r\r\n\n", "é\u200b\n\u00a0x\n".encode()])
def test_arrow_lines_are_the_lines_read_range_reads(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "train.en"
    path.write_bytes(data)
    for r in line_ranges(path, 2):
        assert arrow_lines(r).to_pylist() == read_range(r)


def test_arrow_lines_name_the_file_and_line_of_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "train.fr"
    path.write_bytes(b"un\ndeux\ntr\xffois\n")
    with pytest.raises(TextFormatError, match=re.escape(f"{path}:3: not valid UTF-8")):
        arrow_lines(line_ranges(path, 10)[0])
