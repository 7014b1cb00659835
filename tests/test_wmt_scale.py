"""The WMT'14-shaped synthetic corpus (bench/synth_corpus.py) through the real download (from a loopback HTTP
server and from a local directory, in statmt.org's layout), clean and tokenize: the outputs are the same byte
for byte with one worker process or two, and clean drops exactly what the corpus was built with."""

from __future__ import annotations

import importlib
import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest

from seq2seq.config import MIRROR_ENV, Params, parse_params
from stages.clean import clean
from stages.download import download
from stages.tokenize import tokenize
from tests.pipeline_fixtures import REPO, committed_params, toy_pair

sys.path.insert(0, str(REPO / "bench"))
synth = importlib.import_module("synth_corpus")

N_PAIRS = 3000


@pytest.fixture(autouse=True)
def _no_env_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MIRROR_ENV, raising=False)


def toy_pools() -> tuple[Any, Any, Any]:
    """Pools of toy pairs (tests/pipeline_fixtures.py) standing in for the real corpora of ../shared/data."""
    rng = random.Random(0)
    train, dev, test = ([toy_pair(rng) for _ in range(n)] for n in (4000, 50, 40))
    return (
        synth.Pool.from_pairs([e for e, _ in train], [f for _, f in train]),
        synth.Pool([e for e, _ in dev], [f for _, f in dev]),
        synth.Pool([e for e, _ in test], [f for _, f in test]),
    )


def run_params(mirror: str, corpus: Path, processes: int) -> Params:
    """The committed recipe (WMT'14 en-fr) fetched from `mirror`, with small chunks and a small vocabulary."""
    raw = synth.params_for_mirror(committed_params(), mirror, corpus)
    raw["download"].update(retries=0, timeout_seconds=10)
    raw["clean"].update(chunk_lines=400, processes=processes)  # several chunks: duplicates across chunks too
    # SentencePiece's scores depend on its thread count (sums of floats), not on the encoding processes
    raw["tokenize"].update(vocab_size=200, input_sentence_size=2000, num_threads=2, processes=processes)
    return parse_params(raw)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_pipeline(mirror: str, corpus: Path, work: Path, processes: int) -> dict[str, Any]:
    params = run_params(mirror, corpus, processes)
    manifest = download(params, work / "raw", work / "downloads")
    report = clean(params, work / "raw", work / "clean", work / "clean.json")
    meta = tokenize(params, work / "clean", work / "tokenized")
    return {"manifest": manifest, "clean": report, "tokenize": meta}


def test_synthetic_wmt_corpus_gives_the_same_outputs_with_one_or_two_processes(tmp_path: Path) -> None:
    corpus = tmp_path / "statmt"
    report = synth.write_corpus(corpus, N_PAIRS, parse_params(committed_params()), *toy_pools())

    with synth.serve_directory(corpus) as url:
        one = run_pipeline(url, corpus, tmp_path / "one", processes=1)
    two = run_pipeline(str(corpus), corpus, tmp_path / "two", processes=2)  # a local directory this time

    # download: every training corpus of the recipe, from the upstream archive names, line for line
    lines = {name.removesuffix(".en"): e["lines"] for name, e in one["manifest"].items() if name.endswith(".en")}
    assert {name: lines[name] for name in report["datasets"]} == report["datasets"]
    assert one["manifest"]["europarl_v7.en"]["member"] == "training/europarl-v7.fr-en.en"
    assert files(tmp_path / "one/raw").keys() == files(tmp_path / "two/raw").keys()
    for name, data in files(tmp_path / "one/raw").items():
        if name != "manifest.json":  # which differs in the origins only
            assert data == files(tmp_path / "two/raw")[name], name

    # clean: exactly the noise the corpus holds, whatever the number of processes
    assert one["clean"]["dropped"] == synth.expected_drops(report)
    assert one["clean"]["input_pairs"] == N_PAIRS
    assert files(tmp_path / "one/clean") == files(tmp_path / "two/clean")
    assert one["clean"] == two["clean"]

    # tokenize: the same model (up to the path it was trained under) and byte-identical token arrays
    arrays_one, arrays_two = files(tmp_path / "one/tokenized"), files(tmp_path / "two/tokenized")
    assert arrays_one.keys() == arrays_two.keys()
    for name in arrays_one:
        if name.endswith((".bin", ".idx", ".vocab")):
            assert arrays_one[name] == arrays_two[name], name
    assert one["tokenize"]["splits"] == two["tokenize"]["splits"]
    assert one["tokenize"]["splits"]["train"]["en"]["sentences"] == one["clean"]["kept_pairs"]


@pytest.mark.realdata
def test_the_synthetic_corpus_from_the_shared_data_is_what_clean_expects(tmp_path: Path) -> None:
    if not (synth.SHARED_DATA / "multi30k").is_dir():
        pytest.skip(f"{synth.SHARED_DATA} is absent")
    corpus = tmp_path / "statmt"
    dev, test = synth.shared_dev_test()
    report = synth.write_corpus(corpus, N_PAIRS, parse_params(committed_params()), synth.shared_pool(), dev, test)
    assert json.loads((corpus / "synth.json").read_text())["noise"] == report["noise"]
    assert 20 < report["en_words"] / N_PAIRS < 40  # two or three real sentences per side

    params = run_params(str(corpus), corpus, processes=2)
    download(params, tmp_path / "raw", tmp_path / "downloads")
    metrics = clean(params, tmp_path / "raw", tmp_path / "clean", tmp_path / "clean.json")
    assert metrics["dropped"] == synth.expected_drops(report)
    assert metrics["dev_lines"] == {"newstest2013": 3000}
