"""Rho-1 in its own regime: continued pre-training of a trained base, with a reference that is
better than the base on the target data, all tokens vs selective, paired over seeds, costs counted
with the reference's.

Rho-1 (Lin et al. 2024) continues pre-training a trained model (TinyLlama after 3T tokens) and
selects the tokens whose loss exceeds a reference model's, the reference trained on high-quality
target data. Here, on naija_small and the real mix of ../shared/data:
1. base: the recipe trained from scratch on the mix without a held-back half of the target tasks'
   training records (data.hold_back keep=rest; resumable: a later call continues it);
2. target data: the held-back half of the records the evaluation is about (translation, NER,
   sentiment; data.hold_back keep=share), prepared with the mix's tokenizer; held out by the same
   rule, so the held-out records stay held out. A first attempt fine-tuned a base trained on the
   whole mix on target records it had already seen for two epochs: the reference came out no
   better than the base (0.0026 nats at the recipe's rate, 0.0114 worse at 2e-4);
3. reference: the base continued on the target data; its held-out answer loss on the target
   tasks is reported beside the base's, both on the whole mix's clean held-out records (it must be
   better by `min_reference_gain`, or the experiment says so and stops short of a verdict);
4. the whole mix scored by the reference (`sabiscale score`);
5. per seed, the base continued on the whole mix (the held-back half included), scored, for `steps`: all tokens (the masked loss) vs
   selective (the top 60% of answer tokens by excess loss) vs sampled (60% drawn with odds
   exp(excess / T), loss.selection=sample: the stochastic variant), the same data order and steps;
6. held-out scores of every continued run (analysis/heldout_scores.py), the paired decision rule,
   and the token trajectories of the continued all-token run (the window Rho-1 measured in), next
   to Rho-1's 51/26/11/12 (L->L, H->L, H->H, L->H).

    .venv/bin/python -m sabiscale_analysis.exp_rho1_continued                  # ~2.5 h in bf16 on 2 AVX512-BF16 cores, ~4 h in fp32 on AVX2 (analysis/README.md)
    .venv/bin/python -m sabiscale_analysis.exp_rho1_continued --report-only    # the page from what is done

Writes analysis/results/rho1_continued.{md,json}; the runs stay in runs/experiments/rho1_continued/.
analysis/gpu_day.py runs the same stages at SabiYarn's scale on a GPU (Scale below).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from sabiscale_analysis.experiment import (ROOT, DecisionRule, decide, mean_sd, paired, rendered_line, sabiscale,
                                           train_unless_done, trained)
from sabiscale_analysis.heldout_scores import score_run
from sabiscale.train.device import describe_cpu

TARGET_TASKS = ["translation", "ner", "sentiment"]
RHO1_PAPER = {"L->L": 0.51, "H->L": 0.26, "H->H": 0.11, "L->H": 0.12}  # Rho-1, Fig. 2 (TinyLlama, 15B tokens)
RULE = DecisionRule("held-out answer loss on the target tasks, mean over tasks (nats per answer token)", 0.05, True)


@dataclass(frozen=True)
class EarlierSet:
    """A set of this experiment's runs that a later set replaced (another machine, so another base
    and precision: its seeds cannot pair with the new ones). Its runs are gone with their machine;
    its page stays in git at `commit`, and the new page reports it from there."""

    commit: str
    machine: str
    page: str = "analysis/results/rho1_continued.json"  # its results file, relative to the repository


FP32_SET = EarlierSet("173e809", "a 2-core AMD EPYC with AVX2 only")


@dataclass
class Scale:
    """Everything that differs between the CPU experiment, a GPU day and a dry run."""

    recipe: Path = ROOT / "launch" / "recipes" / "naija_small.yaml"
    work: Path = ROOT / "runs" / "experiments" / "rho1_continued"
    data_dir: Path = ROOT / "runs" / "data" / "shared_data"  # the recipe's prepared data (the whole mix)
    overrides: list[str] = field(default_factory=list)      # model size, batch, data source, ...
    base_steps: int = 1500
    # the share of the target tasks' training records held back from the base for the reference
    # (None: the base trains on the whole mix and the reference on records the base has seen,
    # the first attempt, which gave no reference better than the base)
    hold_back: float | None = 0.5
    reference_steps: int = 300  # ~1.7 epochs of the held-back half at naija_small's batch
    # a fine-tuning rate: new records to learn, but few of them
    reference_lr: float = 5e-4
    reference_warmup: int = 20
    min_reference_gain: float = 0.02  # nats of held-out target answer loss the reference must gain
    steps: int = 400
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    ratio: float = 0.6
    temperature: float = 1.0  # of the sampled arm, in nats of excess loss
    loss_records: int = 200
    translations: int = 100
    probe_every: int = 20
    results: Path = ROOT / "analysis" / "results"
    name: str = "rho1_continued"
    # no continued runs from a reference that is not better than the base (a dry run goes on anyway)
    require_better_reference: bool = True
    command: str = ".venv/bin/python -m sabiscale_analysis.exp_rho1_continued"  # what writes the page
    first_attempt: str = ""  # the design tried before the held-back share, when its runs are gone
    earlier_sets: list[EarlierSet] = field(default_factory=list)


def arms(scale: Scale) -> dict[str, list[str]]:
    selective = ["loss.kind=selective", f"loss.ratio={scale.ratio}"]
    return {"all tokens": ["loss.kind=masked"],
            f"selective {scale.ratio:g}": selective,
            f"sampled {scale.ratio:g} T={scale.temperature:g}": [*selective, "loss.selection=sample",
                                                               f"loss.temperature={scale.temperature}"]}


def common(scale: Scale, run: Path, steps: int) -> list[str]:
    return [*scale.overrides, f"output_dir={run}", f"train.max_steps={steps}", "train.eval_every=100",
            "train.checkpoint_every=100", "train.keep_every=0"]


def hold_back(scale: Scale, keep: str) -> list[str]:
    if scale.hold_back is None:
        return []
    return [f"data.hold_back={{tasks: [{', '.join(TARGET_TASKS)}], share: {scale.hold_back}, keep: {keep}}}"]


def prepared(scale: Scale, data_dir: Path, *overrides: str) -> None:
    if not (data_dir / "shards" / "manifest.json").is_file():
        sabiscale("prepare", str(scale.recipe), *scale.overrides, *overrides, f"data.dir={data_dir}",
                  f"output_dir={scale.work / 'prepare'}")


def tokenizer_of_mix(scale: Scale) -> str:
    """Every stage tokenizes with the whole mix's tokenizer: the scored mix's ids are the base's."""
    return f"tokenizer.path={scale.data_dir / 'tokenizer' / 'tokenizer.json'}"


