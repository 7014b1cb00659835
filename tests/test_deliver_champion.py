"""The deliver-champion flow's decisions (flows/deliver_champion.py); tests/test_promotion_ui.py runs the flow
for real, triggered through MLflow's webhook and Prefect's event."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from flows.deliver_champion import (
    LINEAGE_TAGS,
    Delivery,
    DeliveryRejected,
    Score,
    alias_setter,
    delivery_tags,
    guard,
    missing_lineage,
    parse_inputs,
    report_markdown,
)

SIG = "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.5.1"


def test_lineage_needs_the_git_commit_params_hash_and_data_hashes() -> None:
    complete = {t: "abc" for t in LINEAGE_TAGS}
    assert missing_lineage(complete) == []
    assert missing_lineage({**complete, "git_commit": "unknown"}) == ["git_commit"]
    assert missing_lineage({"git_commit": "abc"}) == list(LINEAGE_TAGS[1:])


def test_the_guard_rejects_only_below_the_previous_champion_by_more_than_the_margin() -> None:
    previous = Score(30.0, SIG, 10.0)
    assert "no champion" in guard("t", Score(1.0, SIG, 1.0), None, None, 0.5)
    assert "29.60 vs the previous champion (version 3) 30.00" in guard("t", Score(29.6, SIG, 1.0), previous, "3", 0.5)
    with pytest.raises(DeliveryRejected, match="below the previous champion by more than the margin"):
        guard("t", Score(29.4, SIG, 1.0), previous, "3", 0.5)
    with pytest.raises(DeliveryRejected, match="not comparable"):
        guard("t", Score(35.0, SIG.replace("13a", "intl"), 1.0), previous, "3", 0.5)


def test_who_set_the_alias_is_known_only_from_seq2seq_promote() -> None:
    at = datetime(2026, 11, 27, 6, 0, tzinfo=UTC)
    tags = {"promotion.by": "alice", "promotion.at": at.isoformat()}
    assert alias_setter(tags, at + timedelta(seconds=5)) == "alice (seq2seq.promote)"
    assert alias_setter(tags, at + timedelta(hours=2)).startswith("unknown: set in the MLflow UI")
    assert alias_setter({}, at).startswith("unknown")


@pytest.mark.parametrize(
    ("args", "bad"),
    [
        (("nmt en-fr", "1", None), "model_name"),
        (("nmt-en-fr", "1; drop", None), "version"),
        (("nmt-en-fr", "1", "yesterday"), "alias_set_at"),
        (("nmt-en-fr", "1", "2026-11-27T06:00:00"), "time zone"),
    ],
)
def test_untrusted_parameters_get_one_clear_error(args: tuple, bad: str) -> None:
    with pytest.raises(ValueError, match=bad) as err:
        parse_inputs(*args)
    assert "\n" not in str(err.value)
    assert parse_inputs("nmt-en-fr", "12", "2026-11-27T06:00:00+00:00")[1] == "12"


def test_tags_and_report_carry_both_backends_scores_and_speeds() -> None:
    d = Delivery("nmt-en-fr", "4", "3", "unknown", family="Transformer")
    d.pytorch = {"test_2016": Score(35.123, SIG, 40.0)}
    d.ctranslate2 = {"test_2016": Score(35.0, SIG, 200.0)}
    d.ctranslate2_note, d.decision = "exported", "BLEU ..."
    tags = delivery_tags(d)
    assert tags["delivery.bleu.test_2016"] == "35.12" and tags["delivery.ctranslate2_int8.bleu.test_2016"] == "35.00"
    assert tags["delivery.pytorch.sentences_per_s.test_2016"] == "40.0"
    assert tags["delivery.ctranslate2_int8.sentences_per_s.test_2016"] == "200.0"
    md = report_markdown(d, "delivered", "`models:/nmt-en-fr/4`")
    assert "| test_2016 | 35.12 | 40.0 | 35.00 | -0.12 | 200.0 | x5.0 |" in md and SIG in md

    rnn = Delivery("nmt-en-fr", "5", "4", "unknown", family="AttentionRNN")
    rnn.pytorch = {"test_2016": Score(30.0, SIG, 50.0)}
    rnn.ctranslate2_note = "skipped: CTranslate2 runs Transformers, this is AttentionRNN; served with PyTorch"
    assert delivery_tags(rnn)["delivery.ctranslate2"].startswith("skipped")
    assert "| test_2016 | 30.00 | 50.0 | – | – | – | – |" in report_markdown(rnn, "delivered", "x")


def test_an_attention_rnn_champion_is_not_exported_and_the_tags_say_why(tmp_path) -> None:
    """CTranslate2 runs Transformers only: an RNN champion (the CPU demo's) is delivered with PyTorch."""
    from types import SimpleNamespace

    from flows.deliver_champion import LoadedVersion, deliver_ctranslate2
    from seq2seq.config import parse_params
    from seq2seq.models import build_model
    from tests.pipeline_fixtures import tiny_params

    raw = tiny_params(tmp_path)
    raw["model"]["family"] = "attention_rnn"
    rnn = build_model(parse_params(raw).model, vocab_size=40)
    d = Delivery("nmt-en-fr", "5", "4", "unknown", family=type(rnn).__name__)
    # the client, version and test sets are not touched on this path
    deliver_ctranslate2(
        None, d, None, LoadedVersion(tmp_path, SimpleNamespace(translator=SimpleNamespace(model=rnn))), {}, 2
    )
    assert d.ctranslate2 == {}
    assert d.ctranslate2_note == "skipped: CTranslate2 runs Transformers, this is AttentionRNN; served with PyTorch"
