"""How long a resumed run takes to open its tracking journal, for a long run: a synthetic journal
of N steps as training writes it (a metrics record per step with the per-step keys, the
per-task/language keys at every 10th step, an eval record every 500 steps, a `sent` line after each),
opened as a resume opens it (from the saved state beside it) and from the first line (the state
file moved away, what every resume did before).

    .venv/bin/python benchmarks/journal_resume.py              # 100k steps, ~1 minute to write
    .venv/bin/python benchmarks/journal_resume.py --steps 20000

Writes benchmarks/results/journal_resume.{json,md}. Timed alone: no experiment or test beside it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
STEP_KEYS = ["train/loss", "train/answer_loss", "train/lr", "train/supervised_tokens", "train/tokens_per_s",
             "train/supervised_tokens_per_s", "train/mfu", "train/mem", "train/skipped_steps", "train/flops_seen",
             "train/grad_norm"]
WINDOW_KEYS = [f"train/{what}/{kind}/{name}" for what in ("loss", "supervised_tokens")
               for kind, names in (("task", ["translation", "ner", "sentiment", "descramble", "text"]),
                                   ("lang", ["eng", "hau", "ibo", "pcm", "yor"])) for name in names]


def write_journal(path: Path, steps: int, killed: bool = False) -> None:
    """Through the real Journal (so its saved state is written as training writes it). `killed`:
    the process dies just before it would save the state again (the most a resume then reads)."""
    from sabiscale.track.journal import Journal

    journal = Journal(path)
    journal.add({"op": "start", "uri": "sqlite:///x.db", "experiment": "bench", "run_name": "bench", "run_id": None,
                 "journal_id": "bench", "time_ms": 0})
    journal.set_run("run", "0", "sqlite:///x.db")
    if killed:  # no state saved after the last full interval
        journal.SNAPSHOT_EVERY = 10**9
        steps_before = steps - 1000
    for step in range(1, steps + 1):
        if killed and step == steps_before:
            journal.SNAPSHOT_EVERY = 0
            journal.mark_sent(journal.state.count)
            journal.SNAPSHOT_EVERY = 10**9
        keys = STEP_KEYS + (WINDOW_KEYS if step % 10 == 0 else [])
        journal.add({"op": "metrics", "step": step, "time_ms": step, "metrics": {k: 1.0 / step for k in keys}})
        if step % 500 == 0:
            journal.add({"op": "metrics", "step": step, "time_ms": step, "metrics": {"eval/answer_loss": 1.0}})
        journal.mark_sent(journal.state.count)
    if killed:
        journal._file.close()  # no close(): a kill saves nothing
        return
    journal.close()


def open_seconds(path: Path, repeats: int) -> float:
    from sabiscale.track.journal import Journal

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        Journal(path).close()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from sabiscale.track.journal import snapshot_path

    work = Path(tempfile.mkdtemp(prefix="journal_bench_"))
    try:
        path = work / "tracking_journal.jsonl"
        write_journal(path, args.steps)
        killed_path = work / "killed" / "tracking_journal.jsonl"
        killed_path.parent.mkdir()
        write_journal(killed_path, args.steps, killed=True)
        after_kill = open_seconds(killed_path, 1)  # one open, as a resume does
        resumed = open_seconds(path, args.repeats)
        size = path.stat().st_size
        snapshot_path(path).rename(work / "aside")
        whole = open_seconds(path, args.repeats)
    finally:
        shutil.rmtree(work)
    from step_throughput import git_commit
    from sabiscale.train.device import describe_cpu
    cpu = describe_cpu()
    commit = git_commit()
    command = ".venv/bin/python benchmarks/journal_resume.py" + (f" --steps {args.steps}" if args.steps != 100_000 else "")
    result = {"command": command, "commit": commit, "cpu": cpu, "date": time.strftime("%Y-%m-%d"), "steps": args.steps,
              "journal_bytes": size, "repeats": args.repeats, "resume_seconds": resumed, "resume_after_kill_seconds": after_kill,
              "whole_read_seconds": whole}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "journal_resume.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Opening a long run's tracking journal on resume\n",
             f"Command: `{command}` at commit {commit}  ",
             f"Date: {result['date']}; CPU: {cpu} (2 cores), nothing else running.\n",
             f"A synthetic journal of {args.steps:,} steps ({size / 2**20:.1f} MiB) written through the real `Journal` "
             "(per-step metrics, the per-task/language window every 10th step, eval every 500, a `sent` line after each). "
             f"Median of {args.repeats} opens:\n",
             "| how it is opened | seconds |", "|---|---:|",
             f"| from the saved state, after a clean stop (a resume now) | {resumed:.3f} |",
             f"| from the saved state, killed 1,000 steps after it was saved (~1,000 lines to read) | {after_kill:.3f} |",
             f"| from the first line (before: every resume) | {whole:.3f} |", "",
             f"Bar (issue: under a second for 100k steps): {'met' if max(resumed, after_kill) < 1 else 'NOT met'}."]
    (RESULTS / "journal_resume.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