def base_dir(scale: Scale) -> Path:
    return scale.work / ("base" if scale.hold_back is None else f"base_without_{scale.hold_back:g}")


def train_base(scale: Scale) -> Path:
    run = base_dir(scale)
    prepared(scale, scale.data_dir)
    data = scale.data_dir
    if scale.hold_back is not None:
        data = scale.work / f"mix_without_{scale.hold_back:g}"
        prepared(scale, data, *hold_back(scale, "rest"), tokenizer_of_mix(scale))
    train_unless_done(scale.recipe, *common(scale, run, scale.base_steps), f"data.dir={data}",
                      *hold_back(scale, "rest"), *([tokenizer_of_mix(scale)] if scale.hold_back else []), "seed=0")
    return run


def train_reference(scale: Scale, base: Path) -> Path:
    target = scale.work / ("target_data" if scale.hold_back is None else f"target_data_{scale.hold_back:g}")
    shared = [f"data.dir={target}", f"data.tasks=[{', '.join(TARGET_TASKS)}]", tokenizer_of_mix(scale),
              *hold_back(scale, "share")]
    prepared(scale, target, *shared[1:])
    run = reference_dir(scale)
    train_unless_done(scale.recipe, *common(scale, run, scale.reference_steps), *shared, "seed=0",
                      f"optim.lr={scale.reference_lr}", f"optim.warmup_steps={scale.reference_warmup}",
                      f"train.init_from={base / 'checkpoints'}")
    return run


