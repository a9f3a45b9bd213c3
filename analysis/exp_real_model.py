"""The real-data model (launch/recipes/naija_small.yaml) and its all-token peer, trained in
time-boxed sessions and evaluated on the official dev records of ../shared/data.

Each call trains both runs for at most --minutes each (SIGTERM at the limit: the run saves a
checkpoint and stops; the next call continues from it, so the whole budget can be spread over
several sessions), and once a run has reached train.max_steps evaluates it with `sabiscale eval
--full` (every dev record, 43k here: an estimated ~45 min per run on 2 cores, from the 200-per-file
eval's rate; 200 decoded per task and
language where the data has them), or with --eval-records N on N per file spread over it. The
peer: the same recipe with `loss.kind=clm` (the causal loss on every token), the same data and
steps; the masked run computes its loss head on the answer tokens only, so it spends less.

    .venv/bin/python -m sabiscale_analysis.exp_real_model --minutes 90     # repeat until both are done
    .venv/bin/python -m sabiscale_analysis.exp_real_model --steps 1000     # a shorter complete run

--steps sets train.max_steps of both runs (default: the recipe's 6000); the learning rate then
decays over those steps, so a short run is a finished short run, not a cut long one.

    .venv/bin/python -m sabiscale_analysis.exp_real_model --steps 1600 --eval-records 200   # this session's

Writes analysis/results/real_model.{md,json,png} when both are evaluated; runs stay in runs/naija_small*.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from sabiscale_analysis.experiment import (ROOT, answer_loss_curve, plot_curves, rendered_line, sabiscale, trained,
                                           train_time_boxed)

RECIPE = ROOT / "launch" / "recipes" / "naija_small.yaml"
RUNS = {"masked (SabiYarn)": ROOT / "runs" / "naija_small", "all tokens (clm peer)": ROOT / "runs" / "naija_small_clm"}
RESULTS = ROOT / "analysis" / "results"
DATA = ROOT / "runs" / "data" / "shared_data"  # the recipe's data.dir


# the downstream score that decides each task family, and below which it is called weak here
WEAK_BELOW = {"ner": ("entity_f1", 0.3), "sentiment": ("macro_f1", 0.4), "translation": ("chrf", 20.0),
              "descramble": ("exact_match", 0.1)}


def train_for(run: Path, kind: str, minutes: float, steps: int | None) -> bool:
    """Train until max_steps or the time box; True once the run is complete."""
    from sabiscale.config import load_config

    return train_time_boxed(RECIPE, run, steps or load_config(RECIPE).train.max_steps, minutes, f"loss.kind={kind}")


def evaluate(run: Path, records: int | None) -> dict:
    """`sabiscale eval` on the dev records: every one (--full), or `records` per file spread over
    it; 200 decoded per task and language either way."""
    report = run / f"eval_dev_{records or 'full'}.json"
    if not report.is_file():
        sample = ["--max-per-file", str(records), "--generate", "200"] if records else ["--full"]
        sabiscale("eval", str(run / "checkpoints"), "--data", str(ROOT.parent / "shared" / "data"), "--split", "dev",
                  *sample, "--out", str(report))
    return json.loads(report.read_text())


def weak_spots(report: dict) -> list[str]:
    """task/language entries whose deciding score is below WEAK_BELOW."""
    weak = []
    for key, scores in sorted(report["generation"].items()):
        measure, bar = WEAK_BELOW.get(key.split("/")[0], (None, None))
        if measure in scores and scores[measure] < bar:
            weak.append(f"{key} ({measure} {scores[measure]:.2f})")
    return weak


def repo_relative(path: str) -> str:
    """A path as the committed results name it: relative to the repository (which may be a
    worktree on another machine), not by this machine's absolute path."""
    return os.path.relpath(path, ROOT)


