"""Beam-5 decoding speed on CPU: our beam search vs Hugging Face `generate` on a MarianMTModel of the same size.

    pip install -e '.[bench]'
    python bench/decode_speed.py                     # synthetic: demo-preset sizes, random weights, fixed length
    python bench/decode_speed.py --checkpoint models/model.pt --spm data/tokenized/spm.model \
        --source data/clean/test/multi30k_test_2016.en --sentences 500     # a trained model on real text

Marian (built here from MarianConfig, random weights, nothing downloaded) has our model's vocabulary,
width, heads, layers, FFN size and ReLU; it is post-norm where ours is pre-norm, so weights cannot
make the two translate alike. Both get the same source ids in the same length-sorted batches, in one
process, alternating runs (the best of --repeats counts), and do the same number of decoder steps:
- synthetic: every hypothesis runs exactly --new-tokens steps (EOS banned, as min_new_tokens does);
- checkpoint: ours searches for real (stopping when its beams finish, dropping finished sentences);
  Marian runs, per batch, as many steps as ours needed for that batch, which is what `generate` would
  do with the same model, since it keeps every row of a batch until the whole batch is done.
The last line printed is JSON: {"metric": "beam5_sentences_per_s", "ours": ..., "peer": ..., "ratio": ...}.

With --ctranslate2, our model is also exported to CTranslate2 (seq2seq/ctranslate2_export.py: the same
weights) and its beam search timed on the same batches with the same length limits; the JSON then has
"ctranslate2" (sentences/s) and "ctranslate2_ratio" (ours / CTranslate2) too. With --int8, our model is
also timed with int8 weights (seq2seq/cpu.py: quantize_int8, what `evaluate.quantize: int8` and
`nmt-translate --quantize int8` use): "ours_int8", "ratio_int8" (/ generate) and, beside --ctranslate2 int8,
"ctranslate2_ratio_int8" (ours int8 / CTranslate2 int8, like with like).

    ONEDNN_MAX_CPU_ISA=AVX2 python bench/decode_speed.py --int8 --ctranslate2 int8    # oneDNN limited to AVX2

ONEDNN_MAX_CPU_ISA limits oneDNN only: torch's own kernels (ATEN_CPU_CAPABILITY=avx2 limits those) and
fbgemm's int8 kernels keep using AVX-512, and memory stays as fast, so it flatters an AVX2-only machine.
On a 2-core AMD EPYC without AVX-512, training read 1.23x Marian (1.31-1.34x emulated on an AVX-512 EPYC)
and int8 beam search 1.70x generate (2.68x emulated).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from same_size import demo_size_config, marian_same_size  # bench/ is on sys.path when run as a script

from seq2seq import cpu
from seq2seq.beam import beam_search
from seq2seq.config import TransformerConfig
from seq2seq.data import pad_batch
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from seq2seq.transformer import Transformer


class Probe(torch.nn.Module):
    """Our model, counting decoder steps; with ban_eos, EOS is never chosen (every hypothesis runs full length)."""

    def __init__(self, model: torch.nn.Module, ban_eos: bool):
        super().__init__()
        self.model, self.cfg, self.ban_eos, self.steps = model, model.cfg, ban_eos, 0

    def encode(self, src):
        return self.model.encode(src)

    def init_cache(self, *memory):
        return self.model.init_cache(*memory)

    def decode_step(self, prev, memory, cache):
        self.steps += 1
        log_probs, cache = self.model.decode_step(prev, memory, cache)
        if self.ban_eos:
            log_probs = log_probs.index_fill(1, torch.tensor([EOS_ID]), float("-inf"))
        return log_probs, cache

    def reorder_cache(self, cache, index):
        return self.model.reorder_cache(cache, index)


def marian_like(cfg: TransformerConfig, vocab_size: int):
    torch.manual_seed(0)
    return marian_same_size(cfg, vocab_size).eval()


def make_sources(n: int, vocab: int, seed: int) -> list[list[int]]:
    """Random source ids with Multi30k-like lengths (8 to 30 subwords)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 31, (n,), generator=g)
    return [torch.randint(4, vocab, (int(n_tok),), generator=g).tolist() for n_tok in lengths]


