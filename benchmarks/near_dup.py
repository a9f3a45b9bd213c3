"""What near-duplicate removal (data.dedup=near) finds in ../shared/data and what it costs at prepare.

Reads every record of the real-data recipe (launch/recipes/naija_small.yaml: every task and
language) once, then splits it as `prepare` does (held-out rule, decontamination, dedup) twice:
with data.dedup=exact and with data.dedup=near at each threshold asked for. Reports the documents
dropped per task x language, the time of the split (near-dup included) against the time of
reading, and a sample of pairs to judge by eye. Tokenizing and shard writing, which come after,
are the same for both and are not timed here.

    .venv/bin/python benchmarks/near_dup.py                      # threshold 0.8, ~2-4 min here
    .venv/bin/python benchmarks/near_dup.py --thresholds 0.7 0.8 0.9

Writes benchmarks/results/near_dup.{json,md}. Timed alone: no experiment or test beside it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
RECIPE = ROOT / "launch" / "recipes" / "naija_small.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.8])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()
    from sabiscale.config import load_config
    from sabiscale.prep.corpus import load_corpus
    from sabiscale.prep.prepare import dropped_totals, split_examples

    cfg = load_config(RECIPE, [f"data.jsonl_root={args.data}"])
    t0 = time.perf_counter()
    corpus = load_corpus(cfg, Path(args.data))
    read_seconds = time.perf_counter() - t0
    rows = []
    for mode, threshold in [("exact", None)] + [("near", t) for t in args.thresholds]:
        run_cfg = cfg.model_copy(deep=True)
        run_cfg.data.dedup = mode
        if threshold is not None:
            run_cfg.data.near_dup_threshold = threshold
        t0 = time.perf_counter()
        parts = split_examples(run_cfg, corpus)
        seconds = time.perf_counter() - t0
        row = {"mode": mode, "threshold": threshold, "split_seconds": seconds, "train": len(parts.train),
               "val": len(parts.val), "dropped": dropped_totals(parts.per_file)}
        if parts.near is not None:
            pairs = [relative_sources(pair, Path(args.data)) for pair in parts.near.pairs]
            row["near"] = parts.near.summary("")
            row["sample_pairs"] = pairs[:: max(1, len(pairs) // 8)][:8]
            row["all_pairs"] = pairs
        rows.append(row)
        print(mode, threshold, f"{seconds:.1f} s", row["dropped"])
    from step_throughput import cpu_description, git_commit

    commit = git_commit()
    command = "python benchmarks/near_dup.py" + (f" --thresholds {' '.join(map(str, args.thresholds))}"
                                                 if args.thresholds != [0.8] else "")
    result = {"command": command, "commit": commit, "cpu": cpu_description(), "date": time.strftime("%Y-%m-%d"),
              "records": len(corpus.examples), "read_seconds": read_seconds, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "near_dup.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (RESULTS / "near_dup.md").write_text(render(result), encoding="utf-8")
    print(render(result))


def relative_sources(pair: dict, data_root: Path) -> dict:
    """Record locations relative to the data root ("translation/eng-ibo.jsonl:908"): the results
    file names no directory of the machine it ran on."""
    def rel(source: str) -> str:
        path, _, line = source.rpartition(":")
        try:
            return f"{Path(path).resolve().relative_to(data_root.resolve())}:{line}"
        except ValueError:
            return f"{Path(path).name}:{line}"
    return {**pair, "dropped": rel(pair["dropped"]), "kept": rel(pair["kept"])}


def render(result: dict) -> str:
    exact = result["rows"][0]
    lines = ["# Near-duplicates in ../shared/data (data.dedup=near)\n",
             f"Command: `{result['command']}` at commit {result['commit']}  ",
             f"Date: {result['date']}; CPU: {result['cpu']} (2 cores), nothing else running (one measurement each).\n",
             f"All {result['records']:,} records of `launch/recipes/naija_small.yaml` (every task and language), read once in "
             f"{result['read_seconds']:.1f} s, then split as `prepare` splits them (held-out rule, dedup) with each setting. "
             "The split's time holds the near-duplicate search; tokenizing and shards, the same for every setting, "
             "are not timed.\n",
             "| setting | train docs | val docs | exact duplicates | near-duplicates | split seconds | split / reading |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        name = "exact" if row["mode"] == "exact" else f"near, Jaccard >= {row['threshold']}"
        lines.append(f"| {name} | {row['train']:,} | {row['val']:,} | {row['dropped'].get('duplicate', 0):,} | "
                     f"{row['dropped'].get('near_duplicate', 0):,} | {row['split_seconds']:.1f} | "
                     f"{row['split_seconds'] / result['read_seconds']:.2f} |")
    for row in result["rows"][1:]:
        lines += ["", f"## Threshold {row['threshold']}: near-duplicates per task x language\n",
                  "| task/lang | dropped |", "|---|---:|"]
        lines += [f"| {key} | {n:,} |" for key, n in row["near"]["by_task_lang"].items()]
        conflicts = [f"{task} {sum(p['answers_differ'] for p in pairs)} of {len(pairs)}"
                     for task in ("sentiment", "ner") if (pairs := [p for p in row["all_pairs"] if p["task"] == task])]
        lines += ["", "Pairs whose labels differ for near-identical text (label noise in the source; dedup keeps the "
                  f"first): {', '.join(conflicts) or 'none'}."]
        lines += ["", "A sample of pairs (kept, then dropped; estimated Jaccard):\n"]
        for pair in row.get("sample_pairs", []):
            lines += [f"- {pair['task']}/{pair['lang']}, {pair['jaccard_estimate']:.2f}: "
                      f"`{pair['kept_text'][:120]}` / `{pair['dropped_text'][:120]}`"]
    lines += ["", f"Exact dedup alone kept {exact['train']:,} training documents."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
