"""Training throughput (target tokens/s) of our Transformer vs Hugging Face's MarianMTModel, same process,
and our model's FLOP/s against the machine's own fp32 peak, measured in the same run.

Both models get the same dimensions (a small CPU Transformer by default: 256 wide, 3+3 layers, 8,000
words; or --d-model etc.), the same token-bucket batches of random ids with Multi30k-like lengths, the same
AdamW and gradient clipping, on the CPU. Each takes a training step the way its own code does: ours through
the training loss of the train stage (`model(src, tgt_in, tgt_out, label_smoothing)`, seq2seq/loss.py),
Marian through its logits and F.cross_entropy with the same label smoothing, summed over real target
tokens. After warm-up, each repeat times one pass over the batches, alternating the two models so that
machine noise hits both; the medians are compared.

Efficiency: the floating-point operations of the matrix products our training step performs, counted from
the batch shapes (every projection, the attention scores and their weighted sums, the output layer over
the real target tokens; x3 for forward + backward), per second, over the fp32 peak of this machine: the
faster of MKL (torch.mm) and oneDNN on a 2048^3 product, timed here with the same threads. The same is
measured for the model `make demo` trains (presets/demo.yaml applied to params.yaml: an attention RNN), on
its own batches, vocabulary and label smoothing (no peer: Marian has no RNN).

    pip install -e '.[bench]'
    python bench/train_throughput.py            # the last line is JSON
    ONEDNN_MAX_CPU_ISA=AVX2 python bench/train_throughput.py    # oneDNN limited to AVX2 (and on Intel,
                                                                # MKL_ENABLE_INSTRUCTIONS=AVX2 for MKL)
    python bench/train_throughput.py --device cuda --amp --max-tokens 16384

ONEDNN_MAX_CPU_ISA limits oneDNN only: torch's own kernels (ATEN_CPU_CAPABILITY=avx2 limits those) and
fbgemm's int8 kernels keep using AVX-512, and memory stays as fast, so it flatters an AVX2-only machine.
On a 2-core AMD EPYC without AVX-512, training read 1.23x Marian (1.31-1.34x emulated on an AVX-512 EPYC)
and int8 beam search 1.70x generate (2.68x emulated).

Marian is built from a MarianConfig (no download): post-norm, sinusoidal positions, shared embeddings, ReLU,
and the same dropout (0.1 on embeddings, attention weights, FFN inner activations and sublayer outputs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from same_size import demo_size_config, marian_same_size  # bench/ is on sys.path when run as a script

from seq2seq import cpu
from seq2seq.config import AttentionRNNConfig, Params, TransformerConfig, parse_params
from seq2seq.data import pad_batch, token_batches
from seq2seq.models import build_model
from seq2seq.preset import preset_applied
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID
from seq2seq.transformer import Transformer

REPO = Path(__file__).resolve().parent.parent
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
StepLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_batches(n_sentences: int, max_tokens: int, vocab: int, n_batches: int, seed: int = 0) -> list[Batch]:
    """(src, tgt_in, tgt_out) batches of random ids, lengths around Multi30k's (~14 source, ~17 target subwords)."""
    rng = np.random.default_rng(seed)
    src_len = np.clip(rng.normal(14, 5, n_sentences), 3, 60).astype(int)
    tgt_len = np.clip(src_len * 1.2 + rng.normal(0, 2, n_sentences), 3, 70).astype(int)
    batches = []
    for idx in token_batches(src_len, tgt_len, max_tokens, rng)[:n_batches]:
        src = [rng.integers(4, vocab, src_len[i]) for i in idx]
        tgt = [rng.integers(4, vocab, tgt_len[i]) for i in idx]
        batches.append((pad_batch(src, suffix=EOS_ID), pad_batch(tgt, prefix=BOS_ID), pad_batch(tgt, suffix=EOS_ID)))
    return batches


def ours(cfg: TransformerConfig, vocab: int) -> tuple[StepLoss, torch.nn.Module]:
    model = cpu.accelerate(Transformer(cfg, vocab))  # the CPU fast paths, as the train stage uses them
    return lambda src, tgt_in, tgt_out: model(src, tgt_in, tgt_out, 0.1), model


def marian(cfg: TransformerConfig, vocab: int) -> tuple[StepLoss, torch.nn.Module]:
    model = marian_same_size(cfg, vocab)

    def loss(src: torch.Tensor, tgt_in: torch.Tensor, tgt_out: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=src, attention_mask=src != PAD_ID, decoder_input_ids=tgt_in, use_cache=False).logits
        return F.cross_entropy(
            logits.flatten(0, 1).float(), tgt_out.flatten(), ignore_index=PAD_ID, label_smoothing=0.1, reduction="sum"
        )

    return loss, model


