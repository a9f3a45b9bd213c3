"""Save a training checkpoint: DeepSpeed's own (model, optimizer, scheduler, ZeRO partitions) plus
the client state sabiscale needs to know what it is looking at later.

Layout: {output_dir}/checkpoints/{tag}/... as DeepSpeed writes it, with `latest` naming the tag.
Client state: step, tokens_seen, resolved config, tokenizer and manifest hashes, MLflow run id.
"""
from __future__ import annotations

from pathlib import Path

CLIENT_STATE_VERSION = 1


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(engine, checkpoint_dir: Path, step: int, client_state: dict) -> Path:
    """Every rank must call this (ZeRO partitions are written per rank)."""
    tag = step_tag(step)
    state = {"client_state_version": CLIENT_STATE_VERSION, "step": step, **client_state}
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state=state)
    return checkpoint_dir / tag
