"""Write packed sequences as WebDataset .tar shards and describe them in `manifest.json`.

Sample layout (one tar member per field, `.npy` written with numpy, never pickled):
    {key}.input_ids.npy     (T,) uint32
    {key}.loss_mask.npy     (T,) uint8   1 = supervised target token
    {key}.position_ids.npy  (T,) int32   restarts at 0 per document
    {key}.docs.json         [[start, length, task, lang], ...]
    {key}.ref_loss.npy      (T,) float16 optional, added by `sabiscale score`: the reference loss of
                            token t at answer tokens, NaN elsewhere (see check_aligned)

manifest.json (format_version 1):
    format_version, tokenizer_sha256, seq_len, nfc, pad_id,
    splits: {train|val: {shards: [{name, sha256, sequences}], counts: {...}}},
    sources: [{task, path, format, sha256}], tasks: {name: its template}, mix: {...},
    skipped: {records, by_task, list}, not_applicable: {task: records}
and, for scored shards, fields and reference (see sabiscale/score.py);
where counts hold sequences, tokens, padding, split_documents and per "task/lang":
documents, tokens, supervised_tokens (after mixing: the realized counts). Tar members carry
mtime 0, so the same input gives byte-identical shards and manifest.
"""
from __future__ import annotations

import hashlib
import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import webdataset as wds

from sabiscale.prep.parallel import SERIAL, Workers
from sabiscale.shards.pack import PackedSequence, PackStats

FORMAT_VERSION = 1
FIELDS = ("input_ids", "loss_mask", "position_ids")


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _sample(key: str, seq: PackedSequence) -> dict:
    return {
        "__key__": key,
        "input_ids.npy": _npy_bytes(seq.input_ids),
        "loss_mask.npy": _npy_bytes(seq.loss_mask),
        "position_ids.npy": _npy_bytes(seq.position_ids),
        "docs.json": json.dumps(seq.docs, ensure_ascii=False).encode("utf-8"),
    }


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_shard(job: tuple[Path, str, int, list[PackedSequence]]) -> dict:
    """One shard file from its sequences (keys continue the split's numbering); its manifest
    entry and per task/lang counts. Runs in a worker process when data.workers > 1."""
    path, split, first_index, sequences = job
    per_doc: dict[str, dict[str, int]] = defaultdict(lambda: {"documents": 0, "tokens": 0, "supervised_tokens": 0})
    with wds.TarWriter(str(path), encoder=False, mtime=0) as writer:
        for offset, seq in enumerate(sequences):
            writer.write(_sample(f"{split}-{first_index + offset:09d}", seq))
            for start, length, task, lang in seq.docs:
                entry = per_doc[f"{task}/{lang}"]
                entry["documents"] += 1
                entry["tokens"] += length
                entry["supervised_tokens"] += int(seq.loss_mask[start:start + length].sum())
    return {"shard": {"name": path.name, "sha256": sha256_file(path), "sequences": len(sequences)},
            "by_task_lang": dict(per_doc)}


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


def write_manifest(out_dir: Path, tokenizer_sha256: str, seq_len: int, pad_id: int, splits: dict,
                   extra: dict | None = None) -> Path:
    """manifest.json; `extra` adds the preparation's record (sources, mix, skipped records)."""
    manifest = {"format_version": FORMAT_VERSION, "tokenizer_sha256": tokenizer_sha256, "seq_len": seq_len,
                "nfc": True, "pad_id": pad_id, "splits": splits, **(extra or {})}
    path = out_dir / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def check_aligned(ref_loss: np.ndarray, loss_mask: np.ndarray, where: str) -> None:
    """A per-token float field must hold a finite value exactly at the answer tokens it scores
    (and NaN elsewhere): a shifted, truncated or foreign array fails this, not silently trains."""
    if ref_loss.shape != loss_mask.shape:
        raise ValueError(f"{where}: ref_loss has shape {list(ref_loss.shape)} but input_ids {list(loss_mask.shape)}; "
                         "the scored shard is damaged: score the shards again with `sabiscale score`")
    scored, targets = np.isfinite(ref_loss[1:]), loss_mask[1:].astype(bool)
    if not np.array_equal(scored, targets):
        first = int(np.flatnonzero(scored != targets)[0]) + 1
        raise ValueError(f"{where}: ref_loss is not aligned with the answer tokens (first difference at token "
                         f"{first}: {'a value' if scored[first - 1] else 'no value'} where the token is "
                         f"{'an answer' if targets[first - 1] else 'not an answer'}); score the shards again "
                         "with `sabiscale score`")


def read_manifest(shards_dir: Path) -> dict:
    path = shards_dir / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `sabiscale prepare` to write shards first")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest.get('format_version')} is not "
                         f"{FORMAT_VERSION}; re-run `sabiscale prepare` with this sabiscale version")
    return manifest
