"""`sabiscale eval`: held-out metrics of a checkpoint, per task and language, as SabiYarn reports them.

Teacher-forced, every task: answer-token perplexity and bits per byte (nats / ln 2 / UTF-8 bytes
of the answer), so tokenizers can be compared. Generated with greedy decoding from the prompt
(transformers `generate`, KV cache on, stop at the end-of-text token):
- translation: chrF and BLEU (sacrebleu) per direction,
- ner: entity-level F1 (seqeval) per language; the output must be one IOB2 tag per input word,
- sentiment: accuracy and macro-F1 per language; the output must be one known label.
An output that does not parse counts as wrong and is counted in `unparsed`.
"""
from __future__ import annotations

import logging
import math
import random
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from mlflow.entities import Metric
from tqdm import tqdm

from sabiscale.prep.tasks import Example
from sabiscale.prep.tokenizer import encode_examples, encode_with_literals

log = logging.getLogger("sabiscale.eval")

IOB_TAG = re.compile(r"^(O|[BI]-[A-Z]+)$")
SENTIMENT_LABELS = ("positive", "negative", "neutral")


@dataclass
class Held:
    example: Example
    reference: object  # the parsed gold answer: text, list of tags or a label


def progress(total: int, what: str):
    """A bar with ETA on a terminal; plain start lines in logs and pipes."""
    interactive = sys.stderr.isatty()
    if not interactive:
        log.info("%s: %d examples", what, total)
    return tqdm(total=total, desc=what, unit="ex", disable=not interactive, dynamic_ncols=True)


def log_eval(cfg, meta: dict, report: dict, files: list) -> str | None:
    """The scores into the MLflow run that trained the checkpoint, at its step (metrics
    `<split>/<task>/<lang>/<score>`, the report files as artifacts); None where there is none."""
    from sabiscale.track.journal import recorded_run_id

    # a checkpoint saved while the store was down knows no run; the run's journal may, since
    run_id = meta.get("mlflow_run_id") or recorded_run_id(cfg.output_dir)
    if not run_id or not cfg.tracking.enabled:
        return None
    from mlflow.tracking import MlflowClient

    from sabiscale.track.tracking import default_tracking_uri

    uri = cfg.tracking.uri or default_tracking_uri(cfg.output_dir)
    metrics = {f"{report['split']}/{key}/{name}": float(value)
               for section in ("teacher_forced", "generation") for key, scores in report[section].items()
               for name, value in scores.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}
    try:
        client = MlflowClient(tracking_uri=uri)
        client.log_batch(run_id, metrics=[Metric(k, v, int(time.time() * 1000), report["step"]) for k, v in metrics.items()])
        for path in files:
            client.log_artifact(run_id, str(path), "eval")
    except Exception as err:  # noqa: BLE001 - the report is on disk either way
        log.warning("could not log the scores to MLflow run %s at %s (%s); the report files hold them", run_id, uri, err)
        return None
    return run_id


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def teacher_forced(lm, tok, examples: list[Example], batch_size: int = 16) -> dict[str, dict[str, float]]:
    """Per "task/lang": answer tokens, bytes, perplexity and bits per byte."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0])  # nats, tokens, bytes
    bar = progress(len(examples), "teacher-forced")
    for chunk in _batches(examples, batch_size):
        bar.update(len(chunk))
        docs = encode_examples(tok, chunk)
        width = max(len(ids) for ids, _ in docs)
        # right padding: causal attention never looks right, so padding changes nothing before it
        ids = torch.full((len(docs), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(docs), width), dtype=torch.bool)
        for row, (d_ids, d_mask) in enumerate(docs):
            ids[row, :len(d_ids)] = torch.from_numpy(d_ids.astype(np.int64))
            mask[row, :len(d_mask)] = torch.from_numpy(d_mask.astype(bool))
        ids, mask = ids.to(lm.device), mask.to(lm.device)
        logits = lm(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none") * mask[:, 1:]
        for row, example in enumerate(chunk):
            entry = totals[f"{example.task}/{example.lang}"]
            entry[0] += float(nll[row].sum())
            entry[1] += int(mask[row, 1:].sum())
            entry[2] += len(example.answer.strip().encode("utf-8"))
    return {key: {"answer_tokens": n, "answer_bytes": b, "perplexity": math.exp(nats / max(n, 1)),
                  "bits_per_byte": nats / math.log(2) / max(b, 1)} for key, (nats, n, b) in sorted(totals.items())}


@torch.no_grad()
def greedy_answers(lm, tok, examples: list[Example], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Decode each prompt greedily until the end-of-text token; returns the answer text."""
    outputs = []
    for chunk in _batches(examples, batch_size):
        enc = left_padded(tok, [prompt_ids(tok, e) for e in chunk], lm.device)
        generated = lm.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        new = generated[:, enc["input_ids"].shape[1]:]
        outputs += [tok.decode(row, skip_special_tokens=True).strip() for row in new]
    return outputs


