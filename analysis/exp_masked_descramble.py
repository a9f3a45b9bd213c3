"""SabiYarn's masked-loss experiment, on real sentences from ../shared/data/text, over several seeds.

Descrambling (the shuffled words of a real sentence -> the sentence) trained with the same data,
model, seed and steps twice: the prompt masked (loss on the answer only, `loss.kind=masked`) and
not masked (`loss.kind=clm`, every token). Compared, per seed and as mean ± standard deviation:
the held-out answer-token loss over training (the same teacher-forced measure for both runs), how
many steps each needs to reach the unmasked run's final answer loss, greedy exact match on
held-out sentences; and for the first seed the token-level loss trajectories of a fixed probe
(analysis/trajectories.py).

    .venv/bin/python -m sabiscale_analysis.exp_masked_descramble                        # 3 seeds, the 4-layer model
    .venv/bin/python -m sabiscale_analysis.exp_masked_descramble --model small --seeds 1  # the first, 2-layer setting
    .venv/bin/python -m sabiscale_analysis.exp_masked_descramble --steps 60 --seeds 1     # a quick look

Resumable: a finished run or score is reused, an interrupted run continues from its checkpoint.
Writes analysis/results/masked_descramble.{md,json,png} and the trajectory report beside them;
the runs stay in runs/experiments/masked_descramble/<model>-<steps>/.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sabiscale_analysis.experiment import (RECIPE, ROOT, DecisionRule, answer_loss_curve, decide, held_out_examples,
                                           mean_sd, paired, plot_curves, rendered_line,
                                           sabiscale, steps_to_reach, train_unless_done)

RESULTS = ROOT / "analysis" / "results"
KINDS = {"masked": "masked (answer only)", "clm": "not masked (all tokens)"}
MODELS = {  # small: the first run of this experiment; large: 4x its layer compute
    "small": {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 344},
    "large": {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 688},
}


def common(args) -> list[str]:
    model = [f"model.{key}={value}" for key, value in MODELS[args.model].items()]
    return [f"data.jsonl_root={ROOT.parent / 'shared' / 'data'}", "data.tasks=[descramble]",
            f"data.max_records_per_file={args.records}", "data.seq_len=256", "data.sequences_per_shard=256",
            "data.val_fraction=0.05", "tokenizer.vocab_size=4000", *model, "train.micro_batch_size=8",
            f"train.max_steps={args.steps}", f"train.eval_every={args.eval_every}", "train.eval_batches=8",
            f"train.probe_every={args.eval_every}", "train.probe_batches=4", "train.log_every=50",
            "train.checkpoint_every=100", "optim.warmup_steps=20", "optim.lr=3e-3", "tracking.system_metrics=false"]


def train(work: Path, data: Path, kind: str, seed: int, args) -> Path:
    """One run, trained to the end (a finished run is left as it is, a stopped one continues)."""
    run = work / f"{kind}-seed{seed}"
    train_unless_done(RECIPE, *common(args), f"seed={seed}", f"output_dir={run}", f"data.dir={run}",
              f"loss.kind={kind}", f"data.shards_dir={data / 'shards'}",
              f"tokenizer.path={data / 'tokenizer' / 'tokenizer.json'}")
    return run


def exact_match(run: Path, examples: list, limit: int, seed: int) -> float:
    """Greedy exact match over `limit` held-out sentences per language, cached in the run."""
    cached = run / f"exact_match_{limit}.json"
    if not cached.is_file():
        from sabiscale.evaluate.heldout import generation_metrics
        from sabiscale.train.checkpoint import load_trained_lm

        lm, tok, _ = load_trained_lm(run / "checkpoints")
        scores = generation_metrics(lm, tok, examples, limit, seed)
        total = sum(s["examples"] for s in scores.values())
        cached.write_text(json.dumps(sum(s["exact_match"] * s["examples"] for s in scores.values()) / max(total, 1)))
    return json.loads(cached.read_text())


def per_seed(curves: dict[str, dict[int, float]], exact: dict[str, float]) -> dict[str, dict]:
    """kind -> final loss, steps to reach the unmasked run's final loss (of the same seed), exact match."""
    target = curves["clm"][max(curves["clm"])]
    return {kind: {"final_answer_loss": curves[kind][max(curves[kind])],
                   "steps_to_unmasked_final_loss": steps_to_reach(curves[kind], target),
                   "exact_match": exact[kind]} for kind in KINDS}


RULE = DecisionRule("final held-out answer-token loss (nats)", effect=0.05, lower_is_better=True)


def verdict(seeds: list[dict]) -> str:
    """The paired rule over the seeds: masked minus not masked, final held-out answer loss."""
    result = paired({s["seed"]: s["masked"]["final_answer_loss"] for s in seeds},
                    {s["seed"]: s["clm"]["final_answer_loss"] for s in seeds}, RULE.lower_is_better)
    return decide(result, RULE, ("masked", "not masked"))


