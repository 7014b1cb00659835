"""Training throughput (target tokens/s) of our Transformer vs Hugging Face's MarianMTModel, same process.

Both models get the dimensions of the demo preset (or --d-model etc.), the same token-bucket batches of
random ids with Multi30k-like lengths, the same loss (label-smoothed cross-entropy, summed over real target
tokens), the same AdamW and gradient clipping, on the CPU. After warm-up, each repeat times one pass over
the batches, alternating the two models so that machine noise hits both; the medians are compared.

    pip install -e '.[bench]'
    python bench/train_throughput.py            # the last line is JSON
    python bench/train_throughput.py --device cuda --amp --max-tokens 16384

Marian is built from a MarianConfig (no download): post-norm, sinusoidal positions, shared embeddings, ReLU,
and the same dropout (0.1 on embeddings, attention weights, FFN inner activations and sublayer outputs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from same_size import demo_size_config, marian_same_size  # bench/ is on sys.path when run as a script

from seq2seq import cpu
from seq2seq.data import pad_batch, token_batches
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID
from seq2seq.transformer import Transformer


def make_batches(n_sentences: int, max_tokens: int, vocab: int, n_batches: int, seed: int = 0):
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


def ours(args) -> torch.nn.Module:
    cfg = demo_size_config(args.d_model, args.heads, args.layers, args.d_ff, dropout=0.1)
    model = cpu.accelerate(Transformer(cfg, args.vocab))  # the CPU fast paths, as the train stage uses them
    return lambda src, tgt_in: model(src, tgt_in), model


def marian(args):
    model = marian_same_size(
        demo_size_config(args.d_model, args.heads, args.layers, args.d_ff, dropout=0.1), args.vocab
    )

    def forward(src, tgt_in):
        return model(input_ids=src, attention_mask=src != PAD_ID, decoder_input_ids=tgt_in, use_cache=False).logits

    return forward, model


def train_pass(forward, model, optimizer, batches, device: torch.device, amp: bool) -> float:
    """One optimizer step per batch; returns target tokens per second."""
    model.train()
    tokens = 0
    start = time.perf_counter()
    for src, tgt_in, tgt_out in batches:
        src, tgt_in, tgt_out = (x.to(device, non_blocking=True) for x in (src, tgt_in, tgt_out))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = forward(src, tgt_in)
        n = int((tgt_out != PAD_ID).sum())
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), tgt_out.flatten(), ignore_index=PAD_ID, label_smoothing=0.1, reduction="sum"
        )
        optimizer.zero_grad(set_to_none=True)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        tokens += n
    if device.type == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=8000, help="vocabulary size (default: the demo preset's)")
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
    batches = make_batches(20000, args.max_tokens, args.vocab, args.batches)
    runs = {}
    for name, build in (("ours", ours), ("peer", marian)):
        forward, model = build(args)
        model.to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {type(model).__name__} with {n_params / 1e6:.2f}M parameters", flush=True)
        runs[name] = (forward, model, optimizer, [])
        for _ in range(args.warmup):
            train_pass(forward, model, optimizer, batches, device, args.amp)
    for r in range(args.repeats):
        for name, (forward, model, optimizer, speeds) in runs.items():
            speeds.append(train_pass(forward, model, optimizer, batches, device, args.amp))
            print(f"repeat {r + 1}: {name} {speeds[-1]:.0f} target tokens/s", flush=True)
    ours_tps, peer_tps = (statistics.median(runs[n][3]) for n in ("ours", "peer"))
    print(
        json.dumps(
            {
                "metric": "train_tokens_per_s",
                "ours": round(ours_tps, 1),
                "peer": round(peer_tps, 1),
                "ratio": round(ours_tps / peer_tps, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
