"""Token-level loss trajectories (Rho-1's L->L, H->L, H->H, L->H), per run and side by side.

Input: what `train.probe_every` leaves in a run directory (probe/meta.npz, probe/loss_*.npy; see
sabiscale/track/probe.py). Method, after Rho-1 ("Not All Tokens Are What You Need", section 2):
- x = training progress of each probe point, step / last step (0..1), so a slope is the change of
  a token's loss over the whole run;
- each token's losses are fitted with a least-squares line over x;
- slope < -threshold: H->L (the token was learned); slope > +threshold: L->H (it got worse);
- otherwise flat: H->H if the token's final loss is above the mean final loss of all probe tokens,
  else L->L.
The threshold (default 0.2 nats) and the x axis (`fraction` or `ordinal`: probe index scaled to
0..1, the same unless probes are unevenly spaced) are options of `sabiscale analyze`.

Outputs, in `<run>/analysis/` (or `--out`): report.md with the category fractions, the mean loss
of each category over training, breakdowns per task, per language and by position in the answer,
example tokens decoded with context, and PNG plots; the same files are logged to each run's
MLflow run under analysis/. With several runs (same probe, e.g. masked vs clm, or two selective
ratios) the report compares them side by side.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sabiscale.errors import MissingInput, UserError

CATEGORIES = ("L->L", "H->L", "H->H", "L->H")
POSITION_BINS = ((0, 0, "first"), (1, 3, "2-4"), (4, 15, "5-16"), (16, 1 << 30, "17+"))


@dataclass
class Trajectories:
    run_dir: Path
    steps: np.ndarray    # (S,)
    losses: np.ndarray   # (S, N) float32
    meta: dict           # probe metadata arrays (sabiscale/track/probe.py)

    @property
    def name(self) -> str:
        return self.run_dir.name


def load_trajectories(run_dir: Path, from_step: int = 0) -> Trajectories:
    """The probe losses of a run, from probe point `from_step` on (a window: Rho-1 measured its
    categories while continuing to pre-train a trained model, not from random initialisation)."""
    run_dir = Path(run_dir)
    probe = run_dir / "probe"
    if not (probe / "meta.npz").is_file():
        raise MissingInput(f"{probe}/meta.npz does not exist: train the run with train.probe_every=N "
                                "(e.g. 10) to record per-token probe losses")
    files = [f for f in sorted(probe.glob("loss_*.npy")) if int(f.stem.split("_")[1]) >= from_step]
    if len(files) < 2:
        raise UserError(f"{probe} holds {len(files)} probe point(s) from step {from_step} on; trajectories need at "
                        "least 2 (probe more often with train.probe_every, or start the window earlier)")
    meta = dict(np.load(probe / "meta.npz", allow_pickle=False))
    steps = np.array([int(f.stem.split("_")[1]) for f in files])
    losses = np.stack([np.load(f, allow_pickle=False).astype(np.float32) for f in files])
    if losses.shape[1] != len(meta["token_id"]):
        raise UserError(f"{probe}: loss arrays hold {losses.shape[1]} tokens but meta.npz describes "
                         f"{len(meta['token_id'])}; the probe directory mixes two runs")
    return Trajectories(run_dir, steps, losses, meta)


def slopes(traj: Trajectories, x_axis: str = "fraction") -> np.ndarray:
    """(N,) least-squares slope of each token's loss over x in [0, 1]."""
    if x_axis == "fraction":  # progress through the window: 0 at its first probe point, 1 at its last
        x = (traj.steps - traj.steps.min()) / max(traj.steps.max() - traj.steps.min(), 1)
    elif x_axis == "ordinal":
        x = np.arange(len(traj.steps)) / max(len(traj.steps) - 1, 1)
    else:
        raise UserError(f"x axis {x_axis!r} is not 'fraction' or 'ordinal'")
    xc = x - x.mean()
    return (xc[:, None] * (traj.losses - traj.losses.mean(axis=0))).sum(axis=0) / (xc ** 2).sum()


def classify(traj: Trajectories, threshold: float = 0.2, x_axis: str = "fraction") -> np.ndarray:
    """(N,) category index into CATEGORIES for every probe token."""
    slope = slopes(traj, x_axis)
    final = traj.losses[-1]
    out = np.where(final > final.mean(), CATEGORIES.index("H->H"), CATEGORIES.index("L->L"))
    out = np.where(slope < -threshold, CATEGORIES.index("H->L"), out)
    return np.where(slope > threshold, CATEGORIES.index("L->H"), out)


def fractions(categories: np.ndarray, keep: np.ndarray | None = None) -> dict[str, float]:
    sel = categories if keep is None else categories[keep]
    n = max(len(sel), 1)
    return {c: float((sel == i).sum()) / n for i, c in enumerate(CATEGORIES)}


