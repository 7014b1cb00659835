"""Checkpoints: one dict, written atomically, loaded with weights_only=True.

Layout: {"format": 2, "family": str, "config": the family's model section (a dict), "vocab_size": int,
"model": state_dict, "step": int, ...extra}. Format 1 (written before the model sections existed) is
refused with the command that converts it: scripts/upgrade_checkpoint.py.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import pydantic
import torch
from torch import nn

from seq2seq.config import key_errors
from seq2seq.models import FAMILIES, model_from_config
from seq2seq.textio import atomic_write

FORMAT = 2


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or incompatible; the message names the file."""


def save_checkpoint(path: Path, model: nn.Module, family: str, step: int, **extra: Any) -> None:
    """Write the checkpoint to a temp file, fsync, and rename it over `path`."""
    state = {
        "format": FORMAT,
        "family": family,
        "config": model.cfg.model_dump(),
        "vocab_size": model.vocab_size,
        "model": model.state_dict(),
        "step": step,
        **extra,
    }
    with atomic_write(Path(path), "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path}: corrupt or unreadable checkpoint ({err})") from None
    if isinstance(state, dict) and state.get("format") == 1:
        raise CheckpointError(
            f"{path}: a checkpoint of format 1, written by an earlier version; "
            f"convert it with python scripts/upgrade_checkpoint.py {path}"
        )
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of format {FORMAT}")
    return state


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
