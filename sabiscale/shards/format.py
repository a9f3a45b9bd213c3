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

Beside each shard, `<shard>.idx.npy`: (samples, 2) int64, the byte offset and length of each
sample's members in the tar, so a reader fetches one sample with one seek and one read.

manifest.json (format_version 2; version 1 lacked `bytes` and `index`):
    format_version, tokenizer_sha256, seq_len, nfc, pad_id,
    splits: {train|val: {shards: [{name, sha256, sequences, bytes, index}], counts: {...}}},
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

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: no sample index (`sabiscale shards index` adds it)
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
        out[name] = _decoded(where, f"{name}.npy", npy_array, raw)
    out["docs"] = _decoded(where, "docs.json", json.loads, raw) if "docs.json" in raw else []
    out["key"] = raw.get("__key__", "")
    lengths = {len(out[name]) for name in FIELDS}
    if len(lengths) != 1:
        raise UserError(f"{where}: fields have different lengths {lengths}")
    if f"{REF_FIELD}.npy" in raw and REF_FIELD not in skip:
        out[REF_FIELD] = _decoded(where, f"{REF_FIELD}.npy", npy_array, raw)
        check_aligned(out[REF_FIELD], out["loss_mask"], where)
    return out


def _decoded(where: str, member: str, decode, raw: dict):
    try:
        return decode(raw[member])
    except (ValueError, UnicodeDecodeError, EOFError) as err:  # json's and numpy's errors are ValueErrors
        raise UserError(f"{where}: member {member} cannot be decoded ({type(err).__name__}: {err}); the shard is "
                        "corrupted: run `sabiscale shards verify` on its directory and restore or re-write it") from None


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
    with open(path, "rb") as f:
        return read_members_from(f)


def read_members_from(fileobj) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(fileobj=fileobj, mode="r:") as tar:
        for member in tar:
            key = member.name.split(".", 1)[0]
            data = tar.extractfile(member).read()
            if len(data) != member.size:
                raise EOFError(f"member {member.name} has {len(data)} of its {member.size} bytes")
            samples[key][member.name] = data
    return samples


BLOCK = 512  # tar's block: every member is a 512-byte header and its data padded to whole blocks


def index_path(shard: Path) -> Path:
    return shard.with_name(shard.name + ".idx.npy")


def index_shard(path: Path) -> np.ndarray:
    """The shard's sample index (sample_spans), written next to it."""
    index = sample_spans(path)
    save_npy(index_path(path), index)
    return index