def breakdowns(traj: Trajectories, categories: np.ndarray) -> dict[str, dict[str, dict[str, float]]]:
    """{"task"|"language"|"answer position": {group: {category: fraction, "tokens": n}}}."""
    meta = traj.meta
    out: dict[str, dict] = {"task": {}, "language": {}, "answer position": {}}
    for key, ids, names in (("task", meta["task"], meta["task_names"]), ("language", meta["lang"], meta["lang_names"])):
        for i, name in enumerate(names):
            keep = ids == i
            if keep.any():
                out[key][str(name)] = {**fractions(categories, keep), "tokens": int(keep.sum())}
    for low, high, label in POSITION_BINS:
        keep = (meta["answer_position"] >= low) & (meta["answer_position"] <= high)
        if keep.any():
            out["answer position"][label] = {**fractions(categories, keep), "tokens": int(keep.sum())}
    return out


def examples(traj: Trajectories, categories: np.ndarray, tokenizer, per_category: int = 5, context: int = 6) -> dict:
    """Decoded examples per category: the tokens whose loss changed most in that direction."""
    meta, slope = traj.meta, slopes(traj)
    out = {}
    for i, name in enumerate(CATEGORIES):
        members = np.flatnonzero(categories == i)
        order = members[np.argsort(slope[members])]  # most learned first
        if name == "L->H":
            order = order[::-1]
        picked = []
        for k in order[:per_category]:
            ids = meta["input_ids"][meta["batch"][k], meta["row"][k]]
            col = meta["col"][k]
            before = tokenizer.decode(ids[max(0, col - context):col].tolist())
            token = tokenizer.decode([int(ids[col])])
            picked.append({"context": before, "token": token, "first_loss": float(traj.losses[0, k]),
                           "final_loss": float(traj.losses[-1, k])})
        out[name] = picked
    return out


def category_curves(traj: Trajectories, categories: np.ndarray) -> dict[str, np.ndarray]:
    return {c: traj.losses[:, categories == i].mean(axis=1) for i, c in enumerate(CATEGORIES) if (categories == i).any()}


def check_same_probe(runs: list[Trajectories]) -> None:
    first = runs[0]
    for other in runs[1:]:
        if not np.array_equal(first.meta["token_id"], other.meta["token_id"]):
            raise UserError(f"{first.run_dir} and {other.run_dir} were probed on different tokens; compare runs "
                             "prepared from the same shards, seed and train.micro_batch_size / probe_batches")


