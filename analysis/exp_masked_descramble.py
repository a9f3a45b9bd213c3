"""SabiYarn's masked-loss experiment, on real sentences from ../shared/data/text.

Descrambling (the shuffled words of a real sentence -> the sentence) trained twice with the same
data, model, seed and steps: the prompt masked (loss on the answer only, `loss.kind=masked`) and
not masked (`loss.kind=clm`, every token). Compared: the held-out answer-token loss over training
(the same teacher-forced measure for both runs), how many steps each needs to reach the unmasked
run's final answer loss, greedy exact-match on held-out sentences, and the token-level loss
trajectories of a fixed probe (analysis/trajectories.py).

    .venv/bin/python -m sabiscale_analysis.exp_masked_descramble             # ~10 minutes on 2 CPU cores
    .venv/bin/python -m sabiscale_analysis.exp_masked_descramble --steps 60  # a quick look

Writes analysis/results/masked_descramble.{md,json,png} and the trajectory report beside them;
the runs stay in runs/experiments/masked_descramble/.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from sabiscale_analysis.experiment import (RECIPE, ROOT, answer_loss_curve, held_out_examples, plot_curves, sabiscale, steps_to_reach,
                                 write_comparison)

WORK = ROOT / "runs" / "experiments" / "masked_descramble"
RESULTS = ROOT / "analysis" / "results"


def common(args) -> list[str]:
    return [f"data.jsonl_root={ROOT.parent / 'shared' / 'data'}", "data.tasks=[descramble]",
            f"data.max_records_per_file={args.records}", "data.seq_len=256", "data.sequences_per_shard=256",
            "data.val_fraction=0.05", "tokenizer.vocab_size=4000", "model.hidden_size=128", "model.num_layers=2",
            "model.num_heads=4", "model.intermediate_size=344", "train.micro_batch_size=8",
            f"train.max_steps={args.steps}", f"train.eval_every={args.eval_every}", "train.eval_batches=8",
            f"train.probe_every={args.eval_every}", "train.probe_batches=4", "train.log_every=50",
            "optim.warmup_steps=20", "optim.lr=3e-3", "tracking.system_metrics=false", f"seed={args.seed}"]




def exact_match(run: Path, examples: list, limit: int, seed: int) -> float:
    from sabiscale.train.checkpoint import load_trained_lm
    from sabiscale.evaluate.heldout import generation_metrics

    lm, tok, _ = load_trained_lm(run / "checkpoints")
    scores = generation_metrics(lm, tok, examples, limit, seed)
    total = sum(s["examples"] for s in scores.values())
    return sum(s["exact_match"] * s["examples"] for s in scores.values()) / max(total, 1)








def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--records", type=int, default=2000, help="sentences read per language file")
    parser.add_argument("--exact-match-examples", type=int, default=40, help="held-out sentences decoded per language")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    started = time.monotonic()
    shutil.rmtree(WORK, ignore_errors=True)
    data = WORK / "data"
    sabiscale("prepare", str(RECIPE), *common(args), f"output_dir={data}", f"data.dir={data}")
    runs = {}
    for kind in ("masked", "clm"):
        runs[kind] = WORK / kind
        sabiscale("train", str(RECIPE), *common(args), f"output_dir={runs[kind]}", f"data.dir={runs[kind]}", f"loss.kind={kind}",
                  f"data.shards_dir={data / 'shards'}", f"tokenizer.path={data / 'tokenizer' / 'tokenizer.json'}")
    curves = {kind: answer_loss_curve(run) for kind, run in runs.items()}
    target = curves["clm"][max(curves["clm"])]
    held_out = held_out_examples(common(args))
    result = {kind: {"final_answer_loss": curves[kind][max(curves[kind])],
                     "steps_to_unmasked_final_loss": steps_to_reach(curves[kind], target),
                     "exact_match": exact_match(run, held_out, args.exact_match_examples, args.seed)}
              for kind, run in runs.items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot_curves(curves, RESULTS / "masked_descramble.png", "held-out answer-token loss",
                "descrambling: prompt masked vs not masked")
    from sabiscale_analysis.trajectories import fractions, classify, load_trajectories, write_report

    report = write_report([runs["masked"], runs["clm"]], RESULTS / "masked_descramble_trajectories")
    categories = {kind: fractions(classify(load_trajectories(run))) for kind, run in runs.items()}
    command = (f".venv/bin/python -m sabiscale_analysis.exp_masked_descramble --steps {args.steps} --eval-every {args.eval_every} "
               f"--records {args.records} --exact-match-examples {args.exact_match_examples} --seed {args.seed}")
    minutes = (time.monotonic() - started) / 60
    (RESULTS / "masked_descramble.json").write_text(json.dumps(
        {"command": command, "date": time.strftime("%Y-%m-%d"), "minutes": minutes, "result": result,
         "curves": curves, "trajectory_categories": categories}, indent=2) + "\n")
    lines = ["# SabiYarn's masked-loss experiment: descrambling, prompt masked vs not masked\n",
             f"Command: `{command}`  ", f"Date: {time.strftime('%Y-%m-%d')}; {minutes:.1f} minutes on a 2-core CPU. "
             f"Real sentences from ../shared/data/text (every language, {args.records} per file); "
             "a 2-layer Llama (hidden 128), 4k BPE, micro-batch 8 x 256, same data, seed and steps for both runs.\n",
             "| | masked (answer only) | not masked (all tokens) |", "|---|---:|---:|",
             f"| final held-out answer-token loss | {result['masked']['final_answer_loss']:.3f} | "
             f"{result['clm']['final_answer_loss']:.3f} |",
             f"| steps to reach the unmasked run's final answer loss ({target:.3f}) | "
             + " | ".join(str(result[k]["steps_to_unmasked_final_loss"] or f"not within {args.steps}")
                          for k in ("masked", "clm")) + " |",
             f"| greedy exact match, held-out sentences | {result['masked']['exact_match']:.1%} | "
             f"{result['clm']['exact_match']:.1%} |"]
    write_comparison(lines, ("masked", "clm"), ("masked", "not masked"), categories, curves,
                     "Answer-token loss per evaluation step", RESULTS / "masked_descramble.png", report,
                     RESULTS / "masked_descramble.md")


if __name__ == "__main__":
    main()
