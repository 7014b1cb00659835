"""export: package the trained model with its SentencePiece model as an MLflow pyfunc and register it.

Reads models/model.pt, data/tokenized/spm.model, models/train_run.json, metrics/eval.json and dvc.lock
(when present); logs the model to the training run as "models from code" (seq2seq/translator_model.py; no
pickled object), registers a new version of export.registered_model_name with its tags in one request
(git commit, DVC hashes of data and params, BLEU per test set with its sacrebleu signature, decoding
options, the weights file's sha256 that every loader checks), points the alias `challenger` at it and
writes models/export.json (name, version, model URI). An export killed before the alias is retried
without a second version: the retry finds the version by run and `export_sha256` tag and completes it.
`python -m seq2seq.promote` decides about `champion`.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import yaml
from mlflow.models import infer_signature

import seq2seq
from seq2seq import cli, paths
from seq2seq.checkpoint import CheckpointError, check_tokenizer, load_checkpoint
from seq2seq.config import Params, ParamsError, load_params
from seq2seq.serving import WEIGHTS_SHA256
from seq2seq.textio import file_sha256, write_json
from seq2seq.tokenizer import Tokenizer
from seq2seq.tracking import git_commit, mlflow, read_run_id, setup_mlflow

EXPORT_KEY_TAG = "export_sha256"  # identifies one export of one model, so that a retry can find its version
# DVC outputs whose hashes identify what a model was trained and scored on
LINEAGE_OUTS = tuple(str(path) for path in (paths.RAW, paths.CLEAN, paths.TOKENIZED, paths.MODEL))


def lineage_tags(params: Params, lock_path: Path = paths.DVC_LOCK) -> dict[str, str]:
    """Git commit, the params' hash and the DVC hashes (from dvc.lock) of the data and model outputs."""
    canonical = json.dumps(params.model_dump(mode="json"), sort_keys=True)
    tags = {"git_commit": git_commit() or "unknown", "params_sha256": hashlib.sha256(canonical.encode()).hexdigest()}
    if not lock_path.is_file():
        tags["dvc_lock"] = "absent (not run by dvc repro)"
        return tags
    lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) or {}
    for stage in lock.get("stages", {}).values():
        for out in stage.get("outs", []):
            if out.get("path") in LINEAGE_OUTS and "md5" in out:
                tags[f"dvc.md5.{out['path']}"] = out["md5"]
    return tags


def score_tags(scores: dict[str, dict]) -> dict[str, str]:
    """BLEU (with signature and confidence interval), chrF and TER per test set, as version tags."""
    tags = {}
    for test_set, s in scores.items():
        tags[f"bleu.{test_set}"] = str(s["bleu"])
        tags[f"bleu_signature.{test_set}"] = s["signature"]
        for key in ("bleu_ci", "chrf", "ter"):
            if key in s:
                tags[f"{key}.{test_set}"] = str(s[key])
    return tags


def export_key(tags: dict[str, str]) -> str:
    """The identity of one export: a retried export has the same (same weights, lineage, scores, decoding)."""
    return hashlib.sha256(json.dumps(tags, sort_keys=True).encode()).hexdigest()


def find_exported(client: mlflow.MlflowClient, name: str, run_id: str, key: str) -> str | None:
    """The version of `name` that an earlier export of the same model from `run_id` registered, if any.

    Registration, tagging and the alias are separate requests: a stage killed between them is retried,
    and the retry must complete that version, not register a duplicate.
    """
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return next((str(v.version) for v in versions if v.tags.get(EXPORT_KEY_TAG) == key), None)


def log_translator(run_id: str, model_path: Path, tokenizer_path: Path, decoding: dict, weights_sha256: str) -> str:
    """Log the pyfunc translator ("models from code": no pickle) to the run; returns its model URI."""
    with tempfile.TemporaryDirectory() as tmp:
        decoding_path = Path(tmp) / "decoding.json"
        decoding_path.write_text(json.dumps(decoding))
        example = ["A man is riding a bicycle down the street."]
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="translator",
                python_model=str(Path(seq2seq.__file__).parent / "translator_model.py"),
                artifacts={
                    "checkpoint": str(model_path),
                    "tokenizer": str(tokenizer_path),
                    "decoding": str(decoding_path),
                },
                model_config={WEIGHTS_SHA256: weights_sha256},
                code_paths=[str(Path(seq2seq.__file__).parent)],
                # string in, string out; decoding options may be overridden per request (within their bounds)
                signature=infer_signature(example, ["Un homme fait du vélo dans la rue."], params=decoding),
                input_example=example,
                pip_requirements=["torch", "sentencepiece", "numpy", "pandas", "pydantic", "mlflow"],
            )
    return info.model_uri


def export(
    params: Params,
    model_path: Path = paths.MODEL,
    tokenizer_path: Path = paths.SPM_MODEL,
    eval_path: Path = paths.METRICS / "eval.json",
    run_file: Path = paths.RUN_FILE,
    out_path: Path = paths.EXPORT,
    lock_path: Path = paths.DVC_LOCK,
) -> dict:
    """Log and register the pyfunc model with its tags, make it the challenger; returns export.json.

    Safe to retry: a version registered by an interrupted export of the same model is completed, not repeated.
    """
    state = load_checkpoint(model_path)  # fail here, clearly, rather than inside MLflow on a bad file
    check_tokenizer(state, model_path, Tokenizer(tokenizer_path))
    scores = json.loads(Path(eval_path).read_text())
    name = params.registered_name()
    decoding = params.evaluate.decoding().model_dump()
    weights_sha256 = file_sha256(model_path)
    tags = {
        **lineage_tags(params, lock_path),
        **score_tags(scores),
        **{f"decoding.{k}": str(v) for k, v in decoding.items()},
        WEIGHTS_SHA256: weights_sha256,
    }
    tags[EXPORT_KEY_TAG] = export_key(tags)
    run_id = read_run_id(run_file)
    setup_mlflow(params.mlflow)
    client = mlflow.MlflowClient()
    version = find_exported(client, name, run_id, tags[EXPORT_KEY_TAG])
    if version is None:
        model_uri = log_translator(run_id, model_path, tokenizer_path, decoding, weights_sha256)
        # one request creates the version with all its tags: there is no half-tagged version
        version = str(mlflow.register_model(model_uri, name, tags=tags).version)
    else:
        print(f"export: {name} version {version} was registered from this run by an interrupted export; completing it")
    client.set_registered_model_alias(name, "challenger", version)
    result = {
        "registered_model_name": name,
        "version": version,
        "model_uri": f"models:/{name}/{version}",
        "run_id": run_id,
    }
    write_json(out_path, result)
    return result


def main(argv: list[str] | None = None) -> None:
    args = cli.stage_parser("export", __doc__).parse_args(argv)
    try:
        result = export(load_params(args.params))
    except (ParamsError, FileNotFoundError, CheckpointError, ValueError) as err:
        cli.fail("export", err)
    print(f"export: registered {result['model_uri']} (alias challenger; promote with python -m seq2seq.promote)")


if __name__ == "__main__":
    main()
