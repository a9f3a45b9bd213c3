"""What the experiment scripts share: running the console script, training a run unless it is
already finished, the held-out examples of a corpus (the same hash split training uses),
steps-to-reach, and loss-curve plots."""
from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "launch" / "recipes" / "shared_data.yaml"


def sabiscale(*argv: str) -> None:
    subprocess.run([str(Path(sys.executable).parent / "sabiscale"), *argv], check=True, cwd=ROOT)


def trained(run: Path) -> dict | None:
    """What the run's last complete checkpoint says it was trained with (step, tokens, precision),
    or None before its first checkpoint."""
    from sabiscale.train.checkpoint import latest_complete, read_sidecar

    last = latest_complete(Path(run) / "checkpoints")
    if last is None:
        return None
    meta, _ = read_sidecar(last)
    return {"step": meta["step"], "tokens_seen": meta["tokens_seen"], "precision": meta.get("precision", "fp32")}


def train_unless_done(recipe: Path, *overrides: str) -> None:
    """`sabiscale train recipe overrides...`, skipped when the run (output_dir=) already has a
    checkpoint at train.max_steps: a resumed experiment would otherwise build an engine for each
    finished run (~15-20 s here) only to find nothing to do. A stopped run continues as usual."""
    given = dict(o.split("=", 1) for o in overrides)
    done = trained(Path(given["output_dir"]))
    if done is not None and "train.max_steps" in given and done["step"] >= int(given["train.max_steps"]):
        print(f"{given['output_dir']}: already trained to step {done['step']}", flush=True)
        return
    sabiscale("train", str(recipe), *overrides)


def held_out_examples(overrides: list[str]) -> list:
    """The validation-split examples of the recipe with these overrides (never trained on)."""
    from sabiscale.config import load_config
    from sabiscale.prep.corpus import is_validation, load_corpus

    cfg = load_config(RECIPE, overrides)
    return [e for e, where in load_corpus(cfg, Path(cfg.data.jsonl_root)).examples
            if is_validation(where, cfg.data.val_fraction)]


def answer_loss_curve(run: Path) -> dict[int, float]:
    """eval/answer_loss per step of a run tracked in its own directory's store (every MLflow run there)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    found = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    return {m.step: m.value for r in found for m in client.get_metric_history(r.info.run_id, "eval/answer_loss")}


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (0 for a single seed)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def steps_to_reach(curve: dict[int, float], target: float) -> int | None:
    return next((s for s in sorted(curve) if curve[s] <= target), None)


def plot_curves(curves: dict[str, dict[int, float]], path: Path, ylabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot(sorted(curve), [curve[s] for s in sorted(curve)], marker="o", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_comparison(lines: list[str], runs: tuple[str, str], labels: tuple[str, str], categories: dict,
                     curves: dict[str, dict[int, float]], curve_title: str, plot: Path, report: Path, out: Path) -> None:
    """Finish a two-run results page: trajectory categories as table rows, the curve table, the
    plot and the trajectory report link; write it to `out` and print it."""
    a, b = runs
    for name in ("L->L", "H->L", "H->H", "L->H"):
        lines.append(f"| probe tokens {name} | {categories[a][name]:.1%} | {categories[b][name]:.1%} |")
    lines += ["", f"{curve_title}:\n", f"| step | {labels[0]} | {labels[1]} |", "|---:|---:|---:|"]
    for step in sorted(curves[a]):
        lines.append(f"| {step} | {curves[a][step]:.3f} | {curves[b].get(step, float('nan')):.3f} |")
    link = report.relative_to(out.parent)
    lines += ["", f"![{curve_title}]({plot.name})", "",
              f"Token-level trajectories of both runs: [{link}]({link})"]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
