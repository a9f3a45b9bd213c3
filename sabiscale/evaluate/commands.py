"""The evaluation commands: `eval` (held-out scores of a checkpoint, or lm-eval on an export),
`score` (Rho-1 reference losses into shards), `generate`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sabiscale.errors import UserError
from sabiscale.lock import DirectoryLock
from sabiscale.runtime import eval_device, setup_logging


def cmd_eval(args: argparse.Namespace) -> int:
    """Held-out metrics of a checkpoint or an export, per task and language, on records training
    never saw."""
    from sabiscale.config import build_config
    from sabiscale.evaluate.heldout import log_eval
    from sabiscale.evaluate.report import format_report
    from sabiscale.model.build import for_inference

    setup_logging(0)
    if args.harness:
        return eval_harness(args)
    tag_dir, lm, tok, meta, fingerprints = load_for_eval(Path(args.checkpoint))
    lm = for_inference(lm, eval_device())
    cfg = build_config(meta["config"], origin=str(tag_dir))  # the run's own tasks, languages, held-out split
    if fingerprints is None:
        fingerprints = training_fingerprints(cfg)
    root, examples = eval_examples(cfg, args)
    report = {"checkpoint": str(tag_dir), "data": str(root or "data.files"), "split": args.split, "step": meta["step"],
              "examples_per_file": None if args.full else args.max_per_file,
              **score_examples(lm, tok, cfg, examples, fingerprints, args)}
    out = Path(args.out) if args.out else tag_dir / f"eval_{args.split}.json"
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(f"# Eval of {tag_dir} ({args.split})\n\n```\n{format_report(report)}\n```\n",
                                      encoding="utf-8")
    print(format_report(report))
    print(f"\nfull report: {out} (and {out.with_suffix('.md').name})")
    logged = log_eval(cfg, meta, report, [out, out.with_suffix(".md")])
    if logged:
        print(f"logged to MLflow run {logged}")
    return 0


def load_for_eval(path: Path):
    """(directory, model, tokenizer, run facts, training fingerprints or None) of a checkpoint or
    of an export (`sabiscale export`, `train.export_every`), which carries its fingerprints."""
    from sabiscale.prep.fingerprint import FINGERPRINTS, Fingerprints
    from sabiscale.train.exports import is_export, load_exported_lm
    from sabiscale.train.checkpoint import load_trained_lm, resolve_checkpoint

    if is_export(path):
        lm, tok, meta = load_exported_lm(path)
        fingerprints = Fingerprints.load(path) if (path / FINGERPRINTS).is_file() else None
        return path, lm, tok, meta, fingerprints
    tag_dir = resolve_checkpoint(path)
    lm, tok, meta = load_trained_lm(tag_dir)
    return tag_dir, lm, tok, meta, None


def score_examples(lm, tok, cfg, examples: list, fingerprints, args: argparse.Namespace) -> dict:
    """The report's sections: contamination per task and language, then every score on the
    clean records (all of them with --include-contaminated)."""
    from sabiscale.evaluate.heldout import generation_metrics, label_tasks, rank_classification, teacher_forced
    from sabiscale.tasks import task_registry

    registry = task_registry(cfg.data.task_defs)
    contamination, clean = check_contamination(examples, fingerprints, registry)
    scored = examples if args.include_contaminated else clean
    if not scored:
        raise UserError(f"every one of the {len(examples)} {args.split} records appears in the training data "
                        "(exactly or by 13-gram): there is nothing clean to score; --include-contaminated scores "
                        "them anyway, marked in the report")
    generate = 200 if args.full else args.generate
    return {"contamination": contamination, "include_contaminated": bool(args.include_contaminated),
            "teacher_forced": teacher_forced(lm, tok, scored, cfg.seed),
            "classification": rank_classification(lm, tok, scored, label_tasks(scored, registry), cfg.seed),
            "generation": generation_metrics(lm, tok, scored, generate, cfg.seed) if generate else {}}


def check_contamination(examples: list, fingerprints, registry) -> tuple[dict, list]:
    """({task/lang: records, exact, ngram, clean}, the clean examples)."""
    from collections import Counter, defaultdict

    counts: dict[str, Counter] = defaultdict(Counter)
    clean = []
    for example in examples:
        found = fingerprints.overlap(example, registry[example.task])
        counts[f"{example.task}/{example.lang}"].update(["records", found or "clean"])
        if found is None:
            clean.append(example)
    return {key: {k: c.get(k, 0) for k in ("records", "exact", "ngram", "clean")} for key, c in sorted(counts.items())}, clean


def training_fingerprints(cfg):
    """What the run's training shards hold; refused for data prepared the old way (dev records in training)."""
    from sabiscale.prep.corpus import SPLIT_RULE_VERSION
    from sabiscale.prep.fingerprint import Fingerprints
    from sabiscale.shards.format import read_manifest

    manifest = read_manifest(cfg.shards_dir)
    if manifest.get("split_rule", {}).get("version") != SPLIT_RULE_VERSION:
        raise UserError(f"{cfg.shards_dir}/manifest.json: these shards were prepared by an earlier sabiscale, whose "
                        "split sent official dev records into training, so no record of them is held out and every "
                        "score would be on training data. Prepare the data again into a new data.dir and train from "
                        "it; then evaluate that run")
    return Fingerprints.load(cfg.shards_dir)


