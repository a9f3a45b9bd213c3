"""The shard commands: `shards verify`, `shards index`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_shards_verify(args: argparse.Namespace) -> int:
    """Check every shard against its manifest."""
    from sabiscale.shards.verify import verify_shards

    problems, totals = verify_shards(Path(args.dir))
    for split, t in totals.items():
        print(f"{split}: {t['sequences']} sequences, {t['tokens']} tokens, {t['supervised_tokens']} supervised")
    if problems:
        print(f"{len(problems)} problem(s) in {args.dir}:", *(f"  - {p}" for p in problems), sep="\n", file=sys.stderr)
        return 1
    print(f"{args.dir}: every shard matches manifest.json")
    return 0


def cmd_shards_index(args: argparse.Namespace) -> int:
    """Add the sample index to shards written by an earlier sabiscale (the shards stay as they are)."""
    from sabiscale.shards.write import index_existing

    print(f"indexed: {index_existing(Path(args.dir))}")
    return 0


def register(sub) -> None:
    shards = sub.add_parser("shards", help="inspect written shards").add_subparsers(dest="shards_command", required=True)
    verify = shards.add_parser("verify", help="check every shard against manifest.json (sha256, counts, dtypes, shapes)")
    verify.add_argument("dir", help="a shards directory (with manifest.json)")
    verify.set_defaults(func=cmd_shards_verify)
    index = shards.add_parser("index", help="add the per-sample index to shards of an earlier sabiscale (format 1 -> 2)")
    index.add_argument("dir", help="a shards directory (with manifest.json)")
    index.set_defaults(func=cmd_shards_index)
