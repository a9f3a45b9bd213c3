"""Data side of the standard workload: shard writing and the loader, against training's consumption.

All of ../shared/data in SabiYarn task format (the shared_data recipe: 16k BPE, 512-token sequences).
- shard writing: `sabiscale prepare` end to end (read, template, train the tokenizer, tokenize,
  pack, write, hash) with data.workers=1 and 2, alternating, each in a fresh process; tokens/s
  counts packed sequence positions written. Also checks that both wrote byte-identical shards.
- loader: the training loader (ShardLoader as `train` builds it: shuffle buffer, decode, collate)
  over the written train shards, micro-batch 8, as the only rank and as rank 0 of 2 (which reads
  every shard but decodes only its micro-batches); tokens/s counts positions delivered to the rank.
- consumption: sabiscale training steps of the standard model (benchmarks/step_throughput.py's
  "ours" role, ZeRO-2 with offload), measured in the same run, in tokens/s per rank.
The loader must be at least 50x faster than training consumes.

    .venv/bin/python benchmarks/data_throughput.py               # ~4 minutes here
    .venv/bin/python benchmarks/data_throughput.py --rounds 1    # quicker
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

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
RECIPE = ROOT / "launch" / "recipes" / "shared_data.yaml"
WORK = ROOT / "runs" / "bench-data"


def run_prepare(workers: int, out: Path) -> dict:
    from sabiscale.config import load_config
    from sabiscale.prep.prepare import prepare
    from sabiscale.shards.format import read_manifest

    cfg = load_config(RECIPE, [f"output_dir={out}", f"data.dir={out}", f"data.prepare_workers={workers}", f"data.jsonl_root={ROOT.parent / 'shared' / 'data'}"])
    start = time.perf_counter()
    prepare(cfg)
    seconds = time.perf_counter() - start
    manifest = read_manifest(cfg.shards_dir)
    positions = sum(s["counts"]["sequences"] for s in manifest["splits"].values()) * cfg.data.seq_len
    return {"seconds": seconds, "positions": positions, "tokens_per_s": positions / seconds}


def run_loader(shards_dir: Path, world_size: int, batches: int) -> dict:
    from sabiscale.data.batch import Vocab
    from sabiscale.data.loader import make_loader
    from sabiscale.shards.format import split_shards
    from sabiscale.shards.format import read_manifest

    manifest = read_manifest(shards_dir)
    stream = make_loader(split_shards(shards_dir, manifest, "train"), Vocab.from_manifest(manifest), 8, 0, world_size,
                         1234, True)
    next(stream)  # the first batch opens the files; training pays that once
    start = time.perf_counter()
    positions = 0
    for _ in range(batches):
        positions += next(stream).input_ids.numel()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "positions": positions, "tokens_per_s": positions / seconds}


def run_consumption(steps: int) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_throughput.py"), "--role", "ours",
                           "--steps", str(steps), "--warmup", "2"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        sys.exit(f"training steps failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"tokens_per_s": result["tokens_per_s"], "seconds_per_step": result["seconds_per_step"]}


def _child(role: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--role", role, *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"{role} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def identical(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def orchestrate(args) -> None:
    writing: dict[int, list[dict]] = {1: [], 2: []}
    for r in range(args.rounds):
        for workers in (1, 2):
            out = WORK / f"w{workers}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            writing[workers].append(_child("prepare", "--workers", str(workers), "--out", str(out)))
            print(f"round {r + 1} prepare, {workers} process(es): {writing[workers][-1]['tokens_per_s']:.0f} tokens/s",
                  flush=True)
    same = identical(WORK / "w1" / "shards", WORK / "w2" / "shards")
    shards = WORK / "w1" / "shards"
    loading = {w: [_child("loader", "--world-size", str(w), "--batches", str(args.batches), "--shards", str(shards))
                   for _ in range(args.rounds)] for w in (1, 2)}
    consumption = run_consumption(args.steps)
    print(f"training consumes {consumption['tokens_per_s']:.0f} tokens/s per rank", flush=True)
    write_results(writing, loading, consumption, same, args)


def write_results(writing: dict, loading: dict, consumption: dict, same: bool, args) -> None:
    med = lambda rows: statistics.median(r["tokens_per_s"] for r in rows)  # noqa: E731
    need = consumption["tokens_per_s"]
    command = f".venv/bin/python benchmarks/data_throughput.py --rounds {args.rounds} --batches {args.batches} --steps {args.steps}"
    summary = {"command": command, "date": time.strftime("%Y-%m-%d"), "training_tokens_per_s_per_rank": need,
               "prepare_tokens_per_s": {w: med(rows) for w, rows in writing.items()},
               "loader_tokens_per_s_per_rank": {w: med(rows) for w, rows in loading.items()},
               "byte_identical_1_vs_2_processes": same, "rounds": {"prepare": writing, "loader": loading}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data_throughput.json").write_text(json.dumps(summary, indent=2) + "\n")
    p1, p2 = summary["prepare_tokens_per_s"][1], summary["prepare_tokens_per_s"][2]
    lines = ["# Data throughput: shard writing and loader vs training consumption\n",
             f"Command: `{command}`  ",
             f"Date: {summary['date']}, 2-core CPU; all of ../shared/data (shared_data recipe: 16k BPE, 512-token "
             f"sequences); medians of {args.rounds} round(s); training consumption measured in the same run "
             "(standard model, micro-batch 8, ZeRO-2 with offload).\n",
             "| stage | tokens/s | x training consumption |", "|---|---:|---:|",
             f"| training consumes (per rank) | {need:.0f} | 1 |",
             f"| prepare, 1 process (end to end) | {p1:.0f} | {p1 / need:.0f} |",
             f"| prepare, 2 processes (end to end) | {p2:.0f} | {p2 / need:.0f} |"]
    for w, rate in summary["loader_tokens_per_s_per_rank"].items():
        lines.append(f"| loader, rank 0 of {w} | {rate:.0f} | {rate / need:.0f} |")
    lines += ["", f"2 processes / 1 process: {p2 / p1:.2f}x; shards byte-identical: {same}.",
              "Tokens are packed sequence positions (padding included): what a step consumes."]
    (RESULTS / "data_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["prepare", "loader"], help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shards", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--world-size", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batches", type=int, default=400, help="micro-batches timed per loader run")
    parser.add_argument("--steps", type=int, default=6, help="training steps timed for the consumption")
    args = parser.parse_args()
    if args.role == "prepare":
        print(json.dumps(run_prepare(args.workers, Path(args.out))))
    elif args.role == "loader":
        print(json.dumps(run_loader(Path(args.shards), args.world_size, args.batches)))
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
