"""Export a trained Transformer to CTranslate2 (OpenNMT's C++ inference engine) for fast CPU/GPU serving.

    pip install -e '.[ctranslate2]'
    python -m seq2seq.ctranslate2_export models/model.pt data/tokenized/spm.model models/ct2 [--quantization int8]

Our Transformer maps one-to-one onto CTranslate2's TransformerSpec: fused self-attention QKV and cross-
attention KV projections (the layout both use), pre- or post-norm, ReLU FFN, embeddings scaled by
sqrt(d_model) plus our position table (sinusoidal or learned, copied as is), one shared or two separate
embedding matrices, LayerNorm eps 1e-5. The vocabulary is the SentencePiece model's pieces in id order.
The source gets the EOS that our encoder sees; `translate_with_ctranslate2` does that for you.

The model directory is written beside `out` and renamed into place, so `out` is either the old export or
the complete new one.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from seq2seq.checkpoint import CheckpointError, load_model
from seq2seq.config import DecodingParams
from seq2seq.decoding import source_batches
from seq2seq.tokenizer import EOS_ID, Tokenizer
from seq2seq.transformer import MultiHeadAttention, Sublayer, Transformer


def _array(tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def _linear(spec, layer) -> None:
    spec.weight = _array(layer.weight)
    if layer.bias is not None:
        spec.bias = _array(layer.bias)


def _layer_norm(spec, norm) -> None:
    spec.gamma, spec.beta = _array(norm.weight), _array(norm.bias)


def _attention(spec, attn: MultiHeadAttention, sublayer: Sublayer) -> None:
    if attn.cross:  # linear[0] queries, linear[1] fused keys+values, linear[2] output
        _linear(spec.linear[0], attn.q_proj)
        _linear(spec.linear[1], attn.kv_proj)
    else:  # linear[0] fused queries+keys+values, linear[1] output
        _linear(spec.linear[0], attn.qkv_proj)
    _linear(spec.linear[-1], attn.out_proj)
    _layer_norm(spec.layer_norm, sublayer.norm)


def _ffn(spec, layer, sublayer: Sublayer) -> None:
    _linear(spec.linear_0, layer.ffn.w1)
    _linear(spec.linear_1, layer.ffn.w2)
    _layer_norm(spec.layer_norm, sublayer.norm)


def transformer_spec(model: Transformer, pieces: Sequence[str]):
    """A CTranslate2 TransformerSpec holding `model`'s weights and the vocabulary `pieces`."""
    from ctranslate2.specs import common_spec, transformer_spec

    cfg = model.cfg
    spec = transformer_spec.TransformerSpec.from_config(
        (cfg.n_encoder_layers, cfg.n_decoder_layers),
        cfg.n_heads,
        pre_norm=cfg.pre_norm,
        activation=common_spec.Activation.RELU,
    )
    spec.config.layer_norm_epsilon = model.encoder_layers[0].sub1.norm.eps
    spec.encoder.embeddings[0].weight = _array(model.src_embed.weight)  # a list: one per source feature
    spec.decoder.embeddings.weight = _array(model.tgt_embed.weight)
    spec.decoder.projection.weight = _array(model.generator.weight)
    for stack, norm in ((spec.encoder, model.encoder_norm), (spec.decoder, model.decoder_norm)):
        stack.position_encodings.encodings = _array(model.positions)
        if cfg.pre_norm:  # post-norm stacks end without a LayerNorm, in both
            _layer_norm(stack.layer_norm, norm)
    for layer_spec, layer in zip(spec.encoder.layer, model.encoder_layers, strict=True):
        _attention(layer_spec.self_attention, layer.self_attn, layer.sub1)
        _ffn(layer_spec.ffn, layer, layer.sub2)
    for layer_spec, layer in zip(spec.decoder.layer, model.decoder_layers, strict=True):
        _attention(layer_spec.self_attention, layer.self_attn, layer.sub1)
        _attention(layer_spec.attention, layer.cross_attn, layer.sub2)
        _ffn(layer_spec.ffn, layer, layer.sub3)
    spec.register_source_vocabulary(list(pieces))
    spec.register_target_vocabulary(list(pieces))
    return spec


def write_ctranslate2(model: Transformer, pieces: Sequence[str], directory: Path, quantization: str | None) -> None:
    """Write `model` with the vocabulary `pieces` as a CTranslate2 model directory (replacing its contents)."""
    from ctranslate2.converters.converter import Converter

    class _Converter(Converter):
        def _load(self):
            return transformer_spec(model, pieces)

    _Converter().convert(str(directory), quantization=quantization, force=True)


