"""Which torch device a stage runs on: train.device from params.yaml."""

from __future__ import annotations

import torch

from seq2seq.config import ParamsError


def pick_device(choice: str) -> torch.device:
    """ "auto" -> CUDA when present, else the CPU; "cuda" without CUDA is an error naming the key."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ParamsError("train.device: 'cuda' requested but CUDA is not available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)
