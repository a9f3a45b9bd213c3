"""Rho-1's selective-LM claim over seeds, two ratios and a self-reference.

The setting of exp_rho1_noise (plain text of ../shared/data/text with a seeded share of noisy
documents; the noise, corpus and tokenizer are fixed), with:
- a reference trained on the clean records (Rho-1's high-quality reference), and a
  self-reference trained on the noisy mix itself (Rho-1's self-reference variant);
- for each seed (initial weights and sample order): all-token training, selective at ratio 0.6
  and 0.8 with the clean reference, and selective 0.6 with the self-reference; same model, data,
  steps and therefore backward compute budget for every run;
- measured: the loss on held-out *clean* documents at every checkpoint, the steps each run needs
  to reach its seed's all-token final clean loss, and the final clean loss per language.

Resumable: finished runs, scores and curves are reused; an interrupted run continues from its
last checkpoint.

    .venv/bin/python -m sabiscale_analysis.exp_rho1_seeds                       # ~60 min on 2 CPU cores
    .venv/bin/python -m sabiscale_analysis.exp_rho1_seeds --steps 40 --seeds 1  # a quick look

Writes analysis/results/rho1_seeds.{md,json,png}; the runs stay in runs/experiments/rho1_seeds/.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from sabiscale_analysis.exp_rho1_noise import common, write_corpora
from sabiscale_analysis.experiment import (RECIPE, ROOT, DecisionRule, decide, held_out_examples, mean_sd, paired,
                                           plot_curves, rendered_line, sabiscale,
                                           steps_to_reach, train_unless_done)

WORK = ROOT / "runs" / "experiments" / "rho1_seeds"
RESULTS = ROOT / "analysis" / "results"
NOISE_SEED = 1234  # the corpus, its noise and the references are the same for every seed


def settings(ratios: list[float]) -> dict[str, dict]:
    """name -> loss kind, ratio and which scored shards (reference) it trains from."""
    out = {"all tokens": {"kind": "masked", "ratio": 1.0, "scored": "scored_clean"}}
    out.update({f"selective {r}": {"kind": "selective", "ratio": r, "scored": "scored_clean"} for r in ratios})
    out[f"selective {ratios[0]}, self-reference"] = {"kind": "selective", "ratio": ratios[0], "scored": "scored_self"}
    return out


def base(seed: int) -> list[str]:
    return common(argparse.Namespace(seed=seed))


def prepare_references(args) -> Path:
    """The noisy mix, a clean reference and a self-reference, and the mix scored by each. Returns
    the mix's tokenizer."""
    mix = WORK / "mix"
    tokenizer = mix / "tokenizer" / "tokenizer.json"
    if not (mix / "shards" / "manifest.json").is_file():
        write_corpora(args.records, args.noise_share, NOISE_SEED, WORK)
        sabiscale("prepare", str(RECIPE), *base(NOISE_SEED), f"data.jsonl_root={WORK / 'noisy'}",
                  f"output_dir={mix}", f"data.dir={mix}")
    for name, corpus in (("reference_clean", "clean"), ("reference_self", "noisy")):
        ref = WORK / name
        overrides = [*base(NOISE_SEED), f"data.jsonl_root={WORK / corpus}", f"output_dir={ref}", f"data.dir={ref}",
                     f"tokenizer.path={tokenizer}", f"train.max_steps={args.reference_steps}"]
        if not (ref / "shards" / "manifest.json").is_file():
            sabiscale("prepare", str(RECIPE), *overrides)
        train_unless_done(RECIPE, *overrides)
        scored = WORK / f"scored_{name.split('_')[1]}"
        if not (scored / "manifest.json").is_file():
            sabiscale("score", "--reference", str(ref / "checkpoints"), "--shards", str(mix / "shards"), "--out", str(scored))
    return tokenizer


def train_run(name: str, setting: dict, seed: int, args, tokenizer: Path) -> Path:
    run = WORK / f"{name.replace(' ', '_').replace(',', '')}-seed{seed}"
    train_unless_done(RECIPE, *base(seed), f"output_dir={run}", f"data.dir={run}",
              f"loss.kind={setting['kind']}", f"loss.ratio={setting['ratio']}", f"data.jsonl_root={WORK / 'noisy'}",
              f"data.shards_dir={WORK / setting['scored']}", f"tokenizer.path={tokenizer}",
              f"train.max_steps={args.steps}", f"train.checkpoint_every={args.checkpoint_every}", "train.keep_last=0")
    return run


def clean_curve(run: Path, examples: list) -> dict:
    """{"curve": step -> clean held-out loss, "per_language": final clean loss per language},
    computed once per run and kept beside it."""
    cached = run / "clean_curve.json"
    if cached.is_file():
        data = json.loads(cached.read_text())
        return {"curve": {int(k): v for k, v in data["curve"].items()}, "per_language": data["per_language"]}
    from sabiscale.evaluate.heldout import teacher_forced
    from sabiscale.train.checkpoint import complete_checkpoints, load_trained_lm

    curve, per_language = {}, {}
    for tag in complete_checkpoints(run / "checkpoints"):
        lm, tok, meta = load_trained_lm(tag)
        groups = teacher_forced(lm, tok, examples)
        curve[meta["step"]] = (sum(math.log(m["perplexity"]) * m["answer_tokens"] for m in groups.values())
                               / sum(m["answer_tokens"] for m in groups.values()))
        per_language = {key.split("/")[1]: math.log(m["perplexity"]) for key, m in groups.items()}
    cached.write_text(json.dumps({"curve": curve, "per_language": per_language}, indent=2) + "\n")
    return {"curve": curve, "per_language": per_language}