def plot_run(traj: Trajectories, categories: np.ndarray, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in category_curves(traj, categories).items():
        ax.plot(traj.steps, curve, marker="o", label=f"{name} ({(categories == CATEGORIES.index(name)).mean():.0%})")
    ax.set_xlabel("step")
    ax.set_ylabel("mean probe token loss")
    ax.set_title(f"{traj.name}: loss per trajectory category")
    ax.legend()
    path = out_dir / f"categories_{traj.name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def plot_comparison(runs: list[Trajectories], cats: list[np.ndarray], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for traj in runs:
        left.plot(traj.steps, traj.losses.mean(axis=1), marker="o", label=traj.name)
    left.set_xlabel("step")
    left.set_ylabel("mean probe answer-token loss")
    left.legend()
    width = 0.8 / len(runs)
    for k, (traj, c) in enumerate(zip(runs, cats)):
        f = fractions(c)
        right.bar(np.arange(len(CATEGORIES)) + k * width, [f[n] for n in CATEGORIES], width, label=traj.name)
    right.set_xticks(np.arange(len(CATEGORIES)) + width * (len(runs) - 1) / 2, CATEGORIES)
    right.set_ylabel("share of probe tokens")
    right.legend()
    fig.tight_layout()
    path = out_dir / "comparison.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def _table(rows: dict[str, dict[str, float]], columns: list[str]) -> list[str]:
    lines = ["| group | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for group, values in rows.items():
        cells = [f"{values[c]:.1%}" if c in CATEGORIES else f"{values[c]}" for c in columns]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return lines


def run_tokenizer(run_dir: Path) -> Path:
    """The run's tokenizer: in its own directory, or (prepared data shared through data.dir)
    the copy every checkpoint carries."""
    own = run_dir / "tokenizer" / "tokenizer.json"
    if own.is_file():
        return own
    from sabiscale.train.checkpoint import resolve_checkpoint

    return resolve_checkpoint(run_dir / "checkpoints") / "tokenizer" / "tokenizer.json"


def shown_path(path: Path) -> str:
    """A run as the report names it: relative to the working directory when it lies under it,
    so a committed report does not carry the machine's absolute paths."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def write_report(run_dirs: list[Path], out_dir: Path, threshold: float = 0.2, x_axis: str = "fraction",
                 from_step: int = 0) -> Path:
    from sabiscale.prep.tokenizer import load_tokenizer

    runs = [load_trajectories(d, from_step) for d in run_dirs]
    check_same_probe(runs)
    cats = [classify(t, threshold, x_axis) for t in runs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = (f"sabiscale analyze {' '.join(shown_path(t.run_dir) for t in runs)} --out {shown_path(out_dir)} "
               f"--threshold {threshold} --x-axis {x_axis} --from-step {from_step} --no-log")
    lines = ["# Token-level loss trajectories\n",
             f"Command: `{command}` (this page is written whole by it)  ",
             f"Runs: {', '.join(shown_path(t.run_dir) for t in runs)}  ",
             f"Probe: {len(runs[0].meta['token_id'])} answer tokens of the validation shards; method: least-squares "
             f"slope of each token's loss over training progress ({x_axis}); |slope| > {threshold} nats is H->L or "
             "L->H, otherwise H->H / L->L by the token's final loss against the mean final loss (analysis/trajectories.py). "
             f"Window: probe points at steps {runs[0].steps.min()}-{runs[0].steps.max()}.\n"]
    if len(runs) > 1:
        lines += ["## Side by side\n", "| category | " + " | ".join(t.name for t in runs) + " | "
                  + " | ".join(f"{t.name} - {runs[0].name}" for t in runs[1:]) + " |",
                  "|---|" + "---:|" * (2 * len(runs) - 1)]
        fr = [fractions(c) for c in cats]
        for name in CATEGORIES:
            diffs = [f"{(f[name] - fr[0][name]) * 100:+.1f} pt" for f in fr[1:]]
            lines.append(f"| {name} | " + " | ".join(f"{f[name]:.1%}" for f in fr) + " | " + " | ".join(diffs) + " |")
        lines.append("| mean final loss | " + " | ".join(f"{t.losses[-1].mean():.3f}" for t in runs) + " | "
                     + " | ".join(f"{t.losses[-1].mean() - runs[0].losses[-1].mean():+.3f}" for t in runs[1:]) + " |")
        pngs = plot_comparison(runs, cats, out_dir)
        lines += ["", *(f"![{p.stem}]({p.name})" for p in pngs), ""]
    for traj, c in zip(runs, cats):
        tok = load_tokenizer(run_tokenizer(traj.run_dir))
        lines += [f"## {traj.name}\n", "Fractions: " + ", ".join(f"{k} {v:.1%}" for k, v in fractions(c).items()) + "\n",
                  "Mean loss per category over training:\n",
                  "| step | " + " | ".join(category_curves(traj, c)) + " |", "|---:|" + "---:|" * len(category_curves(traj, c))]
        curves = category_curves(traj, c)
        for s, step in enumerate(traj.steps):
            lines.append(f"| {step} | " + " | ".join(f"{curve[s]:.3f}" for curve in curves.values()) + " |")
        for kind, rows in breakdowns(traj, c).items():
            lines += ["", f"By {kind}:\n", *_table(rows, [*CATEGORIES, "tokens"])]
        lines += ["", "Examples (context, then [token]; loss first -> final):\n"]
        for name, picked in examples(traj, c, tok).items():
            shown = "; ".join(f"`{e['context']}[{e['token']}]` {e['first_loss']:.2f}->{e['final_loss']:.2f}" for e in picked)
            lines.append(f"- {name}: {shown or '(none)'}")
        pngs = plot_run(traj, c, out_dir)
        lines += ["", *(f"![{p.stem}]({p.name})" for p in pngs), ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report


def log_to_runs(run_dirs: list[Path], out_dir: Path) -> list[str]:
    """Log the report and plots to each run's MLflow run (found in its newest checkpoint)."""
    from mlflow.tracking import MlflowClient

    from sabiscale.train.checkpoint import latest_complete, read_sidecar
    from sabiscale.track.tracking import default_tracking_uri

    logged = []
    for run_dir in run_dirs:
        newest = latest_complete(Path(run_dir) / "checkpoints")
        if newest is None:
            continue
        meta, cfg = read_sidecar(newest)
        if not meta.get("mlflow_run_id"):
            continue
        client = MlflowClient(tracking_uri=cfg.tracking.uri or default_tracking_uri(Path(run_dir)))
        client.log_artifacts(meta["mlflow_run_id"], str(out_dir), artifact_path="analysis")
        logged.append(meta["mlflow_run_id"])
    return logged
