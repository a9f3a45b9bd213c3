"""Sampling the training documents by language and task (see MixConfig for the rule).

Shares are counted in `data.mix.unit`: tokens by default (what the model sees), or UTF-8 bytes or
words of the raw text (so a language the tokenizer splits into many tokens is not taken for a
large one and sampled down). A group
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


def measure(doc: Document, unit: str) -> int:
    return {"tokens": len(doc.ids), "bytes": doc.text_bytes, "words": doc.text_words}[unit]


def _sample(docs: list[Document], target: float, rng: random.Random, unit: str) -> list[Document]:
    size = sum(measure(d, unit) for d in docs)
    repeats = int(target // size) if size else 0
    chosen = docs * repeats
    remainder = target - repeats * size
    order = docs[:]
    rng.shuffle(order)
    taken = 0
    for doc in order:
        if taken + measure(doc, unit) / 2 > remainder:
            continue
        chosen.append(doc)
        taken += measure(doc, unit)
    return chosen


def mix_documents(docs: list[Document], mix: MixConfig, seed: int) -> tuple[list[Document], dict]:
    """The resampled documents (grouped; shuffle them afterwards) and the manifest's `mix` entry."""
    groups: dict[tuple[str, str], list[Document]] = defaultdict(list)
    for doc in docs:
        groups[(doc.task, doc.lang)].append(doc)
    unit = mix.unit
    natural = {key: sum(measure(d, unit) for d in group) for key, group in sorted(groups.items())}
    targets = target_tokens(natural, mix)
    mixed, report = [], {}
    for key in natural:
        chosen = _sample(groups[key], targets[key], random.Random(f"{seed}:mix:{key[0]}/{key[1]}"), unit)
        mixed += chosen
        report[f"{key[0]}/{key[1]}"] = {f"natural_{unit}": natural[key], f"target_{unit}": round(targets[key]),
                                        f"realized_{unit}": sum(measure(d, unit) for d in chosen),
                                        "natural_tokens": sum(len(d.ids) for d in groups[key]),
                                        "realized_tokens": sum(len(d.ids) for d in chosen),
                                        "documents": len(groups[key]), "realized_documents": len(chosen)}
    entry = {"unit": unit, "temperature": mix.temperature, "task_weights": dict(mix.task_weights),
             "language_weights": dict(mix.language_weights), "by_task_lang": report,
             "by_language": language_shares(report, unit)}
    return mixed, entry


def language_shares(report: dict[str, dict], unit: str) -> dict[str, dict[str, float]]:
    """Per language: natural and realized share, in the mixing unit and (if another) in tokens."""
    units = dict.fromkeys([unit, "tokens"])
    totals = {f"{side}_{u}": sum(r[f"{side}_{u}"] for r in report.values()) or 1
              for u in units for side in ("natural", "realized")}
    by_lang: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for key, r in report.items():
        lang = key.split("/", 1)[1]
        for u in units:
            suffix = "" if u == unit else f"_{u}"
            by_lang[lang][f"natural_share{suffix}"] += r[f"natural_{u}"] / totals[f"natural_{u}"]
            by_lang[lang][f"realized_share{suffix}"] += r[f"realized_{u}"] / totals[f"realized_{u}"]
    return {lang: {k: round(v, 6) for k, v in shares.items()} for lang, shares in sorted(by_lang.items())}