def spread(values: list[float]) -> str:
    return "{:.3f} ± {:.3f}".format(*mean_sd(values))


RULE = DecisionRule("final clean held-out loss (nats)", effect=0.05, lower_is_better=True)


def verdicts(table: dict, names: list[str]) -> list[str]:
    """The paired rule, each selective setting against all-token training over the same seeds."""
    base = {r["seed"]: r["final"] for r in table[names[0]]}
    return [decide(paired({r["seed"]: r["final"] for r in table[name]}, base, RULE.lower_is_better), RULE,
                   (name, names[0])) for name in names[1:]]


def write_results(args, table: dict, curves: dict, minutes: float, date: str, rendered_by: str) -> None:
    names = list(table)
    command = (f".venv/bin/python -m sabiscale_analysis.exp_rho1_seeds --steps {args.steps} --seeds {args.seeds} "
               f"--reference-steps {args.reference_steps} --records {args.records} --noise-share {args.noise_share} "
               f"--ratios {' '.join(map(str, args.ratios))}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "rho1_seeds.json").write_text(json.dumps({"command": command, "date": date,
                                                         "minutes": minutes, "per_seed": table}, indent=2) + "\n")
    plot_curves(curves, RESULTS / "rho1_seeds.png", "loss on held-out clean text (mean over seeds)",
                "noisy corpus: all tokens vs selective")
    languages = sorted(table[names[0]][0]["per_language"])
    lines = ["# Rho-1's selective LM over seeds: a noisy real-text corpus\n",
             "Claim (Rho-1): training only on the tokens with the highest excess loss over a reference trained on "
             "high-quality data reaches the all-token baseline faster and ends better.\n",
             f"Command: `{command}`  ", rendered_by, f"Date of the runs: {date}; {minutes:.0f} minutes on a 2-core CPU "
             "(results that already existed are reused, not timed). Held-out records: the validation hash split of "
             "the clean text (never in a training shard). Arms are matched on steps, not compute: a selective step "
             "runs the forward pass on every token and the backward only where selected, and its reference costs "
             "its own training run.\n",
             f"Setting: plain text of ../shared/data/text ({args.records} records per language), {args.noise_share:.0%} of "
             "the documents noised (garbage spans, repeated boilerplate, shuffled words; see exp_rho1_noise); "
             f"references trained {args.reference_steps} steps on the clean records and, for the self-reference, on "
             f"the noisy mix itself; every run a 2-layer Llama (hidden 128), 4k BPE, micro-batch 8 x 256, "
             f"{args.steps} steps, seeds 1..{args.seeds}. Mean ± standard deviation over seeds.\n",
             "| setting | final clean loss | steps to the seed's all-token final clean loss | "
             + " | ".join(f"clean loss {lang}" for lang in languages) + " |",
             "|---|---:|---:|" + "---:|" * len(languages)]
    for name in names:
        reached = [r["steps_to_baseline"] for r in table[name]]
        shown = ", ".join(str(s) if s is not None else f">{args.steps}" for s in reached)
        lines.append(f"| {name} | {spread([r['final'] for r in table[name]])} | {shown} | "
                     + " | ".join(spread([r["per_language"][lang] for r in table[name]]) for lang in languages) + " |")
    lines += ["", RULE.describe(fixed_before=False), ""] + [f"**Verdict:** {line}  " for line in verdicts(table, names)]
    lines += ["", "![clean loss](rho1_seeds.png)"]
    (RESULTS / "rho1_seeds.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--reference-steps", type=int, default=400)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--records", type=int, default=1500, help="records read per language file")
    parser.add_argument("--noise-share", type=float, default=0.35)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.6, 0.8])
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite rho1_seeds.md from the saved JSON with the current rule (no training)")
    args = parser.parse_args()
    if args.report_only:
        saved = json.loads((RESULTS / "rho1_seeds.json").read_text())
        table = saved["per_seed"]
        for rows in table.values():
            for r in rows:
                r["curve"] = {int(k): v for k, v in r["curve"].items()}
        mean_curves = {name: {step: statistics.mean(r["curve"][step] for r in rows) for step in rows[0]["curve"]}
                       for name, rows in table.items()}
        write_results(parser.parse_args(saved["command"].split()[3:]), table, mean_curves, saved["minutes"],
                      saved["date"], rendered_line(["--report-only"]))
        return
    started = time.monotonic()
    tokenizer = prepare_references(args)
    held_out = held_out_examples(base(NOISE_SEED) + [f"data.jsonl_root={WORK / 'clean'}"])
    runs = settings(args.ratios)
    table: dict[str, list[dict]] = {name: [] for name in runs}
    for seed in range(1, args.seeds + 1):  # seed by seed: a stopped experiment holds whole comparisons
        measured = {name: clean_curve(train_run(name, s, seed, args, tokenizer), held_out) for name, s in runs.items()}
        baseline = measured["all tokens"]["curve"]
        target = baseline[max(baseline)]
        for name, m in measured.items():
            table[name].append({"seed": seed, "final": m["curve"][max(m["curve"])], "curve": m["curve"],
                                "steps_to_baseline": steps_to_reach(m["curve"], target),
                                "per_language": m["per_language"]})
    mean_curves = {name: {step: statistics.mean(r["curve"][step] for r in rows) for step in rows[0]["curve"]}
                   for name, rows in table.items()}
    write_results(args, table, mean_curves, (time.monotonic() - started) / 60, time.strftime("%Y-%m-%d"),
                  rendered_line(None))


if __name__ == "__main__":
    main()
