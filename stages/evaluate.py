"""evaluate: translate each test set with beam search and score it with sacrebleu against the raw references.

Reads models/model.pt, data/tokenized/spm.model, data/clean/test/<name>.<src> (the normalised source),
data/raw/<name>.<tgt> (the untouched reference) and plots/train_loss.csv. Writes eval/<name>.<tgt>
(hypotheses; eval/<name>.<tgt>.nbest when evaluate.nbest > 1), metrics/eval.json ({test set: BLEU, chrF,
TER, signatures, BLEU's bootstrap interval, n_sentences, decode_seconds}), plots/bleu_by_length/<name>.csv
and plots/evaluate.png; logs the numbers and the PNG to the training run in MLflow.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import torch

from seq2seq import cli, cpu, paths
from seq2seq.checkpoint import CheckpointError, check_tokenizer, load_model
from seq2seq.config import Params, ParamsError, load_params
from seq2seq.device import pick_device
from seq2seq.progress import Progress
from seq2seq.score import bleu_by_length, score_corpus
from seq2seq.textio import TextFormatError, atomic_write, read_lines, write_json
from seq2seq.tokenizer import Tokenizer
from seq2seq.tracking import mlflow, read_run_id, setup_mlflow
from seq2seq.translate import translate_texts


def plot_png(by_length: dict[str, list[dict]], loss_csv: Path, out: Path) -> None:
    """One PNG with the training loss curve and BLEU by source length (needs no browser, unlike dvc plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_bleu) = plt.subplots(1, 2, figsize=(11, 4))
    if loss_csv.is_file():
        with loss_csv.open(encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        for column in (c for c in (rows[0] if rows else {}) if c not in ("step", "lr")):
            ax_loss.plot([int(r["step"]) for r in rows], [float(r[column]) for r in rows], label=column)
        ax_loss.legend()
    ax_loss.set(title="training", xlabel="step", ylabel="loss")
    for name, rows in by_length.items():
        ax_bleu.plot([r["max_src_words"] for r in rows], [r["bleu"] for r in rows], marker="o", label=name)
    ax_bleu.set(title="BLEU by source length", xlabel="source words (longest in bucket)", ylabel="BLEU")
    ax_bleu.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def evaluate(
    params: Params,
    model_path: Path = paths.MODEL,
    clean_dir: Path = paths.CLEAN,
    raw_dir: Path = paths.RAW,
    tokenizer_path: Path = paths.SPM_MODEL,
    hyp_dir: Path = paths.EVAL,
    metrics_path: Path = paths.METRICS / "eval.json",
    plots_dir: Path = paths.PLOTS,
    run_file: Path = paths.RUN_FILE,
) -> dict:
    """Translate and score every configured test set; returns {test set: scores}."""
    src_lang, tgt_lang = params.data.langs
    device = pick_device(params.train.device)
    if params.train.threads:
        torch.set_num_threads(params.train.threads)
    model, state = load_model(model_path, device)
    model = cpu.for_decoding(model, params.evaluate.quantize)
    tokenizer = Tokenizer(tokenizer_path)
    check_tokenizer(state, model_path, tokenizer)
    p = params.evaluate
    results: dict[str, dict] = {}
    by_length: dict[str, list[dict]] = {}
    for name in params.data.test:
        source_path = clean_dir / "test" / f"{name}.{src_lang}"
        sources = list(read_lines(source_path))
        references = list(read_lines(raw_dir / f"{name}.{tgt_lang}"))
        if len(sources) != len(references):
            raise TextFormatError(f"test set {name}: {len(sources)} source lines vs {len(references)} reference lines")
        t0 = time.perf_counter()
        with Progress(f"evaluate {name}", len(sources), unit="sentences") as progress:
            nbest = translate_texts(
                model,
                tokenizer,
                sources,
                p.decoding(),
                device,
                warn=lambda m, f=source_path: print(f"evaluate: {f}: {m}"),
                progress=progress,
            )
        seconds = time.perf_counter() - t0
        hypotheses = [n[0].text for n in nbest]
        with atomic_write(hyp_dir / f"{name}.{tgt_lang}") as f:
            f.writelines(h + "\n" for h in hypotheses)
        if p.nbest > 1:
            with atomic_write(hyp_dir / f"{name}.{tgt_lang}.nbest") as f:
                f.writelines(f"{i} ||| {t.text} ||| {t.score:.4f}\n" for i, n in enumerate(nbest) for t in n)
        scores = score_corpus(hypotheses, [references], p.chrf_word_order, p.bootstrap_samples)
        results[name] = {**scores, "decode_seconds": round(seconds, 2), "beam_size": p.beam_size}
        by_length[name] = bleu_by_length(sources, hypotheses, references, p.length_buckets)
        with atomic_write(plots_dir / "bleu_by_length" / f"{name}.csv") as f:
            writer = csv.DictWriter(f, fieldnames=["max_src_words", "bucket", "bleu", "sentences"])
            writer.writeheader()
            writer.writerows(by_length[name])
        ci = f" ±{scores['bleu_ci']}" if "bleu_ci" in scores else ""
        print(
            f"evaluate: {name}: BLEU {scores['bleu']}{ci} chrF {scores['chrf']} TER {scores['ter']} "
            f"(beam {p.beam_size}, {seconds:.1f}s) {scores['signature']}"
        )
    write_json(metrics_path, results)
    png = plots_dir / "evaluate.png"
    plot_png(by_length, plots_dir / "train_loss.csv", png)

    setup_mlflow(params.mlflow)
    with mlflow.start_run(run_id=read_run_id(run_file)):
        for name, r in results.items():
            numbers = {k: v for k, v in r.items() if isinstance(v, int | float) and not isinstance(v, bool)}
            mlflow.log_metrics({f"test/{name}/{k}": v for k, v in numbers.items()})
            for key in ("signature", "chrf_signature", "ter_signature"):
                mlflow.set_tag(f"test/{name}/{key}", r[key])
        mlflow.log_artifacts(str(hyp_dir), artifact_path="hypotheses")
        mlflow.log_artifact(str(png), artifact_path="plots")
        mlflow.log_artifacts(str(plots_dir / "bleu_by_length"), artifact_path="plots/bleu_by_length")
    return results


def main(argv: list[str] | None = None) -> None:
    args = cli.stage_parser("evaluate", __doc__).parse_args(argv)
    try:
        results = evaluate(load_params(args.params))
    except (ParamsError, FileNotFoundError, TextFormatError, CheckpointError, ValueError) as err:
        cli.fail("evaluate", err)
    print(f"evaluate: {json.dumps({k: v['bleu'] for k, v in results.items()})}")


if __name__ == "__main__":
    main()
