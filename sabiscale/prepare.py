"""`sabiscale prepare`: raw JSONL (or the embedded demo corpus) -> tokenizer -> WebDataset shards.

Writes into the run directory:
    raw/            the generated demo corpus (demo source only)
    tokenizer/      tokenizer.json + transformers config (trained here unless tokenizer.path is set)
    shards/         train-*.tar, val-*.tar, manifest.json
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .config import RunConfig
from .corpus import is_validation, languages_in, read_examples
from .demo_data import generate_demo_corpus
from .shards.pack import Document, PackStats, pack_documents
from .shards.write import write_manifest, write_split
from .tasks import Example, special_tokens
from .tokenizer import adopt_tokenizer, encode_examples, load_tokenizer, save_tokenizer, tokenizer_hash, train_tokenizer


@dataclass
class Prepared:
    tokenizer_path: Path
    shards_dir: Path
    manifest: Path
    train_documents: int
    val_documents: int


def data_root(cfg: RunConfig) -> Path:
    if cfg.data.source == "demo":
        return generate_demo_corpus(cfg.output_dir / "raw", cfg.data.demo_examples_per_task, cfg.seed)
    return Path(cfg.data.jsonl_root)


def load_split_examples(cfg: RunConfig, root: Path, reserved: list[str]) -> tuple[list[Example], list[Example]]:
    train, val = [], []
    for example, where in read_examples(root, cfg.data.tasks, cfg.data.languages, reserved, cfg.seed,
                                        cfg.data.max_records_per_file):
        (val if is_validation(where, cfg.data.val_fraction) else train).append(example)
    if not train:
        raise ValueError(f"no training examples found under {root} for tasks {cfg.data.tasks}")
    return train, val


def _tokenizer(cfg: RunConfig, train: list[Example], specials: list[str]):
    if cfg.tokenizer.path is not None:
        adopt_tokenizer(Path(cfg.tokenizer.path), cfg.tokenizer_path)
        return load_tokenizer(cfg.tokenizer_path)
    texts = (e.prompt + e.answer for e in train)
    tok = train_tokenizer(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency, specials)
    save_tokenizer(tok, cfg.tokenizer_path)
    return load_tokenizer(cfg.tokenizer_path)


def _documents(tok, examples: list[Example], seed: int) -> list[Document]:
    docs = [Document(ids, mask, e.task, e.lang) for e, (ids, mask) in zip(examples, encode_examples(tok, examples))]
    random.Random(seed).shuffle(docs)  # mix tasks and languages within and across sequences
    return docs


def prepare(cfg: RunConfig) -> Prepared:
    if cfg.data.shards_dir is not None and (cfg.data.shards_dir / "manifest.json").is_file():
        raise FileExistsError(f"data.shards_dir {cfg.data.shards_dir} already holds shards, which `prepare` would "
                              "overwrite; unset data.shards_dir to prepare into <output_dir>/shards (nothing was changed)")
    root = data_root(cfg)
    specials = special_tokens(languages_in(root, cfg.data.tasks, cfg.data.languages))
    train, val = load_split_examples(cfg, root, specials)
    tok = _tokenizer(cfg, train, specials)
    splits = {}
    for split, examples in (("train", train), ("val", val)):
        stats = PackStats()
        packed = pack_documents(_documents(tok, examples, cfg.seed), cfg.data.seq_len, tok.pad_token_id, stats)
        splits[split] = write_split(packed, cfg.shards_dir, split, cfg.data.sequences_per_shard, stats)
    manifest = write_manifest(cfg.shards_dir, tokenizer_hash(cfg.tokenizer_path), cfg.data.seq_len,
                              tok.pad_token_id, splits)
    return Prepared(cfg.tokenizer_path, cfg.shards_dir, manifest, len(train), len(val))
