"""Beam search (seq2seq/beam.py) and its batching: greedy equivalence, scores, length penalty, n-best, order."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch

from seq2seq import cpu
from seq2seq.beam import beam_search, length_penalty
from seq2seq.config import DecodingParams, ModelParams
from seq2seq.data import pad_batch
from seq2seq.decoding import greedy_decode, source_batches, translate_nbest
from seq2seq.models import FAMILIES, build_model
from seq2seq.tokenizer import EOS_ID
from tests.pipeline_fixtures import committed_params
from tests.tiny_models import sequence_log_prob, tiny_transformer, toy_pairs, toy_tokenizer, train_tiny

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory):
    """A tokenizer, a Transformer trained for a few seconds on the toy language, and held-out sources."""
    torch.set_num_threads(1)
    pairs = toy_pairs(600, seed=0)
    tokenizer = toy_tokenizer(tmp_path_factory.mktemp("spm"), pairs)
    src = tokenizer.encode([e for e, _ in pairs])
    tgt = tokenizer.encode([f for _, f in pairs])
    model = train_tiny(tiny_transformer(tokenizer.vocab_size, seed=0), src, tgt, steps=250)
    test = tokenizer.encode([e for e, _ in toy_pairs(40, seed=1)])
    return tokenizer, model, test


def decode_args(sources: list[list[int]], a: float = 2.0, b: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    src = pad_batch(sources, suffix=EOS_ID)
    return src, torch.tensor([int(a * (len(s) + 1) + b) for s in sources])


def test_beam_1_is_greedy_on_trained_and_random_models(toy) -> None:
    tokenizer, model, test = toy
    untrained = tiny_transformer(tokenizer.vocab_size, seed=3)  # rambles: many rows hit the length limit
    for m, limit_a in ((model, 2.0), (untrained, 0.5)):
        src, max_len = decode_args(test, a=limit_a)
        greedy = greedy_decode(m, src, max_len)
        beam = beam_search(m, src, max_len, beam_size=1, alpha=0.6, nbest=1)
        assert [h[0].tokens for h in beam] == greedy
    assert any(len(g) == int(ml) for g, ml in zip(greedy, max_len.tolist(), strict=True))  # limit was exercised


def test_beam_scores_are_the_model_log_probs_and_beat_greedy(toy) -> None:
    _, model, test = toy
    src, max_len = decode_args(test)
    greedy = greedy_decode(model, src, max_len)
    beams = beam_search(model, src, max_len, beam_size=4, alpha=0.0, nbest=4)
    improved = 0
    for source, g, nbest, limit in zip(test, greedy, beams, max_len.tolist(), strict=True):
        assert len(nbest) == 4
        # scores match teacher forcing: the cache followed each hypothesis through the reordering
        # (a hypothesis cut at the length limit has no EOS to score)
        for h in nbest:
            log_prob = sequence_log_prob(model, source, h.tokens, with_eos=len(h.tokens) < limit)
            assert h.log_prob == pytest.approx(log_prob, abs=1e-4)
        greedy_lp = sequence_log_prob(model, source, g, with_eos=len(g) < limit)
        assert nbest[0].log_prob >= greedy_lp - 1e-5
        improved += nbest[0].log_prob > greedy_lp + 1e-5
        assert [h.score for h in nbest] == sorted((h.score for h in nbest), reverse=True)
    print(f"beam 4 found a more likely translation than greedy for {improved}/{len(test)} sentences")


@dataclass
class FixedMemory:
    rows: torch.Tensor

    def index_select(self, index: torch.Tensor) -> FixedMemory:
        return FixedMemory(self.rows.index_select(0, index))


class ScriptedModel:
    """A decoder whose next-token distribution depends only on the previous token (any family's interface).

    From BOS: EOS 0.5, A 0.45, B 0.05. After A or B: EOS 0.9, A 0.05, B 0.05. So "" has log P = -0.69,
    "A" has -0.90: without length penalty the empty output wins; with alpha = 2, lp(|Y|=2) = (7/6)^2
    makes "A" score -0.66 against -0.69, and the longer output wins.
    """

    A, B, V = 4, 5, 6

    def __init__(self) -> None:
        self.steps = 0
        probs = torch.full((self.V, self.V), 1e-9)
        probs[2, [EOS_ID, self.A, self.B]] = torch.tensor([0.5, 0.45, 0.05])  # after BOS
        probs[self.A, [EOS_ID, self.A, self.B]] = torch.tensor([0.9, 0.05, 0.05])
        probs[self.B, [EOS_ID, self.A, self.B]] = torch.tensor([0.9, 0.05, 0.05])
        probs[EOS_ID, EOS_ID] = 1.0
        self.table = (probs / probs.sum(1, keepdim=True)).log()

    def eval(self) -> None:
        pass

    def encode(self, src: torch.Tensor) -> FixedMemory:
        return FixedMemory(src)

    def init_cache(self, memory: FixedMemory | None = None) -> dict:
        return {}

    def decode_step(self, prev: torch.Tensor, memory: FixedMemory, cache: dict) -> tuple[torch.Tensor, dict]:
        self.steps += 1
        return self.table[prev], cache

    @staticmethod
    def reorder_cache(cache: dict, index: torch.Tensor) -> dict:
        return cache


def test_length_penalty_prefers_longer_outputs_as_alpha_grows() -> None:
    src, max_len = torch.ones((3, 4), dtype=torch.long), torch.full((3,), 40)
    model = ScriptedModel()
    short = beam_search(model, src, max_len, beam_size=3, alpha=0.0, nbest=3)
    long_ = beam_search(model, src, max_len, beam_size=3, alpha=2.0, nbest=3)
    assert short[0][0].tokens == []
    assert long_[0][0].tokens == [ScriptedModel.A]
    assert short[0][0].log_prob == pytest.approx(math.log(0.5), abs=1e-6)
    assert long_[0][0].score == pytest.approx((math.log(0.45) + math.log(0.9)) / float(length_penalty(2, 2.0)))
    for nbest in (*short, *long_):  # n-best sorted by score, best first
        assert [h.score for h in nbest] == sorted((h.score for h in nbest), reverse=True)


def test_search_stops_when_the_beams_have_finished() -> None:
    model = ScriptedModel()
    beam_search(model, torch.ones((2, 3), dtype=torch.long), torch.full((2,), 200), beam_size=3, alpha=0.6, nbest=2)
    assert model.steps <= 6  # every hypothesis ends within a few tokens; the limit of 200 is never approached


def test_source_batches_respect_both_limits_and_cover_every_sentence() -> None:
    lengths = [5, 30, 2, 2, 17, 9, 40, 1, 3, 12]
    batches = source_batches(lengths, max_sentences=3, max_tokens=40)
    assert sorted(i for b in batches for i in b.tolist()) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 40
    # without a token limit (greedy validation): consecutive runs of the length order
    assert [b.tolist() for b in source_batches(lengths, max_sentences=4)] == [[7, 2, 3, 8], [0, 5, 9, 4], [1, 6]]


def test_translate_nbest_restores_input_order_whatever_the_batching(toy) -> None:
    _, model, test = toy
    opts = dict(beam_size=3, length_penalty=0.6, nbest=2, max_len_a=2.0, max_len_b=5, quantize="none")
    one_by_one = translate_nbest(model, test, DecodingParams(batch_size=1, max_tokens=1000, **opts), CPU)
    batched = translate_nbest(model, test, DecodingParams(batch_size=16, max_tokens=120, **opts), CPU)
    assert [[h.tokens for h in n] for n in batched] == [[h.tokens for h in n] for n in one_by_one]


def test_nbest_above_beam_size_is_refused() -> None:
    with pytest.raises(ValueError, match="nbest"):
        DecodingParams(
            batch_size=1,
            max_tokens=10,
            beam_size=2,
            length_penalty=0,
            nbest=3,
            max_len_a=1,
            max_len_b=1,
            quantize="none",
        )


def untrained_tiny(family: str) -> torch.nn.Module:
    """A tiny untrained model of `family` (16 wide, 30 words), seeded."""
    raw = committed_params()["model"]
    raw["family"] = family
    raw["transformer"].update(n_heads=2, n_encoder_layers=1, n_decoder_layers=1, d_ff=32)
    for section in ("rnn", "attention_rnn"):
        raw[section].update(hidden=16, layers=2)
    for section in ("transformer", "rnn", "attention_rnn"):
        raw[section].update(d_model=16, dropout=0.0, max_positions=64)
    torch.manual_seed(0)
    return build_model(ModelParams.model_validate(raw), vocab_size=30).eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_decodes_through_the_shared_interface(family: str) -> None:
    """Untrained tiny models of each family: beam 1 is greedy, and beam scores are the model's log-probs
    (which only holds if the family's reorder_cache follows the hypotheses)."""
    model = untrained_tiny(family)
    sources = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14], [15, 16, 17, 18]]
    src, max_len = decode_args(sources, a=1.0, b=3)
    greedy = greedy_decode(model, src, max_len)
    assert [h[0].tokens for h in beam_search(model, src, max_len, 1, 0.6, 1)] == greedy
    for source, nbest in zip(sources, beam_search(model, src, max_len, 3, 0.0, 3), strict=True):
        for h in nbest:
            ended = len(h.tokens) < int(max_len[sources.index(source)])
            expected = sequence_log_prob(model, source, h.tokens, with_eos=ended)
            assert h.log_prob == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_decodes_with_int8_weights(family: str) -> None:
    """cpu.for_decoding(model, "int8") quantises each family's linear (and LSTM) layers, leaves the fp32 model
    as it was, and the int8 copy decodes through the same interface: beam 1 is its greedy search."""
    model = untrained_tiny(family)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    int8 = cpu.for_decoding(model, "int8")
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in int8.modules())
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    sources = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14], [15, 16, 17, 18]]
    src, max_len = decode_args(sources, a=1.0, b=3)
    assert [h[0].tokens for h in beam_search(int8, src, max_len, 1, 0.6, 1)] == greedy_decode(int8, src, max_len)


def test_int8_weights_translate_like_fp32(toy) -> None:
    """On a trained model, int8 weights give the same beam-4 translation for nearly every sentence, with
    log-probabilities within 0.02 per token."""
    _, model, test = toy
    lengths = dict(max_len_a=2.0, max_len_b=5)
    opts = DecodingParams(
        batch_size=16, max_tokens=400, beam_size=4, length_penalty=0.6, nbest=1, quantize="none", **lengths
    )
    fp32 = translate_nbest(cpu.accelerate(copy.deepcopy(model)), test, opts, CPU)
    int8 = translate_nbest(cpu.quantize_int8(model), test, opts, CPU)
    same = [a[0].tokens == b[0].tokens for a, b in zip(fp32, int8, strict=True)]
    assert sum(same) >= 0.9 * len(test), f"{sum(same)} of {len(test)} translations unchanged"
    for a, b, unchanged in zip(fp32, int8, same, strict=True):
        if unchanged:
            assert abs(b[0].log_prob - a[0].log_prob) <= 0.02 * (len(a[0].tokens) + 1), (a[0], b[0])
