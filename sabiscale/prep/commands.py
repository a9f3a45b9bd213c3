"""The data-preparation commands: `prepare`, `tasks`, `tokenizer report`."""
from __future__ import annotations

import argparse
from pathlib import Path

from sabiscale.lock import DirectoryLock
from sabiscale.runtime import add_recipe_arguments, recipe_config, setup_logging


def cmd_prepare(args: argparse.Namespace) -> int:
    """Raw data -> tokenizer -> WebDataset shards + manifest, as the recipe says."""
    from sabiscale.prep.prepare import prepare

    cfg = recipe_config(args)
    if args.skip_bad:
        cfg.data.skip_bad = True
    setup_logging(0)
    with DirectoryLock(cfg.prepared_dir, "prepare"):
        prepared = prepare(cfg)
    if prepared.reused:
        print(f"{cfg.data.dir} already holds data prepared with these settings ({prepared.manifest}); nothing "
              "to do: every run of this recipe trains from it")
        return 0
    print(f"tokenizer: {prepared.tokenizer_path}\nshards:    {prepared.shards_dir} "
          f"({prepared.train_documents} train / {prepared.val_documents} val documents; "
          f"{prepared.heldout_records} held-out records kept out of both)\n"
          f"manifest:  {prepared.manifest}")
    if prepared.skipped:
        shown = "\n".join(f"  {s['where']}: {s['reason']}" for s in prepared.skipped[:10])
        more = f"\n  ... and {len(prepared.skipped) - 10} more" if len(prepared.skipped) > 10 else ""
        print(f"skipped {len(prepared.skipped)} bad record(s), all listed in {prepared.shards_dir / 'skipped.jsonl'}:\n"
              f"{shown}{more}")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    """How to prompt each task (markdown), from the task registry."""
    from sabiscale.tasks import task_guide, task_registry

    cfg = recipe_config(args) if args.recipe else None
    print(task_guide(cfg.data.tasks if cfg else None, task_registry(cfg.data.task_defs) if cfg else None))
    return 0


def data_root(cfg, given: str | None) -> Path | None:
    """The directory of a layout source (`--data` overrides it); None for data.source=files."""
    if given:
        return Path(given)
    if cfg.data.source == "files":
        return None
    return Path(cfg.data.jsonl_root or cfg.prepared_dir / "raw")


def cmd_tokenizer_report(args: argparse.Namespace) -> int:
    """Fertility, bytes per token and byte-fallback share per language."""
    from sabiscale.prep.corpus import load_corpus
    from sabiscale.prep.tokenizer import load_tokenizer
    from sabiscale.prep.tokenizer_report import (format_tokenizer_report, format_unit_shares, tokenizer_report,
                                                  unit_shares)

    cfg = recipe_config(args)
    root = data_root(cfg, args.data)
    tok = load_tokenizer(Path(args.tokenizer) if args.tokenizer else cfg.tokenizer_path)
    examples = [e for e, _ in load_corpus(cfg, root).examples]
    print(f"tokenizer {args.tokenizer or cfg.tokenizer_path} ({len(tok)} tokens) on {root or 'data.files'}\n")
    print(format_tokenizer_report(tokenizer_report(tok, examples)))
    mix = cfg.data.mix
    print("\n" + format_unit_shares(unit_shares(tok, examples, mix.temperature, mix.language_weights), mix.temperature))
    return 0


def register(sub) -> None:
    prepare = sub.add_parser("prepare", help=cmd_prepare.__doc__)
    add_recipe_arguments(prepare)
    prepare.add_argument("--skip-bad", action="store_true",
                         help="skip bad input records instead of stopping; each is listed in <shards>/skipped.jsonl")
    prepare.set_defaults(func=cmd_prepare)
    tasks = sub.add_parser("tasks", help="how to prompt each task: template and a worked example")
    add_recipe_arguments(tasks, optional=True)
    tasks.set_defaults(func=cmd_tasks)
    tokenizer = sub.add_parser("tokenizer", help="inspect a tokenizer").add_subparsers(dest="tokenizer_command",
                                                                                       required=True)
    report = tokenizer.add_parser("report", help="fertility, bytes/token and byte-fallback share per language")
    add_recipe_arguments(report)
    report.add_argument("--tokenizer", default=None, help="a tokenizer.json (default: the recipe's run)")
    report.add_argument("--data", default=None, help="JSONL root (default: the recipe's data)")
    report.set_defaults(func=cmd_tokenizer_report)
