"""Write packed sequences as WebDataset .tar shards; the format itself (members, manifest) is
described and encoded in shards/format.py."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from sabiscale.hashing import sha256_file
from sabiscale.parallel import SERIAL, Workers
from sabiscale.errors import UserError
from sabiscale.shards.format import (FIELDS, FORMAT_VERSION, encode_sample, read_manifest, save_manifest, shard_entry,
                                     shard_writer)
from sabiscale.shards.pack import PackedSequence, PackStats


def write_shard(job: tuple[Path, str, int, list[PackedSequence]]) -> dict:
    """One shard file from its sequences (keys continue the split's numbering); its manifest
    entry and per task/lang counts. Runs in a worker process when data.prepare_workers > 1."""
    path, split, first_index, sequences = job
    per_doc: dict[str, dict[str, int]] = defaultdict(lambda: {"documents": 0, "tokens": 0, "supervised_tokens": 0})
    with shard_writer(path) as writer:
        for offset, seq in enumerate(sequences):
            arrays = {name: getattr(seq, name) for name in FIELDS}
            writer.write(encode_sample(f"{split}-{first_index + offset:09d}", arrays, seq.docs))
            for start, length, task, lang in seq.docs:
                entry = per_doc[f"{task}/{lang}"]
                entry["documents"] += 1
                entry["tokens"] += length
                entry["supervised_tokens"] += int(seq.loss_mask[start:start + length].sum())
    return {"shard": shard_entry(path, len(sequences), sha256_file(path)), "by_task_lang": dict(per_doc)}


def write_split(sequences: list[PackedSequence], out_dir: Path, split: str, per_shard: int, stats: PackStats,
                workers: Workers = SERIAL) -> dict:
    """Write one split's shards (`workers` at a time); return its manifest entry. The bytes of
    every shard depend only on the sequences, so any number of workers writes the same files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(out_dir / f"{split}-{n:06d}.tar", split, first, sequences[first:first + per_shard])
            for n, first in enumerate(range(0, len(sequences), per_shard))]
    written = workers.map(write_shard, jobs)
    per_doc: dict[str, dict[str, int]] = defaultdict(lambda: {"documents": 0, "tokens": 0, "supervised_tokens": 0})
    for result in written:
        for key, counts in result["by_task_lang"].items():
            for name, value in counts.items():
                per_doc[key][name] += value
    counts = {"sequences": stats.sequences, "tokens": stats.tokens, "padding": stats.padding,
              "split_documents": stats.split_documents,
              "supervised_tokens": sum(v["supervised_tokens"] for v in per_doc.values()),
              "by_task_lang": dict(sorted(per_doc.items()))}
    return {"shards": [r["shard"] for r in written], "counts": counts}


def index_existing(shards_dir: Path) -> Path:
    """`sabiscale shards index DIR`: add the sample index (format 2) to shards written without it.
    The shards are only read, after their sha256 is checked against the manifest."""
    manifest = read_manifest(shards_dir)
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            path = shards_dir / entry["name"]
            if not path.is_file() or sha256_file(path) != entry["sha256"]:
                raise UserError(f"{path}: missing or not the shard {shards_dir}/manifest.json lists (sha256 differs); "
                                "restore it or re-run `sabiscale prepare` (nothing was changed)")
            entry.update(shard_entry(path, entry["sequences"], entry["sha256"]))
    manifest["format_version"] = FORMAT_VERSION
    return save_manifest(shards_dir, manifest)