def batches(sources: list[list[int]], size: int) -> list[list[list[int]]]:
    ordered = sorted(sources, key=len)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


@torch.inference_mode()
def run_ours(model: Probe, data: list[list[list[int]]], beam: int, max_len: list[int]) -> tuple[float, list[int]]:
    """Seconds for all batches, and the decoder steps each batch took."""
    steps, start = [], time.perf_counter()
    for batch, limit in zip(data, max_len, strict=True):
        model.steps = 0
        src = pad_batch(batch, suffix=EOS_ID)
        beam_search(model, src, torch.full((len(batch),), limit), beam, alpha=1.0, nbest=1)
        steps.append(model.steps)
    return time.perf_counter() - start, steps


@torch.inference_mode()
def run_peer(model, data: list[list[list[int]]], beam: int, steps: list[int]) -> float:
    start = time.perf_counter()
    for batch, n in zip(data, steps, strict=True):
        src = pad_batch(batch, suffix=EOS_ID)
        model.generate(
            input_ids=src,
            attention_mask=(src != PAD_ID).long(),
            num_beams=beam,
            max_new_tokens=n,
            min_new_tokens=n,
            length_penalty=1.0,
            do_sample=False,
        )
    return time.perf_counter() - start


def run_ctranslate2(translator, data: list[list[list[int]]], beam: int, limits: list[int], fixed_length: bool) -> float:
    """Seconds for CTranslate2's beam search over the batches (ids as piece numbers: no tokenizer needed)."""
    start = time.perf_counter()
    for batch, limit in zip(data, limits, strict=True):
        translator.translate_batch(
            [[str(i) for i in s] + ["</s>"] for s in batch],
            beam_size=beam,
            length_penalty=1.0,
            max_decoding_length=limit,
            min_decoding_length=limit if fixed_length else 0,
        )
    return time.perf_counter() - start


