"""The memory planner against what a real run uses: peak RSS of training on this CPU.

For three model sizes (~50M, ~150M, ~400M parameters; 16k vocabulary, micro-batch 2 x 512 tokens
of the standard workload's shards) each in its own process: RSS just before `train()` (torch,
DeepSpeed, transformers loaded), then the peak RSS until the end of the second optimizer step,
under ds_configs/zero2_offload.json (DeepSpeedCPUAdam, fp32 master weights and moments on the
"host", which on a CPU run is the same memory). The planner's CPU-mode estimate
(`plan_profile(..., on_gpu=False)`, fp32 everywhere, without its 10% margin) is compared with the
measured increase. DeepSpeed's own estimator for the offloaded model states is printed beside it.

    .venv/bin/python benchmarks/memory_plan.py                 # ~5 minutes here
    .venv/bin/python benchmarks/memory_plan.py --sizes 50M     # one size
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import step_throughput as bench  # noqa: E402

ROOT = bench.ROOT
SIZES = {  # hidden, layers, MLP, heads
    "50M": (512, 10, 1376, 8),
    "150M": (768, 18, 2048, 12),
    "400M": (1024, 28, 2752, 16),
}
RUN = ROOT / "runs" / "bench-memory"


def _config(size: str, optimizer: str):
    hidden, layers, mlp, heads = SIZES[size]
    return bench._config("zero2_offload", [
        f"output_dir={RUN / size}", f"data.dir={RUN / size}", f"data.shards_dir={ROOT / 'runs/bench/shards'}",
        f"tokenizer.path={ROOT / 'runs/bench/tokenizer/tokenizer.json'}", f"model.hidden_size={hidden}",
        f"model.num_layers={layers}", f"model.intermediate_size={mlp}", f"model.num_heads={heads}",
        "train.micro_batch_size=2", "train.max_steps=2", "optim.warmup_steps=1", f"optim.kind={optimizer}",
        "train.peak_flops_per_s=1e11"])


def measure(size: str, optimizer: str) -> dict:
    import psutil

    from sabiscale.train.engine import ensure_launcher_env, init_distributed
    from sabiscale.train.plan import ModelShape, load_profile, plan_profile
    from sabiscale.train.hooks import StepRecorder
    from sabiscale.train.loop import train

    cfg = _config(size, optimizer)
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    ensure_launcher_env()
    world = init_distributed()
    from sabiscale.prep.tokenizer import load_tokenizer

    vocab = len(load_tokenizer(Path(cfg.tokenizer.path)))  # the workload's 16k tokenizer
    shape = ModelShape.from_config(cfg, vocab)
    plan = plan_profile(cfg, shape, "zero2_offload", load_profile("zero2_offload", ROOT / "ds_configs"), optimizer,
                        False, 1, 1, on_gpu=False)
    baseline = psutil.Process().memory_info().rss
    steps = StepRecorder()
    with bench.RssSampler(0.005) as sampler:
        train(cfg, world, [steps])
    end = steps.records[-1].end
    peak = max(rss for t, rss in sampler.samples if t <= end)
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    estimate = plan.host_total - plan.host["margin (10%)"]
    return {"size": size, "optimizer": optimizer, "params": shape.params, "baseline_rss": baseline,
            "measured": peak - baseline, "planned": estimate, "planned_with_margin": plan.host_total,
            "ratio": (peak - baseline) / estimate, "components": plan.host}


def ds_estimate(params: int) -> float:
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cpu, _ = estimate_zero2_model_states_mem_needs(params, 1, 1, cpu_offload=True, additional_buffer_factor=1.0)
    return cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", nargs="*", default=list(SIZES))
    parser.add_argument("--optimizers", nargs="*", default=["adamw", "adamw8bit"])
    args = parser.parse_args()
    from sabiscale.runtime import use_environment_toolchain

    use_environment_toolchain()
    if args.role:
        size, optimizer = args.role.split(":")
        print(json.dumps(measure(size, optimizer)))
        return
    from sabiscale.prep.prepare import prepare

    prepare(bench._config())  # the standard workload's shards and 16k tokenizer (reused when already there)
    rows = []
    for size in args.sizes:
        for optimizer in args.optimizers:
            proc = subprocess.run([sys.executable, __file__, "--role", f"{size}:{optimizer}"], capture_output=True,
                                  text=True, cwd=ROOT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if proc.returncode != 0:
                sys.exit(f"{size} {optimizer} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{size} {optimizer}: measured {row['measured'] / 2**30:.2f} GiB, planned {row['planned'] / 2**30:.2f} "
                  f"GiB (ratio {row['ratio']:.2f})", flush=True)
    write_results(rows, args)


def write_results(rows: list[dict], args) -> None:
    command = f".venv/bin/python benchmarks/memory_plan.py --sizes {' '.join(args.sizes)} --optimizers {' '.join(args.optimizers)}"
    out = bench.RESULTS / "memory_plan"
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "date": time.strftime("%Y-%m-%d"),
                                                    "rows": rows}, indent=2) + "\n")
    gib = 2**30
    lines = ["# Memory planner vs measured peak RSS (CPU, ZeRO-2 + optimizer offload)\n",
             f"Command: `{command}`  ",
             f"Date: {time.strftime('%Y-%m-%d')}, at commit {bench.git_commit()}, 2 cores of {bench.cpu_description()}, fp32, "
             "micro-batch 2 x 512 tokens, 16k vocabulary. "
             "measured = peak RSS until the end of step 2 minus RSS just before `train()`; planned = "
             "`sabiscale plan`'s CPU-mode estimate without its 10% margin; DeepSpeed = its "
             "`estimate_zero2_model_states_mem_needs` host figure for the offloaded states (buffer factor 1), "
             "which leaves out the model's own parameters, buckets and activations.\n",
             "| model | optimizer | parameters | measured GiB | planned GiB | measured / planned | DeepSpeed states GiB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['optimizer']} | {r['params'] / 1e6:.1f}M | {r['measured'] / gib:.2f} | "
                     f"{r['planned'] / gib:.2f} | {r['ratio']:.2f} | {ds_estimate(r['params']) / gib:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
