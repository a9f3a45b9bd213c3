"""`sabiscale eval`: held-out metrics of a checkpoint, per task and language, as SabiYarn reports them.

Every score comes with the number of records it is computed on (`n`, `examples`) and a bootstrap
95% interval (`<score>_ci`, evaluate/uncertainty.py).

Teacher-forced, every task: answer-token perplexity and bits per byte (nats / ln 2 / UTF-8 bytes
of the answer), so tokenizers can be compared. Generated with greedy decoding from the prompt
(transformers `generate`, KV cache on, stop at the end-of-text token):
- translation: chrF and BLEU (sacrebleu) per direction, beside the chrF of copying the source,
- ner: entity-level F1 (seqeval) per language; the output must be one IOB2 tag per input word,
- sentiment: accuracy and macro-F1 per language; the output must be one known label.
An output that does not parse counts as wrong and is counted in `unparsed`.
Classification tasks (a label answer: sentiment, langid) are also scored by rank classification,
the standard for base models: the label with the highest likelihood given the prompt, on every
scored record, beside the majority-label baseline of the same records (an under-trained model's
label bias does not pass for skill).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import random
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from mlflow.entities import Metric
from tqdm import tqdm

from sabiscale.evaluate.uncertainty import accuracy_of, label_stats, macro_f1_of, scored
from sabiscale.prep.tokenizer import encode_examples, encode_with_literals
from sabiscale.tasks import Example

log = logging.getLogger("sabiscale.eval")

IOB_TAG = re.compile(r"^(O|[BI]-[A-Z]+)$")
SENTIMENT_LABELS = ("positive", "negative", "neutral")
SCORED_SECTIONS = ("teacher_forced", "generation", "classification")


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
               for section in SCORED_SECTIONS for key, scores in report.get(section, {}).items()
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
def answer_nats(lm, tok, examples: list[Example], batch_size: int = 16, bar=None) -> np.ndarray:
    """(records, 3): the answer's summed loss in nats, its tokens and its UTF-8 bytes, per example."""
    rows = np.zeros((len(examples), 3))
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        if bar is not None:
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
            rows[start + row] = (float(nll[row].sum()), int(mask[row, 1:].sum()),
                                 len(example.answer.strip().encode("utf-8")))
    return rows


def teacher_forced(lm, tok, examples: list[Example], seed: int = 0, batch_size: int = 16) -> dict[str, dict]:
    """Per "task/lang": records, answer tokens, bytes, perplexity and bits per byte, with intervals."""
    stats = answer_nats(lm, tok, examples, batch_size, progress(len(examples), "teacher-forced"))
    groups: dict[str, list[int]] = defaultdict(list)
    for i, example in enumerate(examples):
        groups[f"{example.task}/{example.lang}"].append(i)
    out = {}
    for key, rows in sorted(groups.items()):
        group = stats[rows]
        nats, tokens, nbytes = group.sum(axis=0)
        out[key] = {"n": len(rows), "answer_tokens": int(tokens), "answer_bytes": int(nbytes),
                    **scored("perplexity", group, lambda s: math.exp(s[0] / max(s[1], 1)), seed),
                    **scored("bits_per_byte", group, lambda s: s[0] / math.log(2) / max(s[2], 1), seed)}
    return out


def rank_classification(lm, tok, examples: list[Example], labels_by_task: dict[str, list[str]],
                        seed: int = 0) -> dict[str, dict]:
    """Per "task/lang" of a label task: the label with the highest likelihood given the prompt
    (summed over its tokens), accuracy and macro-F1 with intervals, and the majority-label
    baseline of the same records."""
    chosen = [e for e in examples if e.task in labels_by_task]
    candidates = [dataclasses.replace(e, answer=f" {label}", answer_literals=())
                  for e in chosen for label in labels_by_task[e.task]]
    nats = answer_nats(lm, tok, candidates, bar=progress(len(candidates), "rank classification"))[:, 0]
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    at = 0
    for example in chosen:
        labels = labels_by_task[example.task]
        best = labels[int(np.argmin(nats[at:at + len(labels)]))]
        at += len(labels)
        groups[f"{example.task}/{example.lang}"].append((best, example.answer.strip()))
    out = {}
    for key, pairs in sorted(groups.items()):
        predicted, gold = [p for p, _ in pairs], [g for _, g in pairs]
        labels = sorted(set(labels_by_task[key.split("/")[0]]) | set(gold))
        stats = label_stats(predicted, gold, labels)
        out[key] = {"n": len(gold), **scored("rank_accuracy", stats, accuracy_of, seed),
                    **scored("rank_macro_f1", stats, macro_f1_of, seed), **majority_baseline(gold, labels)}
    return out


def majority_baseline(gold: list[str], labels: list[str]) -> dict:
    """Always answering the most frequent label of these records (a constant's best case)."""
    label, count = Counter(gold).most_common(1)[0]
    sums = label_stats([label] * len(gold), gold, labels).sum(axis=0)
    out = {"majority_label": label, "majority_accuracy": count / len(gold), "majority_macro_f1": macro_f1_of(sums),
           "labels_in_slice": len(set(gold))}
    if len(set(gold)) == 1:
        out["caveat"] = f"one label ({label}) in this slice: accuracy and macro-F1 measure label bias, not skill"
    return out


