"""Batched beam search through the shared decoder interface, for every model family.

The decoder sees one batch of B·K rows (K = beam size): the K live hypotheses of each of B sentences.
Each step scores all K·V extensions of a sentence at once, keeps the K best (torch.topk over [B, K·V]),
and reorders the decoder cache to follow them (`model.reorder_cache`). A candidate that ends in EOS
(or reaches the length limit) moves to the sentence's finished list and its slot stops extending, so
the next step still fills K live slots from the other hypotheses. Finished hypotheses are ranked by
GNMT's length-normalised score (Wu et al. 2016, eq. 14):

    score(Y) = log P(Y | X) / lp(Y),   lp(Y) = ((5 + |Y|) / 6) ** alpha      (|Y| counts EOS)

A sentence is done when no live hypothesis can still beat its n-th best finished one, or at its length
limit `max_len` (a·src_len + b, computed by the caller); done sentences leave the decoder batch, and
the search ends when every sentence is done. With K = 1 this is exactly greedy search.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Hypothesis:
    tokens: list[int]  # without BOS and EOS
    log_prob: float  # log P(tokens + EOS | source); EOS is left out when the length limit cut it off
    score: float  # log_prob / length penalty: what the n-best list is sorted by


def length_penalty(length: torch.Tensor | float, alpha: float) -> torch.Tensor:
    """GNMT length penalty lp = ((5 + length) / 6) ** alpha."""
    return ((5.0 + torch.as_tensor(length, dtype=torch.float32)) / 6.0) ** alpha


@dataclass
class Beams:
    """The hypotheses still growing: for each sentence still being decoded, `width` of them (1 at the first
    step, when all would start from BOS; K after), with their log-probabilities and tokens."""

    sentence: torch.Tensor  # [n]: each sentence's row in the source batch
    log_prob: torch.Tensor  # [n, width]: log P(tokens | source); -inf in a slot whose hypothesis has finished
    tokens: torch.Tensor  # [n, width, steps so far]

    def select(self, index: torch.Tensor) -> Beams:
        """The beams of the sentences at `index` (of the n)."""
        return Beams(self.sentence[index], self.log_prob[index], self.tokens[index])


class Finished:
    """For every sentence of the batch, its K best finished hypotheses so far, best first by score."""

    def __init__(self, n_sentences: int, k: int, max_steps: int, device: torch.device):
        self.score = torch.full((n_sentences, k), NEG_INF, device=device)
        self.log_prob = torch.full((n_sentences, k), NEG_INF, device=device)
        self.length = torch.zeros((n_sentences, k), dtype=torch.long, device=device)
        self.tokens = torch.full((n_sentences, k, max_steps), PAD_ID, dtype=torch.long, device=device)

    def add(self, beams: Beams, ending: torch.Tensor, t: int, alpha: float) -> None:
        """Merge the hypotheses marked `ending` at step t into their sentences' lists, keeping the K best."""
        rows, (_, k, max_steps) = beams.sentence, self.tokens.shape
        eos = beams.tokens[:, :, t] == EOS_ID
        length = torch.where(eos, t, t + 1)  # EOS is not part of the output
        score = torch.where(ending, beams.log_prob / length_penalty(t + 1, alpha), NEG_INF)
        tokens = torch.full((len(rows), k, max_steps), PAD_ID, dtype=torch.long, device=rows.device)
        tokens[:, :, : t + 1] = beams.tokens
        tokens[:, :, t].masked_fill_(eos, PAD_ID)
        merged, best = torch.cat([self.score[rows], score], 1).topk(k, dim=1)
        self.score[rows] = merged
        self.log_prob[rows] = torch.cat([self.log_prob[rows], beams.log_prob], 1).gather(1, best)
        self.length[rows] = torch.cat([self.length[rows], length], 1).gather(1, best)
        best_tokens = best.unsqueeze(2).expand(-1, -1, max_steps)
        self.tokens[rows] = torch.cat([self.tokens[rows], tokens], 1).gather(1, best_tokens)

    def hypotheses(self, nbest: int) -> list[list[Hypothesis]]:
        """The `nbest` best of each sentence as Python lists, converted once per batch."""
        tokens, lengths = self.tokens[:, :nbest].tolist(), self.length[:, :nbest].tolist()
        log_probs, scores = self.log_prob[:, :nbest].tolist(), self.score[:, :nbest].tolist()
        return [
            [
                Hypothesis(toks[:n], lp, s)
                for toks, n, lp, s in zip(tokens[i], lengths[i], log_probs[i], scores[i], strict=True)
                if s != NEG_INF
            ]
            for i in range(len(tokens))
        ]


