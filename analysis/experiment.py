"""What the experiment scripts share: running the console script, training a run unless it is
already finished, the validation examples of a corpus (the same split training uses), paired
comparisons over seeds with a decision rule fixed before the runs, the header every results file
starts with (commit and command), steps-to-reach, and loss-curve plots."""
from __future__ import annotations

import math
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "launch" / "recipes" / "shared_data.yaml"


def sabiscale(*argv: str) -> None:
    subprocess.run([str(Path(sys.executable).parent / "sabiscale"), *argv], check=True, cwd=ROOT)


def prepare_unless_done(recipe: Path) -> None:
    """`sabiscale prepare recipe` on a machine that has not written the recipe's shards yet (a
    fresh checkout: runs/ is not committed)."""
    from sabiscale.config import load_config

    data = load_config(recipe, []).data.dir
    if not (ROOT / data / "shards" / "manifest.json").is_file():
        sabiscale("prepare", str(recipe))


def trained(run: Path) -> dict | None:
    """What the run's last complete checkpoint says it was trained with (step, tokens, precision,
    the device that wrote it: None in checkpoints from before it was recorded, the train.max_steps
    its LR schedule decays over), or None before its first checkpoint."""
    from sabiscale.train.checkpoint import latest_complete, read_sidecar

    last = latest_complete(Path(run) / "checkpoints")
    if last is None:
        return None
    meta, _ = read_sidecar(last)
    return {"step": meta["step"], "tokens_seen": meta["tokens_seen"], "flops_seen": meta.get("flops_seen"),
            "precision": meta.get("precision", "fp32"), "device": meta.get("device"),
            "max_steps": meta["config"]["train"]["max_steps"]}


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


def train_time_boxed(recipe: Path, run: Path, steps: int, minutes: float, *overrides: str) -> bool:
    """Train `run` toward `steps` for at most `minutes`: at the limit the run gets SIGTERM, saves a
    checkpoint and exits 75, and the next call continues from it (a budget spread over sessions).
    True once the run has reached `steps`; a finished run is not started again."""
    import signal

    done = trained(run)
    if done is not None and done["step"] >= steps:
        return True
    proc = subprocess.Popen([str(Path(sys.executable).parent / "sabiscale"), "train", str(recipe),
                             f"output_dir={run}", f"train.max_steps={steps}", *overrides], cwd=ROOT)
    try:
        code = proc.wait(timeout=minutes * 60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # checkpoint now, exit 75: the next call resumes there
        code = proc.wait()
    if code not in (0, 75):
        raise SystemExit(f"training {run} failed with exit {code}")
    return code == 0


def held_out_examples(overrides: list[str], split: str = "val") -> list:
    """The examples of one split ("val": the validation shards' records; "heldout": the records
    held out for evaluation) of the recipe with these overrides: never trained on."""
    from sabiscale.config import load_config
    from sabiscale.prep.corpus import load_corpus

    cfg = load_config(RECIPE, overrides)
    return [e for e, _ in load_corpus(cfg, Path(cfg.data.jsonl_root), {split}).examples]


@dataclass(frozen=True)
class DecisionRule:
    """Fixed before the runs and printed in the results file: arm A is *confirmed* better than arm
    B on a measure when every seed agrees in direction and the paired 95% interval of (A - B)
    excludes 0 on A's side; *no effect of interest* when the interval lies inside (-effect,
    +effect); otherwise *not decided* (more seeds would be needed)."""

    measure: str          # what is compared, e.g. "held-out answer loss (nats)"
    effect: float         # the smallest difference that would matter, in the measure's units
    lower_is_better: bool

    def describe(self, fixed_before: bool = True) -> str:
        better = "lower" if self.lower_is_better else "higher"
        when = "fixed before the runs" if fixed_before else "applied after the runs, which predate it"
        return (f"Decision rule ({when}): on {self.measure} ({better} is better), an arm is confirmed "
                f"better when every paired seed agrees in direction and the paired 95% t-interval of the "
                f"difference excludes 0; the effect of interest is {self.effect:g}: an interval inside "
                f"(-{self.effect:g}, +{self.effect:g}) means no effect of interest; anything else is not decided.")


@dataclass(frozen=True)
class Paired:
    n: int
    mean: float            # mean of (A - B) over the paired seeds
    interval: tuple[float, float]
    a_ahead: int           # seeds where A is better
    b_ahead: int


def paired(a: dict, b: dict, lower_is_better: bool) -> Paired:
    """A paired comparison over the seeds both arms ran: differences, their mean, a 95% t-interval
    and the sign count (which arm is better in how many seeds)."""
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    mean = statistics.mean(diffs)
    half = (stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
            if len(diffs) > 1 else math.inf)
    ahead = sum((d < 0) if lower_is_better else (d > 0) for d in diffs)
    behind = sum((d > 0) if lower_is_better else (d < 0) for d in diffs)
    return Paired(len(diffs), mean, (mean - half, mean + half), ahead, behind)


def decide(result: Paired, rule: DecisionRule, names: tuple[str, str]) -> str:
    """The verdict line the rule gives: never written by hand."""
    a, b = names
    low, high = result.interval
    shown = (f"{a} - {b} = {result.mean:+.4f}, paired 95% interval [{low:+.4f}, {high:+.4f}], {result.n} seeds, "
             f"{a} better in {result.a_ahead}, {b} in {result.b_ahead}")
    excludes_zero = low > 0 or high < 0
    if excludes_zero and result.a_ahead == result.n:
        return f"Confirmed: {a} is better than {b} on {rule.measure} ({shown})."
    if excludes_zero and result.b_ahead == result.n:
        return f"Confirmed: {b} is better than {a} on {rule.measure} ({shown})."
    if -rule.effect < low and high < rule.effect:
        return f"No effect of interest (|difference| < {rule.effect:g}) on {rule.measure} ({shown})."
    return f"Not decided on {rule.measure}: the rule needs more seeds ({shown})."


def git_commit() -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    # results pages written just before do not make the code that writes the next one uncommitted
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)analysis/results",
                            ":(exclude)docs/results"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return (commit or "unknown") + (" with uncommitted changes to the code" if dirty else "")


def rendered_line(argv: list[str] | None) -> str:
    """The line naming the command that wrote a results page whole (this process's own command
    line, or the given arguments to its module) and the commit it ran at."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)  # set under `python -m`
    module = spec.name if spec is not None else Path(sys.argv[0]).stem
    args = sys.argv[1:] if argv is None else argv
    return f"Page written by: `.venv/bin/python -m {module} {' '.join(map(shlex.quote, args))}` at commit {git_commit()}  "


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