def prompt_ids(tok, example: Example) -> list[int]:
    """The prompt's ids as training saw them: tag strings in the user's text stay text."""
    if example.prompt_literals:
        return encode_with_literals(tok.backend_tokenizer, example.prompt, example.prompt_literals)
    return tok.backend_tokenizer.encode(example.prompt, add_special_tokens=False).ids


def left_padded(tok, rows: list[list[int]], device) -> dict[str, torch.Tensor]:
    """Generation continues from the right edge of every row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention[i, width - len(row):] = 1
    return {"input_ids": ids.to(device), "attention_mask": attention.to(device)}


@torch.no_grad()
def generate_text(lm, tok, prompt: str, max_new_tokens: int) -> str:
    """A prompt's greedy continuation, until the end-of-text token."""
    return greedy_answers(lm, tok, [Example("prompt", "", prompt, "", "command line")], max_new_tokens, 1)[0]


def parse_ner(output: str, n_words: int) -> list[str] | None:
    tags = output.split()
    return tags if len(tags) == n_words and all(IOB_TAG.match(t) for t in tags) else None


def parse_sentiment(output: str) -> str | None:
    label = output.strip().lower()
    return label if label in SENTIMENT_LABELS else None


def translation_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    import sacrebleu

    return {"chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
            "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score}


def ner_scores(predicted: list[list[str] | None], gold: list[list[str]]) -> dict[str, float]:
    from seqeval.metrics import f1_score

    # an unparsable output predicts no entity at all: every gold entity is then missed
    filled = [p if p is not None else ["O"] * len(g) for p, g in zip(predicted, gold)]
    return {"entity_f1": f1_score(gold, filled), "unparsed": sum(p is None for p in predicted)}


def sentiment_scores(predicted: list[str | None], gold: list[str]) -> dict[str, float]:
    from sklearn.metrics import f1_score

    filled = [p if p is not None else "<unparsed>" for p in predicted]
    accuracy = sum(p == g for p, g in zip(filled, gold)) / len(gold)
    # macro over every real label that occurs in gold or predictions (an unparsed output is only a miss)
    labels = sorted(set(gold) | {p for p in predicted if p is not None})
    macro_f1 = f1_score(gold, filled, labels=labels, average="macro", zero_division=0)
    return {"accuracy": accuracy, "macro_f1": float(macro_f1), "unparsed": sum(p is None for p in predicted)}


def generation_metrics(lm, tok, examples: list[Example], per_group: int, seed: int) -> dict[str, dict[str, float]]:
    """Per "task/lang" (translation: "translation/eng-<lang>"), at most `per_group` examples each."""
    groups: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        if e.task in ("translation", "ner", "sentiment", "descramble"):
            groups[f"{e.task}/{e.lang}"].append(e)
    rng = random.Random(seed)
    results = {}
    bar = progress(sum(min(per_group, len(g)) for g in groups.values()), "decoding")
    for key, group in sorted(groups.items()):
        picked = rng.sample(group, min(per_group, len(group)))
        bar.set_postfix_str(key)
        bar.update(len(picked))
        task = key.split("/")[0]
        gold = [e.answer.strip() for e in picked]
        longest = max(len(tok.encode(g, add_special_tokens=False)) for g in gold)
        # at most half the context: the prompt needs the rest (lm-eval's rule too, so --harness agrees)
        outputs = greedy_answers(lm, tok, picked, max_new_tokens=min(longest + 8, lm.config.max_position_embeddings // 2))
        if task == "translation":
            scores = translation_scores(outputs, gold)
            key = f"translation/eng-{key.split('/')[1]}"
        elif task == "descramble":
            scores = {"exact_match": sum(o.split() == g.split() for o, g in zip(outputs, gold)) / len(gold)}
        elif task == "ner":
            n_words = [len(g.split()) for g in gold]
            scores = ner_scores([parse_ner(o, n) for o, n in zip(outputs, n_words)], [g.split() for g in gold])
        else:
            scores = sentiment_scores([parse_sentiment(o) for o in outputs], gold)
        results[key] = {"examples": len(picked), **scores,
                        "samples": [{"prompt": e.prompt, "gold": g, "output": o}
                                    for e, g, o in list(zip(picked, gold, outputs))[:3]]}
    return results