def reference_dir(scale: Scale) -> Path:
    """Named by its data and learning rate: a reference trained with other settings keeps its own run."""
    held = "" if scale.hold_back is None else f"_on_{scale.hold_back:g}"
    return scale.work / f"reference{held}_lr{scale.reference_lr:g}"


def scored_mix_dir(scale: Scale) -> Path:
    return scale.work / f"scored_mix_{reference_dir(scale).name}"


def scored_mix(scale: Scale, reference: Path) -> Path:
    out = scored_mix_dir(scale)
    if not (out / "manifest.json").is_file():
        sabiscale("score", "--reference", str(reference / "checkpoints"), "--shards", str(scale.data_dir / "shards"),
                  "--out", str(out))
    return out


def continued_dir(scale: Scale, arm: str, seed: int) -> Path:
    return scale.work / f"{arm.replace(' ', '_')}-seed{seed}"


def continued(scale: Scale, base: Path, scored: Path, arm: str, seed: int) -> Path:
    run = continued_dir(scale, arm, seed)
    probe = [f"train.probe_every={scale.probe_every}"] if seed == scale.seeds[0] else []
    train_unless_done(scale.recipe, *common(scale, run, scale.steps), *arms(scale)[arm], *probe,
                      f"data.dir={scale.data_dir}", f"data.shards_dir={scored}", f"seed={seed}",
                      f"train.init_from={base / 'checkpoints'}")
    return run


def target_loss(report: dict) -> float:
    """The primary measure: answer loss on the target tasks, mean over them."""
    values = [report["answer_loss"][t]["nats_per_token"] for t in TARGET_TASKS if t in report["answer_loss"]]
    return sum(values) / len(values)


def trajectory_fractions(run: Path) -> dict[str, float] | None:
    """L->L, H->L, H->H, L->H shares of the probe tokens over the whole continued run (the
    window starts at the trained base), at the analysis module's default threshold."""
    from sabiscale_analysis.trajectories import classify, fractions, load_trajectories

    if not (run / "probe" / "meta.npz").is_file():
        return None
    return fractions(classify(load_trajectories(run)))


def run_all(scale: Scale) -> None:
    base = train_base(scale)
    reference = train_reference(scale, base)
    quality = {"base": score(scale, base, records_of_mix(scale)), "reference": score(scale, reference, records_of_mix(scale))}
    gain = target_loss(quality["base"]) - target_loss(quality["reference"])
    if scale.require_better_reference and gain < scale.min_reference_gain:
        print(f"the reference is {gain:+.4f} nats better than the base on the target tasks, under the "
              f"{scale.min_reference_gain} required: no continued runs (train it longer or at another rate)")
        return
    scored = scored_mix(scale, reference)
    for seed in scale.seeds:  # seed by seed: a stopped experiment holds whole comparisons
        for arm in arms(scale):
            score(scale, continued(scale, base, scored, arm, seed))
        write_results(scale, rendered_line(None))
        write_trajectories(scale, rendered_line(None))


def score(scale: Scale, run: Path, records_of=None) -> dict:
    return score_run(run, scale.loss_records, scale.translations, records_of=records_of)


def records_of_mix(scale: Scale):
    """The whole mix's config: base and reference are scored on its clean held-out records, the
    records every continued run (trained on the whole mix) is scored on."""
    from sabiscale.config import load_config

    return load_config(scale.recipe, [*scale.overrides, f"data.dir={scale.data_dir}"])


def collect(scale: Scale) -> tuple[dict, dict[str, dict[int, dict]]]:
    """(quality of base and reference, arm -> seed -> scores) of what is scored so far."""
    def scored(run: Path) -> dict | None:
        path = run / "heldout_scores.json"
        return json.loads(path.read_text()) if path.is_file() else None

    quality = {"base": scored(base_dir(scale)), "reference": scored(reference_dir(scale))}
    table = {arm: {seed: r for seed in scale.seeds if (r := scored(continued_dir(scale, arm, seed))) is not None}
             for arm in arms(scale)}
    return quality, table


