"""Per-rank memory under ZeRO-1/2/3 at 8 to 64 ranks, measured on the real engine build without
the hardware (`sabiscale plan --ranks N`: one process as rank 0 of N in torch's fake process
group), beside the planner's numbers.

    .venv/bin/python benchmarks/plan_ranks.py                          # naija_small, 8 16 32 64 ranks, ~8 min
    .venv/bin/python benchmarks/plan_ranks.py --ranks 8 64 --set model.hidden_size=768 model.num_layers=12

Writes benchmarks/results/plan_ranks.{json,md}. Sizes, not times: it may run beside other work.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="launch/recipes/naija_small.yaml")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--set", nargs="*", default=[], help="config overrides (key=value)")
    args = parser.parse_args()
    from sabiscale.config import load_config
    from sabiscale.train.commands import planned_vocab
    from sabiscale.train.plan import ModelShape
    from sabiscale.train.rank_memory import PLANNED, format_rows, measure_ranks

    cfg = load_config(ROOT / args.recipe, args.set)
    vocab = planned_vocab(cfg)
    rows = []
    for ranks in args.ranks:
        rows += measure_ranks(cfg, ranks, vocab, ROOT / "ds_configs")
        print(f"{ranks} ranks measured", flush=True)
    worst = max(abs(r[t] / r["planned"][t] - 1) for r in rows for t in PLANNED
                if r["planned"][t] and not (t == "gradients" and r["stage"] == 1))
    from step_throughput import git_commit
    from sabiscale.train.device import describe_cpu
    commit = git_commit()
    cpu = describe_cpu()
    command = " ".join(["python benchmarks/plan_ranks.py", *(["--recipe", args.recipe] if args.recipe != parser.get_default("recipe") else []),
                        *(["--ranks", *map(str, args.ranks)] if args.ranks != parser.get_default("ranks") else []),
                        *(["--set", *args.set] if args.set else [])])
    params = ModelShape.from_config(cfg, vocab).params
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "plan_ranks.json").write_text(json.dumps({"command": command, "commit": commit, "cpu": cpu,
                                                         "params": params, "rows": rows}, indent=2) + "\n")
    lines = ["# Per-rank memory at N ranks, measured on the real engine build vs planned\n",
             f"Command: `{command}` at commit {commit}  ",
             f"Date: {time.strftime('%Y-%m-%d')}; CPU: {cpu} (sizes, not times).\n",
             f"Model: `{args.recipe}`{' with ' + ' '.join(args.set) if args.set else ''}, {params / 1e6:.1f}M parameters, "
             "fp32 (the CPU's compute dtype; a GPU in bf16 halves the parameter and gradient terms). Each row is one "
             "process built as rank 0 of N in torch's fake process group through sabiscale's own build (the profile's "
             "JSON filled as for training), after one forward/backward/step; bytes of the tensors held at rest.\n",
             format_rows(rows), "",
             f"Largest deviation from the planner over every term and rank count, ZeRO-1 gradients aside: {worst:.1%}.",
             "",
             "ZeRO-1 gradients: the planner counts the whole model's gradients (the peak inside backward, before "
             "DeepSpeed reduces them into this rank's partition); at rest after backward only the partition is left "
             "(1/N), which is what is measured. Under ZeRO-3 offload the reduced gradients at rest are the host's fp32 "
             "partition, compared with the planner's `optimizer: fp32 gradient partition`; its device-side reduce "
             "bucket is transient. Communication buckets and activations are transient and not measured here "
             "(`benchmarks/memory_plan.py` measures the peak of a real run)."]
    (RESULTS / "plan_ranks.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