def label_tasks(examples: list[Example], registry) -> dict[str, list[str]]:
    """Task -> its candidate labels, for the tasks whose answer is a label (sentiment: the known
    labels; others: every answer seen among the records)."""
    from sabiscale.tasks import answer_is_label

    out: dict[str, set[str]] = defaultdict(set)
    for e in examples:
        if e.task in registry and answer_is_label(registry[e.task]) and e.task != "ner":
            out[e.task].add(e.answer.strip())
    if "sentiment" in out:
        out["sentiment"] |= set(SENTIMENT_LABELS)
    return {task: sorted(labels) for task, labels in out.items()}


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


def translation_with_intervals(hypotheses: list[str], references: list[str], sources: list[str], seed: int) -> dict:
    """chrF and BLEU from per-sentence statistics (sacrebleu's own bootstrap scheme), and the chrF
    of copying the source, the floor a translation must clear."""
    from sacrebleu.metrics import BLEU, CHRF

    chrf, bleu = CHRF(), BLEU()

    def score_of(metric, hyps):
        stats = np.array(metric._extract_corpus_statistics(hyps, [references]), dtype=np.float64)
        return stats, lambda sums: metric._compute_score_from_stats(list(sums)).score

    out = {}
    for name, metric, hyps in (("chrf", chrf, hypotheses), ("bleu", bleu, hypotheses), ("copy_source_chrf", chrf, sources)):
        stats, score = score_of(metric, hyps)
        out |= scored(name, stats, score, seed)
    return out


def ner_scores(predicted: list[list[str] | None], gold: list[list[str]]) -> dict[str, float]:
    from seqeval.metrics import f1_score

    # an unparsable output predicts no entity at all: every gold entity is then missed
    filled = [p if p is not None else ["O"] * len(g) for p, g in zip(predicted, gold)]
    return {"entity_f1": f1_score(gold, filled), "unparsed": sum(p is None for p in predicted)}


def ner_with_intervals(predicted: list[list[str] | None], gold: list[list[str]], seed: int) -> dict:
    """Entity-level micro F1 (seqeval's) from per-sentence (correct, predicted, gold) entity counts."""
    from seqeval.metrics.sequence_labeling import get_entities

    rows = []
    for p, g in zip(predicted, gold):
        pred = set(get_entities(p if p is not None else ["O"] * len(g)))
        true = set(get_entities(g))
        rows.append((len(pred & true), len(pred), len(true)))
    out = scored("entity_f1", np.array(rows, dtype=np.float64),
                 lambda s: 2 * s[0] / (s[1] + s[2]) if s[1] + s[2] else 0.0, seed)
    return out | {"unparsed": sum(p is None for p in predicted)}


def sentiment_scores(predicted: list[str | None], gold: list[str]) -> dict[str, float]:
    from sklearn.metrics import f1_score

    filled = [p if p is not None else "<unparsed>" for p in predicted]
    accuracy = sum(p == g for p, g in zip(filled, gold)) / len(gold)
    # macro over every real label that occurs in gold or predictions (an unparsed output is only a miss)
    labels = sorted(set(gold) | {p for p in predicted if p is not None})
    macro_f1 = f1_score(gold, filled, labels=labels, average="macro", zero_division=0)
    return {"accuracy": accuracy, "macro_f1": float(macro_f1), "unparsed": sum(p is None for p in predicted)}


def sentiment_with_intervals(predicted: list[str | None], gold: list[str], seed: int) -> dict:
    labels = sorted(set(gold) | {p for p in predicted if p is not None})
    stats = label_stats(predicted, gold, labels)
    return (scored("accuracy", stats, accuracy_of, seed) | scored("macro_f1", stats, macro_f1_of, seed)
            | {"unparsed": sum(p is None for p in predicted)})


def translation_source(example: Example) -> str:
    """The source sentence of a built-in translation prompt (`<translate> {src} {lang_tag}`)."""
    return example.prompt.removeprefix("<translate>").strip().rsplit(" ", 1)[0]


def generation_metrics(lm, tok, examples: list[Example], per_group: int, seed: int) -> dict[str, dict]:
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
        gold = [e.answer.strip() for e in picked]
        longest = max(len(tok.encode(g, add_special_tokens=False)) for g in gold)
        # at most half the context: the prompt needs the rest (lm-eval's rule too, so --harness agrees)
        outputs = greedy_answers(lm, tok, picked, max_new_tokens=min(longest + 8, lm.config.max_position_embeddings // 2))
        task = key.split("/")[0]
        if task == "translation":
            key = f"translation/eng-{key.split('/')[1]}"
        results[key] = {"examples": len(picked), **generated_scores(task, picked, outputs, gold, seed),
                        "samples": [{"prompt": e.prompt, "gold": g, "output": o}
                                    for e, g, o in list(zip(picked, gold, outputs))[:3]]}
    return results


def generated_scores(task: str, picked: list[Example], outputs: list[str], gold: list[str], seed: int) -> dict:
    if task == "translation":
        return translation_with_intervals(outputs, gold, [translation_source(e) for e in picked], seed)
    if task == "descramble":
        stats = np.array([[o.split() == g.split(), 1] for o, g in zip(outputs, gold)], dtype=np.float64)
        return scored("exact_match", stats, lambda s: s[0] / max(s[1], 1), seed)
    if task == "ner":
        n_words = [len(g.split()) for g in gold]
        return ner_with_intervals([parse_ner(o, n) for o, n in zip(outputs, n_words)], [g.split() for g in gold], seed)
    return sentiment_with_intervals([parse_sentiment(o) for o, g in zip(outputs, gold)], gold, seed)
