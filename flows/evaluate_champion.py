"""The `evaluate-champion` flow: re-score the registered `champion` on the test sets, on a schedule.

It loads `models:/<name>@champion` with the files users load (seq2seq.registry: weights checked against
the version's `weights_sha256` tag, no code run from the artifact store), translates each configured test set
from this worker's clone (pulled from the DVC remote when missing), scores it as the evaluate stage does
(seq2seq.score.score_corpus), and logs the numbers to a new MLflow run tagged with the version, so drift
in the scorer, the references or the environment shows up between retrains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows.workspace import dvc, log, remote_args, resolve_workdir, workspace_lock


@task(name="dvc pull test sets", retries=2, retry_delay_seconds=30)
def pull_missing(workdir: Path, paths: list[Path], remote: str | None) -> None:
    missing = [str(p.relative_to(workdir)) for p in paths if not p.exists()]
    if missing:
        dvc(workdir, "pull", *remote_args(remote), *missing)


@task(name="score champion")
def score_champion(
    workdir: Path, model_uri: str, test_sets: dict[str, tuple[Path, Path]], chrf_word_order: int
) -> dict[str, dict]:
    from seq2seq.registry import load_registered
    from seq2seq.score import score_corpus
    from seq2seq.textio import read_lines
    from seq2seq.translate import translate_texts

    t = load_registered(model_uri)  # refuses weights whose digest differs from the registry tag
    results = {}
    for name, (src, ref) in test_sets.items():
        nbest = translate_texts(t.model, t.tokenizer, list(read_lines(src)), t.decoding, t.device)
        hypotheses = [n[0].text for n in nbest]
        results[name] = score_corpus(hypotheses, [list(read_lines(ref))], chrf_word_order, bootstrap_samples=0)
        log().info("%s on %s: BLEU %.2f chrF %.2f", model_uri, name, results[name]["bleu"], results[name]["chrf"])
    return results


@flow(name="evaluate-champion", log_prints=True)
def evaluate_champion(
    model_name: str | None = None,
    alias: str = "champion",
    remote: str | None = None,
    workdir: str | None = None,
    lock_wait_s: float = 600,
) -> dict[str, Any]:
    """Score `models:/<model_name>@<alias>` (name from params.yaml by default); {} when no model has the alias."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from seq2seq import paths
    from seq2seq.config import load_params
    from seq2seq.tracking import mlflow, setup_mlflow

    wd = resolve_workdir(workdir)
    params = load_params(wd / "params.yaml")
    name = model_name or params.registered_name()
    setup_mlflow(params.mlflow)
    try:
        version = MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        log().warning("no model version of %s has the alias %r yet; nothing to score", name, alias)
        return {}
    src, tgt = params.data.langs
    test_sets = {t: (wd / paths.CLEAN / "test" / f"{t}.{src}", wd / paths.RAW / f"{t}.{tgt}") for t in params.data.test}
    with workspace_lock(wd, lock_wait_s, holder="evaluate-champion"):
        pull_missing(wd, [p for pair in test_sets.values() for p in pair], remote)
    model_uri = f"models:/{name}@{alias}"
    results = score_champion(wd, model_uri, test_sets, params.evaluate.chrf_word_order)
    with mlflow.start_run(run_name=f"{alias}-eval-{name}-v{version.version}"):
        mlflow.set_tags({"model_name": name, "model_version": str(version.version), "alias": alias})
        for t, r in results.items():
            mlflow.log_metrics({f"test/{t}/{m}": r[m] for m in ("bleu", "chrf", "ter") if m in r})
    rows = "".join(f"| {t} | {r['bleu']:.2f} | {r['chrf']:.2f} |\n" for t, r in results.items())
    create_markdown_artifact(
        key="champion-scores",
        markdown=f"# `{name}` v{version.version} (@{alias})\n\n| test set | BLEU | chrF |\n|---|---:|---:|\n{rows}",
    )
    return {"model_version": str(version.version), "scores": results}