def train_pass(loss_fn: StepLoss, model, optimizer, batches: list[Batch], device: torch.device, amp: bool) -> float:
    """One optimizer step per batch; returns target tokens per second."""
    model.train()
    tokens = 0
    start = time.perf_counter()
    for src, tgt_in, tgt_out in batches:
        src, tgt_in, tgt_out = (x.to(device, non_blocking=True) for x in (src, tgt_in, tgt_out))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(src, tgt_in, tgt_out)
        n = int((tgt_out != PAD_ID).sum())
        optimizer.zero_grad(set_to_none=True)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        tokens += n
    if device.type == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - start)


def training_flops(cfg: TransformerConfig, vocab: int, batch: Batch) -> float:
    """FLOPs of the matrix products of one training step of our Transformer on `batch` (forward x3).

    Per layer and position: the projections (2 FLOPs per multiply-add), and attention's scores Q K^T and
    weighted sum A V over the (padded) lengths; the causal self-attention of the decoder over the positions
    it may see. The output layer runs on the real target tokens only (seq2seq/loss.py).
    """
    src, tgt_in, tgt_out = batch
    b, s, t = src.size(0), src.size(1), tgt_in.size(1)
    d, ff = cfg.d_model, cfg.d_ff
    attention = 2 * 2 * d  # Q K^T and A V: 2 products of d multiply-adds per (query, key) pair, over all heads
    encoder = cfg.n_encoder_layers * b * (s * 2 * (4 * d * d + 2 * d * ff) + s * s * attention)
    decoder = (
        cfg.n_decoder_layers
        * b
        * (
            t * 2 * (6 * d * d + 2 * d * ff)  # self q/k/v/out, cross q/out, FFN
            + s * 2 * (2 * d * d)  # cross-attention keys and values of the encoder states
            + t * (t + 1) / 2 * attention  # causal self-attention
            + t * s * attention  # cross-attention
        )
    )
    output = int((tgt_out != PAD_ID).sum()) * 2 * d * vocab
    return 3 * (encoder + decoder + output)


def attention_rnn_flops(cfg: AttentionRNNConfig, vocab: int, batch: Batch) -> float:
    """FLOPs of the matrix products of one training step of the Luong LSTM attention RNN (forward x3).

    The encoder's LSTMs run on the real source tokens only (packed), each direction with half the hidden
    size; the decoder steps through every (padded) target position: its LSTM over [embedding; h~_{t-1}],
    the scores and context over the (padded) source, W_c and the output layer's projection. The keys W_a h_j
    are projected once per source position; the generator runs on the real target tokens (seq2seq/loss.py).
    """
    if cfg.cell != "lstm" or cfg.attention != "luong":
        raise ValueError("counted for the Luong LSTM attention RNN only")
    src, tgt_in, tgt_out = batch
    b, s, t = src.size(0), src.size(1), tgt_in.size(1)
    e, h, layers = cfg.d_model, cfg.hidden, cfg.layers
    half = h // 2 if cfg.bidirectional else h
    directions = 2 if cfg.bidirectional else 1
    lstm = lambda inputs, hidden: 2 * 4 * hidden * (inputs + hidden)  # noqa: E731  (the four gates)
    encoder = int((src != PAD_ID).sum()) * directions * (lstm(e, half) + (layers - 1) * lstm(directions * half, half))
    keys = b * s * 2 * h * h
    decoder = b * t * (lstm(e + h, h) + (layers - 1) * lstm(h, h) + 2 * 2 * s * h + 2 * 2 * h * h + 2 * h * e)
    output = int((tgt_out != PAD_ID).sum()) * 2 * e * vocab
    return 3 * (encoder + keys + decoder + output)


def demo_params() -> Params:
    """params.yaml with presets/demo.yaml applied, as `make demo` trains."""
    text, _ = preset_applied(REPO / "presets" / "demo.yaml", REPO / "params.yaml")
    return parse_params(yaml.safe_load(text))