def better_on(reports: dict[str, dict]) -> dict[str, dict[str, list[str]]]:
    """measure family -> winner (a run's name or "tie") -> the task/languages where it is better:
    by each task's deciding score in generation, and by teacher-forced answer bits/byte."""
    names = list(reports)
    out = {"score": {n: [] for n in [*names, "tie"]}, "bits/byte": {n: [] for n in [*names, "tie"]}}
    for key in sorted(set.intersection(*(set(r["generation"]) for r in reports.values()))):
        measure, _ = WEAK_BELOW.get(key.split("/")[0], (None, None))
        values = [reports[n]["generation"][key].get(measure) for n in names]
        if None not in values:
            best = max(values)
            out["score"][names[values.index(best)] if values.count(best) == 1 else "tie"].append(key)
    for key in sorted(set.intersection(*(set(r["teacher_forced"]) for r in reports.values()))):
        values = [reports[n]["teacher_forced"][key]["bits_per_byte"] for n in names]
        best = min(values)
        out["bits/byte"][names[values.index(best)] if values.count(best) == 1 else "tie"].append(key)
    return out


def task_leads(reports: dict[str, dict]) -> dict[str, str]:
    """task -> the run that is better on most of its languages by every measure that separates
    them (the deciding score, answer bits/byte; one where all are tied does not count), or "split"."""
    names = list(reports)
    wins = better_on(reports)
    tasks = sorted({key.split("/")[0] for key in reports[names[0]]["teacher_forced"]})
    leads = {}
    for task in tasks:
        sides = set()
        for measure in wins.values():
            counts = [sum(key.split("/")[0] == task for key in measure[name]) for name in names]
            if sum(counts):
                sides.add(names[counts.index(max(counts))] if counts.count(max(counts)) == 1 else "split")
        leads[task] = sides.pop() if len(sides) == 1 else "split"
    return leads


def head_to_head(reports: dict[str, dict]) -> list[str]:
    """The count of task/languages each run is better on, and the one-sentence verdict."""
    masked, clm = list(reports)
    wins = better_on(reports)
    score, bits = wins["score"], wins["bits/byte"]
    lines = [f"By each task's deciding score ({', '.join(f'{t}: {m}' for t, (m, _) in WEAK_BELOW.items())}), "
             f"{masked} is better on {len(score[masked])}, {clm} on {len(score[clm])}, tied on {len(score['tie'])} "
             f"task/languages (better with {masked}: {', '.join(score[masked]) or 'none'}). By teacher-forced answer "
             f"bits/byte, {masked} is lower on {len(bits[masked])} and {clm} on {len(bits[clm])} "
             f"(lower with {masked}: {', '.join(bits[masked]) or 'none'}). One run each: differences inside "
             "the bootstrap intervals of the eval reports, or of a few points, say nothing about seeds.", ""]
    leads = task_leads(reports)
    ahead = {side: [task for task, lead in leads.items() if lead == side] for side in (masked, clm, "split")}
    split = f"; split on {', '.join(ahead['split'])}" if ahead["split"] else ""
    if ahead[masked] and not ahead[clm]:
        verdict = f"Confirmed at this length on one seed: the masked loss leads on {', '.join(ahead[masked])} and trails on no task{split}."
    elif ahead[clm] and not ahead[masked]:
        verdict = f"Not confirmed at this length on one seed: the all-token peer leads on {', '.join(ahead[clm])} and the masked loss on no task{split}."
    elif ahead[masked]:
        verdict = (f"Confirmed only in part at this length on one seed: the masked loss leads on {', '.join(ahead[masked])}, "
                   f"the all-token peer on {', '.join(ahead[clm])}{split}.")
    else:
        verdict = "Not confirmed at this length on one seed: neither loss leads on any task."
    lines += [f"**Verdict:** {verdict} (A side leads on a task when it is better on most of its languages by "
              "every measure that tells them apart: the deciding score and the answer bits/byte.)"]
    return lines


