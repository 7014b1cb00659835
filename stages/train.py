"""train: fit the configured model family on the tokenized training data, logging to MLflow.

Reads data/tokenized/; writes models/model.pt (weights for evaluate/export), models/train_run.json (the
MLflow run id that evaluate and export attach to), metrics/train.json and plots/train_loss.csv.

Resumable checkpoints live in <train.checkpoint_dir>/<run key>/ (not a DVC out, so DVC never deletes
them): step-XXXXXXXX.pt (the last train.keep_last; model, optimizer, scaler, TrainState and every RNG
state), best.pt (weights of the best validation) and losses.tsv (every step's loss). The run key hashes
everything that shapes the training trajectory, so a re-run with the same recipe resumes exactly where
the last one stopped, and a changed recipe starts in a fresh directory.

Multi-GPU: `torchrun --nproc_per_node=N -m stages.train` (DDP; gloo on CPU, nccl on CUDA). Each rank
trains on its shard of every epoch's batches; rank 0 alone logs, validates and writes files.

The recipe reads top to bottom in `train`: set-up (processes, data, model, optimizer), `resume`,
`start_tracking`, then the loop (batches -> forward -> loss -> backward (accumulated) -> clip -> step ->
log -> validate -> `save_checkpoint`), then `cleanup` and the final model, metrics and plots.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import sacrebleu
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from seq2seq import checkpoint, cli, cpu, paths
from seq2seq.checkpoint import CheckpointError
from seq2seq.config import Params, ParamsError, TrainParams, flatten, load_params
from seq2seq.data import Batch, Prefetched, TokenArray, collate, token_batches
from seq2seq.decoding import translate_ids
from seq2seq.device import pick_device
from seq2seq.models import build_model
from seq2seq.progress import Progress
from seq2seq.redact import redact
from seq2seq.textio import atomic_write, write_json
from seq2seq.tokenizer import PAD_ID, Tokenizer
from seq2seq.tracking import ResilientRun, dvc_out_hash, git_commit, write_run_file

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


# ---- the state a checkpoint carries ------------------------------------------------------------------------


@dataclass
class TrainState:
    """Where a run is: what a resumable checkpoint stores besides weights, optimizer and RNG states."""

    step: int = 0  # optimizer steps taken
    epoch: int = 1
    batch_index: int = 0  # batches of this epoch's list already taken
    tokens_seen: int = 0  # target tokens trained on, this rank
    trained_seconds: float = 0.0  # wall-clock time in the loop, over every run that resumed it
    best_value: float | None = None  # train.early_stop_metric at the best validation
    best_step: int | None = None
    best_scores: dict[str, float] = field(default_factory=dict)
    evals_without_improvement: int = 0  # compared with train.patience
    mlflow_run_id: str | None = None  # a resumed run continues this MLflow run

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainState:
        return cls(**values)

    def record_validation(self, scores: dict[str, float], metric: str) -> bool:
        """Count a validation; True when it is the best so far (lowest dev_loss or highest dev_bleu)."""
        value = scores[metric]
        if self.best_value is None or (value < self.best_value if metric == "dev_loss" else value > self.best_value):
            self.best_value, self.best_step, self.best_scores = value, self.step, scores
            self.evals_without_improvement = 0
            return True
        self.evals_without_improvement += 1
        return False


# ---- schedule, data order, run key, RNG states -----------------------------------------------------------


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


# ---- set-up ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Processes:
    """This process's place in the run: rank and world size under torchrun (DDP), else 0 of 1; its device."""

    rank: int
    world: int
    device: torch.device
    ddp: bool

    @property
    def master(self) -> bool:
        """Rank 0 alone logs, validates and writes files."""
        return self.rank == 0


def setup_processes(p: TrainParams) -> Processes:
    ddp = "RANK" in os.environ  # set by torchrun
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = pick_device(p.device)
    if ddp:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if p.threads:
        torch.set_num_threads(p.threads)
    return Processes(rank, world, device, ddp)