def forward_flops(report: dict, scored_tokens: int) -> float:
    """Scoring the mix with the reference: one forward pass over its tokens, ~2 FLOPs per
    parameter per token (track/flops.py counts training at ~6)."""
    per_token_training = report["trained"]["flops_seen"] / max(report["trained"]["tokens_seen"], 1)
    return per_token_training / 3 * scored_tokens


def write_results(scale: Scale, rendered_by: str) -> None:
    quality, table = collect(scale)
    names = list(table)
    lines = [f"# Rho-1 in its own regime: continued pre-training of a trained base ({scale.name})\n",
             "Claim (Rho-1): continuing to pre-train on only the tokens with the highest excess loss over a reference "
             "trained on the target data gets a better model on that target than continuing on all tokens.\n",
             f"Command: `{scale.command}` (repeat until done)  ", rendered_by, "",
             f"Date: {time.strftime('%Y-%m-%d')}. Recipe `{scale.recipe.relative_to(ROOT)}` "
             f"{' '.join(scale.overrides)}; base {scale.base_steps} steps on {mix_without(scale)} (seed 0), reference = "
             f"base + {scale.reference_steps} steps on {target_records(scale)} at lr {scale.reference_lr:g} "
             f"({scale.reference_warmup} warmup steps; it must gain {scale.min_reference_gain} nats), continued runs "
             f"{scale.steps} steps from the base on the whole mix scored by the reference, seeds {scale.seeds}. Scores "
             f"on the whole mix's clean held-out records only (analysis/heldout_scores.py).\n", RULE.describe(), "",
             *earlier_attempts(scale)]
    if quality["base"]:
        base = quality["base"]["trained"]
        where = (f"on {base['device']} (the base's last checkpoint)" if base.get("device")
                 else f"on a machine its checkpoints do not name; page rendered on {describe_cpu()}")
        lines += [f"Machine: the runs trained in {base['precision']} (engine precision auto: bf16 only on a CPU "
                  f"with a native bf16 unit) {where}.\n"]
    if quality["base"] and quality["reference"]:
        b, r = target_loss(quality["base"]), target_loss(quality["reference"])
        lines += [f"Reference quality on the target tasks' held-out answer loss: base {b:.4f}, reference {r:.4f} "
                  f"(gain {b - r:+.4f} nats: {'enough' if b - r >= scale.min_reference_gain else 'NOT enough'} "
                  f"for the {scale.min_reference_gain} required).\n"]
    lines += ["| arm | " + " | ".join(f"seed {s}" for s in scale.seeds) + " | mean +- sd |",
              "|---|" + "---:|" * (len(scale.seeds) + 1)]
    values = {arm: {s: target_loss(rep) for s, rep in rows.items()} for arm, rows in table.items()}
    for arm in names:
        got = values[arm]
        summary = "-" if not got else f"{got[next(iter(got))]:.4f} (1 seed)" if len(got) == 1 \
            else "{:.4f} +- {:.4f}".format(*mean_sd(list(got.values())))
        lines.append(f"| {arm} | " + " | ".join(f"{got[s]:.4f}" if s in got else "-" for s in scale.seeds)
                     + f" | {summary} |")
    lines.append("")
    lines += [f"**Verdict ({arm} vs {names[0]}):** {verdict}\n" for arm, verdict in verdicts(values).items()]
    lines += ["", *cost_lines(scale, quality, table), "", *trajectory_lines(scale), "", *earlier_set_lines(scale)]
    scale.results.mkdir(parents=True, exist_ok=True)
    (scale.results / f"{scale.name}.json").write_text(json.dumps({"quality": quality, "runs": {
        arm: {str(s): r for s, r in rows.items()} for arm, rows in table.items()}}, indent=2) + "\n")
    (scale.results / f"{scale.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def verdicts(values: dict[str, dict[int, float]]) -> dict[str, str]:
    """Each selective arm against the first (all tokens), by the pre-registered rule."""
    names = list(values)
    baseline, found = names[0], {}
    for arm in names[1:]:
        if len(set(values[arm]) & set(values[baseline])) >= 2:
            found[arm] = decide(paired(values[arm], values[baseline], True), RULE, (arm, baseline))
        else:
            found[arm] = "not yet two paired seeds."
    return found


def committed_json(commit: str, path: str) -> dict | None:
    """A results file as committed at `commit` (None where git or that commit is not here)."""
    try:
        shown = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT,
                               capture_output=True, text=True)
    except OSError:
        return None
    return json.loads(shown.stdout) if shown.returncode == 0 else None


