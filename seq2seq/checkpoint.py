"""Checkpoints: one dict, written atomically, loaded with weights_only=True, checked against a digest.

Layout: {"format": 2, "family": str, "config": the family's model section (a dict), "vocab_size": int,
"model": state_dict, "step": int, "tensors_sha256": str, ...extra}. `tensors_sha256` is the digest of every
tensor in the file (`tensors_digest`): a flipped byte inside a tensor, which torch.load reads without
complaint, is refused on load naming the file. Checkpoints written before the digest existed load with a
warning (scripts/upgrade_checkpoint.py adds it). Format 1 (written before the model sections
existed) is refused with the command that converts it: scripts/upgrade_checkpoint.py.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
import torch
from torch import nn

from seq2seq.config import key_errors
from seq2seq.models import FAMILIES, model_from_config
from seq2seq.textio import atomic_write
from seq2seq.tokenizer import Tokenizer

FORMAT = 2
DIGEST_KEY = "tensors_sha256"
REQUIRED_KEYS = ("family", "config", "vocab_size", "model", "step")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or incompatible; the message names the file."""


def _tensors(node: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor inside nested dicts, lists and tuples, with its key path, in a fixed order."""
    if isinstance(node, torch.Tensor):
        yield path, node
    elif isinstance(node, dict):
        for key in sorted(node, key=str):
            if key != DIGEST_KEY:
                yield from _tensors(node[key], f"{path}/{key}")
    elif isinstance(node, list | tuple):
        for i, item in enumerate(node):
            yield from _tensors(item, f"{path}/{i}")


def tensors_digest(state: dict[str, Any]) -> str:
    """sha256 over every tensor of a checkpoint dict: its key path, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for path, tensor in _tensors(state):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{path}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(path: Path, model: nn.Module, family: str, step: int, **extra: Any) -> None:
    """Write the checkpoint, with the digest of its tensors, to a temp file, fsync, and rename it over `path`."""
    state = {
        "format": FORMAT,
        "family": family,
        "config": model.cfg.model_dump(),
        "vocab_size": model.vocab_size,
        "model": model.state_dict(),
        "step": step,
        **extra,
    }
    state[DIGEST_KEY] = tensors_digest(state)
    with atomic_write(Path(path), "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    # Bytes that are not a checkpoint make torch.load fail in many ways (UnpicklingError, a bad zip, EOFError,
    # or a KeyError from its legacy reader on a text file): each means the same to the user.
    except Exception as err:
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
        raise CheckpointError(f"{path}: corrupt or unreadable checkpoint ({reason})") from None
    if isinstance(state, dict) and state.get("format") == 1:
        raise CheckpointError(
            f"{path}: a checkpoint of format 1, written by an earlier version; "
            f"convert it with python scripts/upgrade_checkpoint.py {path}"
        )
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of format {FORMAT}")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path}: not a model checkpoint: it lacks {', '.join(missing)}")
    verify_tensors(state, path)
    return state


def verify_tensors(state: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint whose tensors differ from the digest it was saved with; warn when it has none."""
    recorded = state.get(DIGEST_KEY)
    if recorded is None:
        warnings.warn(
            f"{path}: written before checkpoints carried a digest of their tensors, so corruption inside a tensor "
            f"cannot be detected; add one with python scripts/upgrade_checkpoint.py {path}",
            stacklevel=3,
        )
        return
    actual = tensors_digest(state)
    if actual != recorded:
        raise CheckpointError(
            f"{path}: corrupt checkpoint: its tensors' sha256 is {actual} but it was saved with {recorded}"
        )


def check_tokenizer(state: dict[str, Any], path: Path, tokenizer: Tokenizer) -> None:
    """Refuse a SentencePiece model that is not the one the checkpoint at `path` was trained with: another
    vocabulary size (which would fail deep in decoding), or another file than the one its digest names."""
    if state["vocab_size"] != tokenizer.vocab_size:
        raise CheckpointError(
            f"{path} has a vocabulary of {state['vocab_size']} ids but the SentencePiece model "
            f"{tokenizer.model_path} has {tokenizer.vocab_size}: they come from different tokenize runs"
        )
    recorded = state.get("tokenizer_sha256")
    if recorded is not None and recorded != tokenizer.sha256:
        raise CheckpointError(
            f"{path} was trained with a SentencePiece model of sha256 {recorded}, not {tokenizer.model_path} "
            f"(sha256 {tokenizer.sha256}): they come from different tokenize runs"
        )


def model_from_checkpoint(state: dict[str, Any], path: Path) -> nn.Module:
    """Rebuild the model a checkpoint (read from `path`) describes and load its weights."""
    if state["family"] not in FAMILIES:
        raise CheckpointError(f"{path}: unknown model family {state['family']!r}")
    try:
        model = model_from_config(state["family"], state["config"], state["vocab_size"])
    except pydantic.ValidationError as err:
        problems = "; ".join(key_errors(err, "config."))
        raise CheckpointError(f"{path}: its config does not fit this code's {state['family']}: {problems}") from None
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: its weights do not fit the model it describes: {err}") from None
    return model


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The model saved at `path` on `device`, in eval mode, and the whole checkpoint dict."""
    state = load_checkpoint(path, map_location=device)
    model = model_from_checkpoint(state, Path(path)).to(device)
    model.eval()
    return model, state


def average_checkpoints(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Element-wise mean of the model weights in `paths` (as fairseq's scripts/average_checkpoints.py)."""
    if not paths:
        raise CheckpointError("no checkpoints to average")
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for path in paths:
        weights = load_checkpoint(path)["model"]
        if total and weights.keys() != total.keys():
            raise CheckpointError(f"{path}: its weight names differ from {paths[0]}'s; cannot average")
        for name, tensor in weights.items():
            dtypes[name] = tensor.dtype
            if tensor.is_floating_point() and name in total:
                total[name] += tensor.double()
            else:  # the first file's float weights; integer buffers are not averaged: the last one is kept
                total[name] = tensor.double() if tensor.is_floating_point() else tensor
    return {n: (t / len(paths)).to(dtypes[n]) if t.is_floating_point() else t for n, t in total.items()}