def ctranslate2_translator(model: Transformer, threads: int, compute_type: str, directory: Path):
    """Our model as a CTranslate2 Translator, with piece names "0", "1", ... (and its special tokens)."""
    import ctranslate2

    from seq2seq.ctranslate2_export import write_ctranslate2

    pieces = [str(i) for i in range(model.vocab_size)]
    pieces[PAD_ID], pieces[UNK_ID], pieces[BOS_ID], pieces[EOS_ID] = "<pad>", "<unk>", "<s>", "</s>"
    write_ctranslate2(model, pieces, directory / "ct2", quantization=None)
    return ctranslate2.Translator(
        str(directory / "ct2"), device="cpu", compute_type=compute_type, inter_threads=1, intra_threads=threads
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python bench/decode_speed.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, help="a trained model.pt (else a random demo-size model)")
    parser.add_argument("--spm", type=Path, help="its SentencePiece model (with --checkpoint)")
    parser.add_argument("--source", type=Path, help="source sentences, one per line (with --checkpoint)")
    parser.add_argument("--sentences", type=int, default=200, help="sentences to translate")
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per batch")
    parser.add_argument("--beam", type=int, default=5, help="beam size")
    parser.add_argument("--new-tokens", type=int, default=24, help="synthetic: target tokens per hypothesis")
    parser.add_argument("--threads", type=int, default=2, help="torch (and CTranslate2) CPU threads")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs each (alternating); the best counts")
    parser.add_argument("--vocab", type=int, default=8000, help="synthetic model sizes (default: the demo preset)")
    parser.add_argument("--d-model", type=int, default=256, help="synthetic model width")
    parser.add_argument("--heads", type=int, default=4, help="synthetic model attention heads")
    parser.add_argument("--layers", type=int, default=3, help="synthetic model encoder (and decoder) layers")
    parser.add_argument("--d-ff", type=int, default=1024, help="synthetic model feed-forward inner width")
    parser.add_argument(
        "--ctranslate2",
        nargs="?",
        const="float32",
        metavar="COMPUTE_TYPE",
        help="also time a CTranslate2 export of our model (float32, or int8, int8_float32, ...)",
    )
    parser.add_argument("--int8", action="store_true", help="also time our model with int8 weights (cpu.quantize_int8)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.checkpoint:
        from seq2seq.checkpoint import load_model
        from seq2seq.textio import read_lines
        from seq2seq.tokenizer import Tokenizer

        model = cpu.accelerate(load_model(args.checkpoint, "cpu")[0])  # as evaluate and nmt-translate do
        cfg, vocab_size = model.cfg, model.vocab_size
        lines = [line for line in read_lines(args.source) if line.strip()][: args.sentences]
        sources = [s[: cfg.max_positions - 1] for s in Tokenizer(args.spm).encode(lines)]
        ours = Probe(model, ban_eos=False)
    else:
        cfg, vocab_size = demo_size_config(args.d_model, args.heads, args.layers, args.d_ff, dropout=0.0), args.vocab
        torch.manual_seed(0)
        ours = Probe(cpu.accelerate(Transformer(cfg, vocab_size)).eval(), ban_eos=True)
        sources = make_sources(args.sentences, args.vocab, seed=0)
    peer = marian_like(cfg, vocab_size)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_peer = sum(p.numel() for p in peer.parameters() if p.requires_grad)
    data = batches(sources, args.batch_size)
    # ours' length limit: a*src+b as evaluate uses it (1.5, 10) on real text, the fixed length otherwise
    limits = [
        min(int(1.5 * (max(map(len, b)) + 1) + 10), cfg.max_positions) if args.checkpoint else args.new_tokens
        for b in data
    ]
    warm = batches(sources[:8], 8)
    run_peer(peer, warm, args.beam, run_ours(ours, warm, args.beam, [4])[1])
    ours_int8 = Probe(cpu.quantize_int8(ours.model), ban_eos=not args.checkpoint) if args.int8 else None
    tmp = tempfile.TemporaryDirectory()
    ct2 = (
        ctranslate2_translator(ours.model, args.threads, args.ctranslate2, Path(tmp.name)) if args.ctranslate2 else None
    )
    t_ours, t_peer, t_ct2, t_int8 = float("inf"), float("inf"), float("inf"), float("inf")
    for _ in range(args.repeats):  # alternate, so a noisy neighbour on the CPU hurts all alike
        seconds, steps = run_ours(ours, data, args.beam, limits)
        t_ours = min(t_ours, seconds)
        t_peer = min(t_peer, run_peer(peer, data, args.beam, steps))
        if ours_int8 is not None:
            t_int8 = min(t_int8, run_ours(ours_int8, data, args.beam, limits)[0])
        if ct2 is not None:
            t_ct2 = min(t_ct2, run_ctranslate2(ct2, data, args.beam, limits, fixed_length=not args.checkpoint))
    ours_sps, peer_sps = len(sources) / t_ours, len(sources) / t_peer
    mode = f"checkpoint {args.checkpoint}" if args.checkpoint else f"synthetic, {args.new_tokens} tokens"
    print(
        f"{mode}: {len(sources)} sentences, batches of {args.batch_size}, beam {args.beam}, {args.threads} threads, "
        f"{sum(steps)} decoder steps; parameters ours {n_ours / 1e6:.1f}M, Marian {n_peer / 1e6:.1f}M"
    )
    print(f"ours: {t_ours:.2f}s ({ours_sps:.1f} sentences/s); transformers generate: {t_peer:.2f}s ({peer_sps:.1f}/s)")
    result = {"metric": "beam5_sentences_per_s", "ours": round(ours_sps, 2), "peer": round(peer_sps, 2)}
    result["ratio"] = round(ours_sps / peer_sps, 2)
    if ours_int8 is not None:
        int8_sps = len(sources) / t_int8
        print(f"ours with int8 weights: {t_int8:.2f}s ({int8_sps:.1f}/s)")
        result.update(ours_int8=round(int8_sps, 2), ratio_int8=round(int8_sps / peer_sps, 2))
    if ct2 is not None:
        ct2_sps = len(sources) / t_ct2
        print(f"ctranslate2 (our weights, {args.ctranslate2}): {t_ct2:.2f}s ({ct2_sps:.1f}/s)")
        result.update(ctranslate2=round(ct2_sps, 2), ctranslate2_ratio=round(ours_sps / ct2_sps, 2))
        if ours_int8 is not None:  # like with like when CTranslate2 runs int8 too
            result["ctranslate2_ratio_int8"] = round(len(sources) / t_int8 / ct2_sps, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
