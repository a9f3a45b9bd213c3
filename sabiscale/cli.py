"""The `sabiscale` console script: one subcommand per stage, each registered by its stage's
`commands.py`.

    sabiscale demo                              # everything, on the embedded demo corpus
    sabiscale prepare RECIPE [key=value ...]    # raw data -> tokenizer -> shards
    sabiscale train RECIPE [key=value ...]      # shards -> DeepSpeed engine -> checkpoint + MLflow run
    deepspeed --num_gpus 2 --module sabiscale train RECIPE ...   # the same loop on 2 ranks

This is the edge: environment variables (launcher rendezvous, MLFLOW_TRACKING_URI) are read here
and in sabiscale/runtime.py, and turned into arguments; nothing below reads them.
"""
from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from sabiscale.errors import UserError
from sabiscale.evaluate import commands as evaluate_commands
from sabiscale.prep import commands as prep_commands
from sabiscale.publish import commands as publish_commands
from sabiscale.runtime import fail_fast_tracking, quiet_libraries, use_environment_toolchain
from sabiscale.shards import commands as shards_commands
from sabiscale.track import commands as track_commands
from sabiscale.train import commands as train_commands

# In the order of the data flow; `sabiscale --help` lists them so.
STAGES = (prep_commands, shards_commands, train_commands, evaluate_commands, publish_commands, track_commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sabiscale", description=__doc__.split("\n\nThis is the edge")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # The deepspeed launcher passes --local_rank=N before the subcommand; LOCAL_RANK carries it too.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error, also of input errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        stage.register(sub)
    for plugin in entry_points(group="sabiscale.commands"):
        plugin.load()(sub)  # e.g. `sabiscale analyze`, from the sabiscale_analysis package
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow flags (`prepare RECIPE --skip-bad data.seq_len=512`)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None, hooks=()) -> int:
    """hooks: train/hooks.py instruments for the training commands (tests, benchmarks)."""
    use_environment_toolchain()
    fail_fast_tracking()
    quiet_libraries()
    args = parse(argv)
    args.hooks = list(hooks)
    from sabiscale.train.preemption import PREEMPTED_EXIT, Preempted

    try:
        return args.func(args)
    except Preempted as stopped:
        print(f"sabiscale {args.command}: {stopped}", file=sys.stderr)
        return PREEMPTED_EXIT
    except UserError as err:
        if args.debug:
            raise
        print(f"sabiscale {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - not the user's input: a bug, reported as one
        if args.debug:
            raise
        print(bug_report(args.command, err), file=sys.stderr)
        return BUG_EXIT


BUG_EXIT = 70  # EX_SOFTWARE: an internal error, not a usage error (2)


def bug_report(command: str, err: Exception) -> str:
    """What a user sees for an unexpected exception: that it is sabiscale's fault, its one-line
    summary, and the file holding the traceback to report (a traceback alone reads as "my input
    was wrong")."""
    import tempfile
    import traceback

    with tempfile.NamedTemporaryFile("w", prefix=f"sabiscale-{command}-bug-", suffix=".txt", delete=False,
                                     encoding="utf-8") as f:
        f.write(f"sabiscale {' '.join(sys.argv[1:])}\n\n{''.join(traceback.format_exception(err))}")
    summary = str(err).splitlines()[0][:300] if str(err) else ""
    return (f"sabiscale {command}: internal error (a bug in sabiscale, not a problem with your input): "
            f"{type(err).__name__}: {summary}\nThe traceback is in {f.name}; please report it to the sabiscale "
            "maintainers (the project's issue tracker) with that file and the command. `sabiscale --debug "
            f"{command} ...` shows it here.")
