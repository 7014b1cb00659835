"""A joint SentencePiece subword model shared by source and target (Kudo & Richardson 2018)."""

from __future__ import annotations

import functools
import shutil
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from seq2seq.textio import file_sha256

# Fixed special ids: the models and the memmapped data rely on them.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def train_sentencepiece(
    inputs: Sequence[Path],
    model_path: Path,
    vocab_size: int,
    model_type: str,
    character_coverage: float,
    input_sentence_size: int,
    num_threads: int,
    seed: int = 1,
) -> None:
    """Train a SentencePiece model on `inputs` and write it atomically to `model_path` (+ `.vocab`)."""
    model_path = Path(model_path)
    # Not a random temp dir: the model stores the path it was trained under, and the same training should
    # give the same bytes.
    tmp = model_path.with_name(f".{model_path.name}.training")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        prefix = tmp / "spm"
        spm.set_random_generator_seed(seed)
        spm.SentencePieceTrainer.train(
            input=[str(p) for p in inputs],
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=num_threads,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            # a tiny corpus may not support the requested size; treat it as an upper bound
            hard_vocab_limit=False,
            minloglevel=2,
        )
        shutil.move(prefix.with_suffix(".vocab"), model_path.with_suffix(".vocab"))
        shutil.move(prefix.with_suffix(".model"), model_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Tokenizer:
    """Strings to subword ids and back."""

    def __init__(self, model_path: Path | str):
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"{self.model_path}: SentencePiece model not found (run the tokenize stage)")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        except (RuntimeError, OSError) as err:
            raise ValueError(f"{self.model_path}: not a SentencePiece model ({err})") from None
        if (self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()) != (PAD_ID, BOS_ID, EOS_ID):
            raise ValueError(f"{self.model_path}: special ids differ from pad={PAD_ID} bos={BOS_ID} eos={EOS_ID}")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @functools.cached_property
    def sha256(self) -> str:
        """Digest of the model file: a checkpoint records the one it was trained with."""
        return file_sha256(self.model_path)

    def encode(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        return self.sp.encode(list(texts), out_type=int, num_threads=num_threads)

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        return self.sp.decode([list(x) for x in ids])
