"""`sabiscale analyze`: registered with the sabiscale console script through the entry point
group `sabiscale.commands` (pyproject.toml), so the library never imports this package."""
from __future__ import annotations

import argparse
from pathlib import Path


def cmd_analyze(args: argparse.Namespace) -> int:
    """Token-level loss trajectories of one or more runs."""
    from sabiscale_analysis.trajectories import log_to_runs, write_report

    runs = [Path(r) for r in args.runs]
    out = Path(args.out) if args.out else runs[0] / "analysis"
    report = write_report(runs, out, args.threshold, args.x_axis, args.from_step)
    logged = log_to_runs(runs, out) if args.log else []
    print(f"report: {report}" + (f"\nlogged to MLflow run(s) {', '.join(logged)} under analysis/" if logged else ""))
    return 0


def register(sub) -> None:
    """Add the `analyze` subcommand to sabiscale's subparsers."""
    analyze = sub.add_parser("analyze", help="token-level loss trajectories (L->L, H->L, H->H, L->H) of runs, side by side")
    analyze.add_argument("runs", nargs="+", help="run directories trained with train.probe_every=N")
    analyze.add_argument("--out", default=None, help="report directory (default: <first run>/analysis)")
    analyze.add_argument("--threshold", type=float, default=0.2, help="slope (nats over the run) for H->L / L->H")
    analyze.add_argument("--x-axis", choices=["fraction", "ordinal"], default="fraction")
    analyze.add_argument("--from-step", type=int, default=0,
                         help="classify over the probe points from this step on (a window after a warm start)")
    analyze.add_argument("--no-log", dest="log", action="store_false", help="do not log the report to MLflow")
    analyze.set_defaults(func=cmd_analyze)
