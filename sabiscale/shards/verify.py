"""`sabiscale shards verify DIR`: check every shard against manifest.json.

Per shard: present, sha256, a readable tar, the sample count; per sample: all members present,
`.npy` loadable without pickle, dtypes and shapes as the format says, `docs.json` inside the
sequence; per split: token and supervised-token totals. Every problem names the shard and member.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sabiscale.hashing import sha256_file
from sabiscale.shards.format import (DTYPES, FIELDS, READ_ERRORS, check_aligned, load_npy, npy_array, read_manifest,
                                     read_members, sample_spans)


def _check_sample(shard: str, key: str, members: dict[str, bytes], seq_len: int, problems: list[str],
                  fields: tuple[str, ...] = FIELDS) -> tuple[int, int]:
    """(tokens, supervised tokens) of one sample; appends what is wrong with it."""
    arrays = {}
    for field in fields:
        name = f"{key}.{field}.npy"
        if name not in members:
            problems.append(f"{shard}: member {name} is missing")
            continue
        try:
            array = npy_array(members[name])
        except Exception as err:  # noqa: BLE001 - any unreadable array is reported, whatever numpy says
            problems.append(f"{shard}: member {name} is not a readable .npy ({err})")
            continue
        if array.dtype != DTYPES[field] or array.shape != (seq_len,):
            problems.append(f"{shard}: member {name} is {array.dtype}{list(array.shape)}, "
                            f"expected {np.dtype(DTYPES[field])}[{seq_len}]")
        arrays[field] = array
    try:
        docs = json.loads(members[f"{key}.docs.json"])
    except (KeyError, json.JSONDecodeError):
        problems.append(f"{shard}: member {key}.docs.json is missing or not JSON")
        return 0, 0
    if any(start < 0 or start + length > seq_len for start, length, *_ in docs):
        problems.append(f"{shard}: member {key}.docs.json has a document outside the sequence")
    mask = arrays.get("loss_mask")
    if "ref_loss" in arrays and mask is not None and arrays["ref_loss"].shape == mask.shape:
        try:
            check_aligned(arrays["ref_loss"], mask, f"{shard}: member {key}")
        except ValueError as err:
            problems.append(str(err))
    return sum(d[1] for d in docs), int(mask.sum()) if mask is not None else 0


def _read_members(path: Path, problems: list[str]) -> dict[str, dict[str, bytes]] | None:
    try:
        return read_members(path)
    except READ_ERRORS as err:
        problems.append(f"{path.name}: not a readable tar ({err}); the file is truncated or corrupted — "
                        "re-run `sabiscale prepare` or restore it from where it was copied")
        return None


def _check_index(shards_dir: Path, shard: dict, problems: list[str]) -> None:
    """The sample index must hold every sample's exact byte span, in file order (compared with the
    spans the tar headers give; the shard's bytes were read once already)."""
    if "index" not in shard:
        problems.append(f"{shard['name']}: no sample index (an earlier format); run `sabiscale shards index {shards_dir}`")
        return
    try:
        saved = load_npy(shards_dir / shard["index"])
        actual = sample_spans(shards_dir / shard["name"])
    except (ValueError, OSError, *READ_ERRORS) as err:
        problems.append(f"{shard['index']}: cannot be read or compared ({type(err).__name__}: {err})")
        return
    if saved.shape != actual.shape or not np.array_equal(saved, actual):
        problems.append(f"{shard['index']}: does not point at the samples of {shard['name']} in order; "
                        f"run `sabiscale shards index {shards_dir}`")


def verify_shards(shards_dir: Path) -> tuple[list[str], dict]:
    """(problems, totals per split); no problems means every shard matches the manifest."""
    manifest = read_manifest(shards_dir)
    seq_len = manifest["seq_len"]
    fields = FIELDS + tuple(manifest.get("fields", {}))
    problems: list[str] = []
    totals = {}
    listed = set()
    for split, entry in manifest["splits"].items():
        tokens = supervised = sequences = 0
        for shard in entry["shards"]:
            listed.add(shard["name"])
            path = shards_dir / shard["name"]
            if not path.is_file():
                problems.append(f"{shard['name']}: listed in manifest.json but missing")
                continue
            if sha256_file(path) != shard["sha256"]:
                problems.append(f"{shard['name']}: sha256 differs from manifest.json (changed or damaged)")
            samples = _read_members(path, problems)
            if samples is None:
                continue
            if len(samples) != shard["sequences"]:
                problems.append(f"{shard['name']}: {len(samples)} samples, manifest.json says {shard['sequences']}")
            _check_index(shards_dir, shard, problems)
            for key, members in sorted(samples.items()):
                t, s = _check_sample(shard["name"], key, members, seq_len, problems, fields)
                tokens, supervised = tokens + t, supervised + s
            sequences += len(samples)
        counts = entry["counts"]
        if (tokens, supervised) != (counts["tokens"], counts["supervised_tokens"]) and not problems:
            problems.append(f"split {split}: {tokens} tokens / {supervised} supervised in the shards, "
                            f"manifest.json says {counts['tokens']} / {counts['supervised_tokens']}")
        totals[split] = {"sequences": sequences, "tokens": tokens, "supervised_tokens": supervised}
    for stray in sorted(p.name for p in shards_dir.glob("*.tar") if p.name not in listed):
        problems.append(f"{stray}: a shard not listed in manifest.json (it would never be read)")
    return problems, totals