def expand(beams: Beams, log_probs: torch.Tensor, k: int) -> tuple[Beams, torch.Tensor]:
    """Each sentence's K best one-token extensions of its hypotheses (log_probs [n * width, V] from the
    decoder), and for each the decoder row of the hypothesis it extends."""
    n, width = beams.log_prob.shape
    vocab = log_probs.size(-1)
    candidates = beams.log_prob.unsqueeze(2) + log_probs.view(n, width, vocab)
    log_prob, top = candidates.view(n, width * vocab).topk(k, dim=1)  # [n, K]
    origin, token = top // vocab, top % vocab
    steps = beams.tokens.size(2)
    tokens = torch.cat([beams.tokens.gather(1, origin.unsqueeze(2).expand(-1, -1, steps)), token.unsqueeze(2)], 2)
    rows = torch.arange(n, device=origin.device).unsqueeze(1) * width + origin
    return Beams(beams.sentence, log_prob, tokens), rows


@torch.inference_mode()
def beam_search(
    model, src: torch.Tensor, max_len: torch.Tensor, beam_size: int, alpha: float, nbest: int
) -> list[list[Hypothesis]]:
    """The `nbest` best hypotheses (best first) of each source row of `src` [B, S].

    max_len [B]: most target tokens per sentence (EOS not counted). alpha: the GNMT length penalty.
    """
    if not 1 <= nbest <= beam_size:
        raise ValueError(f"nbest ({nbest}) must be between 1 and beam_size ({beam_size})")
    model.eval()
    device, n_sentences, k = src.device, src.size(0), beam_size
    max_len = max_len.to(device)
    memory, cache = model.encode(src), model.init_cache()
    # The first step runs one decoder row per sentence (all K beams would start from the same BOS).
    beams = Beams(
        torch.arange(n_sentences, device=device),
        torch.zeros((n_sentences, 1), device=device),
        torch.empty((n_sentences, 1, 0), dtype=torch.long, device=device),
    )
    prev = torch.full((n_sentences,), BOS_ID, dtype=torch.long, device=device)
    finished = Finished(n_sentences, k, int(max_len.max()), device)

    for t in range(int(max_len.max())):
        width = beams.log_prob.size(1)
        log_probs, cache = model.decode_step(prev, memory, cache)
        # expand: every hypothesis by every token; each sentence keeps its K best extensions
        beams, rows = expand(beams, log_probs, k)
        # finish: an extension that ends in EOS, or that reaches its sentence's limit, joins the finished list,
        # and its slot stops growing (the next step still fills K slots from the other extensions)
        at_limit = max_len[beams.sentence] <= t + 1
        ending = torch.isfinite(beams.log_prob) & ((beams.tokens[:, :, t] == EOS_ID) | at_limit.unsqueeze(1))
        if bool(ending.any()):
            finished.add(beams, ending, t, alpha)
        beams.log_prob = beams.log_prob.masked_fill(ending, NEG_INF)
        # prune: a sentence is done at its limit, or when no live hypothesis can still beat its n-th best
        # finished one (as in Hugging Face's default: exact for alpha = 0, since log-probabilities only fall)
        best_alive = beams.log_prob.max(1).values
        nth_finished = finished.score[beams.sentence, nbest - 1]
        done = at_limit | ~torch.isfinite(best_alive) | (best_alive / length_penalty(t + 1, alpha) <= nth_finished)
        keep = None
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            beams, rows = beams.select(keep), rows[keep]
        # The decoder follows: memory rows per kept sentence (K copies each; re-selected only when sentences left
        # or the first step fanned out), cache rows per kept hypothesis (in place with one beam and no departures).
        if keep is not None or width != k:
            first_rows = (keep if keep is not None else torch.arange(len(done), device=device)) * width
            memory = memory.index_select(first_rows.repeat_interleave(k))
        if k > 1 or keep is not None:
            cache = model.reorder_cache(cache, rows.view(-1))
        prev = beams.tokens[:, :, t].reshape(-1)

    return finished.hypotheses(nbest)
