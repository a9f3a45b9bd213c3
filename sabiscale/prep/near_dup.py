"""Near-duplicate documents (data.dedup=near): MinHash-LSH (datasketch) over word 3-gram shingles.

Low-resource web text repeats with small edits (a changed date, a signature, a retweet prefix);
exact dedup keeps every such copy. A document whose estimated Jaccard similarity to a document
already kept reaches data.near_dup_threshold is dropped; the first in input order is the one
kept. One index per task and language: the same sentence as a translation record and as a
sentiment record teaches two different things. Shingles are normalised words (prep/fingerprint.py,
task tags removed), so case and punctuation do not hide a copy; a document under 3 words is
shingled by its words. LSH only proposes candidates: each is confirmed on its own MinHash estimate,
and the kept/dropped pair is listed (shards/near_duplicates.jsonl) for inspection.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from sabiscale.prep.fingerprint import words
from sabiscale.tasks import Example

SHINGLE_WORDS = 3
NUM_PERM = 128   # MinHash permutations: the estimate's standard error is about 1/sqrt(128) = 0.09
SEED = 1         # fixed: the same corpus drops the same documents on every machine


def shingles(example: Example) -> list[bytes]:
    tokens = [*words(example.prompt), "\x00", *words(example.answer)]
    if len(tokens) < SHINGLE_WORDS:
        return [t.encode() for t in tokens]
    return sorted({" ".join(tokens[i:i + SHINGLE_WORDS]).encode() for i in range(len(tokens) - SHINGLE_WORDS + 1)})


@dataclass
class NearDuplicates:
    threshold: float
    indexes: dict = field(default_factory=dict)       # (task, lang) -> MinHashLSH of kept documents
    signatures: dict = field(default_factory=dict)    # key -> LeanMinHash of a kept document
    sources: dict = field(default_factory=dict)       # key -> (source, text head, answer) of a kept document
    pairs: list[dict] = field(default_factory=list)   # what was dropped for what, with the estimate
    seconds: float = 0.0                              # spent here, for the manifest (its cost at prepare)

    def check(self, example: Example) -> bool:
        """True if `example` nearly repeats a kept document (then recorded as a pair); else
        False, and it is kept: indexed for the documents after it."""
        started = time.perf_counter()
        try:
            return self._check(example)
        finally:
            self.seconds += time.perf_counter() - started

    def _check(self, example: Example) -> bool:
        from datasketch import LeanMinHash, MinHash, MinHashLSH

        signature = MinHash(num_perm=NUM_PERM, seed=SEED)
        signature.update_batch(shingles(example))
        signature = LeanMinHash(signature)
        where = (example.task, example.lang)
        index = self.indexes.get(where)
        if index is None:
            index = self.indexes[where] = MinHashLSH(threshold=self.threshold, num_perm=NUM_PERM)
        best = None
        for key in index.query(signature):
            similarity = signature.jaccard(self.signatures[key])
            if similarity >= self.threshold and (best is None or similarity > best[1]):
                best = (key, similarity)
        if best is not None:
            kept_source, kept_text, kept_answer = self.sources[best[0]]
            # near-copies that teach different answers (a tweet labelled positive and negative) are
            # label noise in the source: counted, since dedup silently keeps the first answer
            self.pairs.append({"task": example.task, "lang": example.lang, "jaccard_estimate": round(best[1], 3),
                               "dropped": example.source, "kept": kept_source,
                               "answers_differ": " ".join(words(example.answer)) != kept_answer,
                               "dropped_text": head(example), "kept_text": kept_text})
            return True
        key = len(self.signatures)
        index.insert(key, signature)
        self.signatures[key] = signature
        self.sources[key] = (example.source, head(example), " ".join(words(example.answer)))
        return False


    def summary(self, list_name: str) -> dict:
        by_task_lang: dict[str, int] = {}
        for pair in self.pairs:
            key = f"{pair['task']}/{pair['lang']}"
            by_task_lang[key] = by_task_lang.get(key, 0) + 1
        return {"method": f"MinHash-LSH, word {SHINGLE_WORDS}-gram shingles, {NUM_PERM} permutations, per task x language",
                "threshold": self.threshold, "removed": len(self.pairs),
                "answers_differ": sum(pair["answers_differ"] for pair in self.pairs), "by_task_lang": dict(sorted(by_task_lang.items())),
                "documents_indexed": len(self.signatures), "seconds": round(self.seconds, 2), "list": list_name}


def head(example: Example, chars: int = 160) -> str:
    text = f"{example.prompt} {example.answer}".strip()
    return text if len(text) <= chars else text[:chars] + "..."
