"""The translate command on bad input (empty lines, over-long lines, non-UTF-8) and the scoring command."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch

from seq2seq import score, translate
from seq2seq.checkpoint import save_checkpoint
from tests.pipeline_fixtures import committed_params_text
from tests.tiny_models import tiny_transformer, toy_pairs, toy_tokenizer, train_tiny


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """`nmt-translate` arguments for a tiny trained checkpoint (max_positions 64)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("translate")
    pairs = toy_pairs(400, seed=0)
    tokenizer = toy_tokenizer(root, pairs)
    model = tiny_transformer(tokenizer.vocab_size, seed=0)
    train_tiny(model, tokenizer.encode([e for e, _ in pairs]), tokenizer.encode([f for _, f in pairs]), steps=150)
    save_checkpoint(root / "model.pt", model, "transformer", 150)
    (root / "params.yaml").write_text(committed_params_text(), encoding="utf-8")
    return ["-m", str(root / "model.pt"), "--spm", str(root / "spm.model"), "--params", str(root / "params.yaml")]


def run_cli(args: list[str], stdin: bytes, capsys, monkeypatch) -> tuple[str, str]:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    translate.main(args)
    out = capsys.readouterr()
    return out.out, out.err


def test_empty_lines_stay_empty_and_aligned(checkpoint, capsys, monkeypatch) -> None:
    out, _ = run_cli(checkpoint, b"the dog sees a cat .\n\n   \na man eats the apple .\n", capsys, monkeypatch)
    lines = out.split("\n")
    assert len(lines) == 5 and lines[-1] == ""
    assert lines[1] == "" and lines[2] == ""
    assert "chien" in lines[0] and "pomme" in lines[3]


def test_long_line_is_truncated_with_a_warning_naming_it(checkpoint, capsys, monkeypatch, tmp_path: Path) -> None:
    long_line = " ".join(["the big red dog sees a small cat ."] * 30)
    (tmp_path / "in.en").write_text(f"a boy sees the ball .\n{long_line}\nthe cat eats a apple .\n", encoding="utf-8")
    out, err = run_cli([*checkpoint, "-i", str(tmp_path / "in.en"), "--beam-size", "2"], b"", capsys, monkeypatch)
    lines = out.splitlines()
    assert len(lines) == 3 and "garçon" in lines[0] and "chat" in lines[2]
    assert "in.en: line 2:" in err and "truncated to 63" in err
    assert "line 1" not in err and "line 3" not in err


def test_output_file_and_nbest_lines(checkpoint, capsys, monkeypatch, tmp_path: Path) -> None:
    out_path = tmp_path / "out.txt"
    run_cli([*checkpoint, "-o", str(out_path), "--beam-size", "3", "--nbest", "3"], b"a dog .\n\n", capsys, monkeypatch)
    rows = [line.split(" ||| ") for line in out_path.read_text().splitlines()]
    assert [r[0] for r in rows] == ["0", "0", "0", "1"]
    scores = [float(r[2]) for r in rows[:3]]
    assert scores == sorted(scores, reverse=True)
    assert rows[3][1] == ""


def test_non_utf8_input_is_refused_naming_the_line(checkpoint, capsys, monkeypatch) -> None:
    with pytest.raises(SystemExit) as exc:
        run_cli(checkpoint, b"a dog .\n\xff\xfebad bytes\n", capsys, monkeypatch)
    assert "stdin:2: not valid UTF-8" in str(exc.value.code)


class CountingStdin(io.BytesIO):
    """stdin bytes that count the lines read so far."""

    lines_read = 0

    def __next__(self) -> bytes:
        line = super().__next__()
        self.lines_read += 1
        return line


