"""The tracking commands: `tracking sync`."""
from __future__ import annotations

import argparse
from pathlib import Path


def cmd_tracking_sync(args: argparse.Namespace) -> int:
    """Send what a run's tracking journal holds and the store never received (safe to repeat)."""
    from sabiscale.track.tracking import run_page, sync

    result = sync(Path(args.run_dir), args.uri)
    if result.sent == 0:
        print(f"nothing to send: {result.uri} already holds everything of run {result.run_id}")
    else:
        print(f"sent {result.sent} records to {result.uri}: MLflow run {result.run_id}")
    if result.uri.startswith("http"):
        print(f"run page: {run_page(result.uri, result.experiment_id, result.run_id)}")
    return 0


def register(sub) -> None:
    tracking = sub.add_parser("tracking", help="MLflow tracking of runs").add_subparsers(dest="tracking_command",
                                                                                       required=True)
    sync = tracking.add_parser("sync", help="send what a run logged while its tracking store was unreachable")
    sync.add_argument("run_dir", help="the run's output_dir (or a tracking_journal*.jsonl file)")
    sync.add_argument("--uri", help="the store to send to, for a run never created (default: the one the run used)")
    sync.set_defaults(func=cmd_tracking_sync)
