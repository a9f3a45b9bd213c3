"""Rho-1's selective-LM experiment on real text with injected noise.

Corpus: the plain-text records of ../shared/data/text (every language). A seeded 35% of the
documents get one kind of noise (documented, generated here):
- garbage: a span of 24-64 random characters (letters, digits, punctuation; no tag characters)
  inserted at a random word boundary;
- boilerplate: "Subscribe to our newsletter for the latest news and offers." appended 2-3 times;
- shuffled: the words of a random half of the sentence shuffled in place.
The clean corpus is the same records without noise. Steps:
1. prepare the noisy mix (tokenizer + shards);
2. train a reference on the clean corpus with the mix's tokenizer;
3. `sabiscale score` the mix's shards with it;
4. train on the mix for the same steps and seed: all tokens (`loss.kind=masked`, which for plain
   text is every token after the language tag) vs `loss.kind=selective` with ratio 0.6;
5. compare the loss on held-out *clean* documents at every checkpoint, the steps each needs to
   reach the all-token run's final clean loss, and the token-level trajectories of a probe of the
   (noisy) validation shards.

    .venv/bin/python -m sabiscale_analysis.exp_rho1_noise                 # ~10-15 minutes on 2 CPU cores
    .venv/bin/python -m sabiscale_analysis.exp_rho1_noise --steps 60      # a quick look

Writes analysis/results/rho1_noise.{md,json,png} and the trajectory report beside them; the runs
stay in runs/experiments/rho1_noise/.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import string
import time
from pathlib import Path

from sabiscale_analysis.experiment import (RECIPE, ROOT, held_out_examples, plot_curves, sabiscale, steps_to_reach,
                                           train_unless_done, write_comparison, rendered_line)

WORK = ROOT / "runs" / "experiments" / "rho1_noise"
RESULTS = ROOT / "analysis" / "results"
BOILERPLATE = "Subscribe to our newsletter for the latest news and offers."
GARBAGE_CHARS = string.ascii_letters + string.digits + "!#$%&()*+,-./:;=?@[]^_{}~"


def add_noise(text: str, rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(["garbage", "boilerplate", "shuffled"])
    words = text.split()
    if kind == "garbage":
        junk = "".join(rng.choice(GARBAGE_CHARS) for _ in range(rng.randint(24, 64)))
        at = rng.randint(0, len(words))
        return " ".join(words[:at] + [junk] + words[at:]), kind
    if kind == "boilerplate":
        return " ".join([text] + [BOILERPLATE] * rng.randint(2, 3)), kind
    half = max(2, len(words) // 2)
    start = rng.randint(0, max(0, len(words) - half))
    span = words[start:start + half]
    rng.shuffle(span)
    return " ".join(words[:start] + span + words[start + half:]), kind


def write_corpora(records: int, share: float, seed: int, work: Path = WORK) -> dict[str, int]:
    """<work>/clean/text/<lang>.jsonl and <work>/noisy/text/<lang>.jsonl, line for line the same records."""
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    for src in sorted((ROOT.parent / "shared" / "data" / "text").glob("*.jsonl")):
        clean_lines, noisy_lines = [], []
        for line in src.read_text(encoding="utf-8").splitlines()[:records]:
            record = json.loads(line)
            clean_lines.append(json.dumps(record, ensure_ascii=False))
            if rng.random() < share:
                record["text"], kind = add_noise(record["text"], rng)
                counts[kind] = counts.get(kind, 0) + 1
            noisy_lines.append(json.dumps(record, ensure_ascii=False))
        for name, lines in (("clean", clean_lines), ("noisy", noisy_lines)):
            out = work / name / "text" / src.name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return counts


def common(args) -> list[str]:
    return ["data.tasks=[text]", "data.seq_len=256", "data.sequences_per_shard=256", "data.val_fraction=0.05",
            "tokenizer.vocab_size=4000", "model.hidden_size=128", "model.num_layers=2", "model.num_heads=4",
            "model.intermediate_size=344", "train.micro_batch_size=8", "train.eval_batches=8", "train.log_every=50",
            "optim.warmup_steps=20", "optim.lr=3e-3", "tracking.system_metrics=false", f"seed={args.seed}"]






def clean_loss_curve(run: Path, examples: list) -> dict[int, float]:
    """Answer-token loss (nats) on clean held-out documents at every checkpoint of a run."""
    from sabiscale.train.checkpoint import complete_checkpoints, load_trained_lm
    from sabiscale.evaluate.heldout import teacher_forced

    curve = {}
    for tag in complete_checkpoints(run / "checkpoints"):
        lm, tok, meta = load_trained_lm(tag)
        per_group = teacher_forced(lm, tok, examples)
        nats = sum(math.log(m["perplexity"]) * m["answer_tokens"] for m in per_group.values())
        curve[meta["step"]] = nats / sum(m["answer_tokens"] for m in per_group.values())
    return curve




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--reference-steps", type=int, default=400)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--records", type=int, default=1500, help="records read per language file")
    parser.add_argument("--noise-share", type=float, default=0.35)
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    started = time.monotonic()
    shutil.rmtree(WORK, ignore_errors=True)
    noise = write_corpora(args.records, args.noise_share, args.seed)
    mix, ref = WORK / "mix", WORK / "reference"
    sabiscale("prepare", str(RECIPE), *common(args), f"data.jsonl_root={WORK / 'noisy'}", f"output_dir={mix}", f"data.dir={mix}")
    tokenizer = mix / "tokenizer" / "tokenizer.json"
    reference = [*common(args), f"data.jsonl_root={WORK / 'clean'}", f"output_dir={ref}", f"data.dir={ref}", f"tokenizer.path={tokenizer}",
                 f"train.max_steps={args.reference_steps}"]
    sabiscale("prepare", str(RECIPE), *reference)
    train_unless_done(RECIPE, *reference)
    sabiscale("score", "--reference", str(ref / "checkpoints"), "--shards", str(mix / "shards"), "--out", str(WORK / "scored"))
    runs = {"all tokens": WORK / "all_tokens", f"selective {args.ratio}": WORK / "selective"}
    for (name, run), kind in zip(runs.items(), ("masked", "selective")):
        train_unless_done(RECIPE, *common(args), f"output_dir={run}", f"data.dir={run}", f"loss.kind={kind}",
                  f"loss.ratio={args.ratio}", f"data.jsonl_root={WORK / 'noisy'}", f"data.shards_dir={WORK / 'scored'}",
                  f"tokenizer.path={tokenizer}", f"train.max_steps={args.steps}",
                  f"train.checkpoint_every={args.checkpoint_every}", "train.keep_last=0",
                  f"train.probe_every={args.checkpoint_every}", "train.probe_batches=4")
    held_out = held_out_examples(common(args) + [f"data.jsonl_root={WORK / 'clean'}"])
    curves = {name: clean_loss_curve(run, held_out) for name, run in runs.items()}
    base, sel = list(runs)
    target = curves[base][max(curves[base])]
    reach = {name: steps_to_reach(c, target) for name, c in curves.items()}
    from sabiscale_analysis.trajectories import classify, fractions, load_trajectories, write_report

    report = write_report(list(runs.values()), RESULTS / "rho1_noise_trajectories")
    categories = {name: fractions(classify(load_trajectories(run))) for name, run in runs.items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot_curves(curves, RESULTS / "rho1_noise.png", "loss on held-out clean text",
                f"noisy corpus: all tokens vs selective (ratio {args.ratio})")
    command = (f".venv/bin/python -m sabiscale_analysis.exp_rho1_noise --steps {args.steps} --reference-steps "
               f"{args.reference_steps} --checkpoint-every {args.checkpoint_every} --records {args.records} "
               f"--noise-share {args.noise_share} --ratio {args.ratio} --seed {args.seed}")
    minutes = (time.monotonic() - started) / 60
    (RESULTS / "rho1_noise.json").write_text(json.dumps(
        {"command": command, "date": time.strftime("%Y-%m-%d"), "minutes": minutes, "noise": noise,
         "clean_loss": curves, "steps_to_reach": reach, "trajectory_categories": categories}, indent=2) + "\n")
    lines = ["# Rho-1's selective-LM experiment: a noisy real-text corpus, all tokens vs selective\n",
             f"Command: `{command}`  ", rendered_line(None),
             f"Date: {time.strftime('%Y-%m-%d')}; {minutes:.1f} minutes on a 2-core CPU; one seed, so no verdict "
             "(exp_rho1_seeds compares over paired seeds). Plain text of "
             f"../shared/data/text ({args.records} records per language); noise injected into "
             f"{sum(noise.values())} documents ({', '.join(f'{k} {v}' for k, v in sorted(noise.items()))}); the reference "
             f"trained {args.reference_steps} steps on the clean records with the mix's tokenizer; both runs: "
             "2-layer Llama (hidden 128), 4k BPE, micro-batch 8 x 256, same data, seed and steps.\n",
             f"| | {base} | {sel} |", "|---|---:|---:|",
             f"| final loss on held-out clean text | {curves[base][max(curves[base])]:.3f} | {curves[sel][max(curves[sel])]:.3f} |",
             f"| steps to reach the all-token run's final clean loss ({target:.3f}) | "
             + " | ".join(str(reach[n]) if reach[n] is not None else f"not within {args.steps}" for n in (base, sel)) + " |"]
    write_comparison(lines, (base, sel), (base, sel), categories, curves, "Clean held-out loss per checkpoint",
                     RESULTS / "rho1_noise.png", report, RESULTS / "rho1_noise.md")


if __name__ == "__main__":
    main()
