"""For a GPU day: the two decisive experiments at SabiYarn's scale on one GPU, in one command.

1. Masked vs all tokens (exp_prompt_weight's question): `loss.prompt_weight` 0 vs 1, and 0
   trained for the FLOPs 1 used, over 5 paired seeds.
2. Rho-1 in its own regime (exp_rho1_continued): a base, a reference on the target tasks, the base
   continued on the scored mix, all tokens vs selective 0.6 vs sampled 0.6 (T=1), over 5 paired seeds.

A ~125M-parameter Llama (hidden 768, 12 layers, 12 heads; SabiYarn's size), 1024-token sequences,
ZeRO-1 in bf16 (what engine.precision=auto picks on a bf16 GPU), the real mix of ../shared/data
prepared inside the output directory. Planned on paper for one H100 at ~35% MFU (~0.4M tokens/s):
800 steps of 16 x 1024 tokens (~13M tokens, ~5 epochs of the mix) take about a minute per run,
so about 10 minutes per arm with its 5 seeds and their held-out scoring. Everything is resumable:
the same command continues where a stopped one was.

    .venv/bin/python -m sabiscale_analysis.gpu_day                     # on a GPU machine
    .venv/bin/python -m sabiscale_analysis.gpu_day --dry-run --out /tmp/gpu_day   # CPU: tiny, minutes

--dry-run runs every stage with a tiny model on the embedded demo corpus and 1 seed (CPU): the
pipeline is tested, nothing is decided. Writes <out>/results/{gpu_day,rho1_continued_gpu}.md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sabiscale_analysis.exp_rho1_continued import Scale, run_all, write_results as write_rho1, write_trajectories
from sabiscale_analysis.experiment import (ROOT, DecisionRule, decide, mean_sd, paired, rendered_line, sabiscale,
                                           trained, train_unless_done)
from sabiscale_analysis.heldout_scores import measures, score_run

GPU = ["model.hidden_size=768", "model.num_layers=12", "model.num_heads=12", "model.intermediate_size=2048",
       "data.seq_len=1024", "train.micro_batch_size=16", f"engine.ds_config={ROOT / 'ds_configs' / 'zero1.json'}",
       "optim.lr=6e-4", "optim.warmup_steps=100"]
DRY = ["data.source=demo", "data.jsonl_root=null", "data.demo_examples_per_task=150", "data.seq_len=128",
       "data.sequences_per_shard=32", "data.val_fraction=0.1", "tokenizer.vocab_size=600", "model.hidden_size=64",
       "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=128", "train.micro_batch_size=4",
       "train.eval_batches=1", "optim.warmup_steps=1", "tracking.system_metrics=false"]
RULES = {"answer_loss": DecisionRule("held-out answer loss, mean over tasks (nats per answer token)", 0.05, True),
         "sentiment": DecisionRule("held-out sentiment macro-F1 by rank classification, mean over languages", 0.05, False),
         "chrf": DecisionRule("held-out translation chrF, mean over directions", 1.0, False)}


def scales(out: Path, dry_run: bool) -> tuple[Scale, int, int]:
    """(Scale shared by both experiments, steps of the masked-vs-all runs, records scored)."""
    recipe = ROOT / "launch" / "recipes" / "naija_small.yaml"
    command = f".venv/bin/python -m sabiscale_analysis.gpu_day{' --dry-run' if dry_run else ''} --out {out}"
    if dry_run:
        return Scale(recipe=recipe, work=out / "rho1", data_dir=out / "data", overrides=DRY, base_steps=4,
                     reference_steps=3, steps=3, seeds=[1], loss_records=20, translations=2, probe_every=1,
                     results=out / "results", name="rho1_continued_gpu", require_better_reference=False, command=command), 3, 20
    return Scale(recipe=recipe, work=out / "rho1", data_dir=out / "data", overrides=GPU, base_steps=2000,
                 reference_steps=400, steps=800, seeds=[1, 2, 3, 4, 5], loss_records=400, translations=200,
                 probe_every=40, results=out / "results", name="rho1_continued_gpu", command=command), 800, 400


def prompt_weight_run(scale: Scale, out: Path, arm: str, seed: int, steps: int) -> Path | None:
    """One run of the masked-vs-all experiment; the FLOP-matched arm once both others of its seed ran."""
    run = out / "prompt_weight" / f"{arm}-seed{seed}"
    weight = "1" if arm == "all" else "0"
    if arm == "masked_flops":
        masked, full = trained(out / "prompt_weight" / f"masked-seed{seed}"), trained(out / "prompt_weight" / f"all-seed{seed}")
        if not masked or not full:
            return None
        steps = round(full["flops_seen"] / (masked["flops_seen"] / masked["step"]))
    train_unless_done(scale.recipe, *scale.overrides, f"output_dir={run}", f"data.dir={scale.data_dir}", f"seed={seed}",
                      "loss.kind=masked", f"loss.prompt_weight={weight}", f"train.max_steps={steps}",
                      "train.eval_every=100", "train.checkpoint_every=100", "train.keep_every=0")
    return run


def masked_vs_all(scale: Scale, out: Path, steps: int, records: int) -> dict[str, dict[int, dict]]:
    if not (scale.data_dir / "shards" / "manifest.json").is_file():
        sabiscale("prepare", str(scale.recipe), *scale.overrides, f"data.dir={scale.data_dir}",
                  f"output_dir={out / 'prepare'}")
    table: dict[str, dict[int, dict]] = {"masked": {}, "all": {}, "masked_flops": {}}
    for seed in scale.seeds:
        for arm in table:
            run = prompt_weight_run(scale, out, arm, seed, steps)
            if run is not None:
                table[arm][seed] = measures(score_run(run, records, scale.translations))
    return table


def write_page(out: Path, scale: Scale, table: dict, steps: int, dry_run: bool) -> None:
    names = {"masked": "w=0 (masked)", "all": "w=1 (all tokens)", "masked_flops": "w=0, FLOP-matched to w=1"}
    lines = ["# GPU day: masked vs all tokens at SabiYarn's scale" + (" (CPU dry run: nothing is decided)" if dry_run else ""),
             "", f"Command: `.venv/bin/python -m sabiscale_analysis.gpu_day{' --dry-run' if dry_run else ''} --out {out}`  ",
             rendered_line(None), "", f"Date: {time.strftime('%Y-%m-%d')}. Overrides: `{' '.join(scale.overrides)}`; "
             f"{steps} steps; seeds {scale.seeds}; held-out clean records only.", ""]
    for key, rule in RULES.items():
        lines += [f"**{rule.measure}**", "", "| arm | " + " | ".join(f"seed {s}" for s in scale.seeds) + " | mean +- sd |",
                  "|---|" + "---:|" * (len(scale.seeds) + 1)]
        for arm, rows in table.items():
            got = {s: m[key] for s, m in rows.items()}
            mean, sd = mean_sd(list(got.values())) if got else (float("nan"), 0.0)
            lines.append(f"| {names[arm]} | " + " | ".join(f"{got[s]:.4f}" if s in got else "-" for s in scale.seeds)
                         + f" | {mean:.4f} +- {sd:.4f} |")
        lines.append("")
        for a, b in (("masked", "all"), ("masked_flops", "all")):
            pa = {s: m[key] for s, m in table[a].items()}
            pb = {s: m[key] for s, m in table[b].items()}
            if len(set(pa) & set(pb)) >= 2:
                lines.append("- " + decide(paired(pa, pb, rule.lower_is_better), rule, (names[a], names[b])))
        lines.append("")
    lines += [RULES["answer_loss"].describe(), "", f"Rho-1 continued pre-training: [{scale.name}.md]({scale.name}.md)"]
    scale.results.mkdir(parents=True, exist_ok=True)
    (scale.results / "gpu_day.json").write_text(json.dumps({"steps": steps, "overrides": scale.overrides,
                                                            "runs": table}, indent=2) + "\n")
    (scale.results / "gpu_day.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_day", help="everything goes here")
    parser.add_argument("--dry-run", action="store_true", help="tiny model, demo corpus, 2 seeds, on the CPU")
    args = parser.parse_args()
    out = args.out.resolve()
    scale, steps, records = scales(out, args.dry_run)
    table = masked_vs_all(scale, out, steps, records)
    write_page(out, scale, table, steps, args.dry_run)
    run_all(scale)
    write_rho1(scale, rendered_line(None))
    write_trajectories(scale, rendered_line(None))


if __name__ == "__main__":
    main()