def sample_spans(path: Path) -> np.ndarray:
    """(samples, 2) int64: byte offset and length of each sample's members in the tar, in file
    order, from the headers alone (tarfile seeks over the data)."""
    spans: list[list[int]] = []
    keys: list[str] = []
    with tarfile.open(path) as tar:
        for member in tar:
            key = member.name.split(".", 1)[0]
            end = member.offset_data + -(-member.size // BLOCK) * BLOCK
            if keys and keys[-1] == key:
                spans[-1][1] = end - spans[-1][0]
            else:
                keys.append(key)
                spans.append([member.offset, end - member.offset])
    return np.asarray(spans, dtype=np.int64).reshape(-1, 2)


def shard_entry(path: Path, sequences: int, sha256: str) -> dict:
    """A shard's manifest entry, its index written beside it."""
    index = index_shard(path)
    if len(index) != sequences:
        raise UserError(f"{path}: {len(index)} samples in the tar, {sequences} written; the shard is damaged")
    return {"name": path.name, "sha256": sha256, "sequences": sequences, "bytes": path.stat().st_size,
            "index": index_path(path).name}


def split_shards(shards_dir: Path, manifest: dict, split: str) -> list[dict]:
    """A split's shards for reading by index: path, sequences, bytes and the index path of each,
    checked before the first read: present, as many bytes as the manifest lists (a truncated or
    replaced shard is named now, not when a run reaches it), an index of the listed length."""
    if split not in manifest["splits"] or not manifest["splits"][split]["shards"]:
        raise UserError(f"{shards_dir}/manifest.json has no {split!r} shards; re-run `sabiscale prepare`")
    out = []
    for entry in manifest["splits"][split]["shards"]:
        path = shards_dir / entry["name"]
        if "index" not in entry:
            raise UserError(f"{shards_dir}/manifest.json lists shards without a sample index (written by an earlier "
                            f"sabiscale): run `sabiscale shards index {shards_dir}` once (it adds the index; the "
                            "shards stay as they are), or re-run `sabiscale prepare`")
        if not path.is_file():
            raise MissingInput(f"{path}: listed in {shards_dir}/manifest.json but missing; restore it or re-run "
                               "`sabiscale prepare`")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ShardDamaged(f"{path}: {size} bytes, its manifest lists {entry['bytes']}: the shard is truncated "
                               "or was replaced; run `sabiscale shards verify` on its directory and restore or "
                               "re-write it")
        out.append({"path": str(path), "sequences": entry["sequences"], "bytes": entry["bytes"],
                    "index": str(shards_dir / entry["index"])})
    return out


class ShardDamaged(UserError):
    """A shard that does not match its manifest entry."""


class ShardReader:
    """Reads one sample by (shard, sample): one seek and one read of exactly its bytes. Files and
    indexes are opened on first use (in each dataloader worker separately) and kept open."""

    def __init__(self, shards: list[dict]) -> None:
        self.shards = shards
        self.bytes_read = 0
        self._files: dict[int, object] = {}
        self._indexes: dict[int, np.ndarray] = {}

    def _index(self, shard: int) -> np.ndarray:
        if shard not in self._indexes:
            entry = self.shards[shard]
            index = load_npy(entry["index"])
            if index.shape != (entry["sequences"], 2) or int(index[-1].sum()) > entry["bytes"]:
                raise ShardDamaged(f"{entry['index']} does not describe {entry['path']} ({len(index)} samples, its "
                                   f"manifest lists {entry['sequences']}); run `sabiscale shards index` on its directory")
            self._indexes[shard] = index
        return self._indexes[shard]

    def read(self, shard: int, sample: int) -> dict:
        """The raw members of one sample (as decode_sample takes them), with __key__ and __url__."""
        offset, length = (int(v) for v in self._index(shard)[sample])
        path = self.shards[shard]["path"]
        if shard not in self._files:
            # unbuffered: a sample is one read of exactly its bytes (a buffered file reads ahead)
            self._files[shard] = open(path, "rb", buffering=0)  # noqa: SIM115 - kept open for the reader's lifetime
        f = self._files[shard]
        f.seek(offset)
        data = f.read(length)
        self.bytes_read += len(data)
        try:
            members = read_members_from(io.BytesIO(data))
        except READ_ERRORS as err:
            raise ShardDamaged(f"{path}: sample {sample} cannot be read ({type(err).__name__}: {err}); the shard is "
                               "corrupted: run `sabiscale shards verify` on its directory and restore or re-write it") from err
        if len(data) != length or len(members) != 1:
            raise ShardDamaged(f"{path}: sample {sample} is not where its index says; run `sabiscale shards verify`")
        (key, raw), = members.items()
        return {"__key__": key, "__url__": path, **{name.split(".", 1)[1]: v for name, v in raw.items()}}

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


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
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise UserError(f"{path}: format_version {manifest.get('format_version')} is not "
                        f"{FORMAT_VERSION}; re-run `sabiscale prepare` with this sabiscale version")
    return manifest


def write_fingerprints(path: Path, **arrays: np.ndarray) -> None:
    """The contamination fingerprints beside the shards (prep/fingerprint.py), written atomically."""
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as f:
        np.savez(f, **arrays)
    os.replace(partial, path)


def read_fingerprints(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise MissingInput(f"{path} is missing: these shards were prepared without contamination fingerprints (by an "
                           "earlier sabiscale); prepare the data again into a new data.dir")
    try:
        with np.load(path) as loaded:
            return {name: loaded[name] for name in loaded.files}
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is damaged ({err}); prepare the data again into a new data.dir") from None
