"""How sure a score is: a seeded bootstrap over the scored records.

Every score here is a function of per-record sums (token losses, chrF/BLEU n-gram statistics,
entity counts, label counts), so one resample is a sum over resampled rows: the same scheme as
sacrebleu's paired bootstrap, 1000 resamples, the 2.5th and 97.5th percentiles.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95


def bootstrap(stats: np.ndarray, score: Callable[[np.ndarray], float], seed: int,
              resamples: int = RESAMPLES) -> tuple[float, list[float]]:
    """(score of all rows, [low, high] 95% interval): `stats` is (records, k); `score` maps a
    column sum (k,) to a number."""
    stats = np.asarray(stats, dtype=np.float64)
    point = float(score(stats.sum(axis=0)))
    if len(stats) < 2:
        return point, [point, point]
    rows = np.random.default_rng(seed).integers(0, len(stats), size=(resamples, len(stats)))
    values = np.array([score(stats[r].sum(axis=0)) for r in rows])
    tail = (1 - LEVEL) / 2
    return point, [float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))]


def scored(name: str, stats: np.ndarray, score: Callable[[np.ndarray], float], seed: int) -> dict[str, object]:
    """{name: value, name_ci: [low, high]}."""
    point, interval = bootstrap(stats, score, seed)
    return {name: point, f"{name}_ci": interval}


def label_stats(predicted: list[str | None], gold: list[str], labels: list[str]) -> np.ndarray:
    """Per record: 1, correct, then (true positive, predicted, gold) for each label."""
    rows = np.zeros((len(gold), 2 + 3 * len(labels)))
    for i, (p, g) in enumerate(zip(predicted, gold)):
        rows[i, :2] = (1, p == g)
        for j, label in enumerate(labels):
            rows[i, 2 + 3 * j:5 + 3 * j] = (p == g == label, p == label, g == label)
    return rows


def accuracy_of(sums: np.ndarray) -> float:
    return float(sums[1] / max(sums[0], 1))


def macro_f1_of(sums: np.ndarray) -> float:
    """Macro-F1 over every label that occurs in gold or predictions of these rows (an unparsed
    output is only a miss)."""
    f1s = []
    for j in range((len(sums) - 2) // 3):
        tp, pred, gold = sums[2 + 3 * j:5 + 3 * j]
        if pred + gold:
            f1s.append(2 * tp / (pred + gold))
    return float(np.mean(f1s)) if f1s else 0.0
