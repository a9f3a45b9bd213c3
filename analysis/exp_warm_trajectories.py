"""Token-level loss trajectories as Rho-1 measured them: while continuing to pre-train a model
that is already trained, not from random initialisation (where every token starts high).

- source: the masked-loss model of the full-mix experiment (exp_masked_mix, seed 1, 400 steps of
  launch/recipes/shared_data.yaml), trained here with the same settings if it is not there yet;
- warm: continual pre-training from its weights (`train.init_from`) on the same prepared data in
  a new order (seed 7), with probes every --probe-every steps;
- cold: the same run from random initialisation, for contrast.
Reported: the four fractions (L->L, H->L, H->H, L->H) of the warm window next to Rho-1's, the cold
run's over its whole run and over its second half, the warm window per task and per language,
and how the slope threshold changes the numbers.

    .venv/bin/python -m sabiscale_analysis.exp_warm_trajectories               # ~25 min on 2 CPU cores
    .venv/bin/python -m sabiscale_analysis.exp_warm_trajectories --steps 40    # a quick look

Writes analysis/results/warm_trajectories.{md,json} and the trajectory reports beside them;
the runs stay in runs/experiments/warm_trajectories/.
"""
from __future__ import annotations

import argparse
import json
import time

from sabiscale_analysis.experiment import RECIPE, ROOT, train_unless_done
from sabiscale_analysis.trajectories import CATEGORIES, breakdowns, classify, fractions, load_trajectories, write_report

WORK = ROOT / "runs" / "experiments" / "warm_trajectories"
SOURCE = ROOT / "runs" / "experiments" / "masked_mix" / "masked-seed1"
DATA = ROOT / "runs" / "data" / "shared_data"
RESULTS = ROOT / "analysis" / "results"
# Rho-1 (Lin et al. 2024), figure 2: continual pre-training of Tinyllama-1B on 15B OpenWebMath tokens
RHO1 = {"L->L": 0.51, "H->L": 0.26, "H->H": 0.11, "L->H": 0.12}
SOURCE_STEPS = 400


def train(out, steps: int, seed: int, extra: list[str]) -> None:
    train_unless_done(RECIPE, f"output_dir={out}", f"data.dir={DATA}", "loss.kind=masked", f"seed={seed}",
              f"train.max_steps={steps}", f"optim.warmup_steps={max(1, steps // 10)}", "train.log_every=50",
              "tracking.system_metrics=false", *extra)


def row(name: str, f: dict[str, float]) -> str:
    return f"| {name} | " + " | ".join(f"{f[c]:.1%}" for c in CATEGORIES) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--probe-every", type=int, default=25)
    args = parser.parse_args()
    started = time.monotonic()
    if not (SOURCE / "checkpoints" / "latest").is_file():
        train(SOURCE, SOURCE_STEPS, 1, [f"train.eval_every={SOURCE_STEPS // 4}", "train.checkpoint_every=100"])
    probes = [f"train.probe_every={args.probe_every}", "train.probe_batches=4", f"train.eval_every={args.steps}"]
    warm, cold = WORK / "warm", WORK / "cold"
    train(warm, args.steps, 7, [*probes, f"train.init_from={SOURCE / 'checkpoints'}"])
    train(cold, args.steps, 7, probes)
    half = args.steps // 2
    windows = {"warm (continual pre-training), whole window": (warm, 0),
               "cold (random init), whole run": (cold, 0), f"cold, second half (steps {half}-{args.steps})": (cold, half)}
    measured = {name: fractions(classify(load_trajectories(run, start))) for name, (run, start) in windows.items()}
    warm_traj = load_trajectories(warm)
    by_threshold = {t: fractions(classify(warm_traj, t)) for t in (0.1, 0.2, 0.3, 0.5)}
    groups = breakdowns(warm_traj, classify(warm_traj))
    write_report([warm], RESULTS / "warm_trajectories_report")
    write_report([cold], RESULTS / "warm_trajectories_cold_report")
    command = f".venv/bin/python -m sabiscale_analysis.exp_warm_trajectories --steps {args.steps} --probe-every {args.probe_every}"
    minutes = (time.monotonic() - started) / 60
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "warm_trajectories.json").write_text(json.dumps(
        {"command": command, "date": time.strftime("%Y-%m-%d"), "minutes": minutes, "fractions": measured,
         "rho1": RHO1, "warm_by_threshold": {str(k): v for k, v in by_threshold.items()}, "warm_groups": groups},
        indent=2) + "\n")
    header = ["| | " + " | ".join(CATEGORIES) + " |", "|---|" + "---:|" * len(CATEGORIES)]
    lines = ["# Token-level trajectories in a warm-started window, as Rho-1 measured them\n",
             f"Command: `{command}`  ", f"Date: {time.strftime('%Y-%m-%d')}; {minutes:.0f} minutes on a 2-core CPU.\n",
             f"Setting: the 11.6M-parameter model of `launch/recipes/shared_data.yaml` trained {SOURCE_STEPS} steps with "
             "the masked loss (exp_masked_mix, seed 1), then trained on for "
             f"{args.steps} steps from its weights (`train.init_from`) on the same prepared data in a new order (seed "
             f"7: about {1 - SOURCE_STEPS * 8 / 7856:.0%} of the sequences it sees were not in the source run); probe "
             f"(4 validation micro-batches, answer tokens) every {args.probe_every} steps; slope threshold 0.2 nats "
             "over the window. Rho-1's numbers are from its figure 2 (Tinyllama-1B, 15B math tokens).\n",
             *header, row("Rho-1 (continual pre-training)", RHO1)]
    lines += [row(name, f) for name, f in measured.items()]
    lines += ["", "Slope threshold, warm window (the larger the threshold, the more tokens count as flat, L->L or H->H):", "",
              *header, *[row(f"threshold {t}", f) for t, f in by_threshold.items()]]
    for key in ("task", "language"):
        lines += ["", f"Warm window by {key}:", "", "| group | " + " | ".join(CATEGORIES) + " | tokens |",
                  "|---|" + "---:|" * (len(CATEGORIES) + 1)]
        lines += [row(group, f).rstrip(" |") + f" | {f['tokens']} |" for group, f in groups[key].items()]
    warm_f = measured["warm (continual pre-training), whole window"]
    cold_f = measured["cold (random init), whole run"]
    lines += ["", f"**Verdict:** from random initialisation {cold_f['H->L']:.0%} of the probe tokens are H->L and "
              f"{cold_f['L->L']:.0%} L->L, an artefact of the start; in the warm window {warm_f['L->L']:.0%} are L->L and "
              f"{warm_f['H->L']:.0%} H->L (Rho-1: 51% and 26%): "
              + ("the warm-window fractions have Rho-1's shape (most tokens already learned, a minority still learned, "
                 "some getting worse)." if warm_f["L->L"] > max(warm_f["H->L"], warm_f["H->H"], warm_f["L->H"]) else
                 "the warm window does not reproduce Rho-1's shape in this setting."),
              "", "Reports: [warm](warm_trajectories_report/report.md), [cold](warm_trajectories_cold_report/report.md)"]
    (RESULTS / "warm_trajectories.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
