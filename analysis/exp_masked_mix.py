"""SabiYarn's masked-loss claim on the real multi-task mix, over several seeds.

The real-data recipe (launch/recipes/shared_data.yaml: translation, NER, sentiment, descrambling
and plain text in every language of ../shared/data) trained with the prompt masked
(`loss.kind=masked`, loss on the answer tokens only) and not masked (`loss.kind=clm`, every
token), same model, data, steps and therefore compute, for each seed (the seed sets both the
initial weights and the sample order). Each run is then scored by `sabiscale eval` on the
official dev records: teacher-forced answer-token loss per task and language, and greedy
generation scored per task (NER span F1, sentiment macro-F1, translation chrF, descrambling
exact match). Reported: the mean and standard deviation over seeds, per task.

Resumable: a finished run or evaluation is never redone, and an interrupted run continues from
its last checkpoint, so the same command picks up where it stopped.

    .venv/bin/python -m sabiscale_analysis.exp_masked_mix                       # ~60-80 min on 2 CPU cores
    .venv/bin/python -m sabiscale_analysis.exp_masked_mix --steps 40 --seeds 1  # a quick look

Writes analysis/results/masked_mix.{md,json,png}; the runs stay in runs/experiments/masked_mix/.
"""
from __future__ import annotations

import argparse
import json
import math
import time

from sabiscale_analysis.experiment import (RECIPE, ROOT, answer_loss_curve, mean_sd, plot_curves, sabiscale,
                                           train_unless_done)

WORK = ROOT / "runs" / "experiments" / "masked_mix"
DATA = ROOT / "runs" / "data" / "shared_data"  # the recipe's own prepared data, shared with it
RESULTS = ROOT / "analysis" / "results"
KINDS = {"masked": "masked (answer only)", "clm": "not masked (all tokens)"}
# the downstream score that decides each task family, read from the eval report
SCORES = {"ner": "entity_f1", "sentiment": "macro_f1", "translation": "chrf", "descramble": "exact_match"}


def train_and_eval(kind: str, seed: int, args) -> dict:
    run = WORK / f"{kind}-seed{seed}"
    report = run / f"eval_dev_step{args.steps}.json"
    if not report.is_file():
        train_unless_done(RECIPE, f"output_dir={run}", f"data.dir={DATA}", f"loss.kind={kind}", f"seed={seed}",
                  f"train.max_steps={args.steps}", f"optim.warmup_steps={max(1, args.steps // 10)}",
                  f"train.eval_every={max(1, args.steps // 4)}", "train.log_every=50", "train.checkpoint_every=100",
                  "tracking.system_metrics=false")
        sabiscale("eval", str(run / "checkpoints"), "--data", str(ROOT.parent / "shared" / "data"), "--split", "dev",
                  "--max-per-file", str(args.eval_records), "--generate", str(args.generate), "--out", str(report))
    return json.loads(report.read_text())


def per_task(report: dict) -> dict[str, dict[str, float]]:
    """Task family -> answer loss (token-weighted over languages) and its downstream score
    (example-weighted over languages)."""
    out: dict[str, dict[str, float]] = {}
    for task in sorted({name.split("/")[0] for name in report["teacher_forced"]}):
        forced = [v for k, v in report["teacher_forced"].items() if k.split("/")[0] == task]
        tokens = sum(v["answer_tokens"] for v in forced)
        out[task] = {"answer_loss": sum(math.log(v["perplexity"]) * v["answer_tokens"] for v in forced) / max(tokens, 1)}
        if task in SCORES:
            gen = [v for k, v in report["generation"].items() if k.split("/")[0] == task]
            n = sum(v["examples"] for v in gen)
            out[task][SCORES[task]] = sum(v[SCORES[task]] * v["examples"] for v in gen) / max(n, 1)
    return out


