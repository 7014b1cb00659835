"""The CTranslate2 export translates as our model does: same greedy output, same sequence log-probabilities."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seq2seq.checkpoint import CheckpointError, save_checkpoint
from seq2seq.data import pad_batch
from seq2seq.decoding import greedy_decode
from seq2seq.tokenizer import EOS_ID
from seq2seq.transformer import Transformer
from tests.tiny_models import sequence_log_prob, tiny_transformer, toy_pairs, toy_tokenizer, train_tiny

ctranslate2 = pytest.importorskip("ctranslate2")
from seq2seq.ctranslate2_export import export_ctranslate2, source_pieces, translate_with_ctranslate2  # noqa: E402


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ct2")
    pairs = toy_pairs(600, seed=0)
    tokenizer = toy_tokenizer(root / "spm", pairs)
    src = tokenizer.encode([e for e, _ in pairs])
    tgt = tokenizer.encode([f for _, f in pairs])
    test = tokenizer.encode([e for e, _ in toy_pairs(40, seed=1)])
    return root, tokenizer, src, tgt, test


@pytest.mark.parametrize(
    "variant",
    [
        {},  # ours by default: pre-norm, sinusoidal positions, one shared embedding matrix
        {"pre_norm": False, "positions": "learned", "share_embeddings": False},
    ],
    ids=["pre-norm-shared", "post-norm-learned-unshared"],
)
def test_export_gives_our_greedy_translations_and_scores(toy, variant: dict) -> None:
    root, tokenizer, src, tgt, test = toy
    base = tiny_transformer(tokenizer.vocab_size, seed=0)
    torch.manual_seed(0)
    model = train_tiny(Transformer(base.cfg.model_copy(update=variant), base.vocab_size), src, tgt, steps=250)
    name = "-".join(f"{k}{v}" for k, v in variant.items()) or "default"
    save_checkpoint(root / f"{name}.pt", model, "transformer", step=250)
    out = export_ctranslate2(root / f"{name}.pt", root / "spm" / "spm.model", root / name)
    assert (out / "model.bin").is_file() and (out / "spm.model").is_file()
    assert not out.with_name(out.name + ".tmp").exists()

    translator = ctranslate2.Translator(str(out), device="cpu", intra_threads=1)
    max_len = torch.tensor([2 * (len(s) + 1) + 5 for s in test])
    ours = greedy_decode(model, pad_batch(test, suffix=EOS_ID), max_len)
    theirs = translate_with_ctranslate2(translator, tokenizer, test, beam_size=1, max_decoding_length=64)
    assert theirs == ours
    assert len({tuple(t) for t in ours}) > 30  # the model translates, it does not repeat one output

    scored = translator.translate_batch(
        source_pieces(tokenizer, test[:10]), beam_size=1, return_scores=True, length_penalty=0.0, max_decoding_length=64
    )  # length_penalty 0: the score is the sum of log-probabilities, not their mean
    for source, result, hypothesis in zip(test, scored, theirs, strict=False):
        # CTranslate2's vectorised float math differs from torch's in the 4th decimal on these small models
        assert result.scores[0] == pytest.approx(sequence_log_prob(model, source, hypothesis), abs=5e-3)


def test_export_refuses_a_mismatched_vocabulary_and_keeps_the_old_export(toy, tmp_path: Path) -> None:
    root, tokenizer, *_ = toy
    model = tiny_transformer(tokenizer.vocab_size + 5, seed=0)
    save_checkpoint(tmp_path / "model.pt", model, "transformer", step=0)
    (tmp_path / "ct2").mkdir()
    (tmp_path / "ct2" / "model.bin").write_bytes(b"previous export")
    with pytest.raises(CheckpointError, match=r"spm\.model: \d+ pieces.*vocabulary"):
        export_ctranslate2(tmp_path / "model.pt", root / "spm" / "spm.model", tmp_path / "ct2")
    assert (tmp_path / "ct2" / "model.bin").read_bytes() == b"previous export"


def test_texts_decode_as_ours_beam_and_gnmt_length_penalty_included(toy) -> None:
    """What the pyfunc serves from a CTranslate2 export (float32 here: the same numbers as PyTorch) is what our
    beam search gives, with our batches, length limits and GNMT length penalty; empty lines stay empty."""
    from seq2seq.config import DecodingParams
    from seq2seq.ctranslate2_export import translate_texts_ctranslate2
    from seq2seq.translate import translate_texts

    root, tokenizer, src, tgt, _ = toy
    model = train_tiny(tiny_transformer(tokenizer.vocab_size, seed=0), src, tgt, steps=250)
    save_checkpoint(root / "texts.pt", model, "transformer", step=250)
    out = export_ctranslate2(root / "texts.pt", root / "spm" / "spm.model", root / "texts")
    translator = ctranslate2.Translator(str(out), device="cpu", intra_threads=1)
    texts = [e for e, _ in toy_pairs(40, seed=1)] + [""]
    for beam, alpha in ((1, 0.0), (5, 0.0), (5, 0.6)):
        opts = DecodingParams(
            batch_size=16,
            max_tokens=4096,
            beam_size=beam,
            length_penalty=alpha,
            nbest=1,
            max_len_a=1.5,
            max_len_b=10,
            quantize="none",
        )
        ours = [n[0].text for n in translate_texts(model, tokenizer, texts, opts, torch.device("cpu"))]
        assert translate_texts_ctranslate2(translator, tokenizer, texts, opts, model.cfg.max_positions) == ours
    assert ours[-1] == ""
