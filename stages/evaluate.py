"""evaluate: translate each test set and score it with sacrebleu against the raw references.

Reads models/model.pt, data/tokenized/spm.model, data/clean/test/<name>.<src> (the normalised source)
and data/raw/<name>.<tgt> (the untouched reference). Writes eval/<name>.<tgt> (hypotheses) and
metrics/eval.json, and logs the same numbers to the training run in MLflow.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import sacrebleu
import torch

from seq2seq.checkpoint import CheckpointError, load_model
from seq2seq.config import Params, ParamsError, load_params
from seq2seq.decoding import translate_ids
from seq2seq.textio import TextFormatError, atomic_write, read_lines, write_json
from seq2seq.tokenizer import Tokenizer
from seq2seq.tracking import mlflow, read_run_id, setup_mlflow
from stages.train import pick_device


def score(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU and chrF with their sacrebleu signatures."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses vs {len(references)} references")
    bleu, chrf = sacrebleu.BLEU(), sacrebleu.CHRF()
    bleu_score = bleu.corpus_score(hypotheses, [references])
    chrf_score = chrf.corpus_score(hypotheses, [references])
    return {
        "bleu": round(bleu_score.score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "chrf": round(chrf_score.score, 2),
        "chrf_signature": str(chrf.get_signature()),
        "n_sentences": len(hypotheses),
    }


def evaluate(
    params: Params,
    model_path: Path = Path("models/model.pt"),
    data_dir: Path = Path("data"),
    tokenizer_path: Path = Path("data/tokenized/spm.model"),
    hyp_dir: Path = Path("eval"),
    metrics_path: Path = Path("metrics/eval.json"),
    run_file: Path = Path("models/train_run.json"),
) -> dict:
    """Translate and score every configured test set; returns {test set: scores}."""
    src_lang, tgt_lang = params.data.src_lang, params.data.tgt_lang
    device = pick_device(params.train.device)
    if params.train.threads:
        torch.set_num_threads(params.train.threads)
    model, _ = load_model(model_path, device)
    tokenizer = Tokenizer(tokenizer_path)
    p = params.evaluate
    results: dict[str, dict] = {}
    for name in params.data.test:
        sources = list(read_lines(data_dir / "clean" / "test" / f"{name}.{src_lang}"))
        references = list(read_lines(data_dir / "raw" / f"{name}.{tgt_lang}"))
        if len(sources) != len(references):
            raise TextFormatError(f"test set {name}: {len(sources)} source lines vs {len(references)} reference lines")
        t0 = time.perf_counter()
        hyp_ids = translate_ids(model, tokenizer.encode(sources), p.batch_size, p.max_len_a, p.max_len_b, device)
        hypotheses = tokenizer.decode(hyp_ids)
        seconds = time.perf_counter() - t0
        with atomic_write(hyp_dir / f"{name}.{tgt_lang}") as f:
            f.writelines(h + "\n" for h in hypotheses)
        results[name] = {**score(hypotheses, references), "decode_seconds": round(seconds, 2)}
        print(f"evaluate: {name}: BLEU {results[name]['bleu']} chrF {results[name]['chrf']} ({seconds:.1f}s)")
    write_json(metrics_path, results)

    setup_mlflow(params.mlflow)
    with mlflow.start_run(run_id=read_run_id(run_file)):
        for name, r in results.items():
            mlflow.log_metrics({f"test/{name}/bleu": r["bleu"], f"test/{name}/chrf": r["chrf"]})
            mlflow.set_tag(f"test/{name}/bleu_signature", r["bleu_signature"])
        mlflow.log_artifacts(str(hyp_dir), artifact_path="hypotheses")
    return results


def main() -> None:
    try:
        results = evaluate(load_params())
    except (ParamsError, FileNotFoundError, TextFormatError, CheckpointError) as err:
        sys.exit(f"evaluate: {err}")
    print(f"evaluate: {json.dumps({k: v['bleu'] for k, v in results.items()})}")


if __name__ == "__main__":
    main()
