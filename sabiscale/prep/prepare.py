"""`sabiscale prepare`: raw inputs (or the embedded demo corpus) -> tokenizer -> WebDataset shards.

Writes into the run directory:
    raw/            the generated demo corpus (demo source only)
    tokenizer/      tokenizer.json + transformers config (trained here unless tokenizer.path is set)
    shards/         train-*.tar, val-*.tar, manifest.json, fingerprints.npz (what training saw, for
                    eval's contamination check), and skipped.jsonl with data.skip_bad

Held-out records (prep/corpus.py::SplitRule) are written to no shard; training and validation
documents that repeat a held-out text, an earlier document (data.dedup) or a text of
data.decontaminate_against are dropped, and the manifest counts each, per input file.

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
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sabiscale.config import FileSource, RunConfig, check_language_weights
from sabiscale.prep.corpus import SPLIT_RULE_VERSION, Corpus, SplitRule, load_corpus
from sabiscale.prep.fingerprint import Fingerprints, document_hash, ngram_hashes, text_hashes, words
from sabiscale.prep.demo_data import generate_demo_corpus
from sabiscale.prep.mix import mix_documents
from sabiscale.prep.near_dup import NearDuplicates
from sabiscale.parallel import SERIAL, Workers
from sabiscale.shards.pack import Document, PackStats, pack_documents
from sabiscale.hashing import sha256_file
from sabiscale.shards.format import write_manifest
from sabiscale.shards.write import write_split
from sabiscale.tasks import BadRecord, Example, task_registry
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
    heldout_records: int = 0

log = logging.getLogger("sabiscale.prepare")


# data settings that do not change what `prepare` writes
_RUNTIME_DATA_KEYS = ("loader_workers", "prepare_workers", "dir", "shards_dir")


def prepared_settings(cfg: RunConfig) -> dict:
    """What decides the prepared data: recorded in the manifest, compared when data.dir is reused."""
    data = {k: v for k, v in cfg.model_dump(mode="json")["data"].items() if k not in _RUNTIME_DATA_KEYS}
    mix = data.pop("mix")
    mix.pop("schedule")
    # with a schedule the shards hold each source at its natural size, whatever the phases' weights
    data["mix"] = "by_source" if cfg.data.mix.schedule else mix
    return {"data": data, "tokenizer": cfg.tokenizer.model_dump(mode="json"), "seed": cfg.seed}


def reuse_prepared(cfg: RunConfig) -> Prepared | None:
    """A shared data.dir is prepared once: the same settings reuse it, other settings are refused."""
    manifest_path = cfg.shards_dir / "manifest.json"
    if cfg.data.dir is None or not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("split_rule", {}).get("version") != SPLIT_RULE_VERSION:
        raise AlreadyExists(f"data.dir {cfg.data.dir} was prepared by an earlier sabiscale that sent official dev records "
                            "into the training shards, so nothing in it is held out: prepare into a new data.dir (or "
                            "delete that directory first; runs trained from it cannot be evaluated on held-out data)")
    recorded = manifest.get("prepared_with")
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


@dataclass
class Split:
    train: list[Example]
    val: list[Example]
    heldout: list[Example]
    per_file: dict[str, Counter]  # input file -> records per split, and documents dropped per reason
    near: NearDuplicates | None = None  # data.dedup=near: what it dropped for what


def split_examples(cfg: RunConfig, corpus: Corpus) -> Split:
    """Train, validation and held-out examples; train and validation lose every document that
    repeats a held-out text, an earlier document or a text of data.decontaminate_against."""
    buckets: dict[str, list[tuple[Example, str]]] = {"train": [], "val": [], "heldout": [], "held_back": []}
    per_file: dict[str, Counter] = defaultdict(Counter)  # keyed "task:path"
    for example, where in corpus.examples:
        buckets[example.split].append((example, where))
        per_file[f"{example.task}:{where.rsplit(':', 1)[0]}"][example.split] += 1
    registry = task_registry(cfg.data.task_defs)
    heldout = Fingerprints.of([e for e, _ in buckets["heldout"]], registry)
    against = against_fingerprints(cfg.data.decontaminate_against)
    seen: set[int] = set()
    near = NearDuplicates(cfg.data.near_dup_threshold) if cfg.data.dedup == "near" else None
    kept: dict[str, list[Example]] = {"train": [], "val": []}
    for split in ("train", "val"):  # train first: a validation document repeating a training one is dropped
        for example, where in buckets[split]:
            reason = drop_reason(example, registry, heldout, against, seen, cfg.data.dedup != "none", near)
            if reason is None:
                kept[split].append(example)
            else:
                per_file[f"{example.task}:{where.rsplit(':', 1)[0]}"][f"dropped_{reason}"] += 1
    train, val = kept["train"], kept["val"]
    lost = tasks_all_skipped(cfg, corpus)
    if not train:
        if corpus.skipped:  # prepare stops here, before it would write the list with the shards
            write_skipped(cfg.shards_dir, corpus.skipped)
        raise UserError(f"no training examples found for tasks {cfg.data.tasks}" + "".join(f"\n{line}" for line in lost))
    if not val:  # training evaluates on the validation split: refused here, not after the engine started
        raise UserError(f"no validation examples: data.val_fraction={cfg.data.val_fraction} sent none of "
                        f"the {len(corpus.examples)} records to validation, and training evaluates on them; raise "
                        "data.val_fraction (e.g. 0.02) and prepare again (nothing was written)")
    for line in lost:
        log.warning("%s", line)
    return Split(train, val, [e for e, _ in buckets["heldout"]], per_file, near)


def dropped_totals(per_file: dict[str, Counter]) -> dict[str, int]:
    totals: Counter = Counter()
    for counts in per_file.values():
        totals.update({k.removeprefix("dropped_"): v for k, v in counts.items() if k.startswith("dropped_")})
    return dict(sorted(totals.items()))


def drop_reason(example: Example, registry, heldout: Fingerprints, against: Fingerprints | None, seen: set[int],
                dedup: bool, near: NearDuplicates | None = None) -> str | None:
    """Why a train or validation document is dropped ("heldout_overlap": it repeats a held-out
    document or text exactly; "decontaminated"; "duplicate"; "near_duplicate"), or None to keep
    it; `seen` and `near` collect the kept documents."""
    if heldout.overlap(example, registry[example.task]) == "exact":
        return "heldout_overlap"
    if against is not None and against.overlap(example, registry[example.task]) is not None:
        return "decontaminated"
    key = document_hash(example)
    if dedup and key in seen:
        return "duplicate"
    if near is not None and near.check(example):
        return "near_duplicate"
    seen.add(key)
    return None


def against_fingerprints(paths: list[Path]) -> Fingerprints | None:
    """Every string (or list of strings) of every record of the given JSONL files, as texts."""
    if not paths:
        return None
    sides: list[list[str]] = []
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"data.decontaminate_against: {path} is not a file (give JSONL files of evaluation records)")
        for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{line_no}: not JSON ({err.msg}); data.decontaminate_against takes JSONL files") from None
            values = record.values() if isinstance(record, dict) else [record]
            sides += [words(" ".join(v) if isinstance(v, list) else v) for v in values
                      if isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))]
    sides = [s for s in sides if s]
    return Fingerprints(np.zeros(0, dtype=np.uint64), np.array(sorted(text_hashes(sides)), dtype=np.uint64),
                        np.array(sorted(ngram_hashes(sides)), dtype=np.uint64))


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
        # read and checked where it is: a file that cannot serve leaves no copy in the run
        _check_specials(load_tokenizer(Path(cfg.tokenizer.path)), specials, Path(cfg.tokenizer.path))
        adopt_tokenizer(Path(cfg.tokenizer.path), cfg.tokenizer_path)
        return load_tokenizer(cfg.tokenizer_path)
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


def _sources_record(corpus: Corpus, root: Path | None, per_file: dict[str, Counter]) -> list[dict]:
    """Each input file with its hash and where its records went: what these shards were made from."""
    out = []
    for src in corpus.files:
        path = Path(src.path)
        shown = path.relative_to(root) if root is not None and path.is_relative_to(root) else path
        counts = per_file.get(f"{src.task}:{path}", Counter())
        records = {k: counts.get(k, 0) for k in ("train", "val", "heldout")}
        records |= {"held_back": counts["held_back"]} if counts.get("held_back") else {}
        records |= {k: v for k, v in sorted(counts.items()) if k.startswith("dropped_")}
        out.append({"task": src.task, "path": str(shown), "format": src.format, "sha256": source_sha256(path),
                    "records": records, **({"hf_args": src.hf_args} if src.hf_args else {})})
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


def write_near_pairs(shards_dir: Path, near: NearDuplicates) -> dict:
    path = shards_dir / "near_duplicates.jsonl"
    path.write_text("".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in near.pairs), encoding="utf-8")
    log.info("near-duplicates: %d documents dropped (threshold %.2f, %.1f s); pairs in %s", len(near.pairs),
             near.threshold, near.seconds, path)
    return near.summary(path.name)


def write_by_source(docs: list[Document], cfg: RunConfig, pad_id: int, workers: Workers) -> dict:
    """The training split as shards per source (task x language) at natural size, for a mix drawn
    at load time (data.mix.schedule); its entry lists each source's shards and its size in every
    mix unit, from which the loader turns a phase's weights into draws."""
    groups: dict[str, list[Document]] = defaultdict(list)
    for doc in docs:
        groups[f"{doc.task}/{doc.lang}"].append(doc)
    shards, sources, counts = [], {}, []
    for key, group in sorted(groups.items()):
        stats = PackStats()
        packed = list(pack_documents(group, cfg.data.seq_len, pad_id, stats))
        written = write_split(packed, cfg.shards_dir, "train-" + key.replace("/", "-"), cfg.data.sequences_per_shard,
                              stats, workers)
        shards += written["shards"]
        counts.append(written["counts"])
        sources[key] = {"shards": [s["name"] for s in written["shards"]], "sequences": stats.sequences,
                        "documents": len(group), "tokens": sum(len(d.ids) for d in group),
                        "bytes": sum(d.text_bytes for d in group), "words": sum(d.text_words for d in group)}
    total = {name: sum(c[name] for c in counts) for name in ("sequences", "tokens", "padding", "split_documents",
                                                            "supervised_tokens")}
    total["by_task_lang"] = dict(sorted(kv for c in counts for kv in c["by_task_lang"].items()))
    return {"shards": shards, "counts": total, "sources": sources}


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
        parts = split_examples(cfg, corpus)
        train, val = parts.train, parts.val
        for weights in cfg.data.mix.weights_named():
            check_language_weights(weights.language_weights, {e.lang for e in train}, "the data")
        log.info("%d train / %d validation examples (%d held out) from %d files (%.0f s); tokenizer next", len(train),
                 len(val), len(parts.heldout), len(corpus.files), time.monotonic() - started)
        tok = _tokenizer(cfg, train, corpus.specials)
        log.info("tokenizing, packing and writing shards to %s (%.0f s so far)", cfg.shards_dir,
                 time.monotonic() - started)
        train_docs, mix_entry = encode(tok, train), None
        if not cfg.data.mix.is_natural():
            train_docs, mix_entry = mix_documents(train_docs, cfg.data.mix, cfg.seed)
        splits = {}
        for split, docs in (("train", train_docs), ("val", encode(tok, val))):
            random.Random(cfg.seed).shuffle(docs)  # mix tasks and languages within and across sequences
            if split == "train" and cfg.data.mix.schedule:
                splits[split] = write_by_source(docs, cfg, tok.pad_token_id, workers)
                continue
            stats = PackStats()
            packed = list(pack_documents(docs, cfg.data.seq_len, tok.pad_token_id, stats))
            splits[split] = write_split(packed, cfg.shards_dir, split, cfg.data.sequences_per_shard, stats, workers)
    registry = task_registry(cfg.data.task_defs)
    extra = {"sources": _sources_record(corpus, root, parts.per_file),
             "tasks": {t: registry[t].model_dump(exclude_defaults=True) for t in cfg.data.tasks},
             "not_applicable": corpus.not_applicable, "prepared_with": prepared_settings(cfg),
             "split_rule": SplitRule.of(cfg.data).describe(), "heldout_records": len(parts.heldout),
             "dropped": dropped_totals(parts.per_file),
             "fingerprints": Fingerprints.of(train, registry).save(cfg.shards_dir)}
    if mix_entry is not None:
        extra["mix"] = mix_entry
    if parts.near is not None:
        extra["near_duplicates"] = write_near_pairs(cfg.shards_dir, parts.near)
    if cfg.data.skip_bad:
        extra["skipped"] = write_skipped(cfg.shards_dir, corpus.skipped)
    manifest = write_manifest(cfg.shards_dir, tokenizer_hash(cfg.tokenizer_path), cfg.data.seq_len,
                              tok.pad_token_id, splits, extra)
    return Prepared(cfg.tokenizer_path, cfg.shards_dir, manifest, len(train), len(val), corpus.skipped,
                    heldout_records=len(parts.heldout))
