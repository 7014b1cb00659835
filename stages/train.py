"""train: fit the configured model on the tokenized training data, logging to MLflow.

Reads data/tokenized/; writes models/model.pt (checkpoint), models/train_run.json (the MLflow run id
that evaluate and export attach to), metrics/train.json and plots/train_loss.csv.
The loop is the whole recipe, top to bottom: batch -> forward -> loss -> backward -> clip -> step -> log.
"""

from __future__ import annotations

import csv
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from seq2seq.checkpoint import save_checkpoint
from seq2seq.config import Params, ParamsError, flatten, load_params
from seq2seq.data import TokenArray, collate, token_batches
from seq2seq.textio import atomic_write, write_json
from seq2seq.tokenizer import PAD_ID
from seq2seq.tracking import git_commit, mlflow, setup_mlflow, write_run_file
from seq2seq.transformer import Transformer, TransformerConfig


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ParamsError("train.device: 'cuda' requested but CUDA is not available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def inverse_sqrt_lr(step: int, peak_lr: float, warmup: int) -> float:
    """Section 5.3 of Vaswani et al.: linear warm-up to `peak_lr`, then decay with 1/sqrt(step)."""
    if warmup == 0:
        return peak_lr
    step = max(step, 1)
    return peak_lr * min(step / warmup, math.sqrt(warmup / step))


def load_split(data_dir: Path, split: str, langs: tuple[str, str]) -> tuple[TokenArray, TokenArray]:
    meta = json.loads((data_dir / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    src, tgt = (TokenArray(data_dir / f"{split}.{lang}", dtype) for lang in langs)
    if len(src) != len(tgt):
        raise ValueError(f"{data_dir}/{split}: {len(src)} source vs {len(tgt)} target sentences")
    return src, tgt


def build_model(params: Params, vocab_size: int) -> Transformer:
    m = params.model
    return Transformer(
        TransformerConfig(
            vocab_size=vocab_size,
            d_model=m.d_model,
            n_heads=m.n_heads,
            n_encoder_layers=m.n_encoder_layers,
            n_decoder_layers=m.n_decoder_layers,
            d_ff=m.d_ff,
            dropout=m.dropout,
            max_positions=m.max_positions,
            share_embeddings=m.share_embeddings,
        )
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate_loss(model: Transformer, src: TokenArray, tgt: TokenArray, max_tokens: int, device: torch.device) -> float:
    """Mean per-token cross-entropy (no label smoothing) over a whole split."""
    model.eval()
    total, count = 0.0, 0
    for idx in token_batches(src.lengths, tgt.lengths, max_tokens):
        s, t_in, t_out = (x.to(device) for x in collate(src, tgt, idx))
        logits = model(s, t_in)
        total += F.cross_entropy(
            logits.flatten(0, 1).float(), t_out.flatten(), ignore_index=PAD_ID, reduction="sum"
        ).item()
        count += int((t_out != PAD_ID).sum())
    model.train()
    return total / max(count, 1)


def train(
    params: Params,
    data_dir: Path = Path("data/tokenized"),
    out_dir: Path = Path("models"),
    metrics_path: Path = Path("metrics/train.json"),
    plot_path: Path = Path("plots/train_loss.csv"),
) -> dict:
    """Train and save the model; returns the metrics written to `metrics_path`."""
    p = params.train
    seed_everything(p.seed)
    if p.threads:
        torch.set_num_threads(p.threads)
    device = pick_device(p.device)
    langs = (params.data.src_lang, params.data.tgt_lang)
    vocab_size = json.loads((data_dir / "meta.json").read_text())["vocab_size"]
    train_src, train_tgt = load_split(data_dir, "train", langs)
    dev_src, dev_tgt = load_split(data_dir, "dev", langs)

    # Pairs longer than train.max_len are skipped, and the count is reported, never silently.
    usable = np.flatnonzero((train_src.lengths <= p.max_len) & (train_tgt.lengths <= p.max_len))
    skipped = len(train_src) - len(usable)
    if len(usable) == 0:
        raise ValueError(f"train.max_len={p.max_len}: no training pair is short enough")
    if skipped:
        print(f"train: skipping {skipped} of {len(train_src)} pairs longer than train.max_len={p.max_len}")

    model = build_model(params, vocab_size).to(device)
    n_params = model.num_parameters()
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, betas=(0.9, 0.98), eps=1e-9, weight_decay=p.weight_decay)
    use_amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    experiment_id = setup_mlflow(params.mlflow)
    run = mlflow.start_run(run_name=f"{params.model.family}-{params.data.pair}")
    run_id = run.info.run_id
    mlflow.log_params(flatten(params.model_dump(exclude={"download"}), ""))
    mlflow.set_tags(
        {
            "git_commit": git_commit() or "unknown",
            "torch": torch.__version__,
            "device": str(device),
            "python": platform.python_version(),
            "n_parameters": str(n_params),
        }
    )
    print(f"train: {params.model.family} with {n_params / 1e6:.2f}M parameters on {device}; MLflow run {run_id}")

    rng = np.random.default_rng(p.seed)
    history: list[tuple[int, float, float]] = []
    step, epoch, tokens_seen = 0, 0, 0
    window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
    start = time.perf_counter()
    deadline = start + p.max_minutes * 60
    model.train()
    stop = False
    while not stop:
        epoch += 1
        batches = token_batches(train_src.lengths[usable], train_tgt.lengths[usable], p.max_tokens, rng)
        for batch in batches:
            src, tgt_in, tgt_out = collate(train_src, train_tgt, usable[batch])
            if device.type == "cuda":
                src, tgt_in, tgt_out = (x.pin_memory().to(device, non_blocking=True) for x in (src, tgt_in, tgt_out))
            step += 1
            lr = inverse_sqrt_lr(step, p.lr, p.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr

            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                logits = model(src, tgt_in)
            n_tokens = int((tgt_out != PAD_ID).sum())
            loss = (
                F.cross_entropy(
                    logits.flatten(0, 1).float(),
                    tgt_out.flatten(),
                    ignore_index=PAD_ID,
                    label_smoothing=p.label_smoothing,
                    reduction="sum",
                )
                / n_tokens
            )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), p.clip_norm)
            scaler.step(optimizer)
            scaler.update()

            window_loss += loss.item() * n_tokens
            window_tokens += n_tokens
            tokens_seen += n_tokens
            if step % p.log_every == 0:
                elapsed = time.perf_counter() - window_start
                mean_loss = window_loss / window_tokens
                metrics = {
                    "loss": mean_loss,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": window_tokens / elapsed,
                    "epoch": epoch,
                }
                mlflow.log_metrics(metrics, step=step, synchronous=False)
                history.append((step, mean_loss, lr))
                print(
                    f"step {step} epoch {epoch} loss {mean_loss:.3f} lr {lr:.2e} "
                    f"tok/s {metrics['tokens_per_s']:.0f} elapsed {time.perf_counter() - start:.0f}s",
                    flush=True,
                )
                window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
            if step >= p.max_steps or time.perf_counter() >= deadline:
                stop = True
                break

    train_seconds = time.perf_counter() - start
    dev_loss = evaluate_loss(model, dev_src, dev_tgt, p.max_tokens, device)
    save_checkpoint(out_dir / "model.pt", model, params.model.family, step, vocab_size=vocab_size)
    metrics = {
        "steps": step,
        "epochs": epoch,
        "train_seconds": round(train_seconds, 1),
        "train_tokens": tokens_seen,
        "tokens_per_s": round(tokens_seen / train_seconds, 1),
        "final_train_loss": round(history[-1][1], 4) if history else None,
        "dev_loss": round(dev_loss, 4),
        "dev_ppl": round(math.exp(min(dev_loss, 50.0)), 3),
        "n_parameters": n_params,
        "skipped_long_pairs": skipped,
    }
    mlflow.log_metrics({"dev_loss": dev_loss, "dev_ppl": metrics["dev_ppl"]}, step=step)
    mlflow.end_run()
    write_json(metrics_path, metrics)
    with atomic_write(plot_path) as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "lr"])
        writer.writerows((s, f"{loss:.5f}", f"{lr:.3e}") for s, loss, lr in history)
    write_run_file(run_id, experiment_id, params.mlflow.tracking_uri, out_dir / "train_run.json")
    return metrics


def main() -> None:
    try:
        params = load_params()
        metrics = train(params)
    except (ParamsError, FileNotFoundError, ValueError) as err:
        sys.exit(f"train: {err}")
    print(f"train: {json.dumps(metrics)}")


if __name__ == "__main__":
    main()