def export_ctranslate2(checkpoint: Path, spm: Path, out: Path, quantization: str | None = None) -> Path:
    """Convert `checkpoint` (a Transformer) with its SentencePiece vocabulary into the directory `out`."""
    model, state = load_model(checkpoint, "cpu")
    if not isinstance(model, Transformer):
        raise CheckpointError(f"{checkpoint}: CTranslate2 export needs a transformer, not {state['family']}")
    tokenizer = Tokenizer(spm)
    if tokenizer.vocab_size != model.vocab_size:
        raise CheckpointError(
            f"{spm}: {tokenizer.vocab_size} pieces, but {checkpoint} has a vocabulary of {model.vocab_size}"
        )
    pieces = [tokenizer.sp.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    out = Path(out)
    staging, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    shutil.rmtree(staging, ignore_errors=True)
    write_ctranslate2(model, pieces, staging, quantization)
    shutil.copy(spm, staging / "spm.model")  # the directory is all a CTranslate2 server needs
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def source_pieces(tokenizer: Tokenizer, ids: Sequence[Sequence[int]]) -> list[list[str]]:
    """Token ids as CTranslate2 input: their pieces, plus the EOS our encoder sees."""
    sp = tokenizer.sp
    return [[sp.id_to_piece(i) for i in sentence] + [sp.id_to_piece(EOS_ID)] for sentence in ids]


def translate_with_ctranslate2(
    translator, tokenizer: Tokenizer, ids: Sequence[Sequence[int]], **options
) -> list[list[int]]:
    """Token ids in, best hypothesis ids out, with a CTranslate2 Translator over an export of ours."""
    results = translator.translate_batch(source_pieces(tokenizer, ids), **options)
    return [[tokenizer.sp.piece_to_id(p) for p in r.hypotheses[0]] for r in results]


def translate_texts_ctranslate2(
    translator, tokenizer: Tokenizer, texts: Sequence[str], opts: DecodingParams, max_positions: int
) -> list[str]:
    """The best translation of each text by a CTranslate2 Translator over an export of ours, with our decoding
    options: the same length-sorted batches as `seq2seq.decoding.translate_nbest`, beam size, and output length
    limit a * (source tokens + EOS) + b, taken per batch (CTranslate2 has one limit per call). Empty texts give "".

    CTranslate2 normalises a beam's score by length ** alpha, where ours uses GNMT's ((5 + length) / 6) ** alpha
    (seq2seq/beam.py); with a length penalty it is asked for the whole beam unnormalised, and the hypotheses are
    ranked by ours, which gives our beam search's choice (the test compares them).
    """
    nonempty = [i for i, t in enumerate(texts) if t.strip()]
    results = [""] * len(texts)
    ids = [seq[: max_positions - 1] for seq in tokenizer.encode([texts[i] for i in nonempty])]
    rerank = opts.beam_size > 1 and opts.length_penalty != 0
    for batch in source_batches([len(s) + 1 for s in ids], opts.batch_size, opts.max_tokens):
        sources = [ids[i] for i in batch]
        limit = max(int(opts.max_len_a * (len(s) + 1) + opts.max_len_b) for s in sources)
        found = translator.translate_batch(
            source_pieces(tokenizer, sources),
            beam_size=opts.beam_size,
            num_hypotheses=opts.beam_size if rerank else 1,
            length_penalty=0.0 if rerank else opts.length_penalty,
            return_scores=rerank,
            max_decoding_length=min(limit, max_positions),
            max_batch_size=len(sources),
        )
        best = [best_by_gnmt(r, opts.length_penalty) if rerank else r.hypotheses[0] for r in found]
        hypotheses = [[tokenizer.sp.piece_to_id(p) for p in pieces] for pieces in best]
        for i, text in zip(batch, tokenizer.decode(hypotheses), strict=True):
            results[nonempty[i]] = text
    return results


def best_by_gnmt(result, alpha: float) -> list[str]:
    """The hypothesis of a CTranslate2 result (unnormalised scores) that seq2seq.beam would rank first:
    the highest log P / ((5 + length) / 6) ** alpha, where length counts EOS."""
    ranked = zip(result.hypotheses, result.scores, strict=True)
    return max(ranked, key=lambda hs: hs[1] / ((5.0 + len(hs[0]) + 1) / 6.0) ** alpha)[0]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m seq2seq.ctranslate2_export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", type=Path, help="a Transformer model.pt")
    parser.add_argument("spm", type=Path, help="its SentencePiece model")
    parser.add_argument("out", type=Path, help="the CTranslate2 model directory to write")
    parser.add_argument("--quantization", help="int8, int8_float32, float16, bfloat16, ... (default: float32)")
    args = parser.parse_args(argv)
    try:
        path = export_ctranslate2(args.checkpoint, args.spm, args.out, args.quantization)
    except ModuleNotFoundError as err:
        raise SystemExit(f"ctranslate2_export: {err}; install it with pip install -e '.[ctranslate2]'") from None
    except (CheckpointError, ValueError, RuntimeError, OSError) as err:  # sentencepiece's errors name the file
        raise SystemExit(f"ctranslate2_export: {err}") from None
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
