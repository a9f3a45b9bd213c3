"""The shard format, in one place: how a sample is encoded into WebDataset tar members and decoded
back, how shards are written and read, and the manifest that describes them. The writer
(shards/write.py), the loader (data/loader.py), the verifier (shards/verify.py) and the scorer
(evaluate/score.py) all go through here; arrays are `.npy` written with numpy, never pickled
(probe files use the same helpers).

Sample layout (one tar member per field):
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
and, for scored shards, fields ({ref_loss: {dtype, aligned_with, meaning}}) and reference
(checkpoint, step, hash of its files, tokenizer); where counts hold sequences, tokens, padding,
split_documents and per "task/lang": documents, tokens, supervised_tokens (after mixing: the
realized counts). Tar members carry mtime 0, so the same input gives byte-identical shards.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import webdataset as wds

from sabiscale.errors import MissingInput, UserError

FORMAT_VERSION = 1
FIELDS = ("input_ids", "loss_mask", "position_ids")
REF_FIELD = "ref_loss"
DTYPES = {"input_ids": np.uint32, "loss_mask": np.uint8, "position_ids": np.int32, REF_FIELD: np.float16}
# what reading a damaged tar raises, from tarfile, the file system or webdataset
READ_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def npy_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def save_npy(path: Path, array: np.ndarray) -> None:
    np.save(path, array, allow_pickle=False)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    np.savez(path, **arrays)


def load_npy(path: Path):
    """An .npy array or an .npz archive, never unpickled."""
    return np.load(path, allow_pickle=False)


def encode_sample(key: str, arrays: dict[str, np.ndarray], docs: list) -> dict:
    """The tar members of one sample (arrays by field name, e.g. FIELDS)."""
    return {"__key__": key, **{f"{name}.npy": npy_bytes(a) for name, a in arrays.items()},
            "docs.json": json.dumps(docs, ensure_ascii=False).encode("utf-8")}


def with_array(raw: dict, name: str, array: np.ndarray) -> dict:
    """A read sample's members with one array field added (or replaced), ready to write again."""
    members = {k: v for k, v in raw.items() if not k.startswith("__") and k != f"{name}.npy"}
    return {"__key__": raw["__key__"], **members, f"{name}.npy": npy_bytes(array)}


def decode_sample(raw: dict, skip: tuple[str, ...] = ()) -> dict:
    """Raw tar members -> arrays, docs and key; fields named in `skip` are left out."""
    where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
    out = {}
    for name in FIELDS:
        if f"{name}.npy" not in raw:
            raise UserError(f"{where}: member {name}.npy is missing; the shard is not a sabiscale shard "
                            "or is damaged (run `sabiscale prepare` again)")
        out[name] = npy_array(raw[f"{name}.npy"])
    out["docs"] = json.loads(raw["docs.json"]) if "docs.json" in raw else []
    out["key"] = raw.get("__key__", "")
    lengths = {len(out[name]) for name in FIELDS}
    if len(lengths) != 1:
        raise UserError(f"{where}: fields have different lengths {lengths}")
    if f"{REF_FIELD}.npy" in raw and REF_FIELD not in skip:
        out[REF_FIELD] = npy_array(raw[f"{REF_FIELD}.npy"])
        check_aligned(out[REF_FIELD], out["loss_mask"], where)
    return out


def check_aligned(ref_loss: np.ndarray, loss_mask: np.ndarray, where: str) -> None:
    """A per-token float field must hold a finite value exactly at the answer tokens it scores
    (and NaN elsewhere): a shifted, truncated or foreign array fails this, not silently trains."""
    if ref_loss.shape != loss_mask.shape:
        raise UserError(f"{where}: ref_loss has shape {list(ref_loss.shape)} but input_ids {list(loss_mask.shape)}; "
                        "the scored shard is damaged: score the shards again with `sabiscale score`")
    scored, targets = np.isfinite(ref_loss[1:]), loss_mask[1:].astype(bool)
    if not np.array_equal(scored, targets):
        first = int(np.flatnonzero(scored != targets)[0]) + 1
        raise UserError(f"{where}: ref_loss is not aligned with the answer tokens (first difference at token "
                        f"{first}: {'a value' if scored[first - 1] else 'no value'} where the token is "
                        f"{'an answer' if targets[first - 1] else 'not an answer'}); score the shards again "
                        "with `sabiscale score`")


def shard_writer(path: Path) -> wds.TarWriter:
    """A tar writer for encoded samples (use as a context manager); mtime 0 keeps shards byte-identical."""
    return wds.TarWriter(str(path), encoder=False, mtime=0)


def raw_samples(sources: Iterator[dict]) -> Iterator[dict]:
    """Raw samples (members by name, plus __key__ and __url__) of the shards `sources` names
    ({"url": ...} each), in order; reading errors are READ_ERRORS."""
    return wds.tarfile_samples(sources)


def read_members(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {member name: bytes} of a whole shard, every member checked to be complete (a
    truncated member raises EOFError, one of READ_ERRORS)."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(path) as tar:
        for member in tar:
            key = member.name.split(".", 1)[0]
            data = tar.extractfile(member).read()
            if len(data) != member.size:
                raise EOFError(f"member {member.name} has {len(data)} of its {member.size} bytes")
            samples[key][member.name] = data
    return samples


def write_manifest(out_dir: Path, tokenizer_sha256: str, seq_len: int, pad_id: int, splits: dict,
                   extra: dict | None = None) -> Path:
    """manifest.json; `extra` adds the preparation's record (sources, mix, skipped records)."""
    manifest = {"format_version": FORMAT_VERSION, "tokenizer_sha256": tokenizer_sha256, "seq_len": seq_len,
                "nfc": True, "pad_id": pad_id, "splits": splits, **(extra or {})}
    return save_manifest(out_dir, manifest)


def save_manifest(out_dir: Path, manifest: dict) -> Path:
    """Write a manifest atomically (a reader never sees half of one)."""
    path = out_dir / "manifest.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_manifest(shards_dir: Path) -> dict:
    path = shards_dir / "manifest.json"
    if not path.is_file():
        raise MissingInput(f"{path} does not exist; run `sabiscale prepare` to write shards first")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: format_version {manifest.get('format_version')} is not "
                        f"{FORMAT_VERSION}; re-run `sabiscale prepare` with this sabiscale version")
    return manifest