def earlier_set_lines(scale: Scale) -> list[str]:
    """The sets this one replaced, each with its own numbers and verdicts, read from the commit
    that holds its page: reported beside this set, never pooled with it."""
    lines = []
    for earlier in scale.earlier_sets:
        where = f"{earlier.page} at commit {earlier.commit}"
        found = committed_json(earlier.commit, earlier.page)
        if found is None:
            lines.append(f"Earlier set ({where}, on {earlier.machine}): that commit is not in this clone's history.\n")
            continue
        base, reference = (target_loss(found["quality"][k]) for k in ("base", "reference"))
        values = {arm: {int(s): target_loss(r) for s, r in rows.items()} for arm, rows in found["runs"].items()}
        runs = "; ".join(f"{arm} " + "/".join(f"{v:.4f}" for _, v in sorted(got.items())) + f" (seed{'s' * (len(got) > 1)} {', '.join(map(str, sorted(got)))})"
                         for arm, got in values.items() if got)
        lines.append(f"Earlier set ({where}; trained in {found['quality']['base']['trained']['precision']} on "
                     f"{earlier.machine}, from its own base; its runs are gone with that machine): base {base:.4f}, "
                     f"reference {reference:.4f} (gain {base - reference:+.4f}); {runs}. Not pooled with this set: its "
                     "seeds continue another base, trained on another machine.\n")
        lines += [f"- Its verdict ({arm} vs {next(iter(values))}): {verdict}" for arm, verdict in verdicts(values).items()]
        lines.append("")
    return lines


def mix_without(scale: Scale) -> str:
    if scale.hold_back is None:
        return "the whole mix"
    return (f"the mix without a held-back {scale.hold_back:g} share of the target tasks' training records "
            "(data.hold_back keep=rest, by a hash of each record's file and line)")


def target_records(scale: Scale) -> str:
    tasks = ", ".join(TARGET_TASKS)
    if scale.hold_back is None:
        return f"the target tasks' training records ({tasks}), which the base has seen"
    return f"the held-back share of the target tasks' training records ({tasks}; data.hold_back keep=share), new to the base"


FIRST_ATTEMPT = ("Earlier attempt (analysis/results/rho1_continued.json at commit a63921e, bf16 on an AVX512-BF16 "
                 "CPU): a base trained 1500 steps on the whole mix (target answer loss 1.8804) fine-tuned on target "
                 "records it had already seen: 600 steps at lr 2e-4 gave 1.8918 (-0.0114; that JSON); at the recipe's rate "
                 "+0.0026 (that commit's message only: its scores were not committed). No reference better than its base, hence the held-back share.\n")


def earlier_attempts(scale: Scale) -> list[str]:
    """The references tried before this design, from the runs they left (their own scores)."""
    first = scale.work / "base" / "heldout_scores.json"
    if scale.hold_back is None:
        return []
    if not first.is_file():  # its runs are gone with the machine they ran on; the page of that commit has them
        return [scale.first_attempt] if scale.first_attempt else []
    base = target_loss(json.loads(first.read_text()))
    tried = []
    for run in sorted(scale.work.glob("reference*")):
        scores = run / "heldout_scores.json"
        if run != reference_dir(scale) and scores.is_file():
            ref = target_loss(json.loads(scores.read_text()))
            tried.append(f"`{run.name}` {ref:.4f} ({base - ref:+.4f})")
    if not tried:
        return []
    return [f"Earlier attempt (its own page history): a base trained on the whole mix ({base:.4f}) fine-tuned on target "
            f"records it had already seen: {', '.join(tried)}. No reference better than its base, hence the held-back "
            "share.\n"]