def eval_examples(cfg, args: argparse.Namespace):
    """(data root, the examples of --split), or a UserError saying which split would find some."""
    from sabiscale.evaluate.report import no_examples_message
    from sabiscale.prep.commands import data_root
    from sabiscale.prep.corpus import load_corpus

    root = data_root(cfg, args.data)
    per_file = None if args.full else args.max_per_file
    wanted = {"dev": {"heldout"}, "val": {"val"}, "all": None}[args.split]
    examples = [e for e, _ in load_corpus(cfg, root, wanted, per_file, spread=True).examples]
    if not examples:
        everything = [e for e, _ in load_corpus(cfg, root, None, per_file).examples]
        counts = {"dev": sum(e.split == "heldout" for e in everything), "val": sum(e.split == "val" for e in everything),
                  "all": len(everything)}
        raise UserError(no_examples_message(args.split, root, counts))
    return root, examples


def eval_harness(args: argparse.Namespace) -> int:
    """lm-evaluation-harness on an exported model, with sabiscale's tag-format task configs."""
    from sabiscale.evaluate.harness import run_harness

    if not args.data:
        raise UserError("--harness reads a task-layout directory (<root>/<task>/<file>.jsonl): give it with --data ROOT")
    export_dir = Path(args.checkpoint)
    out = Path(args.out) if args.out else export_dir / "harness"
    scores = run_harness(export_dir, Path(args.data), out, None if args.full else args.max_per_file,
                         "cuda" if eval_device().type == "cuda" else "cpu", args.include_contaminated)
    for name, values in sorted(scores.items()):
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items() if isinstance(v, float)))
    print(f"\nreport: {out / 'harness.json'}; task configs for `lm_eval --include_path`: {out / 'tasks'}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """Reference losses of every answer token, written into new shards (for loss.kind=selective)."""
    from sabiscale.evaluate.score import score_shards
    from sabiscale.train.engine import barrier, ensure_launcher_env, init_distributed

    ensure_launcher_env()
    world = init_distributed()
    setup_logging(world.rank)
    with DirectoryLock(Path(args.out), "score", take=world.rank == 0):
        manifest = score_shards(Path(args.reference), Path(args.shards), Path(args.out), world.rank, world.world_size,
                                world.device, args.batch_size, barrier)
    if world.rank == 0:
        print(f"scored shards: {manifest.parent} (manifest {manifest}); train from them with "
              f"data.shards_dir={manifest.parent} tokenizer.path=<the shards' tokenizer.json> loss.kind=selective")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Continue a prompt with a trained checkpoint or export (greedy, until the end-of-text token)."""
    from sabiscale.evaluate.heldout import generate_text
    from sabiscale.model.build import for_inference

    _, lm, tok, _, _ = load_for_eval(Path(args.checkpoint))
    print(generate_text(for_inference(lm, eval_device()), tok, args.prompt, args.max_new_tokens))
    return 0


def register(sub) -> None:
    ev = sub.add_parser("eval", help="held-out metrics of a checkpoint or export (perplexity, bits/byte, chrF, BLEU, F1)")
    ev.add_argument("checkpoint", help="checkpoints/step_XXXXXXXX (or checkpoints/, to take `latest`), or a Hugging "
                                       "Face export (`sabiscale export`, or checkpoints/step_XXXXXXXX/hf from train.export_every)")
    ev.add_argument("--data", default=None, help="JSONL root in the task layout, <task>/<lang>.jsonl (default: the run's data)")
    ev.add_argument("--split", choices=["dev", "val", "all"], default="dev",
                    help="dev: the held-out records (never in training); val: the run's validation split; all: everything")
    ev.add_argument("--max-per-file", type=int, default=60,
                    help="records per file, spread evenly over it (default 60: a minute or so on a small CPU)")
    ev.add_argument("--generate", type=int, default=12, help="examples decoded per task and language (0 = none)")
    ev.add_argument("--full", action="store_true", help="every record, and 200 decoded per task and language")
    ev.add_argument("--out", default=None, help="report JSON (default: eval_<split>.json in the checkpoint)")
    ev.add_argument("--include-contaminated", action="store_true",
                    help="also score records that appear in the training data (exactly or by 13-gram); marked in the report")
    ev.add_argument("--harness", action="store_true",
                    help="run lm-evaluation-harness on an exported model directory (given instead of a checkpoint) "
                         "with sabiscale's tag-format tasks over the dev records of --data")
    ev.set_defaults(func=cmd_eval)
    score = sub.add_parser("score", help="reference losses of every answer token into new shards (Rho-1)")
    score.add_argument("--reference", required=True, help="the reference model: a checkpoint (or checkpoints/ for the newest)")
    score.add_argument("--shards", required=True, help="shards directory to score (with manifest.json)")
    score.add_argument("--out", required=True, help="new directory for the scored shards (rerun to resume)")
    score.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    score.set_defaults(func=cmd_score)
    gen = sub.add_parser("generate", help="continue a prompt with a checkpoint (see `sabiscale tasks` for prompts)")
    gen.add_argument("checkpoint", help="checkpoints/step_XXXXXXXX (or checkpoints/, to take `latest`)")
    gen.add_argument("prompt", help="e.g. \"<translate> Good morning <yor>\"")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.set_defaults(func=cmd_generate)
