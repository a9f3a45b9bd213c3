"""Shared fixtures: a small prepared demo run directory, the real data root, and a one-rank
DeepSpeed world in this process (gloo on the CPU accelerator)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sabiscale.runtime import use_environment_toolchain
from sabiscale.config import load_config
from sabiscale.prep.prepare import prepare

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
BIN = Path(sys.executable).parent
use_environment_toolchain()  # the same compiled DeepSpeed ops as `sabiscale` itself


def tiny_overrides(out: Path) -> list[str]:
    """A run small enough for a test: tiny model, short sequences, few steps."""
    return [f"output_dir={out}", "data.demo_examples_per_task=150", "data.seq_len=128",
            "data.sequences_per_shard=32", "data.val_fraction=0.1", "tokenizer.vocab_size=600",
            "model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=128",
            "train.micro_batch_size=4", "train.max_steps=20", "train.log_every=5", "train.eval_batches=2",
            "optim.warmup_steps=2", "optim.lr=5e-3"]


@pytest.fixture(scope="session")
def demo_cfg(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cfg = load_config(ROOT / "launch/recipes/demo.yaml", tiny_overrides(out))
    if cfg.engine.ds_config != "auto":
        cfg.engine.ds_config = ROOT / cfg.engine.ds_config
    prepare(cfg)
    return cfg


@pytest.fixture(scope="session")
def parts(demo_cfg):
    """(tokenizer, the first train micro-batch of 4 demo sequences, vocab), unshuffled."""
    from sabiscale.data.batch import Vocab
    from sabiscale.data.loader import make_loader
    from sabiscale.shards.format import split_shards
    from sabiscale.shards.format import read_manifest
    from sabiscale.prep.tokenizer import load_tokenizer

    tok = load_tokenizer(demo_cfg.tokenizer_path)
    manifest = read_manifest(demo_cfg.shards_dir)
    vocab = Vocab.from_manifest(manifest)
    batch = next(make_loader(split_shards(demo_cfg.shards_dir, manifest, "train"), vocab, 4, 0, 1, 0, 0, 0))
    return tok, batch, vocab


@pytest.fixture(scope="session")
def world():
    """One rank, initialized once per test process (DeepSpeed keeps the process group)."""
    from sabiscale.train.engine import ensure_launcher_env, init_distributed

    ensure_launcher_env()
    return init_distributed()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent: the real corpora live beside the repository in ../shared/data")
    return SHARED_DATA


def child_env(extra: dict | None = None) -> dict:
    """This process's environment without the one-rank rendezvous the in-process `world` set up:
    a child that inherited it would try to bind this process's MASTER_PORT."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(extra or {})
    return env


def run_cli(args: list[str], cwd: Path = ROOT, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a real command (the console script, the deepspeed launcher) and fail with its output."""
    proc = subprocess.run(args, cwd=cwd, env=child_env(env), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def fresh_run_dir(prepared_cfg, dest: Path) -> Path:
    """A new output_dir holding the prepared tokenizer and shards of `prepared_cfg` and no
    checkpoints, so runs that resume automatically never pick up another test's checkpoint."""
    import shutil

    for part in ("tokenizer", "shards", "raw"):
        if (prepared_cfg.output_dir / part).is_dir():
            shutil.copytree(prepared_cfg.output_dir / part, dest / part)
    return dest