def cost_lines(scale: Scale, quality: dict, table: dict) -> list[str]:
    """Training FLOPs of each stage; the selective arm's total includes the reference and the
    scoring of the mix (the base is shared by both arms)."""
    if not quality["reference"]:
        return []
    ref = quality["reference"]["trained"]["flops_seen"]
    manifest = json.loads((scored_mix_dir(scale) / "manifest.json").read_text()) \
        if (scored_mix_dir(scale) / "manifest.json").is_file() else None
    tokens = sum(s["counts"]["tokens"] for s in manifest["splits"].values()) if manifest else 0
    scoring = forward_flops(quality["reference"], tokens)
    lines = ["Cost (training FLOPs as the runs count them; scoring = one forward pass over the mix):\n",
             "| arm | continued run | + reference training | + scoring the mix | total |", "|---|---:|---:|---:|---:|"]
    for arm, rows in table.items():
        if not rows:
            continue
        run = sum(r["trained"]["flops_seen"] for r in rows.values()) / len(rows)
        extra = (ref, scoring) if arm != "all tokens" else (0.0, 0.0)
        lines.append(f"| {arm} | {run:.3e} | {extra[0]:.3e} | {extra[1]:.3e} | {run + sum(extra):.3e} |")
    return lines


def trajectory_lines(scale: Scale) -> list[str]:
    found = {arm: trajectory_fractions(scale.work / f"{arm.replace(' ', '_')}-seed{scale.seeds[0]}") for arm in arms(scale)}
    if not any(found.values()):
        return []
    lines = [f"Token trajectories over the continued run (seed {scale.seeds[0]}, probe every {scale.probe_every} steps "
             "from the trained base to the end; slope threshold 0.2 nats over the window, final loss above/below the "
             "probe mean), next to Rho-1's:\n", "| | " + " | ".join(RHO1_PAPER) + " |", "|---|" + "---:|" * 4,
             "| Rho-1 (TinyLlama, 15B tokens) | " + " | ".join(f"{v:.0%}" for v in RHO1_PAPER.values()) + " |"]
    for arm, frac in found.items():
        if frac:
            lines.append(f"| {arm} | " + " | ".join(f"{frac[c]:.0%}" for c in RHO1_PAPER) + " |")
    return lines


TRAJECTORY_THRESHOLDS = (0.1, 0.2, 0.4)  # nats over the window; 0.2 is the analysis module's default


def sequence_bootstrap(traj, categories, resamples: int = 1000) -> dict[str, tuple[float, float]]:
    """95% interval of each category's share, resampling the probe's sequences (its tokens are
    not independent: a sequence's tokens share a context and a task)."""
    import numpy as np
    from sabiscale_analysis.trajectories import CATEGORIES

    sequence = traj.meta["batch"].astype(np.int64) * (int(traj.meta["row"].max()) + 1) + traj.meta["row"]
    ids, index = np.unique(sequence, return_inverse=True)
    counts = np.zeros((len(ids), 4))
    np.add.at(counts, (index, categories), 1)
    rng = np.random.default_rng(0)
    draws = counts[rng.integers(0, len(ids), (resamples, len(ids)))].sum(axis=1)
    shares = draws / draws.sum(axis=1, keepdims=True)
    low, high = np.percentile(shares, [2.5, 97.5], axis=0)
    return {c: (float(low[i]), float(high[i])) for i, c in enumerate(CATEGORIES)}


