"""Masked vs all-token loss, decided: SabiYarn's prompt-masked loss (loss.prompt_weight=0), the
all-token loss (1) and weights between, on naija_small, paired over seeds, scored only on records
that training never saw.

The plan (PLAN below) is printed into the results file before the first run finishes and was
committed before the runs (git log of this file). Stages, in the order they run:
1. the weight sweep {0, 1, 0.1, 0.3} on seed 1;
2. seeds 2 and 3 for weights 0 and 1;
3. seeds 2 and 3 for the sweep's best weight, when that is 0.1 or 0.3 (by the primary measure);
4. the FLOP-matched arm: weight 0 trained for as many training FLOPs as the weight-1 run of the
   same seed used (the masked loss's head runs on fewer tokens, so it gets more steps; its
   learning rate decays over those steps: a finished run, not an extended one).

Every run: launch/recipes/naija_small.yaml, its prepared data (runs/data/shared_data: official dev
and test records held out, 5% of the rest by hash), seed s for initial weights and sample order,
PLAN["steps"] steps. Scored on the held-out records that are clean (no exact or 13-gram overlap
with training):
- answer loss (nats per answer token) per task on up to PLAN["loss_records"] records per task and
  language, the same records for every run; primary measure: its mean over tasks;
- sentiment by rank classification on every clean held-out sentiment record: macro-F1 per
  language with bootstrap intervals, against the majority label; secondary: the mean over languages;
- translation: greedy chrF on PLAN["translations"] records per direction against the chrF of
  copying the source; secondary: the mean over directions.

Resumable: finished runs and their scores are reused; an interrupted run continues from its last
checkpoint. Each call does what is left (or --stage N at most), then rewrites the results.

    .venv/bin/python -m sabiscale_analysis.exp_prompt_weight                 # everything (~2.5 h here)
    .venv/bin/python -m sabiscale_analysis.exp_prompt_weight --report-only   # the page from what is done

Writes analysis/results/prompt_weight.{md,json,png}; the runs stay in runs/experiments/prompt_weight/.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from sabiscale_analysis.experiment import (ROOT, DecisionRule, answer_loss_curve, decide, mean_sd, paired,
                                           plot_curves, prepare_unless_done, rendered_line, trained,
                                           train_unless_done)
from sabiscale_analysis.heldout_scores import measures, score_run

RECIPE = ROOT / "launch" / "recipes" / "naija_small.yaml"
WORK = ROOT / "runs" / "experiments" / "prompt_weight"
RESULTS = ROOT / "analysis" / "results"

PLAN = {
    "steps": 700,
    "sweep": [0.0, 1.0, 0.1, 0.3],
    "sweep_seed": 1,
    "seeds": [1, 2, 3],
    "loss_records": 200,
    "translations": 100,
    "rules": {
        "answer_loss": DecisionRule("held-out answer loss, mean over tasks (nats per answer token)", 0.05, True),
        "sentiment": DecisionRule("held-out sentiment macro-F1 by rank classification, mean over languages", 0.05, False),
        "chrf": DecisionRule("held-out translation chrF, mean over directions", 1.0, False),
    },
}
FLOP_MATCHED = "0 (FLOP-matched to 1)"


def run_dir(arm: str, seed: int) -> Path:
    return WORK / f"w{arm.split(' ')[0]}{'-flops' if arm == FLOP_MATCHED else ''}-seed{seed}"


def overrides(weight: float, seed: int, steps: int, run: Path) -> list[str]:
    return [f"output_dir={run}", f"seed={seed}", "loss.kind=masked", f"loss.prompt_weight={weight:g}",
            f"train.max_steps={steps}", "train.eval_every=100", "train.checkpoint_every=100", "train.keep_every=0"]


def train_arm(arm: str, seed: int) -> Path | None:
    """Train one arm of one seed (unless done); None when it cannot start yet (the FLOP-matched
    arm needs the weight-1 run of its seed)."""
    run = run_dir(arm, seed)
    steps = PLAN["steps"]
    weight = float(arm.split(" ")[0])
    if arm == FLOP_MATCHED:
        steps = flop_matched_steps(seed)
        if steps is None:
            return None
    train_unless_done(RECIPE, *overrides(weight, seed, steps, run))
    return run


def flop_matched_steps(seed: int) -> int | None:
    """Steps at which weight 0 spends the training FLOPs weight 1 spent in PLAN["steps"] (from
    both runs' checkpoints: train/flops_seen counts the head only on the tokens it runs on)."""
    masked, full = trained(run_dir("0", seed)), trained(run_dir("1", seed))
    if not masked or not full or masked["step"] < PLAN["steps"] or full["step"] < PLAN["steps"]:
        return None
    return round(full["flops_seen"] / (masked["flops_seen"] / masked["step"]))


def score(run: Path) -> dict:
    """The run's held-out scores (analysis/heldout_scores.py; cached in the run)."""
    return score_run(run, PLAN["loss_records"], PLAN["translations"])


def best_of_sweep(reports: dict) -> str | None:
    """The sweep weight with the lowest primary measure on the sweep seed (None until all ran)."""
    seed = PLAN["sweep_seed"]
    values = {f"{w:g}": measures(reports[(f"{w:g}", seed)])["answer_loss"] for w in PLAN["sweep"]
              if (f"{w:g}", seed) in reports}
    if len(values) < len(PLAN["sweep"]):
        return None
    return min(values, key=values.get)


def stages(best: str | None) -> list[list[tuple[str, int]]]:
    sweep = [(f"{w:g}", PLAN["sweep_seed"]) for w in PLAN["sweep"]]
    more = [(arm, s) for s in PLAN["seeds"][1:] for arm in ("0", "1")]
    best_seeds = [(best, s) for s in PLAN["seeds"][1:]] if best not in (None, "0", "1") else []
    flops = [(FLOP_MATCHED, s) for s in PLAN["seeds"]]
    return [sweep, more, best_seeds, flops]


def collect() -> dict[tuple[str, int], dict]:
    """(arm, seed) -> scores of every finished, scored run."""
    found = {}
    for arm in [*{f"{w:g}" for w in PLAN["sweep"]}, FLOP_MATCHED]:
        for seed in PLAN["seeds"]:
            path = run_dir(arm, seed) / "heldout_scores.json"
            if path.is_file():
                found[(arm, seed)] = json.loads(path.read_text())
    return found


def plan_lines() -> list[str]:
    rules = PLAN["rules"]
    return ["## Pre-registered (fixed before the runs)\n",
            f"- Runs: naija_small (11.6M-parameter Llama, 8 x 512 tokens per step), {PLAN['steps']} steps, "
            f"`loss.kind=masked loss.prompt_weight=w`. Sweep w in {{{', '.join(f'{w:g}' for w in PLAN['sweep'])}}} on seed "
            f"{PLAN['sweep_seed']}; seeds {PLAN['seeds']} on w=0, w=1 and the sweep's best w by the primary measure; "
            "a FLOP-matched arm: w=0 for the training FLOPs w=1 used, seeds " + str(PLAN["seeds"]) + ".",
            f"- Primary: {rules['answer_loss'].measure}, on up to {PLAN['loss_records']} clean held-out records per task "
            "and language (the same records for every run). Effect of interest 0.05 nats.",
            f"- Secondary: {rules['sentiment'].measure} on every clean held-out sentiment record (effect of interest "
            f"0.05); {rules['chrf'].measure} on {PLAN['translations']} clean held-out records per direction, greedy "
            "(effect of interest 1 chrF point), beside the chrF of copying the source.",
            f"- {rules['answer_loss'].describe()}",
            "- Secondary measures use the same rule with their effects. Comparisons: w=0 vs w=1 (the question), the "
            "sweep's best vs w=0, and the FLOP-matched w=0 vs w=1.", ""]


def write_results(reports: dict, command: str) -> None:
    arms = sorted({arm for arm, _ in reports}, key=lambda a: (a == FLOP_MATCHED, a))
    seeds = PLAN["seeds"]
    value = {name: {arm: {s: measures(reports[(arm, s)])[name] for s in seeds if (arm, s) in reports} for arm in arms}
             for name in PLAN["rules"]}
    first = next(iter(reports.values()), None)
    lines = ["# Masked vs all tokens, decided: loss.prompt_weight on naija_small, paired seeds, held-out records\n",
             "Claim (SabiYarn): computing the loss only on the answer tokens (w=0) makes a better model than the "
             "loss on every token (w=1); a 2025 study finds a small non-zero prompt weight better than either.\n",
             f"Command: `{command}` (repeat until every stage is done; `--report-only` writes what there is)  ",
             rendered_line(None), "",
             f"Date: {time.strftime('%Y-%m-%d')}. Data: `runs/data/shared_data` prepared by `launch/recipes/naija_small.yaml` "
             "(../shared/data; official dev/test records and 5% of the rest held out by construction). "
             + (f"Precision {first['trained']['precision']}. " if first else ""), *plan_lines(),
             "## Results\n", f"Finished and scored: {len(reports)} runs.\n"]
    for name, rule in PLAN["rules"].items():
        lines += [f"**{rule.measure}** ({'lower' if rule.lower_is_better else 'higher'} is better)\n",
                  "| arm (w) | " + " | ".join(f"seed {s}" for s in seeds) + " | mean +- sd |", "|---|" + "---:|" * (len(seeds) + 1)]
        for arm in arms:
            got = value[name][arm]
            mean, sd = mean_sd(list(got.values())) if got else (math.nan, 0.0)
            lines.append(f"| {arm} | " + " | ".join(f"{got[s]:.4f}" if s in got else "-" for s in seeds) + f" | {mean:.4f} +- {sd:.4f} |")
        lines.append("")
    lines += copy_baseline_lines(reports), "", *cost_lines(reports, arms), "", "## Verdicts (generated by the rule)\n"
    best = best_of_sweep(reports)
    pairs = [("0", "1")] + ([(best, "0")] if best not in (None, "0", "1") else []) + [(FLOP_MATCHED, "1")]
    lines += verdict_lines(pairs, value)
    if best is not None:
        lines.append(f"- The sweep's best weight on seed {PLAN['sweep_seed']} by the primary measure: w={best}.")
    if best not in (None, "0", "1"):
        # the sweep's best runs the head on every token, so it costs what w=1 costs: the FLOP-matched
        # w=0 is its equal-compute rival too
        lines += ["", "## Asked after the results (not pre-registered: read the rule's verdicts with that in mind)\n",
                  f"At equal training FLOPs: the FLOP-matched w=0 against the sweep's best w={best}, which costs what "
                  "w=1 costs (the same seeds, paired).\n", *verdict_lines([(FLOP_MATCHED, best)], value)]
    below_copy = [arm for arm in arms if value["chrf"].get(arm) and
                  sum(value["chrf"][arm].values()) / len(value["chrf"][arm]) < copy_chrf(reports)]
    if below_copy:
        lines += ["", f"Translation: the mean chrF of every one of these arms is below copying the source "
                      f"({copy_chrf(reports):.2f}): {', '.join(f'w={a}' for a in below_copy)}. No arm translates "
                      "better than leaving the English untranslated; the chrF differences rank weak models."]
    lines += ["", *per_language_lines(reports), "", "![validation answer-token loss over steps, seed 1](prompt_weight.png)"]
    curves = {f"w={arm}": answer_loss_curve(run_dir(arm, PLAN["sweep_seed"])) for arm in arms
              if (arm, PLAN["sweep_seed"]) in reports}
    RESULTS.mkdir(parents=True, exist_ok=True)
    if curves:
        plot_curves(curves, RESULTS / "prompt_weight.png", "validation answer-token loss", "naija_small, seed 1: prompt weight")
    (RESULTS / "prompt_weight.json").write_text(json.dumps(
        {"command": command, "plan": {k: v for k, v in PLAN.items() if k != "rules"},
         "runs": {f"w={arm} seed={s}": r for (arm, s), r in sorted(reports.items())}}, indent=2) + "\n")
    (RESULTS / "prompt_weight.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def verdict_lines(pairs: list[tuple[str, str]], value: dict) -> list[str]:
    """The rule's verdict on each measure for each (a, b) pair of arms, on their common seeds."""
    lines = []
    for a, b in pairs:
        for name, rule in PLAN["rules"].items():
            both = set(value[name].get(a, {})) & set(value[name].get(b, {}))
            if len(both) >= 2:
                interim = (f"**interim, {len(both)} of the {len(PLAN['seeds'])} planned seeds** "
                           if len(both) < len(PLAN["seeds"]) else "")
                lines.append(f"- w={a} vs w={b}: {interim}" + decide(paired(value[name][a], value[name][b],
                                                                           rule.lower_is_better), rule, (f"w={a}", f"w={b}")))
            else:
                lines.append(f"- w={a} vs w={b} on {rule.measure}: not yet run on two paired seeds.")
    return lines


def copy_chrf(reports: dict) -> float:
    """Copying the source: chrF, mean over the directions of every scored report."""
    copy = [v["copy_source_chrf"] for r in reports.values() for v in r["translation"].values() if "copy_source_chrf" in v]
    return sum(copy) / max(len(copy), 1)


def copy_baseline_lines(reports: dict) -> str:
    majority = [v["majority_macro_f1"] for r in list(reports.values())[:1] for v in r["sentiment"].values()]
    if not reports:
        return "No run is finished yet."
    return (f"Baselines on the same records: copying the source scores chrF {copy_chrf(reports):.2f} "
            f"(mean over directions); always answering the majority label scores sentiment macro-F1 "
            f"{sum(majority) / max(len(majority), 1):.4f} (mean over languages).")


def cost_lines(reports: dict, arms: list[str]) -> list[str]:
    lines = ["Cost per run (training FLOPs as the run counts them: the loss head only on the tokens it runs on):\n",
             "| arm (w) | steps | tokens | training FLOPs (mean over seeds) |", "|---|---:|---:|---:|"]
    for arm in arms:
        done = [r["trained"] for (a, _), r in reports.items() if a == arm]
        lines.append(f"| {arm} | {done[0]['step']} | {done[0]['tokens_seen'] / 1e6:.2f}M | "
                     f"{sum(d['flops_seen'] for d in done) / len(done):.3e} |")
    return lines


def per_language_lines(reports: dict) -> list[str]:
    """Seed 1's per-language sentiment and translation scores with their bootstrap intervals."""
    seed = PLAN["sweep_seed"]
    lines = [f"Per language, seed {seed} (bootstrap 95% intervals over records):\n",
             "| arm (w) | " + " | ".join(sorted(next(iter(reports.values()))["sentiment"])) + " |" if reports else "",
             "|---|" + "---:|" * len(next(iter(reports.values()))["sentiment"]) if reports else ""]
    for (arm, s), r in sorted(reports.items()):
        if s == seed:
            lines.append(f"| {arm} | " + " | ".join(
                f"{v['rank_macro_f1']:.3f} [{v['rank_macro_f1_ci'][0]:.3f}, {v['rank_macro_f1_ci'][1]:.3f}]"
                for _, v in sorted(r["sentiment"].items())) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report-only", action="store_true", help="train nothing: write the page from what is scored")
    parser.add_argument("--stage", type=int, choices=[1, 2, 3, 4], help="run the stages up to this one only")
    args = parser.parse_args()
    command = ".venv/bin/python -m sabiscale_analysis.exp_prompt_weight"
    if not args.report_only:
        prepare_unless_done(RECIPE)
        for number in range(1, (args.stage or 4) + 1):
            for arm, seed in stages(best_of_sweep(collect()))[number - 1]:
                run = train_arm(arm, seed)
                if run is not None:
                    score(run)
                    write_results(collect(), command)
    write_results(collect(), command)


if __name__ == "__main__":
    main()
