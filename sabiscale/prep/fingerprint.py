"""What training saw, in a form an evaluation can check against: hashes of every training
document's texts and of their word 13-grams (the decontamination check of GPT-3 and
lm-evaluation-harness).

A document's texts are its prompt without task tags and, when the answer is free text (not a
label such as a sentiment or NER tags), its answer. Texts are compared normalised: NFC, lower
case, punctuation and symbols removed, whitespace collapsed. A scored record is contaminated
*exactly* when the whole document equals a training document or one of its texts of at least
MIN_WORDS words equals a training text (shorter texts, "2" or "Thank you", are too common to
say anything), and *by n-gram* when one of its texts shares a 13-gram with a training text.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sabiscale.shards.format import read_fingerprints, write_fingerprints
from sabiscale.tasks import Example, TaskDef, answer_is_label

NGRAM = 13
MIN_WORDS = 4
FINGERPRINTS = "fingerprints.npz"
_TAG = re.compile(r"<[^<>\s]+>")


def words(text: str) -> list[str]:
    text = unicodedata.normalize("NFC", _TAG.sub(" ", text)).lower()
    kept = "".join(" " if unicodedata.category(c)[0] in "PSZC" else c for c in text)
    return kept.split()


def texts(example: Example, spec: TaskDef) -> list[list[str]]:
    """The example's texts as word lists (empty ones dropped)."""
    sides = [words(example.prompt)] + ([] if answer_is_label(spec) else [words(example.answer)])
    return [s for s in sides if s]


def _hash(items: list[str]) -> int:
    return int.from_bytes(hashlib.blake2b("\x1f".join(items).encode(), digest_size=8).digest(), "little")


def text_hashes(sides: list[list[str]]) -> set[int]:
    return {_hash(side) for side in sides if len(side) >= MIN_WORDS}


def ngram_hashes(sides: list[list[str]]) -> set[int]:
    return {_hash(side[i:i + NGRAM]) for side in sides for i in range(len(side) - NGRAM + 1)}


def document_hash(example: Example) -> int:
    """The whole document, normalised: two documents with this hash teach the same thing."""
    return _hash([example.task, example.lang, *words(example.prompt), "\x00", *words(example.answer)])


@dataclass
class Fingerprints:
    documents: np.ndarray  # sorted unique uint64 hashes of whole documents
    texts: np.ndarray      # ... of their texts of MIN_WORDS words or more
    ngrams: np.ndarray     # ... of their texts' 13-grams

    @classmethod
    def of(cls, examples: list[Example], registry: dict[str, TaskDef]) -> "Fingerprints":
        doc_set, text_set, ngram_set = set(), set(), set()
        for example in examples:
            sides = texts(example, registry[example.task])
            doc_set.add(document_hash(example))
            text_set |= text_hashes(sides)
            ngram_set |= ngram_hashes(sides)
        return cls(_sorted(doc_set), _sorted(text_set), _sorted(ngram_set))

    def overlap(self, example: Example, spec: TaskDef) -> str | None:
        """"exact", "ngram" or None: how `example` appears in what these fingerprints were made from."""
        sides = texts(example, spec)
        if _any_in({document_hash(example)}, self.documents) or _any_in(text_hashes(sides), self.texts):
            return "exact"
        if _any_in(ngram_hashes(sides), self.ngrams):
            return "ngram"
        return None

    def save(self, shards_dir: Path) -> dict:
        write_fingerprints(shards_dir / FINGERPRINTS, documents=self.documents, texts=self.texts, ngrams=self.ngrams)
        return {"file": FINGERPRINTS, "documents": int(self.documents.size), "texts": int(self.texts.size),
                "ngrams": int(self.ngrams.size), "n": NGRAM, "min_words": MIN_WORDS}

    @classmethod
    def load(cls, shards_dir: Path) -> "Fingerprints":
        arrays = read_fingerprints(shards_dir / FINGERPRINTS)
        return cls(arrays["documents"], arrays["texts"], arrays["ngrams"])


def _sorted(hashes: set[int]) -> np.ndarray:
    return np.array(sorted(hashes), dtype=np.uint64)


def _any_in(hashes: set[int], table: np.ndarray) -> bool:
    if not hashes or table.size == 0:
        return False
    probe = np.fromiter(hashes, dtype=np.uint64, count=len(hashes))
    at = np.searchsorted(table, probe).clip(max=table.size - 1)
    return bool((table[at] == probe).any())
