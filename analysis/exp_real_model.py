"""The real-data model (launch/recipes/naija_small.yaml) and its all-token peer, trained in
time-boxed sessions and evaluated on the official dev records of ../shared/data.

Each call trains both runs for at most --minutes each (SIGTERM at the limit: the run saves a
checkpoint and stops; the next call continues from it, so the whole budget can be spread over
several sessions), and once a run has reached train.max_steps evaluates it with `sabiscale eval
--full` (every dev record; 200 decoded per task and language where the data has them). The
peer: the same recipe with `loss.kind=clm` (the causal loss on every token), the same steps and
therefore the same compute.

    .venv/bin/python -m sabiscale_analysis.exp_real_model --minutes 90     # repeat until both are done

Writes analysis/results/real_model.{md,json} when both are evaluated; runs stay in runs/naija_small*.
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from sabiscale_analysis.experiment import ROOT, sabiscale

RECIPE = ROOT / "launch" / "recipes" / "naija_small.yaml"
RUNS = {"masked (SabiYarn)": ROOT / "runs" / "naija_small", "all tokens (clm peer)": ROOT / "runs" / "naija_small_clm"}
RESULTS = ROOT / "analysis" / "results"


def train_for(run: Path, kind: str, minutes: float) -> bool:
    """Train until max_steps or the time box; True once the run is complete."""
    proc = subprocess.Popen([str(Path(sys.executable).parent / "sabiscale"), "train", str(RECIPE), f"output_dir={run}",
                             f"loss.kind={kind}"], cwd=ROOT)
    try:
        code = proc.wait(timeout=minutes * 60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # checkpoint now, exit 75: the next session resumes there
        code = proc.wait()
    if code not in (0, 75):
        raise SystemExit(f"training {run} failed with exit {code}")
    return code == 0


def evaluate(run: Path) -> dict:
    report = run / "eval_dev_full.json"
    if not report.is_file():
        sabiscale("eval", str(run / "checkpoints"), "--data", str(ROOT.parent / "shared" / "data"), "--split", "dev",
                  "--full", "--out", str(report))
    return json.loads(report.read_text())


def write_results(reports: dict[str, dict]) -> None:
    names = list(reports)
    keys = sorted(set(reports[names[0]]["generation"]) | set(reports[names[1]]["generation"]))
    lines = ["# The real-data model: naija_small on ../shared/data, masked vs its all-token peer\n",
             f"Command: `.venv/bin/python -m sabiscale_analysis.exp_real_model --minutes 90` (repeated until both runs "
             f"finished)  \nDate: {time.strftime('%Y-%m-%d')}. Recipe `launch/recipes/naija_small.yaml`, step "
             f"{reports[names[0]]['step']}; `sabiscale eval --full` on the official dev records.\n",
             "| task/language | " + " | ".join(names) + " |", "|---|---:|---:|"]
    for key in keys:
        cells = []
        for name in names:
            scores = reports[name]["generation"].get(key, {})
            cells.append(", ".join(f"{k} {v:.3f}" for k, v in scores.items() if isinstance(v, float)) or "-")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "| task/language (teacher-forced) | " + " | ".join(f"{n} bits/byte" for n in names) + " |", "|---|---:|---:|"]
    for key in sorted(reports[names[0]]["teacher_forced"]):
        lines.append(f"| {key} | " + " | ".join(f"{reports[n]['teacher_forced'][key]['bits_per_byte']:.3f}" for n in names) + " |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "real_model.json").write_text(json.dumps(reports, indent=2, ensure_ascii=False) + "\n")
    (RESULTS / "real_model.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=90, help="training time per run in this session")
    args = parser.parse_args()
    done = {name: train_for(run, "masked" if "masked" in name else "clm", args.minutes) for name, run in RUNS.items()}
    if not all(done.values()):
        print("not finished yet: run the same command again to continue from the checkpoints")
        return
    write_results({name: evaluate(run) for name, run in RUNS.items()})


if __name__ == "__main__":
    main()
