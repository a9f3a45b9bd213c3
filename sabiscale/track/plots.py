"""Loss-curve PNGs (matplotlib, headless) from a run's metric history: total, per task, per language.

Written to {output_dir}/plots/ and logged to the MLflow run at the end and at each checkpoint. The
history of the plotted metrics is kept in {output_dir}/plots/history.jsonl, so a resumed run draws
its whole curve, not only the steps since it resumed.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402


TOTALS = ("train/loss", "train/answer_loss", "eval/answer_loss")


def plotted(name: str) -> bool:
    return name in TOTALS or "/loss/task/" in name or "/loss/lang/" in name


class PlotHistory:
    """The plotted metrics of every step so far, by name. With a file (rank 0), each record is
    appended to it, and a resumed run reads back what the steps up to its checkpoint logged (the
    steps after it, which the run replays, are dropped first)."""

    def __init__(self, path: Path | None = None, upto_step: int = 0) -> None:
        self.path = path
        self.series: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self._file = None
        if path is not None:
            self._continue(path, upto_step)
            self._file = path.open("a", encoding="utf-8")  # kept open: a record is appended every step

    def _continue(self, path: Path, upto_step: int) -> None:
        kept = []
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # the last line, torn by a kill: those steps are replayed
                    break
                if entry["step"] <= upto_step and (entry["step"] > 0 or upto_step > 0):
                    kept.append(line)
                    for name, value in entry["metrics"].items():
                        self.series[name].append((entry["step"], value))
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(partial, path)

    def record(self, metrics: dict[str, float], step: int) -> None:
        picked = {name: float(value) for name, value in metrics.items() if plotted(name)}
        for name, value in picked.items():
            self.series[name].append((step, value))
        if self._file is not None and picked:
            self._file.write(json.dumps({"step": step, "metrics": picked}) + "\n")
            self._file.flush()  # a kill loses at most this line (the resume replays its step)


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
    total = {k: v for k, v in history.items() if k in TOTALS}
    # per-task / per-language keys look like "train/loss/task/ner" and "eval/loss/lang/yor"
    written = [_plot(total, "loss", out_dir / "loss.png")]
    for kind in ("task", "lang"):
        picked = {k.rsplit("/", 1)[-1] + (" (eval)" if k.startswith("eval") else ""): v
                  for k, v in history.items() if f"/loss/{kind}/" in k}
        written.append(_plot(picked, f"answer loss per {'task' if kind == 'task' else 'language'}",
                             out_dir / f"loss_per_{kind}.png"))
    return [p for p in written if p is not None]