@dataclass(frozen=True)
class TrainData:
    """The token arrays training reads, and the tokenizer they were encoded with (for the dev BLEU)."""

    src: TokenArray
    tgt: TokenArray
    usable: np.ndarray  # indices of the training pairs short enough to train on
    dev: tuple[TokenArray, TokenArray]
    vocab_size: int
    tokenizer: Tokenizer

    @property
    def skipped(self) -> int:
        return len(self.src) - len(self.usable)

    def batches(self, epoch: int, p: TrainParams, procs: Processes) -> list[np.ndarray]:
        """This rank's batches of `epoch`, as indices into the training arrays."""
        lengths = self.src.lengths[self.usable], self.tgt.lengths[self.usable]
        return [self.usable[b] for b in epoch_batches(*lengths, p.max_tokens, p.seed, epoch, procs.rank, procs.world)]

    def stream(
        self, epoch: int, index: int, p: TrainParams, procs: Processes, pin: bool
    ) -> Iterator[tuple[int, int, Batch]]:
        """This rank's batches collated, in order, epoch after epoch, from batch `index` of `epoch` on: each
        as (epoch, index of the next batch, batch), the position a checkpoint records. `pin`: in page-locked
        memory, for an asynchronous copy to the GPU."""
        batches = self.batches(epoch, p, procs)
        while True:
            if index == len(batches):
                epoch, index = epoch + 1, 0
                batches = self.batches(epoch, p, procs)
            batch = collate(self.src, self.tgt, batches[index])
            index += 1
            yield epoch, index, tuple(x.pin_memory() for x in batch) if pin else batch


def load_data(params: Params, data_dir: Path, procs: Processes) -> TrainData:
    p = params.train
    vocab_size = json.loads((data_dir / "meta.json").read_text())["vocab_size"]
    src, tgt = load_split(data_dir, "train", params.data.langs)
    dev = load_split(data_dir, "dev", params.data.langs)
    tokenizer = Tokenizer(data_dir / "spm.model")
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(
            f"{data_dir / 'meta.json'} gives a vocabulary of {vocab_size} ids but {tokenizer.model_path} has "
            f"{tokenizer.vocab_size}: they come from different tokenize runs"
        )
    # Pairs longer than train.max_len (or the model's max_positions) are skipped and counted, never silently.
    max_len = min(p.max_len, params.model.config.max_positions - 1)
    usable = np.flatnonzero((src.lengths <= max_len) & (tgt.lengths <= max_len))
    if len(usable) == 0:
        raise ValueError(f"train.max_len={p.max_len}: no training pair is short enough")
    data = TrainData(src, tgt, usable, dev, vocab_size, tokenizer)
    if data.skipped and procs.master:
        print(f"train: skipping {data.skipped} of {len(src)} pairs longer than {max_len} tokens")
    return data


