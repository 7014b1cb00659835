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
    device, n_sent, k = src.device, src.size(0), beam_size
    max_len = max_len.to(device)
    t_max = int(max_len.max())
    memory = model.encode(src)
    cache = model.init_cache()

    # Live state, for the sentences still decoding (`live` holds their rows in `src`). The first step
    # runs one row per sentence (all K beams would start from the same BOS); its K best fan out.
    live = torch.arange(n_sent, device=device)
    alive_lp = torch.zeros((n_sent, 1), device=device)
    alive_tokens = torch.empty((n_sent, 1, 0), dtype=torch.long, device=device)
    prev = torch.full((n_sent,), BOS_ID, dtype=torch.long, device=device)
    # Finished state, for every sentence: the K best finished hypotheses by score, best first.
    fin_score = torch.full((n_sent, k), NEG_INF, device=device)
    fin_lp = torch.full((n_sent, k), NEG_INF, device=device)
    fin_len = torch.zeros((n_sent, k), dtype=torch.long, device=device)
    fin_tokens = torch.full((n_sent, k, t_max), PAD_ID, dtype=torch.long, device=device)

    for t in range(t_max):
        n_live, width = alive_lp.shape  # width: decoder rows per sentence (1 at the first step, then K)
        log_probs, cache = model.decode_step(prev, memory, cache)
        vocab = log_probs.size(-1)
        candidates = alive_lp.unsqueeze(2) + log_probs.view(n_live, width, vocab)
        top_lp, top = candidates.view(n_live, width * vocab).topk(k, dim=1)  # [n_live, K]
        origin, token = top // vocab, top % vocab
        tokens = torch.cat([alive_tokens.gather(1, origin.unsqueeze(2).expand(-1, -1, t)), token.unsqueeze(2)], 2)

        # Candidates that finish now: EOS, or the last token this sentence may have.
        valid = torch.isfinite(top_lp)
        eos = token == EOS_ID
        at_limit = (max_len[live] <= t + 1).unsqueeze(1)
        finishing = valid & (eos | at_limit)
        if bool(finishing.any()):
            new_len = torch.where(eos, t, t + 1)  # EOS is not part of the output
            new_score = torch.where(finishing, top_lp / length_penalty(t + 1, alpha), NEG_INF)
            new_tokens = torch.full((n_live, k, t_max), PAD_ID, dtype=torch.long, device=device)
            new_tokens[:, :, : t + 1] = tokens
            new_tokens[:, :, t].masked_fill_(eos, PAD_ID)
            # merge with the finished lists so far and keep the K best, best first
            score, best = torch.cat([fin_score[live], new_score], 1).topk(k, dim=1)
            fin_score[live] = score
            fin_lp[live] = torch.cat([fin_lp[live], top_lp], 1).gather(1, best)
            fin_len[live] = torch.cat([fin_len[live], new_len], 1).gather(1, best)
            fin_tokens[live] = torch.cat([fin_tokens[live], new_tokens], 1).gather(
                1, best.unsqueeze(2).expand(-1, -1, t_max)
            )
        alive_lp = top_lp.masked_fill(finishing, NEG_INF)
        alive_tokens = tokens

        # A sentence is done when no live hypothesis can still beat its n-th best finished one (as in
        # Hugging Face's default: exact for alpha = 0, since log-probabilities only fall), or at its limit.
        best_alive = alive_lp.max(1).values
        nth_finished = fin_score[live][:, nbest - 1]
        done = (
            (max_len[live] <= t + 1)
            | ~torch.isfinite(best_alive)
            | (best_alive / length_penalty(t + 1, alpha) <= nth_finished)
        )
        # slot j of sentence i continues candidate (i, j): its cache is row i·width + origin, its input the token
        rows = torch.arange(n_live, device=device).unsqueeze(1) * width + origin
        keep = None
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            live, alive_lp, alive_tokens, rows, token = (
                live[keep],
                alive_lp[keep],
                alive_tokens[keep],
                rows[keep],
                token[keep],
            )
        if keep is not None or width != k:  # sentences left, or the first step fanned out
            first_rows = (keep if keep is not None else torch.arange(n_live, device=device)) * width
            memory = memory.index_select(first_rows.repeat_interleave(k))
        if k > 1 or keep is not None:  # with one beam the rows stay in place unless sentences leave
            cache = model.reorder_cache(cache, rows.view(-1))
        prev = token.reshape(-1)

    return _to_hypotheses(fin_tokens, fin_len, fin_lp, fin_score, nbest)


def _to_hypotheses(
    tokens: torch.Tensor, lengths: torch.Tensor, log_probs: torch.Tensor, scores: torch.Tensor, nbest: int
) -> list[list[Hypothesis]]:
    """Tensors of finished hypotheses (best first) to Python lists, once per batch."""
    tokens, lengths = tokens[:, :nbest].tolist(), lengths[:, :nbest].tolist()
    log_probs, scores = log_probs[:, :nbest].tolist(), scores[:, :nbest].tolist()
    return [
        [
            Hypothesis(toks[:n], lp, s)
            for toks, n, lp, s in zip(tokens[i], lengths[i], log_probs[i], scores[i], strict=True)
            if s != NEG_INF
        ]
        for i in range(len(tokens))
    ]
