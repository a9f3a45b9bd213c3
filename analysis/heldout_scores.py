"""Held-out scores of a trained run, the same for every experiment that compares runs: on the
clean held-out records of the run's data (never in a training shard, no exact or 13-gram overlap
with training), answer loss per task, sentiment by rank classification with bootstrap intervals
against the majority label, translation chrF against copying the source; and the three measures
the experiments decide on."""
from __future__ import annotations

import json
import time
from pathlib import Path

from sabiscale_analysis.experiment import trained


def heldout_sets(run: Path, records_of=None):
    """(config, {task: [clean examples]}, contamination): every clean held-out record of the run's
    data, or of the data `records_of` (a RunConfig) names: runs trained on parts of one data set
    (data.hold_back) are then scored on the same records, clean of all of its training records."""
    from collections import defaultdict

    from sabiscale.evaluate.commands import check_contamination, training_fingerprints
    from sabiscale.prep.commands import data_root
    from sabiscale.prep.corpus import load_corpus
    from sabiscale.tasks import task_registry
    from sabiscale.train.checkpoint import read_sidecar, resolve_checkpoint

    cfg = records_of if records_of is not None else read_sidecar(resolve_checkpoint(run / "checkpoints"))[1]
    examples = [e for e, _ in load_corpus(cfg, data_root(cfg, None), {"heldout"}).examples]
    contamination, clean = check_contamination(examples, training_fingerprints(cfg), task_registry(cfg.data.task_defs))
    by_task = defaultdict(list)
    for e in clean:
        by_task[e.task].append(e)
    return cfg, dict(by_task), contamination


def loss_sample(by_task: dict, per_group: int) -> list:
    """Up to `per_group` per task and language, picked by a fixed seed: the same records for
    every run of the same data."""
    import random
    from collections import defaultdict

    groups = defaultdict(list)
    for examples in by_task.values():
        for e in examples:
            groups[(e.task, e.lang)].append(e)
    rng = random.Random(0)
    return [e for key in sorted(groups) for e in rng.sample(groups[key], min(per_group, len(groups[key])))]


def score_run(run: Path, loss_records: int, translations: int, ner_records: int = 0, records_of=None) -> dict:
    """The held-out scores of a run's last checkpoint (cached in the run as heldout_scores.json):
    answer loss per task on up to `loss_records` per task and language, sentiment by rank
    classification on every clean record, translation chrF on `translations` per direction, and
    with `ner_records`, entity F1 of greedy NER generation on that many per language. `records_of`:
    see heldout_sets."""
    from sabiscale.evaluate.heldout import answer_nats, generation_metrics, label_tasks, rank_classification
    from sabiscale.model.build import for_inference
    from sabiscale.runtime import eval_device
    from sabiscale.tasks import task_registry
    from sabiscale.train.checkpoint import load_trained_lm, resolve_checkpoint

    out = run / "heldout_scores.json"
    if out.is_file():
        cached = json.loads(out.read_text())
        # else the run trained on since (or NER is asked for and not there): scored again
        if cached["step"] == trained(run)["step"] and (not ner_records or "ner" in cached):
            return cached
    started = time.time()
    cfg, by_task, contamination = heldout_sets(run, records_of)
    lm, tok, meta = load_trained_lm(resolve_checkpoint(run / "checkpoints"))
    lm = for_inference(lm, eval_device())
    sample = loss_sample(by_task, loss_records)
    stats = answer_nats(lm, tok, sample)
    answer_loss = {}
    for task in sorted({e.task for e in sample}):
        rows = stats[[i for i, e in enumerate(sample) if e.task == task]]
        answer_loss[task] = {"records": len(rows), "nats_per_token": float(rows[:, 0].sum() / rows[:, 1].sum())}
    sentiment = by_task.get("sentiment", [])
    registry = task_registry(cfg.data.task_defs)
    classification = rank_classification(lm, tok, sentiment, label_tasks(sentiment, registry), cfg.seed)
    translation = generation_metrics(lm, tok, by_task.get("translation", []), translations, seed=0)
    for scores in translation.values():
        scores.pop("samples", None)
    report = {"step": meta["step"], "trained": trained(run), "answer_loss": answer_loss,
              "sentiment": classification, "translation": translation, "contamination": contamination}
    if ner_records:
        report["ner"] = generation_metrics(lm, tok, by_task.get("ner", []), ner_records, seed=0)
    report["seconds"] = round(time.time() - started)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def measures(report: dict) -> dict[str, float]:
    """The three decided measures of one run: answer loss (mean over tasks), sentiment macro-F1
    (mean over languages), translation chrF (mean over directions)."""
    loss = [v["nats_per_token"] for v in report["answer_loss"].values()]
    f1 = [v["rank_macro_f1"] for v in report["sentiment"].values()]
    chrf = [v["chrf"] for v in report["translation"].values()]
    return {"answer_loss": sum(loss) / len(loss), "sentiment": sum(f1) / max(len(f1), 1),
            "chrf": sum(chrf) / max(len(chrf), 1)}
