"""Convert a checkpoint written by an earlier version of this code to the current format (2, with a digest).

    python scripts/upgrade_checkpoint.py models/model.pt                 # in place
    python scripts/upgrade_checkpoint.py old/model.pt --out models/model.pt

Format 1 kept one flat model config for every family, with the vocabulary size inside and the RNN fields
prefixed `rnn_`; format 2 keeps the family's own section (params.yaml's model.<family>) and `vocab_size`
beside it. The weights change names in two places: Transformers written before the fused attention
projections hold q_proj, k_proj and v_proj apart (concatenated here into qkv_proj / kv_proj), and the RNN
families' out_proj and generator moved into their `output` layer. Everything else in the file is kept.
A format 2 checkpoint written before checkpoints carried a digest of their tensors gets one (`tensors_sha256`,
see seq2seq/checkpoint.py): check that it loads and translates as expected first, as its bytes are then
vouched for. Only model weights are converted: resumable training checkpoints of an earlier version are not resumed
(their run key differs), so a training run started again begins afresh.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from seq2seq.checkpoint import DIGEST_KEY, FORMAT, CheckpointError, model_from_checkpoint, tensors_digest
from seq2seq.textio import atomic_write

RNN_FIELDS = {
    "rnn_cell": "cell",
    "rnn_hidden": "hidden",
    "rnn_layers": "layers",
    "rnn_bidirectional": "bidirectional",
    "rnn_reverse_source": "reverse_source",
}


def upgrade_config(flat: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Format 1's flat config -> (the family's section, vocab_size)."""
    config = {RNN_FIELDS.get(key, key): value for key, value in flat.items() if key != "vocab_size"}
    return config, flat["vocab_size"]


def fuse_attention_projections(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Transformer's separate q_proj, k_proj, v_proj -> qkv_proj (self-attention), or q_proj and kv_proj
    (cross-attention, whose queries come from elsewhere than its keys and values)."""
    out = dict(weights)
    for name in [n for n in weights if ".k_proj." in n]:
        attention, leaf = name.split(".k_proj.")
        k, v = out.pop(f"{attention}.k_proj.{leaf}"), out.pop(f"{attention}.v_proj.{leaf}")
        if attention.endswith("cross_attn"):
            out[f"{attention}.kv_proj.{leaf}"] = torch.cat([k, v])
        else:
            out[f"{attention}.qkv_proj.{leaf}"] = torch.cat([out.pop(f"{attention}.q_proj.{leaf}"), k, v])
    return out


def upgrade_weights(family: str, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Format 1's weight names -> format 2's (see the module docstring)."""
    if family == "transformer":
        return fuse_attention_projections(weights)
    return {(f"output.{n}" if n in ("out_proj.weight", "generator.weight") else n): t for n, t in weights.items()}


def upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """A format 1 checkpoint dict as format 2."""
    config, vocab_size = upgrade_config(state["config"])
    weights = upgrade_weights(state["family"], state["model"])
    return {**state, "format": FORMAT, "config": config, "vocab_size": vocab_size, "model": weights}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python scripts/upgrade_checkpoint.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", type=Path, help="a checkpoint of format 1, or of format 2 without a digest")
    parser.add_argument("--out", type=Path, help="where to write the converted checkpoint (default: in place)")
    args = parser.parse_args(argv)
    out = args.out or args.checkpoint
    try:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") not in (1, FORMAT):
            raise CheckpointError(f"{args.checkpoint}: not a checkpoint of format 1 or {FORMAT}; nothing to convert")
        if state["format"] == FORMAT and DIGEST_KEY in state:
            raise CheckpointError(f"{args.checkpoint}: already of format {FORMAT} with a digest; nothing to convert")
        upgraded = upgrade(state) if state["format"] == 1 else dict(state)
        model_from_checkpoint(upgraded, args.checkpoint)  # the converted file must load: refuse to write it otherwise
        upgraded[DIGEST_KEY] = tensors_digest(upgraded)
    except (OSError, RuntimeError, KeyError) as err:  # CheckpointError is a RuntimeError
        sys.exit(f"upgrade_checkpoint: error: {err}")
    with atomic_write(out, "wb") as f:
        torch.save(upgraded, f)
    print(f"upgrade_checkpoint: wrote {out} (format {FORMAT})")


if __name__ == "__main__":
    main()