def write_trajectories(scale: Scale, rendered_by: str) -> None:
    """The trajectory file: the continued runs' probe tokens (seed 1) from the trained base on,
    per category with a sequence-bootstrap interval, at three thresholds, next to Rho-1's."""
    from sabiscale_analysis.trajectories import classify, fractions, load_trajectories

    seed = scale.seeds[0]
    runs = {arm: continued_dir(scale, arm, seed) for arm in arms(scale)}
    runs = {arm: run for arm, run in runs.items() if (run / "probe" / "meta.npz").is_file()}
    first = next(iter(runs.values()), None)
    if first is None or len(load_trajectories(first).steps) < 3:
        return
    base = trained(base_dir(scale))
    lines = [f"# Token loss trajectories from a trained base ({scale.name})\n",
             f"Command: `{scale.command}` (this page with its Rho-1 page)  ", rendered_by, "",
             f"Window: the continued runs of seed {seed}, from their first step (the trained base: {scale.base_steps} "
             f"steps, {base['tokens_seen']:,} tokens seen) to their last ({scale.steps} steps), a probe every "
             f"{scale.probe_every} steps. Tokens: the answer tokens of the probe (fixed validation sequences of the "
             "whole mix). A token's category comes from the least-squares slope of its loss over the window (x from 0 "
             "to 1): below -threshold H->L, above +threshold L->H, else H->H or L->L by its final loss against the "
             "mean final loss of the probe (analysis/trajectories.py). Intervals: 95%, resampling the probe's "
             "sequences (1000 draws).\n",
             "Rho-1 (Fig. 2) measured its shares while continuing to pre-train TinyLlama-1.1B (after 3T tokens) on "
             "15B tokens; this window is far shorter and the model far smaller, so the shares place the run, they do "
             "not test Rho-1's numbers.\n",
             "| arm | threshold | tokens | " + " | ".join(RHO1_PAPER) + " |", "|---|---:|---:|" + "---:|" * 4,
             "| Rho-1 (TinyLlama, 15B tokens) | - | - | " + " | ".join(f"{v:.0%}" for v in RHO1_PAPER.values()) + " |"]
    table = {}
    for arm, run in runs.items():
        traj = load_trajectories(run)
        for threshold in TRAJECTORY_THRESHOLDS:
            categories = classify(traj, threshold)
            share, interval = fractions(categories), sequence_bootstrap(traj, categories)
            table[f"{arm} @ {threshold:g}"] = {"share": share, "interval": interval, "tokens": len(categories),
                                              "probe_steps": traj.steps.tolist()}
            lines.append(f"| {arm} | {threshold:g} | {len(categories)} | " + " | ".join(
                f"{share[c]:.0%} [{interval[c][0]:.0%}, {interval[c][1]:.0%}]" for c in RHO1_PAPER) + " |")
    primary = table[f"{next(iter(runs))} @ 0.2"]
    inside = [c for c in RHO1_PAPER if primary["interval"][c][0] <= RHO1_PAPER[c] <= primary["interval"][c][1]]
    learned = primary["share"]["H->L"]
    lines += ["", f"**Verdict ({next(iter(runs))}, threshold 0.2):** {learned:.0%} of the probe's answer tokens are "
              f"learned over the window (H->L; Rho-1: {RHO1_PAPER['H->L']:.0%}) and {primary['share']['L->H']:.0%} get "
              f"worse (L->H; Rho-1: {RHO1_PAPER['L->H']:.0%}); Rho-1's share lies inside this run's interval for "
              f"{', '.join(inside) if inside else 'no category'}.\n"]
    (scale.results / f"{scale.name}_trajectories.json").write_text(json.dumps(
        {"window": {"base_steps": scale.base_steps, "base_tokens": base["tokens_seen"], "steps": scale.steps,
                    "probe_every": scale.probe_every, "seed": seed}, "rho1": RHO1_PAPER, "runs": table}, indent=2) + "\n")
    (scale.results / f"{scale.name}_trajectories.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report-only", action="store_true", help="train nothing: write the page from what is scored")
    args = parser.parse_args()
    scale = Scale(first_attempt=FIRST_ATTEMPT, earlier_sets=[FP32_SET])
    if not args.report_only:
        run_all(scale)
    write_results(scale, rendered_line(None))
    write_trajectories(scale, rendered_line(None))


if __name__ == "__main__":
    main()