def write_results(reports: dict[str, dict], curves: dict[str, dict[int, float]], command: str,
                  facts: dict[str, dict]) -> None:
    names = list(reports)
    keys = sorted(set().union(*(reports[n]["generation"] for n in names)))
    columns = "|---|" + "---:|" * len(names)
    first = facts[names[0]]
    per_file = reports[names[0]].get("examples_per_file")
    protocol = f"{per_file} per file spread evenly over it, teacher-forced" if per_file else "every record teacher-forced"
    lines = ["# The real-data model: naija_small on ../shared/data, masked vs its all-token peer\n",
             "Claim (SabiYarn): computing the loss only on the answer tokens makes the model better at the tasks; "
             "here at equal steps against the causal loss on every token.\n",
             f"Command: `{command}` (repeated until both runs finished; `--report-only` writes what there is)  \n"
             f"{rendered_line(None)}\n"
             f"Date: {time.strftime('%Y-%m-%d')}. Recipe "
             f"`launch/recipes/naija_small.yaml` (11.6M-parameter Llama, 16k BPE, 8 x 512 tokens per step), step "
             f"{first['step']}{' for both' if len(names) == 2 else ''} ({first['tokens_seen'] / 1e6:.1f}M tokens each, "
             f"{first['precision']}: what "
             "engine.precision=auto chose on this 2-core CPU); the peer is the same recipe with `loss.kind=clm` (the "
             "causal loss on every token: the same data and steps; the masked run computes its loss head on the answer "
             "tokens only, so it spends less compute per step). `sabiscale eval` on the held-out records (never in "
             f"a training shard; records that appear in training anyway are left out and counted; {protocol}; up to "
             "200 decoded greedily per task and language).\n",
             *[f"**{name}: not finished yet** (its last checkpoint: step {facts[name]['step'] if name in facts else 0} "
               f"of {first['step']}); the same command, without --report-only, continues it and completes this file.\n"
               for name in RUNS if name not in reports],
             "| task/language | " + " | ".join(names) + " |", columns]
    for key in keys:
        cells = []
        for name in names:
            scores = reports[name]["generation"].get(key, {})
            cells.append(", ".join(f"{k} {v:.3f}" for k, v in scores.items() if isinstance(v, float)) or "-")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "| task/language (teacher-forced) | " + " | ".join(f"{n} bits/byte" for n in names) + " |", columns]
    for key in sorted(reports[names[0]]["teacher_forced"]):
        lines.append(f"| {key} | " + " | ".join(f"{reports[n]['teacher_forced'][key]['bits_per_byte']:.3f}" for n in names) + " |")
    lines += ["", *head_to_head(reports)] if len(reports) == 2 else []
    lines += ["", "Still weak (" + ", ".join(f"{t} {m} < {b}" for t, (m, b) in WEAK_BELOW.items()) + "):", ""]
    lines += [f"- {name}: " + (", ".join(weak_spots(reports[name])) or "none") for name in names]
    lines += ["", "![validation answer-token loss](real_model.png)"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot_curves(curves, RESULTS / "real_model.png", "validation answer-token loss", "naija_small: masked vs all tokens")
    reports = {name: {**r, "checkpoint": repo_relative(r["checkpoint"]), "data": repo_relative(r["data"])}
               for name, r in reports.items()}
    (RESULTS / "real_model.json").write_text(json.dumps({"command": command, "trained": facts, "reports": reports,
                                                        "curves": curves},
                                                        indent=2, ensure_ascii=False) + "\n")
    (RESULTS / "real_model.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=90, help="training time per run in this session")
    parser.add_argument("--steps", type=int, help="train.max_steps of both runs (default: the recipe's)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: evaluate the runs that are complete and write what there is")
    parser.add_argument("--eval-records", type=int,
                        help="dev records per file, spread over it (default: every one; an estimated ~45 min per run here)")
    args = parser.parse_args()
    if args.report_only:
        facts = {name: trained(run) for name, run in RUNS.items() if (run / "checkpoints" / "latest").is_file()}
        done = {name: name in facts and facts[name]["step"] == args.steps for name in RUNS}
    else:
        if not (DATA / "shards" / "manifest.json").is_file():  # a fresh machine: tokenizer and shards first
            sabiscale("prepare", str(RECIPE))
        done = {name: train_for(run, "masked" if "masked" in name else "clm", args.minutes, args.steps)
                for name, run in RUNS.items()}
        facts = {name: trained(run) for name, run in RUNS.items()}
    if not all(done.values()) and not args.report_only:
        print("not finished yet: run the same command again to continue from the checkpoints")
        return
    command = f".venv/bin/python -m sabiscale_analysis.exp_real_model --minutes {args.minutes:g}" + (
        f" --steps {args.steps}" if args.steps else "") + (f" --eval-records {args.eval_records}" if args.eval_records else "")
    finished = [name for name in RUNS if done[name]]
    write_results({name: evaluate(RUNS[name], args.eval_records) for name in finished},
                  {name: answer_loss_curve(RUNS[name]) for name in finished}, command, facts)


if __name__ == "__main__":
    main()
