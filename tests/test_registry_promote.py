"""Promotion rules on a local SQLite registry (no server): signatures must match, margins count, ties pass."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from seq2seq.promote import PromotionRefused, VersionScore, compare, promote

SIG = "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"


def test_compare_rules() -> None:
    champ = VersionScore("1", 30.0, SIG)
    assert "no champion" in compare(VersionScore("2", 1.0, SIG), None, "t", 0.0)
    assert "30.00" in compare(VersionScore("2", 30.0, SIG), champ, "t", 0.0)  # a tie is not worse
    with pytest.raises(PromotionRefused, match=r"29\.90 vs champion \(version 1\) 30\.00"):
        compare(VersionScore("2", 29.9, SIG), champ, "t", 0.0)
    with pytest.raises(PromotionRefused, match=r"margin 0\.50"):
        compare(VersionScore("2", 30.4, SIG), champ, "t", 0.5)
    with pytest.raises(PromotionRefused, match="not comparable"):
        compare(VersionScore("2", 35.0, SIG.replace("13a", "intl")), champ, "t", 0.0)
    with pytest.raises(PromotionRefused, match="no BLEU"):
        compare(VersionScore("2", None, None), champ, "t", 0.0)


def test_promote_on_a_local_registry(tmp_path: Path) -> None:
    client = MlflowClient(
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", registry_uri=f"sqlite:///{tmp_path}/mlflow.db"
    )
    client.create_registered_model("m")
    for bleu in ("30.0", "31.0"):
        v = client.create_model_version("m", source=str(tmp_path))
        client.set_model_version_tag("m", v.version, "bleu.t", bleu)
        client.set_model_version_tag("m", v.version, "bleu_signature.t", SIG)
    promote(client, "m", "1", "t", 0.0)
    with pytest.raises(PromotionRefused, match="already the champion"):
        promote(client, "m", "1", "t", 0.0)
    with pytest.raises(PromotionRefused, match=r"margin 2\.00"):
        promote(client, "m", "2", "t", 2.0)
    assert "version 2" in promote(client, "m", "2", "t", 1.0)
    assert str(client.get_model_version_by_alias("m", "champion").version) == "2"
