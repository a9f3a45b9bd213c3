"""What a run reads, checked before anything heavy starts (DeepSpeed is not imported here): the
shards' manifest, the tokenizer they were written with, the loss kind's needs."""
from __future__ import annotations

from pathlib import Path

from sabiscale.config import RunConfig
from sabiscale.errors import UserError
from sabiscale.loss.kinds import make_loss_kind
from sabiscale.prep.tokenizer import adopt_tokenizer, tokenizer_hash
from sabiscale.shards.format import read_manifest


def check_inputs(cfg: RunConfig) -> dict:
    """The shards must come from the tokenizer we are about to train with (and suit the loss kind)."""
    if not cfg.tokenizer_path.is_file() and cfg.tokenizer.path is not None:
        adopt_tokenizer(Path(cfg.tokenizer.path), cfg.tokenizer_path)
    manifest = read_manifest(cfg.shards_dir)
    ours = tokenizer_hash(cfg.tokenizer_path)
    if manifest["tokenizer_sha256"] != ours:
        raise UserError(f"{cfg.shards_dir}/manifest.json was written with tokenizer "
                        f"{manifest['tokenizer_sha256'][:12]} but {cfg.tokenizer_path} is {ours[:12]}; "
                        "re-run `sabiscale prepare` so shards and tokenizer match (or set tokenizer.path to theirs)")
    if manifest["seq_len"] != cfg.data.seq_len:
        raise UserError(f"shards have seq_len {manifest['seq_len']} but data.seq_len is {cfg.data.seq_len}; "
                        "re-run `sabiscale prepare` or set data.seq_len to match")
    make_loss_kind(cfg.loss).check_shards(manifest, cfg.shards_dir)
    return manifest
