"""What the lm-evaluation-harness task configs of `sabiscale eval --harness` call (their utils.py
re-exports this module): dev records of task-layout JSONL (<root>/<task>/<file>.jsonl) made into sabiscale's own
prompts (the renderer that writes the shards), and the scores computed by the functions
`sabiscale eval` uses, so both report the same numbers for the same outputs."""
from __future__ import annotations

import math

from sabiscale.evaluate.heldout import (ner_scores, parse_ner, parse_sentiment, sentiment_scores,
                                        translation_scores)
from sabiscale.tasks import BUILTIN_TASKS, EOS, render


def _docs(dataset, task: str):
    def as_doc(record: dict, index: int) -> dict:
        example = render(task, BUILTIN_TASKS[task], dict(record), f"harness:{index}", [], 0)
        return {"prompt": example.prompt, "answer": example.answer.strip(), "target": example.answer + EOS}

    # the data files hold only the held-out, clean records (sabiscale/evaluate/harness.py)
    return dataset.map(as_doc, with_indices=True)


def translation_docs(dataset):
    return _docs(dataset, "translation")


def ner_docs(dataset):
    return _docs(dataset, "ner")


def sentiment_docs(dataset):
    return _docs(dataset, "sentiment")


def text_docs(dataset):
    return _docs(dataset, "text")


def _output(results: list[str]) -> str:
    return results[0].split(EOS)[0].strip()


def translation_results(doc: dict, results: list[str]) -> dict:
    pair = (_output(results), doc["answer"])
    return {"chrf": pair, "bleu": pair}


def ner_results(doc: dict, results: list[str]) -> dict:
    return {"entity_f1": (_output(results), doc["answer"])}


def sentiment_results(doc: dict, results: list[str]) -> dict:
    pair = (_output(results), doc["answer"])
    return {"accuracy": pair, "macro_f1": pair}


def text_results(doc: dict, results: list) -> dict:
    loglikelihood = results[0][0]
    return {"bits_per_byte": (loglikelihood, len(doc["answer"].encode("utf-8")))}


def chrf(items) -> float:
    return translation_scores([o for o, _ in items], [g for _, g in items])["chrf"]


def bleu(items) -> float:
    return translation_scores([o for o, _ in items], [g for _, g in items])["bleu"]


def entity_f1(items) -> float:
    return ner_scores([parse_ner(o, len(g.split())) for o, g in items], [g.split() for _, g in items])["entity_f1"]


def accuracy(items) -> float:
    return sentiment_scores([parse_sentiment(o) for o, _ in items], [g for _, g in items])["accuracy"]


def macro_f1(items) -> float:
    return sentiment_scores([parse_sentiment(o) for o, _ in items], [g for _, g in items])["macro_f1"]


def bits_per_byte(items) -> float:
    return -sum(ll for ll, _ in items) / math.log(2) / max(sum(n for _, n in items), 1)
