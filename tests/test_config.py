"""params.yaml validation: bad keys, types and ranges fail before any work, naming the key path."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from seq2seq.config import ParamsError, load_params, parse_params
from seq2seq.preset import apply_preset
from tests.pipeline_fixtures import committed_params, committed_params_text

REPO = Path(__file__).resolve().parents[1]
RAW = committed_params()


def with_change(path: str, value: object) -> dict:
    raw = copy.deepcopy(RAW)
    node = raw
    *parents, leaf = path.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    return raw


def test_committed_params_and_presets_are_valid() -> None:
    params = parse_params(committed_params())
    assert params.data.pair == "en-fr"
    assert params.source_for("newstest2014").files["fr"].endswith("newstest2014-fren-ref.fr.sgm")


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        ("train.lr", -1.0, "train.lr"),  # range
        ("train.max_steps", "many", "train.max_steps"),  # type
        ("model.transformer.n_heads", 7, "model.transformer"),  # d_model not divisible by heads
        ("clean.normalization", "NFX", "clean.normalization"),
        ("data.src_lang", "English", "data.src_lang"),
        ("tokenize.vocab_size", 10, "tokenize.vocab_size"),
    ],
)
def test_bad_values_name_the_key(path: str, value: object, named: str) -> None:
    with pytest.raises(ParamsError) as err:
        parse_params(with_change(path, value), "params.yaml")
    assert named in str(err.value)
    assert "params.yaml" in str(err.value)


def test_unknown_key_is_rejected() -> None:
    raw = with_change("train.learning_rate", 0.1)
    with pytest.raises(ParamsError, match=r"train\.learning_rate"):
        parse_params(raw)


def test_missing_key_is_rejected() -> None:
    raw = copy.deepcopy(RAW)
    del raw["train"]["warmup_steps"]
    with pytest.raises(ParamsError, match=r"train\.warmup_steps: Field required"):
        parse_params(raw)


def test_dataset_names_and_pairs_are_checked() -> None:
    with pytest.raises(ParamsError, match="no_such_corpus"):
        parse_params(with_change("data.train", ["no_such_corpus"]))
    # UN has no English-German source: switching the pair names the dataset and what it has
    with pytest.raises(ParamsError, match=r"download.datasets.un has no source for en-de"):
        parse_params(with_change("data.tgt_lang", "de"))


def test_english_german_is_a_one_line_change_of_pair_and_corpora() -> None:
    raw = with_change("data.tgt_lang", "de")
    raw["data"]["train"] = ["europarl_v7", "commoncrawl", "news_commentary_v9"]
    params = parse_params(raw)
    assert params.source_for("newstest2014").files["de"].endswith("newstest2014-deen-ref.de.sgm")


def test_stage_cli_refuses_bad_params_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(with_change("train.clip_norm", 0)))
    proc = subprocess.run(
        [sys.executable, "-m", "stages.train"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "train.clip_norm" in proc.stderr
    assert not (tmp_path / "models").exists()


def test_preset_is_applied_keeping_comments_and_validated(tmp_path: Path) -> None:
    params_path = tmp_path / "params.yaml"
    params_path.write_text(committed_params_text())
    keys = apply_preset(REPO / "presets/demo.yaml", params_path)
    assert "data.train" in keys
    params = load_params(params_path)
    assert params.data.train == ["multi30k_train"]
    assert "# The pipeline's parameters" in params_path.read_text()

    bad = tmp_path / "bad.yaml"
    bad.write_text("train.lr: -3\n")
    before = params_path.read_text()
    with pytest.raises(ParamsError, match=r"train\.lr"):
        apply_preset(bad, params_path)
    assert params_path.read_text() == before  # nothing written on a bad preset
