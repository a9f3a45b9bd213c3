"""`sabiscale prepare`: raw inputs (or the embedded demo corpus) -> tokenizer -> WebDataset shards.

Writes into the run directory:
    raw/            the generated demo corpus (demo source only)
    tokenizer/      tokenizer.json + transformers config (trained here unless tokenizer.path is set)
    shards/         train-*.tar, val-*.tar, manifest.json (and skipped.jsonl with data.skip_bad)

Reading (and templating) and shard writing run on data.prepare_workers processes, tokenizing on the
tokenizers library's own threads; every stage keeps input order, so the output is byte-identical
for any number of workers.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from sabiscale.config import FileSource, RunConfig
from sabiscale.prep.corpus import Corpus, is_validation, load_corpus
from sabiscale.prep.demo_data import generate_demo_corpus
from sabiscale.prep.mix import mix_documents
from sabiscale.prep.parallel import SERIAL, Workers
from sabiscale.shards.pack import Document, PackStats, pack_documents
from sabiscale.hashing import sha256_file
from sabiscale.shards.format import write_manifest
from sabiscale.shards.write import write_split
from sabiscale.prep.tasks import BadRecord, Example, task_registry
from sabiscale.prep.tokenizer import adopt_tokenizer, encode_examples, load_tokenizer, save_tokenizer, tokenizer_hash, train_tokenizer
from sabiscale.errors import AlreadyExists, UserError

@dataclass
class Prepared:
    tokenizer_path: Path
    shards_dir: Path
    manifest: Path
    train_documents: int
    val_documents: int
    skipped: list[dict] = field(default_factory=list)
    reused: bool = False  # data.dir already held data prepared with these settings

log = logging.getLogger("sabiscale.prepare")


# data settings that do not change what `prepare` writes
_RUNTIME_DATA_KEYS = ("loader_workers", "prepare_workers", "dir", "shards_dir")


def prepared_settings(cfg: RunConfig) -> dict:
    """What decides the prepared data: recorded in the manifest, compared when data.dir is reused."""
    data = {k: v for k, v in cfg.model_dump(mode="json")["data"].items() if k not in _RUNTIME_DATA_KEYS}
    return {"data": data, "tokenizer": cfg.tokenizer.model_dump(mode="json"), "seed": cfg.seed}


def reuse_prepared(cfg: RunConfig) -> Prepared | None:
    """A shared data.dir is prepared once: the same settings reuse it, other settings are refused."""
    manifest_path = cfg.shards_dir / "manifest.json"
    if cfg.data.dir is None or not manifest_path.is_file():
        return None
    recorded = json.loads(manifest_path.read_text(encoding="utf-8")).get("prepared_with")
    wanted = prepared_settings(cfg)
    if recorded is not None:  # a setting added since then was, for that data, its default
        recorded = with_defaults(recorded, prepared_settings(RunConfig()))
        source_defaults = FileSource(task="-", path="-").model_dump(mode="json")
        recorded["data"]["files"] = [with_defaults(f, source_defaults) for f in recorded["data"].get("files", [])]
    if recorded != wanted:
        changed = sorted(f"{section}.{k}" for section in ("data", "tokenizer") for k in wanted[section]
                         if (recorded or {}).get(section, {}).get(k) != wanted[section][k])
        raise AlreadyExists(f"data.dir {cfg.data.dir} holds data prepared with other settings ({', '.join(changed) or 'seed'} "
                            "differ); runs may be training from it: choose another data.dir for these settings, or "
                            "delete that directory to prepare it again (nothing was changed)")
    return Prepared(cfg.tokenizer_path, cfg.shards_dir, manifest_path, 0, 0, reused=True)


def with_defaults(recorded: dict, defaults: dict) -> dict:
    """`recorded` with every key it lacks taken from `defaults`, at every depth."""
    out = dict(recorded)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = with_defaults(out[key], value)
    return out


def data_root(cfg: RunConfig) -> Path | None:
    if cfg.data.source == "demo":
        return generate_demo_corpus(cfg.prepared_dir / "raw", cfg.data.demo_examples_per_task, cfg.seed)
    return Path(cfg.data.jsonl_root) if cfg.data.jsonl_root is not None else None


def read_corpus(cfg: RunConfig, root: Path | None, workers: Workers = SERIAL) -> Corpus:
    try:
        return load_corpus(cfg, root, workers=workers)
    except BadRecord as err:
        raise BadRecord(f"{err}\n(to skip such records and list each one instead, run prepare with --skip-bad "
                        "or data.skip_bad=true)") from None


def split_examples(cfg: RunConfig, corpus: Corpus) -> tuple[list[Example], list[Example]]:
    train, val = [], []
    for example, where in corpus.examples:
        (val if is_validation(where, cfg.data.val_fraction) else train).append(example)
    lost = tasks_all_skipped(cfg, corpus)
    if not train:
        if corpus.skipped:  # prepare stops here, before it would write the list with the shards
            write_skipped(cfg.shards_dir, corpus.skipped)
        raise UserError(f"no training examples found for tasks {cfg.data.tasks}" + "".join(f"\n{line}" for line in lost))
    for line in lost:
        log.warning("%s", line)
    return train, val


def tasks_all_skipped(cfg: RunConfig, corpus: Corpus) -> list[str]:
    """One line per task whose every record was skipped as bad (--skip-bad): a task that silently
    vanished from the mix would otherwise show only in the manifest."""
    kept = {example.task for example, _ in corpus.examples}
    skipped: dict[str, int] = {}
    for record in corpus.skipped:
        skipped[record["task"]] = skipped.get(record["task"], 0) + 1
    lost = {task: n for task, n in skipped.items() if task not in kept}
    if not lost:
        return []
    listed = cfg.shards_dir / "skipped.jsonl"
    return [f"task {task!r}: all {n} records were bad and skipped; it has no examples. Each record and its reason "
            f"is listed in {listed}" for task, n in sorted(lost.items())]


def _tokenizer(cfg: RunConfig, train: list[Example], specials: list[str]):
    if cfg.tokenizer.path is not None:
        adopt_tokenizer(Path(cfg.tokenizer.path), cfg.tokenizer_path)
        tok = load_tokenizer(cfg.tokenizer_path)
        _check_specials(tok, specials, Path(cfg.tokenizer.path))
        return tok
    texts = (e.prompt + e.answer for e in train)
    tok = train_tokenizer(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency, specials)
    save_tokenizer(tok, cfg.tokenizer_path)
    return load_tokenizer(cfg.tokenizer_path)


def _check_specials(tok, specials: list[str], path: Path) -> None:
    """A reused tokenizer must keep every task and language tag whole, else tags would be split
    into pieces and read as text."""
    missing = [s for s in specials if s not in tok.all_special_tokens and s not in tok.get_added_vocab()]
    if missing:
        raise UserError(f"tokenizer.path {path} lacks the special token(s) {missing} of this recipe's tasks and "
                         "languages; unset tokenizer.path to train a tokenizer for them")


def encode(tok, examples: list[Example]) -> list[Document]:
    """Tokenized in this process: the tokenizers library already runs its batch encoding on every
    core (measured: worker processes only added the cost of shipping examples to them)."""
    return [Document(ids, mask, e.task, e.lang, len((e.prompt + e.answer).encode("utf-8")), len((e.prompt + e.answer).split()))
            for e, (ids, mask) in zip(examples, encode_examples(tok, examples))]


def _sources_record(corpus: Corpus, root: Path | None) -> list[dict]:
    """Each input file with its hash: what these shards were made from."""
    out = []
    for src in corpus.files:
        path = Path(src.path)
        shown = path.relative_to(root) if root is not None and path.is_relative_to(root) else path
        out.append({"task": src.task, "path": str(shown), "format": src.format, "sha256": source_sha256(path),
                    **({"hf_args": src.hf_args} if src.hf_args else {})})
    return out


def source_sha256(path: Path) -> str | None:
    """A file's sha256; for a saved dataset directory, one over its files' hashes; None for a
    dataset streamed from the Hub (its revision is what pins it)."""
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return hashlib.sha256("".join(f"{p.relative_to(path)}:{sha256_file(p)}\n" for p in files).encode()).hexdigest()
    return None


def write_skipped(shards_dir: Path, skipped: list[dict]) -> dict:
    shards_dir.mkdir(parents=True, exist_ok=True)
    path = shards_dir / "skipped.jsonl"
    path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in skipped), encoding="utf-8")
    by_task: dict[str, int] = {}
    for s in skipped:
        by_task[s["task"]] = by_task.get(s["task"], 0) + 1
    return {"records": len(skipped), "by_task": by_task, "list": path.name}


def prepare(cfg: RunConfig) -> Prepared:
    if cfg.data.shards_dir is not None and (cfg.data.shards_dir / "manifest.json").is_file():
        raise AlreadyExists(f"data.shards_dir {cfg.data.shards_dir} already holds shards, which `prepare` would "
                              "overwrite; unset data.shards_dir to prepare into <output_dir>/shards (nothing was changed)")
    reused = reuse_prepared(cfg)
    if reused is not None:
        return reused
    root = data_root(cfg)
    started = time.monotonic()
    with Workers(cfg.data.prepare_workers) as workers:
        log.info("reading %s", root or "data.files")
        corpus = read_corpus(cfg, root, workers)
        train, val = split_examples(cfg, corpus)
        log.info("%d train / %d validation examples from %d files (%.0f s); tokenizer next", len(train), len(val),
                 len(corpus.files), time.monotonic() - started)
        tok = _tokenizer(cfg, train, corpus.specials)
        log.info("tokenizing, packing and writing shards to %s (%.0f s so far)", cfg.shards_dir,
                 time.monotonic() - started)
        train_docs, mix_entry = encode(tok, train), None
        if not cfg.data.mix.is_natural():
            train_docs, mix_entry = mix_documents(train_docs, cfg.data.mix, cfg.seed)
        splits = {}
        for split, docs in (("train", train_docs), ("val", encode(tok, val))):
            random.Random(cfg.seed).shuffle(docs)  # mix tasks and languages within and across sequences
            stats = PackStats()
            packed = list(pack_documents(docs, cfg.data.seq_len, tok.pad_token_id, stats))
            splits[split] = write_split(packed, cfg.shards_dir, split, cfg.data.sequences_per_shard, stats, workers)
    registry = task_registry(cfg.data.task_defs)
    extra = {"sources": _sources_record(corpus, root),
             "tasks": {t: registry[t].model_dump(exclude_defaults=True) for t in cfg.data.tasks},
             "not_applicable": corpus.not_applicable, "prepared_with": prepared_settings(cfg)}
    if mix_entry is not None:
        extra["mix"] = mix_entry
    if cfg.data.skip_bad:
        extra["skipped"] = write_skipped(cfg.shards_dir, corpus.skipped)
    manifest = write_manifest(cfg.shards_dir, tokenizer_hash(cfg.tokenizer_path), cfg.data.seq_len,
                              tok.pad_token_id, splits, extra)
    return Prepared(cfg.tokenizer_path, cfg.shards_dir, manifest, len(train), len(val), corpus.skipped)
