"""Sampling the training documents by language and task (see MixConfig for the rule).

Token counts, not document counts, are what the model sees, so the shares are in tokens. A group
(task, language) whose target is above its natural size is repeated whole as often as it fits and
topped up with a seeded choice of its documents; one below is a seeded choice of whole documents.
Nothing is cut, so the realized count is within one document of the target; the manifest keeps
both.
"""
from __future__ import annotations

import random
from collections import defaultdict

from sabiscale.config import MixConfig
from sabiscale.shards.pack import Document
from sabiscale.errors import UserError


def target_tokens(natural: dict[tuple[str, str], int], mix: MixConfig) -> dict[tuple[str, str], float]:
    """(task, lang) -> tokens wanted, for the same total as the corpus."""
    total = sum(natural.values())
    by_lang: dict[str, int] = defaultdict(int)
    for (_, lang), n in natural.items():
        by_lang[lang] += n
    lang_score = {lang: (n / total) ** (1.0 / mix.temperature) * mix.language_weights.get(lang, 1.0)
                  for lang, n in by_lang.items()}
    norm = sum(lang_score.values())
    if norm == 0:
        raise UserError(f"data.mix gives every language weight 0 (languages {sorted(by_lang)})")
    targets = {}
    for lang, score in lang_score.items():
        groups = {key: n * mix.task_weights.get(key[0], 1.0) for key, n in natural.items() if key[1] == lang}
        group_sum = sum(groups.values())
        for key, weighted in groups.items():
            targets[key] = total * score / norm * (weighted / group_sum if group_sum else 0.0)
    return targets


def _sample(docs: list[Document], target: float, rng: random.Random) -> list[Document]:
    size = sum(len(d.ids) for d in docs)
    repeats = int(target // size) if size else 0
    chosen = docs * repeats
    remainder = target - repeats * size
    order = docs[:]
    rng.shuffle(order)
    taken = 0
    for doc in order:
        if taken + len(doc.ids) / 2 > remainder:
            continue
        chosen.append(doc)
        taken += len(doc.ids)
    return chosen


def mix_documents(docs: list[Document], mix: MixConfig, seed: int) -> tuple[list[Document], dict]:
    """The resampled documents (grouped; shuffle them afterwards) and the manifest's `mix` entry."""
    groups: dict[tuple[str, str], list[Document]] = defaultdict(list)
    for doc in docs:
        groups[(doc.task, doc.lang)].append(doc)
    natural = {key: sum(len(d.ids) for d in group) for key, group in sorted(groups.items())}
    targets = target_tokens(natural, mix)
    mixed, report = [], {}
    for key in natural:
        chosen = _sample(groups[key], targets[key], random.Random(f"{seed}:mix:{key[0]}/{key[1]}"))
        mixed += chosen
        report[f"{key[0]}/{key[1]}"] = {"natural_tokens": natural[key], "target_tokens": round(targets[key]),
                                        "realized_tokens": sum(len(d.ids) for d in chosen),
                                        "documents": len(groups[key]), "realized_documents": len(chosen)}
    realized_total = sum(r["realized_tokens"] for r in report.values()) or 1
    by_lang: dict[str, dict[str, float]] = defaultdict(lambda: {"natural_share": 0.0, "realized_share": 0.0})
    natural_total = sum(natural.values())
    for key, r in report.items():
        lang = key.split("/", 1)[1]
        by_lang[lang]["natural_share"] += r["natural_tokens"] / natural_total
        by_lang[lang]["realized_share"] += r["realized_tokens"] / realized_total
    entry = {"temperature": mix.temperature, "task_weights": dict(mix.task_weights),
             "language_weights": dict(mix.language_weights), "by_task_lang": report,
             "by_language": {lang: {k: round(v, 6) for k, v in shares.items()} for lang, shares in sorted(by_lang.items())}}
    return mixed, entry
