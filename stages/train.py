"""train: fit the configured model family on the tokenized training data, logging to MLflow.

Reads data/tokenized/; writes models/model.pt (weights for evaluate/export), models/train_run.json (the
MLflow run id that evaluate and export attach to), metrics/train.json and plots/train_loss.csv.

Resumable checkpoints live in <train.checkpoint_dir>/<run key>/ (not a DVC out, so DVC never deletes
them): step-XXXXXXXX.pt (the last train.keep_last; model, optimizer, scaler, step, data position and
every RNG state), best.pt (weights of the best validation) and losses.tsv (every step's loss). The run
key hashes everything that shapes the training trajectory, so a re-run with the same recipe resumes
exactly where the last one stopped, and a changed recipe starts in a fresh directory.

Multi-GPU: `torchrun --nproc_per_node=N -m stages.train` (DDP; gloo on CPU, nccl on CUDA). Each rank
trains on its shard of every epoch's batches; rank 0 alone logs, validates and writes files.

The loop is the whole recipe, top to bottom: batches -> forward -> loss -> backward (accumulated) ->
clip -> step -> log -> validate -> checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import sacrebleu
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from seq2seq import cpu
from seq2seq.checkpoint import CheckpointError, average_checkpoints, load_checkpoint, save_checkpoint
from seq2seq.config import Params, ParamsError, TrainParams, flatten, load_params
from seq2seq.data import TokenArray, collate, token_batches
from seq2seq.decoding import translate_ids
from seq2seq.models import build_model
from seq2seq.textio import atomic_write, write_json
from seq2seq.tokenizer import PAD_ID, Tokenizer
from seq2seq.tracking import ResilientRun, dvc_out_hash, git_commit, mlflow, setup_mlflow, write_run_file

# Train params that do not change which steps are taken or what they compute: changing them keeps the run key,
# so the next run resumes (e.g. a larger max_minutes, another thread count, or a GPU instead of the CPU).
NOT_IN_RUN_KEY = {
    "max_minutes",
    "log_every",
    "device",
    "threads",
    "compile",
    "eval_every",
    "eval_bleu_sentences",
    "early_stop_metric",
    "patience",
    "save_every",
    "keep_last",
    "final_model",
    "checkpoint_dir",
}
# dense bf16 peak FLOP/s per GPU for the MFU estimate (PaLM appendix B; nanoGPT's estimate_mfu)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40": 181e12, "A10": 125e12, "L4": 121e12}


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ParamsError("train.device: 'cuda' requested but CUDA is not available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def learning_rate(step: int, p: TrainParams) -> float:
    """Linear warm-up to train.lr, then 1/sqrt(step) decay (Vaswani et al. section 5.3) or a cosine to min_lr."""
    step = max(step, 1)
    if step < p.warmup_steps:
        return p.lr * step / p.warmup_steps
    if p.lr_schedule == "inverse_sqrt":
        return p.lr * math.sqrt(max(p.warmup_steps, 1) / step)
    progress = min((step - p.warmup_steps) / max(p.max_steps - p.warmup_steps, 1), 1.0)
    return p.min_lr + 0.5 * (p.lr - p.min_lr) * (1 + math.cos(math.pi * progress))


def load_split(data_dir: Path, split: str, langs: tuple[str, str]) -> tuple[TokenArray, TokenArray]:
    meta = json.loads((data_dir / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    src, tgt = (TokenArray(data_dir / f"{split}.{lang}", dtype) for lang in langs)
    if len(src) != len(tgt):
        raise ValueError(f"{data_dir}/{split}: {len(src)} source vs {len(tgt)} target sentences")
    return src, tgt


def epoch_batches(
    src_lengths: np.ndarray, tgt_lengths: np.ndarray, max_tokens: int, seed: int, epoch: int, rank: int, world: int
) -> list[np.ndarray]:
    """This rank's batches of `epoch`: the same shuffled order for a given (seed, epoch), so a data position
    is just (epoch, batch index); every rank gets the same number of batches."""
    batches = token_batches(src_lengths, tgt_lengths, max_tokens, np.random.default_rng([seed, epoch]))
    per_rank = len(batches) // world
    if per_rank == 0:
        raise ValueError(f"{len(batches)} batches per epoch cannot be shared by {world} processes")
    return batches[rank::world][:per_rank]


def run_key(params: Params, data_dir: Path, world: int) -> tuple[str, dict[str, Any]]:
    """A short hash of everything that shapes the training trajectory, and the hashed dict itself."""
    meta = (data_dir / "meta.json").read_bytes()
    shape = {
        "pair": params.data.pair,
        "world_size": world,  # each process's share of the batches depends on it
        "model": {"family": params.model.family, "config": params.model.config.model_dump()},
        "train": params.train.model_dump(exclude=NOT_IN_RUN_KEY),
        "data_meta_sha256": hashlib.sha256(meta).hexdigest(),
    }
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]
    return f"{params.model.family}-{digest}", shape


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Resumable checkpoints in step order."""
    return sorted(ckpt_dir.glob("step-*.pt"))


