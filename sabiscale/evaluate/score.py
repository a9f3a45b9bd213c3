"""`sabiscale score`: a reference model's loss of every answer token, computed once and written
into new shards beside `input_ids` (Rho-1's reference losses, for `loss.kind: selective`).

    sabiscale score --reference runs/ref/checkpoints --shards runs/x/shards --out runs/x/shards-scored

Each output sample is the input sample plus `ref_loss.npy`: float16 (T,), the reference loss of
token t at every answer token t and NaN elsewhere (the loader refuses any other alignment). The
output manifest is the input's with new shard hashes, `fields` and `reference` (checkpoint path,
step, content hash of its files, tokenizer hash). Shards are split over the ranks of a
`deepspeed` launch (shard i on rank i mod world size); each output shard is written to
`<name>.partial` and renamed when complete, so a rerun of the same command skips finished shards
and resumes the rest; manifest.json is written last, by rank 0.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sabiscale.train.reference import Reference
from sabiscale.data.batch import Vocab, collate
from sabiscale.hashing import sha256_file
from sabiscale.shards.format import (FORMAT_VERSION, REF_FIELD, decode_sample, raw_samples, read_manifest,
                                     save_manifest, shard_entry, shard_writer, with_array)
from sabiscale.errors import AlreadyExists, UserError

log = logging.getLogger("sabiscale.score")


def score_shard(reference: Reference, src: Path, dst: Path, vocab: Vocab, batch_size: int, device: torch.device,
                bar) -> int:
    """Write `dst` = `src` with ref_loss added to every sample; returns the number of samples."""
    partial = dst.with_name(dst.name + ".partial")
    samples = raw_samples(iter([{"url": str(src)}]))
    n = 0
    with shard_writer(partial) as writer:
        while raw_group := [s for _, s in zip(range(batch_size), samples)]:
            batch = collate([decode_sample(r, skip=(REF_FIELD,)) for r in raw_group], 0, vocab).to(device)
            ref = reference.score(batch).cpu().numpy().astype(np.float16)
            for raw, row in zip(raw_group, ref):
                writer.write(with_array(raw, REF_FIELD, row))
            n += len(raw_group)
            bar.update(len(raw_group))
    os.replace(partial, dst)
    return n


def score_shards(checkpoint: Path, in_dir: Path, out_dir: Path, rank: int, world_size: int, device: torch.device,
                 batch_size: int = 8, barrier=lambda: None) -> Path:
    """Score every shard of every split; returns the output manifest path."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if out_dir.resolve() == in_dir.resolve():
        raise UserError(f"--out {out_dir} is the input directory; scored shards go to a new directory "
                         "(the original shards stay as they are)")
    manifest = read_manifest(in_dir)
    reference = Reference(checkpoint, device)
    reference.check_tokenizer(manifest, in_dir)
    identity = reference.identity()
    if (out_dir / "manifest.json").is_file():
        done = json.loads((out_dir / "manifest.json").read_text(encoding="utf-8")).get("reference")
        raise AlreadyExists(f"{out_dir} already holds scored shards (reference {done and done['checkpoint']}); "
                              "choose a new --out directory (nothing was overwritten)")
    out_dir.mkdir(parents=True, exist_ok=True)
    _claim(out_dir / "scoring.json", identity, in_dir, rank, barrier)
    vocab = Vocab.from_manifest(manifest)
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    mine = [s for i, s in enumerate(shards) if i % world_size == rank]
    todo = [s for s in mine if not (out_dir / s["name"]).is_file()]
    if len(todo) < len(mine):
        log.info("rank %d: %d of its %d shards were scored before; resuming with the rest", rank,
                 len(mine) - len(todo), len(mine))
    bar = tqdm(total=sum(s["sequences"] for s in todo), unit="seq", desc=f"score rank {rank}",
               disable=not sys.stderr.isatty())
    for shard in todo:
        src = in_dir / shard["name"]
        if sha256_file(src) != shard["sha256"]:
            raise UserError(f"{src}: sha256 differs from {in_dir}/manifest.json (changed or damaged); "
                             f"run `sabiscale shards verify {in_dir}`")
        n = score_shard(reference, src, out_dir / shard["name"], vocab, batch_size, device, bar)
        if n != shard["sequences"]:
            raise UserError(f"{src}: {n} samples, manifest.json says {shard['sequences']}; the shard is damaged")
        log.info("rank %d: scored %s (%d sequences)", rank, shard["name"], n)
    bar.close()
    barrier()
    if rank == 0:
        _write_scored_manifest(manifest, in_dir, out_dir, identity)
    barrier()
    return out_dir / "manifest.json"


def _claim(path: Path, identity: dict, in_dir: Path, rank: int, barrier) -> None:
    """Record which reference and inputs this directory is being scored with; a rerun with other
    ones would mix two references' losses in one set of shards."""
    claim = {"reference": identity, "input": str(in_dir.resolve())}
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        if before != claim:
            raise UserError(f"{path.parent} holds a partial scoring with reference {before['reference']['checkpoint']} "
                             f"of {before['input']}; resume it with the same --reference and --shards, or use a new --out")
    barrier()
    if rank == 0 and not path.is_file():
        path.write_text(json.dumps(claim, indent=2) + "\n", encoding="utf-8")
    barrier()


def _write_scored_manifest(manifest: dict, in_dir: Path, out_dir: Path, identity: dict) -> None:
    # the same records as the input shards: the same contamination fingerprints, so a run trained
    # on the scored shards is evaluated on the same clean held-out records
    if "fingerprints" in manifest:
        shutil.copyfile(in_dir / manifest["fingerprints"]["file"], out_dir / manifest["fingerprints"]["file"])
    scored = json.loads(json.dumps(manifest))
    for split in scored["splits"].values():
        split["shards"] = [shard_entry(out_dir / s["name"], s["sequences"], sha256_file(out_dir / s["name"]))
                           for s in split["shards"]]
    scored["format_version"] = FORMAT_VERSION
    scored["fields"] = {REF_FIELD: {"dtype": "float16", "aligned_with": "input_ids",
                                    "meaning": "reference loss of token t at answer tokens, NaN elsewhere"}}
    scored["reference"] = identity
    save_manifest(out_dir, scored)