def write_results(args, seeds: list[dict], curves: dict, categories: dict, report: Path, minutes: float,
                  date: str, rendered_by: str) -> None:
    command = (f".venv/bin/python -m sabiscale_analysis.exp_masked_descramble --model {args.model} --seeds {args.seeds} "
               f"--steps {args.steps} --eval-every {args.eval_every} --records {args.records} "
               f"--exact-match-examples {args.exact_match_examples}")
    model = MODELS[args.model]
    (RESULTS / "masked_descramble.json").write_text(json.dumps(
        {"command": command, "date": date, "minutes": minutes, "model": model,
         "per_seed": seeds, "curves": curves, "trajectory_categories_first_seed": categories}, indent=2) + "\n")
    plot_curves(curves, RESULTS / "masked_descramble.png", "held-out answer-token loss",
                "descrambling: prompt masked vs not masked")

    def cells(measure: str, fmt: str) -> str:
        out = []
        for kind in KINDS:
            values = [s[kind][measure] for s in seeds]
            if any(v is None for v in values):
                shown = ", ".join(str(v) if v is not None else f"not within {args.steps}" for v in values)
            else:
                mean, sd = mean_sd(values)
                shown = f"{mean:{fmt}} ± {sd:{fmt}} ({', '.join(f'{v:{fmt}}' for v in values)})"
            out.append(shown)
        return " | ".join(out)

    lines = ["# SabiYarn's masked-loss experiment: descrambling, prompt masked vs not masked\n",
             "Claim (SabiYarn): computing the loss only on the answer tokens makes the model converge faster and "
             "focus on the task.\n",
             f"Command: `{command}`  ", rendered_by,
             f"Date of the runs: {date}; {minutes:.0f} minutes on a 2-core CPU (runs already finished are "
             f"reused, not timed). Real sentences from ../shared/data/text (every language, {args.records} per file); "
             f"a {model['num_layers']}-layer Llama (hidden {model['hidden_size']}), 4k BPE, micro-batch 8 x 256, "
             f"{args.steps} steps; the same data, model, seed and steps for both losses, seeds 1..{args.seeds} (the "
             "seed sets the initial weights and the sample order). Mean ± standard deviation over seeds, each "
             "seed's value in brackets. Held-out records: the validation hash split of the text files (never in "
             "the training shards). The arms are matched on steps, not compute: a masked step needs fewer FLOPs "
             "(its head and last layer run only on answer tokens).\n",
             "| | " + " | ".join(KINDS.values()) + " |", "|---|---:|---:|",
             f"| final held-out answer-token loss | {cells('final_answer_loss', '.3f')} |",
             f"| steps to reach the same seed's unmasked final answer loss | {cells('steps_to_unmasked_final_loss', '.0f')} |",
             f"| greedy exact match, {args.exact_match_examples} held-out sentences per language | "
             f"{cells('exact_match', '.3f')} |"]
    for name in ("L->L", "H->L", "H->H", "L->H"):
        lines.append(f"| probe tokens {name} (seed 1) | " + " | ".join(f"{categories[k][name]:.1%}" for k in KINDS) + " |")
    lines += ["", RULE.describe(fixed_before=False), "", f"**Verdict:** {verdict(seeds)}", "",
              "Held-out answer-token loss per evaluation step, mean over seeds:\n",
              "| step | " + " | ".join(KINDS.values()) + " |", "|---:|---:|---:|"]
    for step in sorted(curves["masked seed 1"]):
        means = [mean_sd([curves[f"{k} seed {s}"][step] for s in range(1, args.seeds + 1)])[0] for k in KINDS]
        lines.append(f"| {step} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    lines += ["", "![held-out answer-token loss](masked_descramble.png)"]
    if report.is_file():  # written by the full command; the runs it reads are not kept in the repository
        link = report.relative_to(RESULTS)
        lines += ["", f"Token-level trajectories of both runs of seed 1: [{link}]({link})"]
    (RESULTS / "masked_descramble.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="large")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--records", type=int, default=2000, help="sentences read per language file")
    parser.add_argument("--exact-match-examples", type=int, default=40, help="held-out sentences decoded per language")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite masked_descramble.md from the saved JSON with the current rule (no training)")
    args = parser.parse_args()
    if args.report_only:
        saved = json.loads((RESULTS / "masked_descramble.json").read_text())
        run_args = parser.parse_args(saved["command"].split()[3:])
        seeds = [{"seed": i + 1, **s} for i, s in enumerate(saved["per_seed"])]
        curves = {name: {int(step): v for step, v in curve.items()} for name, curve in saved["curves"].items()}
        write_results(run_args, seeds, curves, saved["trajectory_categories_first_seed"],
                      RESULTS / "masked_descramble_trajectories" / "report.md", saved["minutes"], saved["date"],
                      rendered_line(["--report-only"]))
        return
    started = time.monotonic()
    work = ROOT / "runs" / "experiments" / "masked_descramble" / f"{args.model}-{args.steps}"
    data = work / "data"
    if not (data / "shards" / "manifest.json").is_file():
        sabiscale("prepare", str(RECIPE), *common(args), f"output_dir={data}", f"data.dir={data}")
    held_out = held_out_examples(common(args))
    seeds, curves = [], {}
    for seed in range(1, args.seeds + 1):  # seed by seed, so a stopped experiment already holds whole pairs
        runs = {kind: train(work, data, kind, seed, args) for kind in KINDS}
        seed_curves = {kind: answer_loss_curve(run) for kind, run in runs.items()}
        curves.update({f"{kind} seed {seed}": c for kind, c in seed_curves.items()})
        seeds.append({"seed": seed, **per_seed(seed_curves, {k: exact_match(r, held_out, args.exact_match_examples, seed)
                                                             for k, r in runs.items()})})
    from sabiscale_analysis.trajectories import classify, fractions, load_trajectories, write_report

    first = {kind: work / f"{kind}-seed1" for kind in KINDS}
    report = write_report(list(first.values()), RESULTS / "masked_descramble_trajectories")
    categories = {kind: fractions(classify(load_trajectories(run))) for kind, run in first.items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_results(args, seeds, curves, categories, report, (time.monotonic() - started) / 60, time.strftime("%Y-%m-%d"),
                  rendered_line(None))


if __name__ == "__main__":
    main()