def estimate_mfu(n_params: int, tokens_per_s: float, device: torch.device) -> float | None:
    """Model FLOPs utilisation: ~6 FLOPs per parameter per trained token (forward + backward) over the GPU's peak."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)
    return 6 * n_params * tokens_per_s / peak if peak else None


@torch.no_grad()
def evaluate_loss(model: nn.Module, src: TokenArray, tgt: TokenArray, max_tokens: int, device: torch.device) -> float:
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


def validate(model: nn.Module, params: Params, dev: tuple[TokenArray, TokenArray], tokenizer, device) -> dict:
    """Dev loss and perplexity on the whole dev set, and greedy BLEU on its first eval_bleu_sentences."""
    dev_loss = evaluate_loss(model, *dev, params.train.max_tokens, device)
    metrics = {"dev_loss": dev_loss, "dev_ppl": math.exp(min(dev_loss, 50.0))}
    n = min(params.train.eval_bleu_sentences, len(dev[0]))
    if n:
        e = params.evaluate
        sources = [dev[0][i].tolist() for i in range(n)]
        hyps = translate_ids(model, sources, e.batch_size, e.max_len_a, e.max_len_b, device)
        refs = tokenizer.decode([dev[1][i].tolist() for i in range(n)])
        metrics["dev_bleu"] = sacrebleu.corpus_bleu(tokenizer.decode(hyps), [refs]).score
        model.train()
    return metrics


def progress_bar(total: int, start: int):
    """A rich progress bar on an interactive terminal; None (plain log lines) otherwise."""
    if not sys.stderr.isatty():
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn()
    )
    bar.add_task("train", total=total, completed=start, status="")
    bar.start()
    return bar


def train(
    params: Params,
    data_dir: Path = Path("data/tokenized"),
    out_dir: Path = Path("models"),
    metrics_path: Path = Path("metrics/train.json"),
    plot_path: Path = Path("plots/train_loss.csv"),
) -> dict | None:
    """Train (resuming when a checkpoint of this recipe exists) and save the model; rank 0 returns the metrics."""
    p = params.train
    # ---- set-up: processes, device, data, model, optimizer --------------------------------------------------
    ddp = "RANK" in os.environ  # set by torchrun
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    master = rank == 0
    device = pick_device(p.device)
    if ddp:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if p.threads:
        torch.set_num_threads(p.threads)
    random.seed(p.seed)
    np.random.seed(p.seed)
    torch.manual_seed(p.seed)  # the same initial weights on every rank

    langs = (params.data.src_lang, params.data.tgt_lang)
    vocab_size = json.loads((data_dir / "meta.json").read_text())["vocab_size"]
    train_src, train_tgt = load_split(data_dir, "train", langs)
    dev = load_split(data_dir, "dev", langs)
    tokenizer = Tokenizer(data_dir / "spm.model") if p.eval_bleu_sentences else None
    # Pairs longer than train.max_len (or the model's max_positions) are skipped and counted, never silently.
    max_len = min(p.max_len, params.model.config.max_positions - 1)
    usable = np.flatnonzero((train_src.lengths <= max_len) & (train_tgt.lengths <= max_len))
    skipped = len(train_src) - len(usable)
    if len(usable) == 0:
        raise ValueError(f"train.max_len={p.max_len}: no training pair is short enough")
    if skipped and master:
        print(f"train: skipping {skipped} of {len(train_src)} pairs longer than {max_len} tokens")

    raw_model = cpu.accelerate(build_model(params.model, vocab_size)).to(device)
    n_params = raw_model.num_parameters()
    optimizer = torch.optim.AdamW(
        raw_model.parameters(), lr=p.lr, betas=(0.9, 0.98), eps=1e-9, weight_decay=p.weight_decay
    )
    use_amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    # ---- resume: the last checkpoint of this recipe, if any ---------------------------------------------------
    key, key_dict = run_key(params, data_dir, world)
    ckpt_dir = Path(p.checkpoint_dir) / key
    losses_path = ckpt_dir / "losses.tsv"
    step, epoch, batch_index, tokens_seen, trained_seconds = 0, 1, 0, 0, 0.0
    best: dict[str, Any] = {"value": None, "step": None, "scores": {}}
    evals_without_improvement, mlflow_run_id = 0, None
    existing = step_checkpoints(ckpt_dir)
    if existing:
        state = load_checkpoint(existing[-1], map_location="cpu")  # RNG states must stay CPU tensors
        if state.get("run_key") != key_dict:
            raise CheckpointError(
                f"{existing[-1]}: written for another recipe than params.yaml describes; "
                f"move {ckpt_dir} away to start afresh"
            )
        if state["step"] > p.max_steps:
            raise CheckpointError(f"{existing[-1]}: step {state['step']} is beyond train.max_steps={p.max_steps}")
        try:
            raw_model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{existing[-1]}: does not fit this model/optimizer ({err})") from None
        step, epoch, batch_index = state["step"], state["epoch"], state["batch_index"]
        tokens_seen, trained_seconds = state["tokens_seen"], state["trained_seconds"]
        best, evals_without_improvement = state["best"], state["evals_without_improvement"]
        mlflow_run_id = state["mlflow_run_id"]
        set_rng_state(state["rng"][rank])
        if master:
            print(f"train: resuming from {existing[-1]} (step {step}, epoch {epoch}, batch {batch_index})")
    else:
        torch.manual_seed(p.seed + rank)  # different dropout masks per rank
    if master:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for tmp in ckpt_dir.glob(".*.tmp"):  # left by a process killed while writing
            tmp.unlink()
        # losses.tsv keeps exactly the steps the checkpoint covers; steps after it will be redone
        kept = (
            [line for line in losses_path.read_text().splitlines()[1:] if int(line.split("\t")[0]) <= step]
            if (step and losses_path.exists())
            else []
        )
        with atomic_write(losses_path) as f:
            f.write("step\tloss\tlr\ttokens\n" + "".join(line + "\n" for line in kept))
    losses_file = losses_path.open("a") if master else None

    model: nn.Module = torch.compile(raw_model) if p.compile else raw_model
    if ddp:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # ---- MLflow: rank 0 only; a resumed run continues its MLflow run ----------------------------------------
    tracker: ResilientRun | None = None
    experiment_id = ""
    if master:
        experiment_id = setup_mlflow(params.mlflow)
        run = None
        if mlflow_run_id is not None:
            try:
                run = mlflow.start_run(run_id=mlflow_run_id)
            except mlflow.exceptions.MlflowException as err:
                print(
                    f"WARNING: cannot continue MLflow run {mlflow_run_id} ({err}); starting a new one", file=sys.stderr
                )
                mlflow_run_id = None
        if run is None:
            run = mlflow.start_run(run_name=f"{params.model.family}-{params.data.pair}")
        tracker = ResilientRun(run.info.run_id, continued=mlflow_run_id is not None)
        if mlflow_run_id is None:
            mlflow.log_params(flatten(params.model_dump(exclude={"download"}), ""))
            mlflow.set_tags(
                {
                    "git_commit": git_commit() or "unknown",
                    "torch": torch.__version__,
                    "device": f"{device} x{world}",
                    "python": platform.python_version(),
                    "n_parameters": str(n_params),
                    "run_key": key,
                    "dvc_data_tokenized_md5": dvc_out_hash(str(data_dir)) or "unknown",
                }
            )
        print(
            f"train: {params.model.family} with {n_params / 1e6:.2f}M parameters on {device} x{world}; "
            f"checkpoints in {ckpt_dir}; MLflow run {tracker.run_id}",
            flush=True,
        )

    def save(path: Path, **extra: Any) -> None:
        save_checkpoint(path, raw_model, params.model.family, step, **extra)

    def flush_losses(rows: list) -> list[tuple[int, float, float, int]]:
        """Append pending (step, loss tensor, lr, tokens) rows to losses.tsv (one device sync); returns them."""
        done = []
        if losses_file is not None and rows:
            values = torch.stack([r[1] for r in rows]).tolist()
            done = [(r[0], v, r[2], r[3]) for r, v in zip(rows, values, strict=True)]
            losses_file.write("".join(f"{s}\t{v!r}\t{lr!r}\t{n}\n" for s, v, lr, n in done))
            losses_file.flush()
        rows.clear()
        return done

    def save_training_state() -> None:
        """Write step-XXXXXXXX.pt with everything exact resume needs; keep the last keep_last."""
        rngs = [rng_state()]
        if ddp:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state())
        if not master:
            return
        os.fsync(losses_file.fileno())
        save(
            ckpt_dir / f"step-{step:08d}.pt",
            optimizer=optimizer.state_dict(),
            scaler=scaler.state_dict(),
            epoch=epoch,
            batch_index=batch_index,
            tokens_seen=tokens_seen,
            trained_seconds=trained_seconds + time.perf_counter() - start,
            best=best,
            evals_without_improvement=evals_without_improvement,
            mlflow_run_id=tracker.run_id,
            run_key=key_dict,
            rng=rngs,
            lr_schedule={"name": p.lr_schedule, "lr": learning_rate(step, p)},  # the lr is a function of step
        )
        for old in step_checkpoints(ckpt_dir)[: -p.keep_last]:
            old.unlink()
        print(f"train: rank {rank} saved checkpoint step-{step:08d}.pt", flush=True)

    # ---- the loop ------------------------------------------------------------------------------------------
    batches = epoch_batches(
        train_src.lengths[usable], train_tgt.lengths[usable], p.max_tokens, p.seed, epoch, rank, world
    )
    pending: list[tuple[int, torch.Tensor, float, int]] = []
    window_tokens, window_start, window_rows = 0, time.perf_counter(), []
    last_scores: dict[str, float] = {}
    start = time.perf_counter()
    bar = progress_bar(p.max_steps, step) if master else None
    stop = step >= p.max_steps or trained_seconds >= p.max_minutes * 60  # a finished run stays finished
    model.train()
    while not stop:
        # one optimizer step = grad_accum micro-batches, taken in order from this epoch's (sharded) batch list
        micro = []
        for _ in range(p.grad_accum):
            if batch_index == len(batches):
                epoch, batch_index = epoch + 1, 0
                batches = epoch_batches(
                    train_src.lengths[usable], train_tgt.lengths[usable], p.max_tokens, p.seed, epoch, rank, world
                )
            micro.append(collate(train_src, train_tgt, usable[batches[batch_index]]))
            batch_index += 1
        n_tokens = sum(int((tgt_out != PAD_ID).sum()) for _, _, tgt_out in micro)
        all_tokens = n_tokens
        if ddp:  # normalise by the tokens of all ranks (DDP averages gradients, hence the x world below)
            counts = torch.tensor([n_tokens], device=device)
            dist.all_reduce(counts)
            all_tokens = int(counts.item())
        step += 1
        lr = learning_rate(step, p)
        for group in optimizer.param_groups:
            group["lr"] = lr

        step_loss = torch.zeros((), device=device)
        for i, batch in enumerate(micro):
            if device.type == "cuda":
                batch = tuple(x.pin_memory().to(device, non_blocking=True) for x in batch)
            src, tgt_in, tgt_out = batch
            sync = contextlib.nullcontext() if not ddp or i == len(micro) - 1 else model.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    logits = model(src, tgt_in)
                loss_sum = F.cross_entropy(
                    logits.flatten(0, 1).float(),
                    tgt_out.flatten(),
                    ignore_index=PAD_ID,
                    label_smoothing=p.label_smoothing,
                    reduction="sum",
                )
                scaler.scale(loss_sum * (world / all_tokens)).backward()
            step_loss += loss_sum.detach()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), p.clip_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        pending.append((step, step_loss / n_tokens, lr, n_tokens))
        window_tokens += n_tokens
        tokens_seen += n_tokens
        elapsed = trained_seconds + time.perf_counter() - start
        stop = step >= p.max_steps or elapsed >= p.max_minutes * 60

        if master and (step % p.log_every == 0 or stop):
            rows = window_rows + flush_losses(pending)
            seconds = time.perf_counter() - window_start
            mean_loss = sum(r[1] * r[3] for r in rows) / sum(r[3] for r in rows)
            metrics = {
                "loss": mean_loss,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": window_tokens * world / seconds,
                "epoch": epoch,
            }
            mfu = estimate_mfu(n_params, window_tokens / seconds, device)
            if mfu is not None:
                metrics["mfu"] = mfu
            tracker.log_metrics(metrics, step=step)
            status = f"loss {mean_loss:.3f} lr {lr:.2e} tok/s {metrics['tokens_per_s']:.0f}"
            if bar is not None:
                bar.update(bar.task_ids[0], completed=step, status=status)
            else:
                print(f"step {step} epoch {epoch} {status} elapsed {elapsed:.0f}s", flush=True)
            window_tokens, window_start, window_rows = 0, time.perf_counter(), []

        if master and (step % p.eval_every == 0 or stop):
            scores = last_scores = validate(raw_model, params, dev, tokenizer, device)
            tracker.log_metrics(scores, step=step)
            value = scores[p.early_stop_metric]
            better = (lambda a, b: a < b) if p.early_stop_metric == "dev_loss" else (lambda a, b: a > b)
            if best["value"] is None or better(value, best["value"]):
                best, evals_without_improvement = {"value": value, "step": step, "scores": scores}, 0
                save(ckpt_dir / "best.pt", **scores)
            else:
                evals_without_improvement += 1
            print(f"validation at step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in scores.items()), flush=True)
            if p.patience and evals_without_improvement >= p.patience:
                print(f"train: early stop, {p.early_stop_metric} did not improve in {p.patience} validations")
                stop = True

        if ddp:  # rank 0 decides about time and early stopping; every rank must stop at the same step
            flag = torch.tensor([int(stop)], device=device)
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        if step % p.save_every == 0 or stop:
            window_rows += flush_losses(pending)
            save_training_state()

    # ---- the final model, metrics and artifacts ------------------------------------------------------------
    train_seconds = trained_seconds + time.perf_counter() - start
    if bar is not None:
        bar.stop()
    digest = hashlib.sha256(b"".join(t.detach().cpu().numpy().tobytes() for t in raw_model.state_dict().values()))
    print(f"train: rank {rank} final parameters sha256 {digest.hexdigest()}", flush=True)
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    if not master:
        return None
    losses_file.close()

    if p.final_model == "best" and (ckpt_dir / "best.pt").exists():
        raw_model.load_state_dict(load_checkpoint(ckpt_dir / "best.pt")["model"])
    elif p.final_model == "average":
        raw_model.load_state_dict(average_checkpoints(step_checkpoints(ckpt_dir)))
    save(out_dir / "model.pt")
    if p.final_model != "last" or not last_scores:
        last_scores = validate(raw_model, params, dev, tokenizer, device)

    rows = [line.split("\t") for line in losses_path.read_text().splitlines()[1:]]
    history = []
    for i in range(0, len(rows), p.log_every):  # per log_every window: token-weighted mean loss
        window = rows[i : i + p.log_every]
        tokens = sum(int(r[3]) for r in window)
        history.append(
            (int(window[-1][0]), sum(float(r[1]) * int(r[3]) for r in window) / tokens, float(window[-1][2]))
        )
    dev_loss = last_scores["dev_loss"]
    metrics = {
        "steps": step,
        "epochs": epoch,
        "train_seconds": round(train_seconds, 1),
        "train_tokens": tokens_seen,
        "tokens_per_s": round(tokens_seen * world / max(train_seconds, 1e-9), 1),
        "final_train_loss": round(history[-1][1], 4) if history else None,
        "dev_loss": round(dev_loss, 4),
        "dev_ppl": round(math.exp(min(dev_loss, 50.0)), 3),
        "best_step": best["step"],
        f"best_{p.early_stop_metric}": round(best["value"], 4) if best["value"] is not None else None,
        "dev_bleu": round(last_scores["dev_bleu"], 2) if "dev_bleu" in last_scores else None,
        "final_model": p.final_model,
        "n_parameters": n_params,
        "skipped_long_pairs": skipped,
        "world_size": world,
    }
    tracker.log_metrics({"final_dev_loss": dev_loss, "final_dev_ppl": metrics["dev_ppl"]}, step=step)
    tracker.log_artifact(out_dir / "model.pt", "checkpoints")
    for path in [ckpt_dir / "best.pt", *step_checkpoints(ckpt_dir)[-1:]]:
        if path.exists():
            tracker.log_artifact(path, "checkpoints")
    tracker.end()
    write_json(metrics_path, metrics)
    with atomic_write(plot_path) as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "lr"])
        writer.writerows((s, f"{loss:.5f}", f"{lr:.3e}") for s, loss, lr in history)
    write_run_file(tracker.run_id, experiment_id, params.mlflow.tracking_uri, out_dir / "train_run.json")
    return metrics


def main() -> None:
    try:
        params = load_params()
        metrics = train(params)
    except (ParamsError, CheckpointError, FileNotFoundError, ValueError) as err:
        sys.exit(f"train: {err}")
    if metrics is not None:
        print(f"train: {json.dumps(metrics)}")


if __name__ == "__main__":
    main()
