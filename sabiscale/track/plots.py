"""Loss-curve PNGs (matplotlib, headless) from a run's metric history: total, per task, per language.

Written to {output_dir}/plots/ and logged to the MLflow run at the end and at each checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402


def _plot(series: dict[str, list[tuple[int, float]]], title: str, path: Path) -> Path | None:
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, points in sorted(series.items()):
        steps, values = zip(*points)
        style = "--" if "eval" in label else "-"
        ax.plot(steps, values, style, label=label, marker="." if len(points) < 30 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def loss_plots(history: dict[str, list[tuple[int, float]]], out_dir: Path) -> list[Path]:
    """One PNG each: total (train and eval), per task, per language; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    total = {k: v for k, v in history.items() if k in ("train/loss", "train/answer_loss", "eval/answer_loss")}
    # per-task / per-language keys look like "train/loss/task/ner" and "eval/loss/lang/yor"
    written = [_plot(total, "loss", out_dir / "loss.png")]
    for kind in ("task", "lang"):
        picked = {k.rsplit("/", 1)[-1] + (" (eval)" if k.startswith("eval") else ""): v
                  for k, v in history.items() if f"/loss/{kind}/" in k}
        written.append(_plot(picked, f"answer loss per {'task' if kind == 'task' else 'language'}",
                             out_dir / f"loss_per_{kind}.png"))
    return [p for p in written if p is not None]
