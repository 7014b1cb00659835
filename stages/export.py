"""export: package the trained model with its SentencePiece model as an MLflow pyfunc and register it.

Reads models/model.pt, data/tokenized/spm.model, models/train_run.json and metrics/eval.json;
logs the model to the training run, registers a new version of export.registered_model_name and
writes models/export.json (name, version, model URI).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from mlflow.models import infer_signature

import seq2seq
from seq2seq.checkpoint import CheckpointError, load_checkpoint
from seq2seq.config import Params, ParamsError, load_params
from seq2seq.serving import Translator
from seq2seq.textio import write_json
from seq2seq.tracking import mlflow, read_run_id, setup_mlflow


def registered_name(params: Params) -> str:
    return params.export.registered_model_name.format(src=params.data.src_lang, tgt=params.data.tgt_lang)


def export(
    params: Params,
    model_path: Path = Path("models/model.pt"),
    tokenizer_path: Path = Path("data/tokenized/spm.model"),
    eval_path: Path = Path("metrics/eval.json"),
    run_file: Path = Path("models/train_run.json"),
    out_path: Path = Path("models/export.json"),
) -> dict:
    """Log and register the pyfunc model; returns what is written to `out_path`."""
    load_checkpoint(model_path)  # fail here, clearly, rather than inside MLflow on a bad file
    scores = json.loads(Path(eval_path).read_text())
    name = registered_name(params)
    setup_mlflow(params.mlflow)
    with tempfile.TemporaryDirectory() as tmp:
        decoding = Path(tmp) / "decoding.json"
        decoding.write_text(json.dumps(params.evaluate.model_dump()))
        example = ["A man is riding a bicycle down the street."]
        with mlflow.start_run(run_id=read_run_id(run_file)) as run:
            info = mlflow.pyfunc.log_model(
                name="translator",
                python_model=Translator(),
                artifacts={
                    "checkpoint": str(model_path),
                    "tokenizer": str(tokenizer_path),
                    "decoding": str(decoding),
                },
                code_paths=[str(Path(seq2seq.__file__).parent)],
                signature=infer_signature(example, ["Un homme fait du vélo dans la rue."]),
                input_example=example,
                registered_model_name=name,
                pip_requirements=["torch", "sentencepiece", "numpy", "pandas", "mlflow"],
            )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for test_set, s in scores.items():
        client.set_model_version_tag(name, version, f"bleu.{test_set}", str(s["bleu"]))
        client.set_model_version_tag(name, version, f"bleu_signature.{test_set}", s["bleu_signature"])
    result = {
        "registered_model_name": name,
        "version": version,
        "model_uri": f"models:/{name}/{version}",
        "run_id": run.info.run_id,
    }
    write_json(out_path, result)
    return result


def main() -> None:
    try:
        result = export(load_params())
    except (ParamsError, FileNotFoundError, CheckpointError) as err:
        sys.exit(f"export: {err}")
    print(f"export: registered {result['model_uri']}")


if __name__ == "__main__":
    main()
