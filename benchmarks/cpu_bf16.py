"""Where bf16 pays on this CPU: sabiscale's training step in fp32 and in bf16 for models of several
widths (the standard workload of benchmarks/step_throughput.py otherwise: ../shared/data, 16k
BPE, 4 layers, micro-batch 8 x 512, ZeRO-2 with CPU Adam), alternating in each round, each in its
own process; and the fastest fp32 and bf16 matmul. It is the measurement behind
engine.precision=auto's CPU rule (sabiscale/train/device.py: bf16 on CPUs with native bf16 for
models at least CPU_BF16_MIN_HIDDEN wide, a width per CPU family).

    .venv/bin/python benchmarks/cpu_bf16.py            # ~8 minutes here, on a quiet machine
    .venv/bin/python benchmarks/cpu_bf16.py --tag amx  # another CPU family: a results file of its own
    .venv/bin/python benchmarks/cpu_bf16.py --render-only [--tag amx]  # rewrite the .md from the saved
                                                        # .json with the current rule, measuring nothing

Writes benchmarks/results/cpu_bf16.{md,json} (cpu_bf16_<tag>.* with --tag; the header names the CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import step_throughput as bench  # the standard workload (a sibling: run this as a script)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# width -> (heads, MLP width): 64-wide heads, MLP ~2.7x the width as in the standard workload
WIDTHS = {64: (1, 176), 128: (2, 344), 256: (4, 688), 512: (8, 1376)}


def model_overrides(width: int) -> list[str]:
    heads, mlp = WIDTHS[width]
    return [f"model.hidden_size={width}", f"model.num_heads={heads}", f"model.intermediate_size={mlp}"]


def measure(width: int, precision: str, steps: int, warmup: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--role", f"{width}:{precision}", "--steps", str(steps),
                           "--warmup", str(warmup)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        sys.exit(f"{width}:{precision} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def results_name(tag: str | None) -> str:
    return f"cpu_bf16_{tag}" if tag else "cpu_bf16"


def write(rounds: dict, peaks: dict, unit: str | None, command: str, tag: str | None = None, cpu: str | None = None,
          date: str | None = None) -> None:
    """unit: the CPU's native bf16 ("amx", "avx512_bf16" or None); cpu and date: the measured
    machine's description and the measurement's day (default: this machine's, today)."""
    from sabiscale.train.device import CPU_BF16_MIN_HIDDEN, choose_precision

    native, cpu, date = unit is not None, cpu or bench.cpu_description(), date or time.strftime("%Y-%m-%d")
    rows = []
    for width in WIDTHS:
        fp32, bf16 = rounds[f"{width}:fp32"], rounds[f"{width}:bf16"]
        gain = [f["seconds_per_step"] / b["seconds_per_step"] for f, b in zip(fp32, bf16)]
        rows.append({"width": width, "fp32_seconds_per_step": statistics.median(r["seconds_per_step"] for r in fp32),
                     "bf16_seconds_per_step": statistics.median(r["seconds_per_step"] for r in bf16),
                     "bf16_speedup_median": statistics.median(gain), "bf16_speedup_range": [min(gain), max(gain)],
                     "auto_picks": choose_precision("auto", "cpu", None, native, width, unit)})
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = results_name(tag)
    (RESULTS / f"{name}.json").write_text(json.dumps({"command": command, "date": date,
                                                      "cpu": cpu, "native_bf16": native, "bf16_unit": unit, "matmul_peak_flops_per_s": peaks,
                                                      "widths": rows, "rounds": rounds}, indent=2) + "\n")
    lines = ["# Where bf16 pays on the CPU: sabiscale's step in fp32 and bf16, by model width\n",
             f"Command: `{command}`  ",
             f"Date: {date}, 2-core {cpu}, native bf16 (AVX512-BF16 or AMX): {native}; fastest "
             f"matmul (2048^3) fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s "
             f"({peaks['bf16'] / peaks['fp32']:.2f}x). The standard workload of benchmarks/step_throughput.py "
             f"(4 layers, micro-batch 8 x 512, ZeRO-2 with CPU Adam, fused projections, eager) at each width; "
             f"medians of {len(next(iter(rounds.values())))} alternating rounds.\n",
             "| hidden | fp32 s/step | bf16 s/step | bf16 speed-up (median, range) | engine.precision=auto picks |",
             "|---:|---:|---:|---:|---|"]
    for r in rows:
        lo, hi = r["bf16_speedup_range"]
        lines.append(f"| {r['width']} | {r['fp32_seconds_per_step']:.3f} | {r['bf16_seconds_per_step']:.3f} | "
                     f"{r['bf16_speedup_median']:.2f}x ({lo:.2f}-{hi:.2f}) | {r['auto_picks']} |")
    rule = ", ".join(f"{width} with {name}" for name, width in CPU_BF16_MIN_HIDDEN.items())
    lines += ["", f"The rule (sabiscale/train/device.py): bf16 on a CPU with native bf16 for models at least "
              f"as wide as that CPU's threshold ({rule}; this CPU: {unit or 'none'}), fp32 otherwise. Narrow models spend their step in element-wise work, "
              "which bf16 does not speed up on the CPU (the casts cost), so only wide ones gain from the faster "
              "matmuls. Without native bf16 the CPU emulates it, far slower than fp32."]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tag", help="name the results file cpu_bf16_<tag> (results differ by CPU family)")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the results from their saved JSON with the current rule (its auto column)")
    args = parser.parse_args()
    from sabiscale.runtime import use_environment_toolchain

    use_environment_toolchain()
    if args.role:
        width, precision = args.role.split(":")
        print(json.dumps(bench.run_ours(args.steps, args.warmup, "zero2_offload", precision,
                                        model_overrides(int(width)) + ["train.compile=off"])))
        return
    if args.render_only:
        saved = json.loads((RESULTS / f"{results_name(args.tag)}.json").read_text())
        write(saved["rounds"], saved["matmul_peak_flops_per_s"], saved["bf16_unit"], saved["command"], args.tag,
              saved["cpu"], saved["date"])
        return
    from sabiscale.prep.prepare import prepare
    from sabiscale.track.metrics import measure_matmul_peak
    from sabiscale.train.device import cpu_bf16_unit

    if not (bench._config().shards_dir / "manifest.json").is_file():
        prepare(bench._config())
    cpu = torch.device("cpu")
    peaks = {"fp32": measure_matmul_peak(cpu), "bf16": measure_matmul_peak(cpu, torch.bfloat16)}
    rounds: dict[str, list[dict]] = {f"{w}:{p}": [] for w in WIDTHS for p in ("fp32", "bf16")}
    for r in range(args.rounds):
        for role in rounds:
            width, precision = role.split(":")
            rounds[role].append(measure(int(width), precision, args.steps, args.warmup))
            print(f"round {r + 1} {role}: {rounds[role][-1]['seconds_per_step']:.3f} s/step", flush=True)
    peaks = {"fp32": max(peaks["fp32"], measure_matmul_peak(cpu)),
             "bf16": max(peaks["bf16"], measure_matmul_peak(cpu, torch.bfloat16))}
    write(rounds, peaks, cpu_bf16_unit(),
          f".venv/bin/python benchmarks/cpu_bf16.py --rounds {args.rounds} --steps {args.steps} --warmup {args.warmup}"
          + (f" --tag {args.tag}" if args.tag else ""), args.tag)


if __name__ == "__main__":
    main()