def summarize(results: dict[str, list[dict]]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """kind -> task -> measure -> one value per seed."""
    table: dict = {}
    for kind, reports in results.items():
        for report in reports:
            for task, measures in per_task(report).items():
                for measure, value in measures.items():
                    table.setdefault(kind, {}).setdefault(task, {}).setdefault(measure, []).append(value)
    return table


def verdict(table: dict) -> str:
    """One sentence from the numbers: a task counts for a side only when the means differ by more
    than both spreads."""
    wins = {"masked": [], "clm": []}
    for task, measures in table["masked"].items():
        for measure, values in measures.items():
            m, sm = mean_sd(values)
            c, sc = mean_sd(table["clm"][task][measure])
            better_masked = m < c if measure == "answer_loss" else m > c
            if abs(m - c) > sm + sc:
                wins["masked" if better_masked else "clm"].append(f"{task} {measure}")
    if wins["masked"] and not wins["clm"]:
        return f"Confirmed in this setting: the masked loss is better beyond the seed spread on {', '.join(wins['masked'])}, and worse on nothing."
    if not wins["masked"]:
        return ("Not confirmed in this setting: the masked loss is not better beyond the seed spread on any task"
                + (f" (worse on {', '.join(wins['clm'])})." if wins["clm"] else "."))
    return (f"Confirmed only in part: masked is better beyond the seed spread on {', '.join(wins['masked'])}, "
            f"worse on {', '.join(wins['clm'])}.")


def write_results(args, table: dict, curves: dict, minutes: float) -> None:
    command = (f".venv/bin/python -m sabiscale_analysis.exp_masked_mix --steps {args.steps} --seeds {args.seeds} "
               f"--eval-records {args.eval_records} --generate {args.generate}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "masked_mix.json").write_text(json.dumps(
        {"command": command, "date": time.strftime("%Y-%m-%d"), "minutes": minutes, "per_seed": table,
         "curves": curves}, indent=2) + "\n")
    plot_curves(curves, RESULTS / "masked_mix.png", "validation answer-token loss", "full mix: masked vs not masked")
    lines = ["# SabiYarn's masked loss on the full real multi-task mix\n",
             "Claim (SabiYarn): computing the loss only on the answer tokens makes the model converge faster and "
             "focus on the task.\n",
             f"Command: `{command}`  ", f"Date: {time.strftime('%Y-%m-%d')}; {minutes:.0f} minutes on a 2-core CPU "
             "(runs and evaluations that already existed are reused, not timed).\n",
             f"Setting: `launch/recipes/shared_data.yaml` (11.6M-parameter Llama, 16k BPE, micro-batch 8 x 512), "
             f"{args.steps} steps per run, the same data, model and steps for both losses, seeds 1..{args.seeds}. "
             f"Scores on the official dev records of ../shared/data (first {args.eval_records} per file, "
             f"{args.generate} decoded greedily per task and language). Mean ± standard deviation over seeds.\n",
             "| task | measure | " + " | ".join(KINDS.values()) + " |", "|---|---|---:|---:|"]
    for task in sorted(table["masked"]):
        for measure in table["masked"][task]:
            cells = ["{:.3f} ± {:.3f}".format(*mean_sd(table[k][task][measure])) for k in KINDS]
            lines.append(f"| {task} | {measure} | " + " | ".join(cells) + " |")
    lines += ["", f"**Verdict:** {verdict(table)}", "", "![validation answer-token loss](masked_mix.png)"]
    (RESULTS / "masked_mix.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--eval-records", type=int, default=100, help="dev records read per file")
    parser.add_argument("--generate", type=int, default=40, help="dev examples decoded per task and language")
    args = parser.parse_args()
    started = time.monotonic()
    if not (DATA / "shards" / "manifest.json").is_file():
        sabiscale("prepare", str(RECIPE))
    results: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    for seed in range(1, args.seeds + 1):  # seed by seed, so a stopped experiment already holds whole pairs
        for kind in KINDS:
            results[kind].append(train_and_eval(kind, seed, args))
    curves = {f"{kind} seed {seed}": answer_loss_curve(WORK / f"{kind}-seed{seed}")
              for kind in KINDS for seed in range(1, args.seeds + 1)}
    write_results(args, summarize(results), curves, (time.monotonic() - started) / 60)


if __name__ == "__main__":
    main()