def resume(
    ckpt_dir: Path,
    key_dict: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    p: TrainParams,
    procs: Processes,
) -> TrainState:
    """The state of this recipe's last checkpoint, with weights, optimizer, scaler and RNGs restored from it;
    or a fresh state. Rank 0 also makes the checkpoint directory and clears what a killed process left."""
    existing = step_checkpoints(ckpt_dir)
    if not existing:
        torch.manual_seed(p.seed + procs.rank)  # different dropout masks per rank
        state = TrainState()
    else:
        path = existing[-1]
        saved = checkpoint.load_checkpoint(path, map_location="cpu")  # RNG states must stay CPU tensors
        if saved.get("run_key") != key_dict:
            raise CheckpointError(
                f"{path}: written for another recipe than params.yaml describes; move {ckpt_dir} away to start afresh"
            )
        if saved["step"] > p.max_steps:
            raise CheckpointError(f"{path}: step {saved['step']} is beyond train.max_steps={p.max_steps}")
        try:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scaler.load_state_dict(saved["scaler"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{path}: does not fit this model/optimizer ({err})") from None
        state = TrainState.from_dict(saved["train_state"])
        set_rng_state(saved["rng"][procs.rank])
        if procs.master:
            print(f"train: resuming from {path} (step {state.step}, epoch {state.epoch}, batch {state.batch_index})")
    if procs.master:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for tmp in ckpt_dir.glob(".*.tmp"):  # left by a process killed while writing
            tmp.unlink()
    return state


def wrap_model(model: nn.Module, p: TrainParams, procs: Processes) -> nn.Module:
    """The module the loop calls: `model` compiled (train.compile) and, under torchrun, wrapped in DDP."""
    if p.compile:
        model = torch.compile(model)
    if procs.ddp:
        model = DistributedDataParallel(model, device_ids=[procs.device.index] if procs.device.type == "cuda" else None)
    return model


def start_tracking(
    params: Params, state: TrainState, n_params: int, key: str, ckpt_dir: Path, data_dir: Path, procs: Processes
) -> ResilientRun:
    """Rank 0's MLflow run: the one a resumed run started (its id in the checkpoint, or beside the journal),
    otherwise a new one with the validated params and tags for what else shapes the result. Nothing here
    waits for MLflow: the run is created or continued in the background, whenever the server answers."""
    logged = {k: redact(str(v)) for k, v in flatten(params.model_dump(exclude={"download"}), "").items()}
    tags = {
        "git_commit": git_commit() or "unknown",
        "torch": torch.__version__,
        "device": f"{procs.device} x{procs.world}",
        "python": platform.python_version(),
        "n_parameters": str(n_params),
        "run_key": key,
        "dvc_data_tokenized_md5": dvc_out_hash(str(data_dir)) or "unknown",
    }
    return ResilientRun(
        ckpt_dir / "metrics.jsonl",
        through_step=state.step,
        tracking_uri=params.mlflow.tracking_uri,
        experiment=params.mlflow.experiment,
        run_id=state.mlflow_run_id,
        run_name=f"{params.model.family}-{params.data.pair}",
        params=logged,
        tags=tags,
    )


class TrackingError(RuntimeError):
    """The run trained, but MLflow never answered, so later stages have no run to log to."""


# ---- logging, validation, checkpoints ------------------------------------------------------------------


class Window(NamedTuple):
    """The steps between two log lines: their token-weighted mean loss, target tokens, wall seconds, and the
    seconds of those the loop spent getting its batches (collating them, or waiting for the prefetch thread)."""

    loss: float
    tokens: int
    seconds: float
    data_seconds: float


class LossLog:
    """losses.tsv in the checkpoint directory: step, loss, lr and target tokens of every step (rank 0).

    On a resume it is cut back to the steps the checkpoint covers (the later ones are redone), so it is the
    exact record of a run however often it was interrupted. Losses stay tensors until `flush`: one device
    sync per flush, not per step. The rows since the last `window()` make up the next logged mean.
    """

    def __init__(self, path: Path, through_step: int):
        kept = []
        if through_step and path.exists():
            kept = [line for line in path.read_text().splitlines()[1:] if int(line.split("\t")[0]) <= through_step]
        with atomic_write(path) as f:
            f.write("step\tloss\tlr\ttokens\n" + "".join(line + "\n" for line in kept))
        self.path, self.file = path, path.open("a")
        self.pending: list[tuple[int, torch.Tensor, float, int]] = []
        self.rows: list[tuple[int, float, float, int]] = []  # written, in the current window
        self.window_start = time.perf_counter()
        self.data_seconds = 0.0  # spent getting batches, in the current window

    def add(self, step: int, loss: torch.Tensor, lr: float, tokens: int, data_seconds: float = 0.0) -> None:
        self.pending.append((step, loss, lr, tokens))
        self.data_seconds += data_seconds

    def flush(self) -> None:
        if self.pending:
            values = torch.stack([row[1] for row in self.pending]).tolist()
            rows = [(s, v, lr, n) for (s, _, lr, n), v in zip(self.pending, values, strict=True)]
            self.file.write("".join(f"{s}\t{v!r}\t{lr!r}\t{n}\n" for s, v, lr, n in rows))
            self.file.flush()
            self.rows += rows
            self.pending.clear()

    def sync(self) -> None:
        """Make every step so far durable: a checkpoint written next must not cover steps the file lacks."""
        self.flush()
        os.fsync(self.file.fileno())

    def window(self) -> Window:
        """The steps since the last window (mean loss, tokens, seconds, of which getting batches); starts the next."""
        self.flush()
        tokens = sum(row[3] for row in self.rows)
        mean = sum(row[1] * row[3] for row in self.rows) / tokens
        window = Window(mean, tokens, time.perf_counter() - self.window_start, self.data_seconds)
        self.rows, self.window_start, self.data_seconds = [], time.perf_counter(), 0.0
        return window

    def close(self) -> None:
        self.file.close()

    def history(self, log_every: int) -> list[tuple[int, float, float]]:
        """(last step, token-weighted mean loss, last lr) of each log_every window of the whole file."""
        rows = [line.split("\t") for line in self.path.read_text().splitlines()[1:]]
        history = []
        for i in range(0, len(rows), log_every):
            window = rows[i : i + log_every]
            tokens = sum(int(r[3]) for r in window)
            mean = sum(float(r[1]) * int(r[3]) for r in window) / tokens
            history.append((int(window[-1][0]), mean, float(window[-1][2])))
        return history


def log_window(
    losses: LossLog,
    state: TrainState,
    lr: float,
    grad_norm: torch.Tensor,
    n_params: int,
    procs: Processes,
    tracker: ResilientRun,
    progress: Progress,
) -> None:
    """Log the mean loss, lr, gradient norm and speed of the steps since the last log (rank 0)."""
    mean_loss, tokens, seconds, data_seconds = losses.window()
    metrics = {
        "loss": mean_loss,
        "lr": lr,
        "grad_norm": float(grad_norm),
        "tokens_per_s": tokens * procs.world / seconds,
        "data_wait_share": data_seconds / seconds,  # of the step time, spent getting batches
        "epoch": state.epoch,
    }
    mfu = estimate_mfu(n_params, tokens / seconds, procs.device)
    if mfu is not None:
        metrics["mfu"] = mfu
    tracker.log_metrics(metrics, step=state.step)
    status = f"loss {mean_loss:.3f} lr {lr:.2e} tok/s {metrics['tokens_per_s']:.0f}"
    progress.update(state.step, status)
    if progress.bar is None:
        print(f"step {state.step} epoch {state.epoch} {status} elapsed {state.trained_seconds:.0f}s", flush=True)


@torch.no_grad()
def evaluate_loss(model: nn.Module, src: TokenArray, tgt: TokenArray, max_tokens: int, device: torch.device) -> float:
    """Mean per-token cross-entropy (no label smoothing) over a whole split."""
    model.eval()
    total, count = 0.0, 0
    for idx in token_batches(src.lengths, tgt.lengths, max_tokens):
        s, t_in, t_out = (x.to(device) for x in collate(src, tgt, idx))
        total += model(s, t_in, t_out, label_smoothing=0.0).item()
        count += int((t_out != PAD_ID).sum())
    model.train()
    return total / max(count, 1)


def validate(model: nn.Module, params: Params, data: TrainData, device: torch.device) -> dict[str, float]:
    """Dev loss and perplexity on the whole dev set, and greedy BLEU on its first eval_bleu_sentences."""
    dev_loss = evaluate_loss(model, *data.dev, params.train.max_tokens, device)
    metrics = {"dev_loss": dev_loss, "dev_ppl": math.exp(min(dev_loss, 50.0))}
    n = min(params.train.eval_bleu_sentences, len(data.dev[0]))
    if n:
        e = params.evaluate
        sources = [data.dev[0][i].tolist() for i in range(n)]
        hyps = translate_ids(model, sources, e.batch_size, e.max_len_a, e.max_len_b, device)
        refs = data.tokenizer.decode([data.dev[1][i].tolist() for i in range(n)])
        metrics["dev_bleu"] = sacrebleu.corpus_bleu(data.tokenizer.decode(hyps), [refs]).score
        model.train()
    return metrics


def save_checkpoint(
    state: TrainState,
    ckpt_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    params: Params,
    key_dict: dict[str, Any],
    procs: Processes,
    losses: LossLog | None,
) -> None:
    """Write step-XXXXXXXX.pt with everything exact resume needs and keep the last train.keep_last.
    Every rank calls it (each one's RNG state goes into the file); rank 0 writes."""
    rngs = [rng_state()]
    if procs.ddp:
        rngs = [None] * procs.world
        dist.all_gather_object(rngs, rng_state())
    if not procs.master:
        return
    losses.sync()
    p, name = params.train, f"step-{state.step:08d}.pt"
    checkpoint.save_checkpoint(
        ckpt_dir / name,
        model,
        params.model.family,
        state.step,
        train_state=state.to_dict(),
        optimizer=optimizer.state_dict(),
        scaler=scaler.state_dict(),
        run_key=key_dict,
        rng=rngs,
        lr_schedule={"name": p.lr_schedule, "lr": learning_rate(state.step, p)},  # the lr is a function of step
    )
    for old in step_checkpoints(ckpt_dir)[: -p.keep_last]:
        old.unlink()
    print(f"train: rank {procs.rank} saved checkpoint {name}", flush=True)


def tokens_of_all_ranks(n_tokens: int, procs: Processes) -> int:
    if not procs.ddp:
        return n_tokens
    counts = torch.tensor([n_tokens], device=procs.device)
    dist.all_reduce(counts)
    return int(counts.item())


def rank_0_decides(stop: bool, procs: Processes) -> bool:
    """Rank 0 decides about time and early stopping: every rank must stop at the same step."""
    if not procs.ddp:
        return stop
    flag = torch.tensor([int(stop)], device=procs.device)
    dist.broadcast(flag, 0)
    return bool(flag.item())


# ---- the recipe -----------------------------------------------------------------------------------------


def train(
    params: Params,
    data_dir: Path = paths.TOKENIZED,
    out_dir: Path = paths.MODELS,
    metrics_path: Path = paths.METRICS / "train.json",
    plot_path: Path = paths.PLOTS / "train_loss.csv",
) -> dict | None:
    """Train (resuming when a checkpoint of this recipe exists) and save the model; rank 0 returns the metrics."""
    p, family = params.train, params.model.family
    # ---- set-up: processes, data, model, optimizer; then resume and tracking ---------------------------------
    procs = setup_processes(p)
    device = procs.device
    random.seed(p.seed)
    np.random.seed(p.seed)
    torch.manual_seed(p.seed)  # the same initial weights on every rank
    data = load_data(params, data_dir, procs)
    raw_model = cpu.accelerate(build_model(params.model, data.vocab_size)).to(device)
    n_params = raw_model.num_parameters()
    optimizer = torch.optim.AdamW(
        raw_model.parameters(), lr=p.lr, betas=(0.9, 0.98), eps=1e-9, weight_decay=p.weight_decay
    )
    use_amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    key, key_dict = run_key(params, data_dir, procs.world)
    ckpt_dir = Path(p.checkpoint_dir) / key
    state = resume(ckpt_dir, key_dict, raw_model, optimizer, scaler, p, procs)
    model = wrap_model(raw_model, p, procs)
    tracker, losses, progress = None, None, None
    if procs.master:
        tracker = start_tracking(params, state, n_params, key, ckpt_dir, data_dir, procs)
        print(
            f"train: {family} with {n_params / 1e6:.2f}M parameters on {device} x{procs.world}; "
            f"checkpoints in {ckpt_dir}; MLflow {redact(params.mlflow.tracking_uri)}",
            flush=True,
        )
        losses = LossLog(ckpt_dir / "losses.tsv", through_step=state.step)
        progress = Progress("train", p.max_steps, unit="steps", completed=state.step, plain=False)

    # ---- the loop ------------------------------------------------------------------------------------------
    # on a GPU a thread collates (and pins) the next batches while the GPU computes, so it does not wait on them
    feed = data.stream(state.epoch, state.batch_index, p, procs, pin=device.type == "cuda")
    if device.type == "cuda":
        feed = Prefetched(feed, depth=2 * p.grad_accum)
    last_scores: dict[str, float] = {}
    clock = time.perf_counter() - state.trained_seconds  # so that trained_seconds = now - clock, across resumes
    stop = state.step >= p.max_steps or state.trained_seconds >= p.max_minutes * 60  # a finished run stays finished
    model.train()
    while not stop:
        # one optimizer step = grad_accum micro-batches, taken in order from this epoch's (sharded) batch list
        micro, waited = [], time.perf_counter()
        for _ in range(p.grad_accum):
            state.epoch, state.batch_index, batch = next(feed)
            micro.append(batch)
        waited = time.perf_counter() - waited
        n_tokens = sum(int((tgt_out != PAD_ID).sum()) for _, _, tgt_out in micro)
        all_tokens = tokens_of_all_ranks(n_tokens, procs)  # the loss is per target token of every rank's batches
        state.step += 1
        lr = learning_rate(state.step, p)
        for group in optimizer.param_groups:
            group["lr"] = lr

        step_loss = torch.zeros((), device=device)
        for i, batch in enumerate(micro):
            if device.type == "cuda":
                batch = tuple(x.to(device, non_blocking=True) for x in batch)  # pinned by the feed
            src, tgt_in, tgt_out = batch
            # DDP all-reduces the gradients once per step, after the last micro-batch's backward
            sync = model.no_sync() if procs.ddp and i < len(micro) - 1 else contextlib.nullcontext()
            with sync:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    # the label-smoothed cross-entropy summed over real target tokens (seq2seq/loss.py)
                    loss_sum = model(src, tgt_in, tgt_out, p.label_smoothing)
                # DDP averages the ranks' gradients, hence x world to make it a sum over all_tokens
                scaler.scale(loss_sum * (procs.world / all_tokens)).backward()
            step_loss += loss_sum.detach()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), p.clip_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        state.tokens_seen += n_tokens
        state.trained_seconds = time.perf_counter() - clock
        stop = state.step >= p.max_steps or state.trained_seconds >= p.max_minutes * 60
        if procs.master:
            losses.add(state.step, step_loss / n_tokens, lr, n_tokens, waited)
            if state.step % p.log_every == 0 or stop:
                log_window(losses, state, lr, grad_norm, n_params, procs, tracker, progress)
            if state.step % p.eval_every == 0 or stop:
                last_scores = validate(raw_model, params, data, device)
                tracker.log_metrics(last_scores, step=state.step)
                if state.record_validation(last_scores, p.early_stop_metric):
                    checkpoint.save_checkpoint(ckpt_dir / "best.pt", raw_model, family, state.step, **last_scores)
                scores = " ".join(f"{k} {v:.4g}" for k, v in last_scores.items())
                print(f"validation at step {state.step}: {scores}", flush=True)
                if p.patience and state.evals_without_improvement >= p.patience:
                    print(f"train: early stop, {p.early_stop_metric} did not improve in {p.patience} validations")
                    stop = True
        stop = rank_0_decides(stop, procs)
        if state.step % p.save_every == 0 or stop:
            state.trained_seconds = time.perf_counter() - clock
            if procs.master:
                state.mlflow_run_id = tracker.run_id  # None while MLflow has not answered yet
            save_checkpoint(state, ckpt_dir, raw_model, optimizer, scaler, params, key_dict, procs, losses)

    # ---- cleanup, and rank 0's final model, metrics and plots --------------------------------------------
    feed.close()
    state.trained_seconds = time.perf_counter() - clock
    cleanup(raw_model, procs, progress)
    if not procs.master:
        return None
    losses.close()
    final_model(raw_model, p, ckpt_dir)
    checkpoint.save_checkpoint(
        out_dir / "model.pt", raw_model, family, state.step, tokenizer_sha256=data.tokenizer.sha256
    )
    if p.final_model != "last" or not last_scores:
        last_scores = validate(raw_model, params, data, device)
    history = losses.history(p.log_every)
    metrics = train_metrics(state, last_scores, history, p, n_params, data.skipped, procs.world)
    tracker.log_metrics({"final_dev_loss": last_scores["dev_loss"], "final_dev_ppl": metrics["dev_ppl"]}, state.step)
    for path in [out_dir / "model.pt", ckpt_dir / "best.pt", *step_checkpoints(ckpt_dir)[-1:]]:
        if path.exists():
            tracker.log_artifact(path, "checkpoints")
    tracker.end()
    if tracker.run_id is None:
        raise TrackingError(
            f"MLflow at {redact(params.mlflow.tracking_uri)} did not answer during the whole run: the model and the "
            f"metrics journal are saved in {ckpt_dir}; run the stage again when MLflow is back (it resumes at "
            f"step {state.step}, creates the run, logs it and finishes)"
        )
    write_json(metrics_path, metrics)
    write_loss_plot(plot_path, history)
    write_run_file(tracker.run_id, tracker.experiment_id, params.mlflow.tracking_uri, out_dir / "train_run.json")
    return metrics


# ---- after the loop -------------------------------------------------------------------------------------


def cleanup(model: nn.Module, procs: Processes, progress: Progress | None) -> None:
    """Every rank: print the final weights' hash (identical on every rank under DDP), leave the process group."""
    if progress is not None:
        progress.close()
    digest = hashlib.sha256(b"".join(t.detach().cpu().numpy().tobytes() for t in model.state_dict().values()))
    print(f"train: rank {procs.rank} final parameters sha256 {digest.hexdigest()}", flush=True)
    if procs.ddp:
        dist.barrier()
        dist.destroy_process_group()


def final_model(model: nn.Module, p: TrainParams, ckpt_dir: Path) -> None:
    """Load the weights train.final_model asks for: the last (as they are), the best, or the kept average."""
    if p.final_model == "best" and (ckpt_dir / "best.pt").exists():
        model.load_state_dict(checkpoint.load_checkpoint(ckpt_dir / "best.pt")["model"])
    elif p.final_model == "average":
        model.load_state_dict(checkpoint.average_checkpoints(step_checkpoints(ckpt_dir)))


def train_metrics(
    state: TrainState,
    scores: dict[str, float],
    history: list[tuple[int, float, float]],
    p: TrainParams,
    n_params: int,
    skipped: int,
    world: int,
) -> dict[str, Any]:
    """metrics/train.json: the run's totals, the final model's dev scores and the best validation."""
    dev_loss, seconds = scores["dev_loss"], state.trained_seconds
    return {
        "steps": state.step,
        "epochs": state.epoch,
        "train_seconds": round(seconds, 1),
        "train_tokens": state.tokens_seen,
        "tokens_per_s": round(state.tokens_seen * world / max(seconds, 1e-9), 1),
        "final_train_loss": round(history[-1][1], 4) if history else None,
        "dev_loss": round(dev_loss, 4),
        "dev_ppl": round(math.exp(min(dev_loss, 50.0)), 3),
        "best_step": state.best_step,
        f"best_{p.early_stop_metric}": round(state.best_value, 4) if state.best_value is not None else None,
        "dev_bleu": round(scores["dev_bleu"], 2) if "dev_bleu" in scores else None,
        "final_model": p.final_model,
        "n_parameters": n_params,
        "skipped_long_pairs": skipped,
        "world_size": world,
    }


def write_loss_plot(path: Path, history: list[tuple[int, float, float]]) -> None:
    """plots/train_loss.csv: step, mean loss and lr of each log_every window (a DVC plot)."""
    with atomic_write(path) as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "lr"])
        writer.writerows((s, f"{loss:.5f}", f"{lr:.3e}") for s, loss, lr in history)


def main(argv: list[str] | None = None) -> None:
    args = cli.stage_parser("train", __doc__).parse_args(argv)
    try:
        metrics = train(load_params(args.params))
    except (ParamsError, CheckpointError, FileNotFoundError, ValueError, TrackingError) as err:
        cli.fail("train", err)
    if metrics is not None:
        print(f"train: {json.dumps(metrics)}")


if __name__ == "__main__":
    main()
