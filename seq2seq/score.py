"""Score detokenized translations with sacrebleu: BLEU (with a bootstrap confidence interval), chrF and TER.

The evaluate stage uses these functions; the command scores any system's output the same way,
so its numbers compare with ours (same signatures):

    python -m seq2seq.score --hyp system.fr --ref newstest2014.fr [--ref second-ref.fr] [--chrf-word-order 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from sacrebleu.metrics import BLEU, CHRF, TER

from seq2seq.textio import TextFormatError, read_lines


def score_corpus(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], chrf_word_order: int, bootstrap_samples: int
) -> dict:
    """BLEU, chrF and TER of `hypotheses` against one or more reference streams, each with its signature.

    `signature` is BLEU's: the key promotion compares. With bootstrap_samples > 1, `bleu_ci` is the half
    width of BLEU's 95% confidence interval (sacrebleu's bootstrap resampling, fixed seed).
    """
    if not hypotheses:
        raise ValueError("no hypotheses to score (the hypothesis file is empty)")
    for i, refs in enumerate(references):
        if len(refs) != len(hypotheses):
            raise ValueError(f"{len(hypotheses)} hypotheses vs {len(refs)} lines in reference {i + 1}")
    refs = [list(r) for r in references]
    bleu, chrf, ter = BLEU(), CHRF(word_order=chrf_word_order), TER()
    bleu_score = bleu.corpus_score(list(hypotheses), refs)
    result = {
        "bleu": round(bleu_score.score, 2),
        "signature": str(bleu.get_signature()),
        "chrf": round(chrf.corpus_score(list(hypotheses), refs).score, 2),
        "chrf_signature": str(chrf.get_signature()),
        "ter": round(ter.corpus_score(list(hypotheses), refs).score, 2),
        "ter_signature": str(ter.get_signature()),
        "n_sentences": len(hypotheses),
    }
    if bootstrap_samples > 1 and hypotheses:
        resampled = BLEU().corpus_score(list(hypotheses), refs, n_bootstrap=bootstrap_samples)
        result.update(
            bleu_ci=round(resampled._ci, 2),  # sacrebleu keeps the interval in private fields; no public accessor
            bleu_ci_low=round(resampled._mean - resampled._ci, 2),
            bleu_ci_high=round(resampled._mean + resampled._ci, 2),
            bootstrap_samples=bootstrap_samples,
        )
    return result


def bleu_by_length(
    sources: Sequence[str], hypotheses: Sequence[str], references: Sequence[str], buckets: Sequence[int]
) -> list[dict]:
    """Corpus BLEU of the sentences in each source-length bucket: whitespace words up to each bound
    (inclusive), and one last bucket for longer sources. `max_src_words` is the longest in the bucket."""
    words = [len(s.split()) for s in sources]
    bounds = sorted(buckets)
    rows = []
    for lower, upper in zip([0, *bounds], [*bounds, max(words, default=0)], strict=True):
        idx = [i for i, n in enumerate(words) if lower < n <= upper]
        if idx:
            score = BLEU().corpus_score([hypotheses[i] for i in idx], [[references[i] for i in idx]]).score
            label = f"{lower + 1}-{upper}" if upper in bounds else f">{lower}"
            longest = max(words[i] for i in idx)
            rows.append({"max_src_words": longest, "bucket": label, "bleu": round(score, 2), "sentences": len(idx)})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m seq2seq.score", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hyp", type=Path, required=True, help="detokenized hypotheses, one per line")
    parser.add_argument("--ref", type=Path, action="append", required=True, help="reference file (repeatable)")
    parser.add_argument("--chrf-word-order", type=int, choices=[0, 2], default=2, help="0 = chrF, 2 = chrF++")
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples for BLEU's 95%% CI; 0 = none")
    args = parser.parse_args(argv)
    try:
        hyps = list(read_lines(args.hyp))
        refs = [list(read_lines(r)) for r in args.ref]
        result = score_corpus(hyps, refs, args.chrf_word_order, args.bootstrap)
    except (FileNotFoundError, TextFormatError, ValueError) as err:
        sys.exit(f"score: {err}")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