def test_input_is_read_translated_and_written_a_chunk_at_a_time(checkpoint, capsys, monkeypatch) -> None:
    stdin = CountingStdin(b"a dog .\nthe cat .\na man .\n\xff bad\n")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(stdin))
    monkeypatch.setattr(translate, "CHUNK_LINES", 2)
    lines_read_at_each_write = []
    real_stdout = sys.stdout

    class RecordingStdout(io.StringIO):
        def write(self, text: str) -> int:
            lines_read_at_each_write.append(stdin.lines_read)
            return real_stdout.write(text)

    monkeypatch.setattr(sys, "stdout", RecordingStdout())
    with pytest.raises(SystemExit) as exc:
        translate.main(checkpoint)
    # the first chunk was translated and written before the rest was read; the chunk with line 4 stops it
    assert lines_read_at_each_write[:2] == [2, 2]
    assert "stdin:4: not valid UTF-8" in str(exc.value.code)
    first, second = capsys.readouterr().out.splitlines()
    assert "chien" in first and "chat" in second


def test_bad_decoding_option_is_refused(checkpoint, capsys, monkeypatch) -> None:
    with pytest.raises(SystemExit) as exc:
        run_cli([*checkpoint, "--beam-size", "2", "--nbest", "4"], b"a dog .\n", capsys, monkeypatch)
    assert "nbest" in str(exc.value.code)


def test_score_command_prints_every_metric_with_signatures(tmp_path: Path, capsys) -> None:
    (tmp_path / "hyp").write_text("le chien voit un chat .\nun homme mange .\n", encoding="utf-8")
    (tmp_path / "ref").write_text("le chien voit le chat .\nun homme mange .\n", encoding="utf-8")
    score.main(["--hyp", str(tmp_path / "hyp"), "--ref", str(tmp_path / "ref"), "--bootstrap", "50"])
    result = json.loads(capsys.readouterr().out)
    assert 0 < result["bleu"] < 100 and result["n_sentences"] == 2
    assert result["signature"].startswith("nrefs:1|") and "nw:2" in result["chrf_signature"]
    assert "tercom" in result["ter_signature"]
    assert result["bleu_ci_low"] <= result["bleu_ci_high"]
    (tmp_path / "short").write_text("one line\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="2 hypotheses vs 1 lines"):
        score.main(["--hyp", str(tmp_path / "hyp"), "--ref", str(tmp_path / "short")])


def test_a_tokenizer_from_another_run_is_refused_naming_both_files(checkpoint, capsys, monkeypatch, tmp_path) -> None:
    """A SentencePiece model with another vocabulary would fail deep in decoding (IndexError); one of the same
    size but another file is caught by the digest the checkpoint records."""
    from seq2seq.tokenizer import train_sentencepiece

    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"{e}\n{f}\n" for e, f in toy_pairs(300, seed=5)), encoding="utf-8")
    train_sentencepiece([text], tmp_path / "other.model", 40, "unigram", 1.0, 0, 1)
    args = [*checkpoint]
    args[args.index("--spm") + 1] = str(tmp_path / "other.model")
    with pytest.raises(SystemExit) as exc:
        run_cli(args, b"a dog .\n", capsys, monkeypatch)
    message = str(exc.value.code)
    assert "model.pt" in message and "other.model" in message and "different tokenize runs" in message
    assert capsys.readouterr().out == ""


def test_a_checkpoint_names_the_tokenizer_it_was_trained_with(checkpoint, tmp_path: Path) -> None:
    from seq2seq.checkpoint import CheckpointError, check_tokenizer, load_checkpoint
    from seq2seq.tokenizer import Tokenizer

    model_pt, spm = Path(checkpoint[1]), Path(checkpoint[3])
    tokenizer, state = Tokenizer(spm), load_checkpoint(model_pt)
    check_tokenizer({**state, "tokenizer_sha256": tokenizer.sha256}, model_pt, tokenizer)
    with pytest.raises(CheckpointError, match=r"model\.pt was trained with a SentencePiece model of sha256 0+, not "):
        check_tokenizer({**state, "tokenizer_sha256": "0" * 64}, model_pt, tokenizer)