def fp32_peak(threads: int) -> tuple[float, str]:
    """The faster of MKL and oneDNN on a 2048^3 fp32 product, in FLOP/s, with the backend's name."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    products = {"mkl": lambda: a @ b.T}
    if cpu.ONEDNN:
        products["onednn"] = lambda: cpu.onednn_matmul(a, b)
    best = {}
    for name, product in products.items():
        product()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            product()
            times.append(time.perf_counter() - start)
        best[name] = 2 * 2048**3 / min(times)
    name = max(best, key=best.get)
    return best[name], name


def target_tokens(batches: list[Batch]) -> int:
    return sum(int((b[2] != PAD_ID).sum()) for b in batches)


def demo_model_efficiency(args: argparse.Namespace, peak: float) -> dict[str, float | str]:
    """Target tokens/s and FLOP/s over `peak` of the model `make demo` trains, on its batch size and vocabulary."""
    params = demo_params()
    vocab, smoothing = params.tokenize.vocab_size, params.train.label_smoothing
    torch.manual_seed(0)
    model = cpu.accelerate(build_model(params.model, vocab))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)
    batches = make_batches(20000, params.train.max_tokens, vocab, 2 * args.batches)

    def loss_fn(src: torch.Tensor, tgt_in: torch.Tensor, tgt_out: torch.Tensor) -> torch.Tensor:
        return model(src, tgt_in, tgt_out, smoothing)

    cpu_device = torch.device("cpu")
    for _ in range(args.warmup):
        train_pass(loss_fn, model, optimizer, batches, cpu_device, False)
    tps = statistics.median(train_pass(loss_fn, model, optimizer, batches, cpu_device, False) for _ in range(3))
    flops = sum(attention_rnn_flops(params.model.config, vocab, b) for b in batches) / target_tokens(batches) * tps
    print(
        f"demo model ({params.model.family}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"max_tokens {params.train.max_tokens}): {tps:.0f} target tokens/s, {flops / 1e9:.1f} GFLOP/s",
        flush=True,
    )
    return {
        "family": params.model.family,
        "tokens_per_s": round(tps, 1),
        "model_gflops_per_s": round(flops / 1e9, 1),
        "efficiency": round(flops / peak, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(prog="python bench/train_throughput.py", description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=8000, help="vocabulary size")
    ap.add_argument("--d-model", type=int, default=256, help="model width")
    ap.add_argument("--heads", type=int, default=4, help="attention heads")
    ap.add_argument("--layers", type=int, default=3, help="encoder layers, and as many decoder layers")
    ap.add_argument("--d-ff", type=int, default=1024, help="feed-forward inner width")
    ap.add_argument("--max-tokens", type=int, default=4096, help="source + target tokens per batch")
    ap.add_argument("--batches", type=int, default=8, help="batches per timed pass")
    ap.add_argument("--warmup", type=int, default=1, help="untimed passes per model")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per model (alternating); the median counts")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = demo_size_config(args.d_model, args.heads, args.layers, args.d_ff, dropout=0.1)
    batches = make_batches(20000, args.max_tokens, args.vocab, args.batches)
    runs = {}
    for name, build in (("ours", ours), ("peer", marian)):
        loss_fn, model = build(cfg, args.vocab)
        model.to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {type(model).__name__} with {n_params / 1e6:.2f}M parameters", flush=True)
        runs[name] = (loss_fn, model, optimizer, [])
        for _ in range(args.warmup):
            train_pass(loss_fn, model, optimizer, batches, device, args.amp)
    for r in range(args.repeats):
        for name, (loss_fn, model, optimizer, speeds) in runs.items():
            speeds.append(train_pass(loss_fn, model, optimizer, batches, device, args.amp))
            print(f"repeat {r + 1}: {name} {speeds[-1]:.0f} target tokens/s", flush=True)
    ours_tps, peer_tps = (statistics.median(runs[n][3]) for n in ("ours", "peer"))
    result = {
        "metric": "train_tokens_per_s",
        "ours": round(ours_tps, 1),
        "peer": round(peer_tps, 1),
        "ratio": round(ours_tps / peer_tps, 3),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "native"),
    }
    if device.type == "cpu":
        peak, backend = fp32_peak(torch.get_num_threads())
        flops_per_token = sum(training_flops(cfg, args.vocab, b) for b in batches) / target_tokens(batches)
        model_flops = flops_per_token * ours_tps
        print(
            f"ours: {flops_per_token / 1e6:.1f} MFLOP per target token -> {model_flops / 1e9:.1f} GFLOP/s; "
            f"fp32 peak {peak / 1e9:.1f} GFLOP/s ({backend}, 2048^3, {torch.get_num_threads()} threads)"
        )
        result.update(
            model_gflops_per_s=round(model_flops / 1e9, 1),
            peak_gflops_per_s=round(peak / 1e9, 1),
            peak_backend=backend,
            efficiency=round(model_flops / peak, 3),
            demo_model=demo_model_efficiency(args, peak),
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
