"""What selective language modeling (Rho-1) costs per step, on the standard workload.

Same workload as step_throughput.py (../shared/data mix, 16k BPE, Llama 256x4, micro-batch 8 x 512,
fp32 CPU, DeepSpeed ZeRO-2 with optimizer offload). Three roles, each in its own process,
alternating in one run:
- masked:    the prompt-masked loss (the baseline step),
- selective: loss.kind=selective, ratio 0.6, reference losses read from shards scored once with
             `sabiscale score` (what the issue's <=5% budget is about),
- online:    the same with loss.reference=online: a frozen reference model on the same device
             scores every micro-batch (the option for users who cannot pre-score).
The reference is the checkpoint of a short masked run of the same model (made once, kept in
runs/bench/reference/); scoring the whole train split once is timed and reported too.

    .venv/bin/python benchmarks/selective_cost.py                 # ~15 minutes here, once scored
    .venv/bin/python benchmarks/selective_cost.py --rounds 1 --steps 3   # smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import step_throughput as bench  # the standard workload and its measurements (a sibling: run this as a script)

ROOT = bench.ROOT
RATIO = 0.6
BENCH_DIR = ROOT / "runs" / "bench"
REFERENCE = BENCH_DIR / "reference"
SCORED = BENCH_DIR / "shards-scored"


def role_overrides(role: str) -> list[str]:
    if role == "masked":
        return []
    selective = ["loss.kind=selective", f"loss.ratio={RATIO}", f"tokenizer.path={BENCH_DIR / 'tokenizer' / 'tokenizer.json'}"]
    if role == "selective":
        return selective + [f"data.shards_dir={SCORED}"]
    return selective + ["loss.reference=online", f"loss.reference_checkpoint={REFERENCE}"]


def make_reference_and_score() -> float | None:
    """Reference checkpoint and scored shards, made once; returns the scoring seconds when scored now."""
    from sabiscale.prep.prepare import prepare

    cfg = bench._config()
    if not (cfg.shards_dir / "manifest.json").is_file():
        print("preparing the standard workload (tokenizer + shards) ...", flush=True)
        prepare(cfg)
    tokenizer = json.loads((cfg.shards_dir / "manifest.json").read_text())["tokenizer_sha256"]
    # this benchmark's own cache, made before the standard shards were prepared again with another
    # tokenizer: its losses would be of other tokens (`sabiscale score` refuses it), so make it anew
    if REFERENCE.is_dir() and _reference_tokenizer() != tokenizer:
        print(f"{REFERENCE} was trained with another tokenizer than {cfg.shards_dir}; training it again", flush=True)
        shutil.rmtree(REFERENCE)
        shutil.rmtree(SCORED, ignore_errors=True)
    if not REFERENCE.is_dir():
        print("training the reference model (a short masked run) ...", flush=True)
        _run_role("masked", steps=20, warmup=0)
        shutil.copytree(cfg.checkpoint_dir, REFERENCE)
    if (SCORED / "manifest.json").is_file():
        return None
    print(f"scoring {cfg.shards_dir} with {REFERENCE} ...", flush=True)
    t0 = time.monotonic()
    subprocess.run([str(Path(sys.executable).parent / "sabiscale"), "score", "--reference", str(REFERENCE),
                    "--shards", str(cfg.shards_dir), "--out", str(SCORED)], check=True, cwd=ROOT)
    return time.monotonic() - t0


def _reference_tokenizer() -> str | None:
    from sabiscale.train.checkpoint import latest_complete, read_sidecar

    newest = latest_complete(REFERENCE)
    return read_sidecar(newest)[0].get("tokenizer_sha256") if newest else None


def _run_role(role: str, steps: int, warmup: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--role", role, "--steps", str(steps), "--warmup", str(warmup)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        sys.exit(f"{role} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def orchestrate(args) -> None:
    scoring_seconds = make_reference_and_score()
    roles = ("masked", "selective", "online")
    rounds: dict[str, list[dict]] = {r: [] for r in roles}
    for r in range(args.rounds):
        for role in roles:
            result = _run_role(role, args.steps, args.warmup)
            rounds[role].append(result)
            print(f"round {r + 1} {role}: {result['seconds_per_step']:.3f} s/step", flush=True)
    write_results(rounds, scoring_seconds, args)


def write_results(rounds: dict, scoring_seconds: float | None, args) -> None:
    keys = ["seconds_per_step", "tokens_per_s", "supervised_tokens_per_s", "transient_bytes_per_token"]
    median = {role: {k: statistics.median(r[k] for r in results) for k in keys} for role, results in rounds.items()}
    ratio = {role: {k: median[role][k] / median["masked"][k] for k in keys} for role in rounds}
    command = f".venv/bin/python benchmarks/selective_cost.py --rounds {args.rounds} --steps {args.steps} --warmup {args.warmup}"
    manifest = json.loads((SCORED / "manifest.json").read_text())
    sequences = manifest["splits"]["train"]["counts"]["sequences"] + manifest["splits"]["val"]["counts"]["sequences"]
    out = bench.RESULTS / "selective_cost"
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "date": time.strftime("%Y-%m-%d"), "ratio": RATIO, "rounds": rounds, "median": median,
         "ratio_to_masked": ratio, "scoring_seconds": scoring_seconds, "scored_sequences": sequences}, indent=2) + "\n")
    lines = ["# Selective LM (Rho-1) step cost vs the masked step\n",
             f"Command: `{command}`  ",
             f"Date: {time.strftime('%Y-%m-%d')}, 2-core CPU, fp32, standard workload of step_throughput.py "
             f"(DeepSpeed ZeRO-2 + optimizer offload); ratio {RATIO}; medians of {args.rounds} alternating rounds, "
             f"{args.steps} timed steps after {args.warmup} warm-up steps.\n",
             "| role | s/step | step time vs masked | tokens/s | trained (selected) tokens/s |",
             "|---|---:|---:|---:|---:|"]
    for role in rounds:
        m = median[role]
        lines.append(f"| {role} | {m['seconds_per_step']:.3f} | {ratio[role]['seconds_per_step']:.3f} | "
                     f"{m['tokens_per_s']:.0f} | {m['supervised_tokens_per_s']:.0f} |")
    lines += ["", "selective: reference losses read from shards scored once by `sabiscale score` (float16 beside "
              "input_ids); the head ranks every answer token without gradient, then runs the fused loss with "
              "gradient on the selected 60% only. online: a frozen copy of the reference model scores each "
              "micro-batch at training time (one more forward of the body and head per micro-batch)."]
    if scoring_seconds is not None:
        lines.append(f"\nScoring the {sequences} sequences once took {scoring_seconds:.0f} s "
                     f"({sequences * 512 / scoring_seconds:.0f} tokens/s, one process).")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["masked", "selective", "online"], help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    from sabiscale.runtime import use_environment_toolchain

    use_environment_toolchain()
    if args.role:
        print(json.dumps(bench.run_ours(args.steps, args.warmup, "zero2_offload", "fp32", role_overrides(args.role))))
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
