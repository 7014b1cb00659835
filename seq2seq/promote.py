"""Move the registry alias `champion` to a model version, only if it is better.

    python -m seq2seq.promote                       # the `challenger` of the configured model
    python -m seq2seq.promote --version 7 --test-set newstest2014 --margin 0.5
    python -m seq2seq.promote --version 7 --force   # records who forced it in the version's tags

A version is promoted when its BLEU on the test set, computed with the same sacrebleu signature as the
champion's, is at least the champion's plus the margin (export.promotion_margin by default). Otherwise
nothing changes and both numbers are shown. The current champion is whatever the registry says now,
whether the pipeline or a person in the MLflow UI set the alias.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from seq2seq.config import ParamsError, load_params

CHAMPION, CHALLENGER = "champion", "challenger"
DELIVERED_TAG = "delivery.champion"  # registered model tag: the version the deliver-champion flow last delivered


class PromotionRefused(RuntimeError):
    """The candidate is not better than the champion (or cannot be compared); the message shows both."""


@dataclass(frozen=True)
class VersionScore:
    version: str
    bleu: float | None  # None: the version has no BLEU for this test set
    signature: str | None


def version_score(client: MlflowClient, name: str, version: str, test_set: str) -> VersionScore:
    tags = client.get_model_version(name, version).tags
    bleu = tags.get(f"bleu.{test_set}")
    return VersionScore(str(version), float(bleu) if bleu is not None else None, tags.get(f"bleu_signature.{test_set}"))


def compare(candidate: VersionScore, champion: VersionScore | None, test_set: str, margin: float) -> str:
    """Why the candidate may be promoted; raises PromotionRefused saying why not."""
    if champion is None:
        return "no champion yet"
    if candidate.version == champion.version:
        raise PromotionRefused(f"version {candidate.version} is already the champion")
    if candidate.bleu is None:
        raise PromotionRefused(f"version {candidate.version} has no BLEU for test set {test_set!r}")
    if champion.bleu is None:
        raise PromotionRefused(f"champion (version {champion.version}) has no BLEU for test set {test_set!r}")
    if candidate.signature != champion.signature:
        raise PromotionRefused(
            f"BLEU on {test_set} not comparable: version {candidate.version} signature {candidate.signature}, "
            f"champion (version {champion.version}) signature {champion.signature}"
        )
    needed = champion.bleu + margin
    summary = (
        f"BLEU on {test_set}: version {candidate.version} {candidate.bleu:.2f} vs champion (version "
        f"{champion.version}) {champion.bleu:.2f} + margin {margin:.2f} = {needed:.2f} [{candidate.signature}]"
    )
    if candidate.bleu < needed:
        raise PromotionRefused(f"not promoted: {summary}")
    return summary


def current_champion(client: MlflowClient, name: str) -> str | None:
    """The version the `champion` alias points at now, or None."""
    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)  # an int from some stores
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(err).lower():
            return None
        raise


def promote(
    client: MlflowClient,
    name: str,
    version: str,
    test_set: str,
    margin: float,
    force: bool = False,
    user: str | None = None,
) -> str:
    """Point `champion` at `version` if it wins on `test_set`; returns what was done, raises PromotionRefused."""
    user = user or os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()
    champion_version = current_champion(client, name)
    champion = version_score(client, name, champion_version, test_set) if champion_version else None
    candidate = version_score(client, name, version, test_set)
    try:
        reason = compare(candidate, champion, test_set, margin)
    except PromotionRefused as err:
        if not force or (champion and champion.version == version):
            raise
        reason = f"forced by {user} over: {err}"
        client.set_model_version_tag(name, version, "promotion.forced_by", user)
    client.set_registered_model_alias(name, CHAMPION, version)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for key, value in {
        "promotion.by": user,
        "promotion.at": now,
        "promotion.previous_champion": champion_version or "none",
        "promotion.reason": reason[:5000],
    }.items():
        client.set_model_version_tag(name, version, key, value)
    return f"champion -> version {version} ({reason})"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m seq2seq.promote", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--name", help="registered model (default: export.registered_model_name from params)")
    parser.add_argument("--version", help=f"version to promote (default: the one aliased {CHALLENGER!r})")
    parser.add_argument("--test-set", help="test set whose BLEU decides (default: the first of data.test)")
    parser.add_argument("--margin", type=float, help="BLEU to add over the champion (default: export.promotion_margin)")
    parser.add_argument("--force", action="store_true", help="promote even if not better; tags who forced it")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: mlflow.tracking_uri from params)")
    parser.add_argument("--params", default="params.yaml", help="the parameters file (default: params.yaml)")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
    except ParamsError as err:
        sys.exit(f"promote: {err}")
    name = args.name or params.registered_name()
    client = MlflowClient(tracking_uri=args.tracking_uri or params.mlflow.tracking_uri)
    try:
        version = args.version or str(client.get_model_version_by_alias(name, CHALLENGER).version)
        message = promote(
            client,
            name,
            version,
            args.test_set or params.data.test[0],
            params.export.promotion_margin if args.margin is None else args.margin,
            force=args.force,
        )
    except PromotionRefused as err:
        sys.exit(f"promote: {name}: {err}")
    except MlflowException as err:
        sys.exit(f"promote: {name}: {err.message}")
    print(f"promote: {name}: {message}")


if __name__ == "__main__":
    main()
