"""The `sabiscale` console script: one subcommand per stage.

    sabiscale demo                              # everything, on the embedded demo corpus
    sabiscale prepare RECIPE [key=value ...]    # raw data -> tokenizer -> shards
    sabiscale train RECIPE [key=value ...]      # shards -> DeepSpeed engine -> checkpoint + MLflow run
    deepspeed --num_gpus 2 --module sabiscale train RECIPE ...   # the same loop on 2 ranks

This is the edge: environment variables (launcher rendezvous, MLFLOW_TRACKING_URI) are read here
and turned into arguments; nothing below reads them.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

from sabiscale.errors import UserError
from sabiscale.lock import DirectoryLock
from sabiscale.track.tracking import run_page
from sabiscale.config import PROJECT_ROOT, RunConfig, load_config, resolve_paths

DEMO_RECIPE = PROJECT_ROOT / "launch" / "recipes" / "demo.yaml"


def _setup_logging(rank: int) -> None:
    """sabiscale's own lines on rank 0 at INFO; libraries (DeepSpeed, MLflow, compilers) only warn."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout, force=True)
    logging.getLogger("sabiscale").setLevel(logging.INFO if rank == 0 else logging.WARNING)


def _config(args: argparse.Namespace) -> RunConfig:
    overrides = list(args.overrides) + (["train.resume=must"] if getattr(args, "resume", False) else [])
    return resolve_paths(load_config(args.recipe, overrides), os.environ)


def cmd_prepare(args: argparse.Namespace) -> int:
    """Raw data -> tokenizer -> WebDataset shards + manifest, as the recipe says."""
    from sabiscale.prep.prepare import prepare

    cfg = _config(args)
    if args.skip_bad:
        cfg.data.skip_bad = True
    _setup_logging(0)
    with DirectoryLock(cfg.prepared_dir, "prepare"):
        prepared = prepare(cfg)
    if prepared.reused:
        print(f"{cfg.data.dir} already holds data prepared with these settings ({prepared.manifest}); nothing "
              "to do: every run of this recipe trains from it")
        return 0
    print(f"tokenizer: {prepared.tokenizer_path}\nshards:    {prepared.shards_dir} "
          f"({prepared.train_documents} train / {prepared.val_documents} val documents)\n"
          f"manifest:  {prepared.manifest}")
    if prepared.skipped:
        shown = "\n".join(f"  {s['where']}: {s['reason']}" for s in prepared.skipped[:10])
        more = f"\n  ... and {len(prepared.skipped) - 10} more" if len(prepared.skipped) > 10 else ""
        print(f"skipped {len(prepared.skipped)} bad record(s), all listed in {prepared.shards_dir / 'skipped.jsonl'}:\n"
              f"{shown}{more}")
    return 0


def _run_training(cfg: RunConfig, hooks=()):
    from sabiscale.train.device import check_accelerator

    check_accelerator(cfg.engine.device)
    _check_prepared(cfg)
    if cfg.engine.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # read by DeepSpeed when it is first imported, just below
    from sabiscale.train.engine import ensure_launcher_env, init_distributed
    from sabiscale.train.loop import train

    logging.getLogger("DeepSpeed").addFilter(_DropNotices())

    ensure_launcher_env()
    world = init_distributed()
    _setup_logging(world.rank)
    return train(cfg, world, hooks), world


def _global_rank() -> int:
    """This process's rank as the launcher (or Slurm) gave it, before the process group exists."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def _check_prepared(cfg: RunConfig) -> None:
    """Missing or mismatched shards and tokenizer are named before DeepSpeed starts (seconds, not 20)."""
    from sabiscale.data.loader import shard_urls
    from sabiscale.train.inputs import check_inputs

    manifest = check_inputs(cfg)
    shard_urls(cfg.shards_dir, manifest, "train")


def cmd_train(args: argparse.Namespace) -> int:
    """Train on the recipe's shards (continues from the newest checkpoint of its run directory)."""
    cfg = _config(args)
    with DirectoryLock(cfg.output_dir, "train", take=_global_rank() == 0):
        result, world = _run_training(cfg, args.hooks)
    if world.rank == 0:
        losses = result.eval_answer_loss
        change = (f"{losses[min(losses)]:.3f} -> {losses[max(losses)]:.3f}" if len(losses) > 1
                  else f"{losses[max(losses)]:.3f}" if losses else "n/a")
        print(f"trained {result.steps} steps; eval answer loss {change}\n"
              f"checkpoint: {result.checkpoint}\nMLflow run: {result.run_id} ({result.tracking_uri})")
        if result.run_id and result.tracking_uri:
            ui = (result.tracking_uri if result.tracking_uri.startswith("http") else "http://127.0.0.1:5000")
            print(f"run page:   {run_page(ui, result.experiment_id, result.run_id)}"
                  + ("" if result.tracking_uri.startswith("http") else
                     f"  (after `mlflow ui --backend-store-uri {result.tracking_uri} --port 5000`)"))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from sabiscale.prep.prepare import prepare

    overrides = [f"output_dir={args.out}", *args.overrides] if args.out else args.overrides
    cfg = resolve_paths(load_config(DEMO_RECIPE, overrides), os.environ)
    if cfg.output_dir.exists() and any(cfg.output_dir.iterdir()):
        # a demo always starts from scratch, and never over an earlier one
        cfg.output_dir = cfg.output_dir.with_name(f"{cfg.output_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    _setup_logging(0)
    logging.getLogger("sabiscale").info("demo: preparing data in %s", cfg.output_dir)
    with DirectoryLock(cfg.output_dir, "demo", take=_global_rank() == 0):
        prepared = prepare(cfg)
        result, world = _run_training(cfg, args.hooks)
    if world.rank != 0:
        return 0
    losses = result.eval_answer_loss
    first, last = losses[min(losses)], losses[max(losses)]
    store = result.tracking_uri or ""
    print("\n".join([
        "",
        "sabiscale demo finished.",
        f"  raw corpus   {cfg.output_dir / 'raw'}  (generated, multi-task, 3 invented languages + English)",
        f"  tokenizer    {prepared.tokenizer_path}",
        f"  shards       {prepared.shards_dir}  (WebDataset .tar + manifest.json)",
        f"  checkpoint   {result.checkpoint}  (DeepSpeed ZeRO-2, optimizer offloaded to CPU)",
        f"  MLflow run   {result.run_id} in {store}",
        f"  answer-token loss on held-out data: {first:.3f} -> {last:.3f} ({last / first:.0%} of start)",
        "",
        "Look at the run:",
        f"  mlflow ui --backend-store-uri {store} --host 127.0.0.1 --port 5000",
        f"  then open {run_page('http://127.0.0.1:5000', result.experiment_id, result.run_id)}",
    ]))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Held-out metrics of a checkpoint, per task and language."""
    import json

    from sabiscale.train.checkpoint import load_trained_lm, resolve_checkpoint
    from sabiscale.config import build_config
    from sabiscale.prep.corpus import is_dev_record, is_validation, load_corpus
    from sabiscale.evaluate.heldout import generation_metrics, log_eval, teacher_forced

    _setup_logging(0)
    if args.harness:
        return eval_harness(args)
    tag_dir = resolve_checkpoint(Path(args.checkpoint))
    lm, tok, meta = load_trained_lm(tag_dir)
    lm = lm.to(_eval_device())
    cfg = build_config(meta["config"], origin=str(tag_dir))  # the run's own tasks, languages, held-out split
    root = _data_root(cfg, args.data)
    keep = is_dev_record if args.split == "dev" else None
    corpus = load_corpus(cfg, root, keep, None if args.full else args.max_per_file, spread=True)
    examples = [e for e, where in corpus.examples
                if args.split != "val" or is_validation(where, cfg.data.val_fraction)]
    if not examples:
        raise UserError(no_examples_message(cfg, root, args))
    generate = 200 if args.full else args.generate
    report = {"checkpoint": str(tag_dir), "data": str(root or "data.files"), "split": args.split, "step": meta["step"],
              "examples_per_file": None if args.full else args.max_per_file,
              "teacher_forced": teacher_forced(lm, tok, examples),
              "generation": generation_metrics(lm, tok, examples, generate, cfg.seed) if generate else {}}
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


def eval_harness(args: argparse.Namespace) -> int:
    """lm-evaluation-harness on an exported model, with sabiscale's tag-format task configs."""
    from sabiscale.evaluate.harness import run_harness

    if not args.data:
        raise UserError("--harness reads a task-layout directory (<root>/<task>/<file>.jsonl): give it with --data ROOT")
    export_dir = Path(args.checkpoint)
    out = Path(args.out) if args.out else export_dir / "harness"
    scores = run_harness(export_dir, Path(args.data), out, None if args.full else args.max_per_file,
                         "cuda" if _eval_device().type == "cuda" else "cpu")
    for name, values in sorted(scores.items()):
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items() if isinstance(v, float)))
    print(f"\nreport: {out / 'harness.json'}; task configs for `lm_eval --include_path`: {out / 'tasks'}")
    return 0


def no_examples_message(cfg: RunConfig, root: Path | None, args: argparse.Namespace) -> str:
    """Which --split values would find examples in this data, and why this one found none."""
    from sabiscale.prep.corpus import is_validation, load_corpus

    everything = load_corpus(cfg, root, None, None if args.full else args.max_per_file).examples
    counts = {"val": sum(is_validation(where, cfg.data.val_fraction) for _, where in everything), "all": len(everything)}
    why = {"dev": "no record is marked as an official dev record (field `orig_split: dev`, or an `id` containing `-dev-`)",
           "val": "no record falls into the run's held-out hash split", "all": "it holds no records of the run's tasks"}
    working = [f"--split {split} ({n} examples)" for split, n in counts.items() if n and split != args.split]
    return (f"no {args.split} examples under {root or 'data.files'}: {why[args.split]}. "
            + (f"These would work: {', '.join(working)}." if working else "No --split finds examples there."))


def _eval_device():
    """The GPU where torch sees one (evaluation runs there; fp32, so sdpa attention), else the CPU."""
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _data_root(cfg: RunConfig, given: str | None) -> Path | None:
    """The directory of a layout source (`--data` overrides it); None for data.source=files."""
    if given:
        return Path(given)
    if cfg.data.source == "files":
        return None
    return Path(cfg.data.jsonl_root or cfg.prepared_dir / "raw")


def format_report(report: dict) -> str:
    lines = [f"{'task/lang':<24}{'tokens':>8}{'ppl':>10}{'bits/byte':>11}"]
    for key, m in report["teacher_forced"].items():
        lines.append(f"{key:<24}{m['answer_tokens']:>8}{m['perplexity']:>10.2f}{m['bits_per_byte']:>11.3f}")
    for key, m in report["generation"].items():
        scores = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in m.items() if k not in ("samples",))
        lines.append(f"{key:<24}{scores}")
    return "\n".join(lines)


def cmd_export(args: argparse.Namespace) -> int:
    """Consolidate a checkpoint into a Hugging Face model directory."""
    from sabiscale.train.checkpoint import export_hf

    out = export_hf(Path(args.checkpoint), Path(args.out))
    print(f"exported to {out}: load with AutoModelForCausalLM.from_pretrained({str(out)!r}) "
          f"and AutoTokenizer.from_pretrained({str(out)!r}); model card: {out / 'README.md'}")
    if args.register:
        from sabiscale.config import build_config
        from sabiscale.publish.registry import register_export
        from sabiscale.train.checkpoint import read_sidecar, resolve_checkpoint

        tag_dir = resolve_checkpoint(Path(args.checkpoint))
        meta, _ = read_sidecar(tag_dir)
        done = register_export(out, args.register, build_config(meta["config"], origin=str(tag_dir)), meta, tag_dir)
        print(f"registered {done.name} version {done.version} (MLflow run {done.run_id}) in {done.uri}")
    return 0


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


def cmd_tasks(args: argparse.Namespace) -> int:
    """How to prompt each task (markdown), from the task registry."""
    from sabiscale.prep.tasks import task_guide, task_registry

    cfg = _config(args) if args.recipe else None
    print(task_guide(cfg.data.tasks if cfg else None, task_registry(cfg.data.task_defs) if cfg else None))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Continue a prompt with a trained checkpoint (greedy, until the end-of-text token)."""
    from sabiscale.evaluate.heldout import generate_text
    from sabiscale.train.checkpoint import load_trained_lm

    lm, tok, _ = load_trained_lm(Path(args.checkpoint))
    print(generate_text(lm.to(_eval_device()), tok, args.prompt, args.max_new_tokens))
    return 0


def cmd_shards_index(args: argparse.Namespace) -> int:
    """Add the sample index to shards written by an earlier sabiscale (the shards stay as they are)."""
    from sabiscale.shards.write import index_existing

    print(f"indexed: {index_existing(Path(args.dir))}")
    return 0


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


def cmd_tokenizer_report(args: argparse.Namespace) -> int:
    """Fertility, bytes per token and byte-fallback share per language."""
    from sabiscale.prep.corpus import load_corpus
    from sabiscale.prep.tokenizer import load_tokenizer
    from sabiscale.prep.tokenizer_report import (format_tokenizer_report, format_unit_shares, tokenizer_report,
                                                  unit_shares)

    cfg = _config(args)
    root = _data_root(cfg, args.data)
    tok = load_tokenizer(Path(args.tokenizer) if args.tokenizer else cfg.tokenizer_path)
    examples = [e for e, _ in load_corpus(cfg, root).examples]
    print(f"tokenizer {args.tokenizer or cfg.tokenizer_path} ({len(tok)} tokens) on {root or 'data.files'}\n")
    print(format_tokenizer_report(tokenizer_report(tok, examples)))
    mix = cfg.data.mix
    print("\n" + format_unit_shares(unit_shares(tok, examples, mix.temperature, mix.language_weights), mix.temperature))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """Reference losses of every answer token, written into new shards (for loss.kind=selective)."""
    from sabiscale.train.engine import barrier, ensure_launcher_env, init_distributed
    from sabiscale.evaluate.score import score_shards

    ensure_launcher_env()
    world = init_distributed()
    _setup_logging(world.rank)
    with DirectoryLock(Path(args.out), "score", take=world.rank == 0):
        manifest = score_shards(Path(args.reference), Path(args.shards), Path(args.out), world.rank, world.world_size,
                                world.device, args.batch_size, barrier)
    if world.rank == 0:
        print(f"scored shards: {manifest.parent} (manifest {manifest}); train from them with "
              f"data.shards_dir={manifest.parent} tokenizer.path=<the shards' tokenizer.json> loss.kind=selective")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """GPU and host memory per DeepSpeed profile for the recipe's model; the cheapest that fits."""
    from sabiscale.train.plan import (GiB, PROFILES, format_plans, largest_fitting_model, parse_size, plan_all,
                                      slurm_resources)

    cfg = _config(args)
    vocab = _planned_vocab(cfg)
    gpu, host = parse_size(args.gpu_memory), parse_size(args.host_memory) if args.host_memory else None
    ranks = args.gpus_per_node * args.nodes
    ds_dir = PROJECT_ROOT / "ds_configs"
    plans, best = plan_all(cfg, vocab, gpu, host, ranks, args.gpus_per_node, ds_dir)
    print(f"{cfg.name}: {_params_line(cfg, vocab)}; micro-batch {cfg.train.micro_batch_size} x "
          f"{cfg.data.seq_len} tokens; {ranks} GPU(s) of {gpu / GiB:.1f} GiB\n")
    print(format_plans(plans, best, gpu, host))
    if args.slurm and best is not None:
        cpus, mem = slurm_resources(best, args.gpus_per_node, cfg.data.loader_workers)
        print(f"\nslurm: --nodes={args.nodes} --gpus-per-node={args.gpus_per_node} --cpus-per-task={cpus} --mem={mem}G")
    if args.largest:
        print(f"\nlargest model of this shape family that fits one {gpu / GiB:.0f} GiB GPU "
              f"(micro-batch {cfg.train.micro_batch_size} x {cfg.data.seq_len}):")
        for profile in PROFILES:
            for opt in ("adamw", "adamw8bit"):
                params, trial, fit = largest_fitting_model(cfg, vocab, profile, ds_dir, opt, True, gpu)
                m = trial.model
                print(f"  {profile:<15}{opt:<11}{params / 1e6:>9.0f}M parameters"
                      + (f" (hidden {m.hidden_size}, {m.num_layers} layers, activation checkpointing; "
                         f"host memory {fit.host_total / GiB:.0f} GiB)" if fit else ""))
    return 0 if best is not None else 1


def _planned_vocab(cfg) -> int:
    from sabiscale.prep.tokenizer import load_tokenizer

    if cfg.tokenizer_path.is_file():
        return len(load_tokenizer(cfg.tokenizer_path))
    return cfg.tokenizer.vocab_size


def _params_line(cfg, vocab: int) -> str:
    from sabiscale.train.plan import ModelShape

    return f"{ModelShape.from_config(cfg, vocab).params / 1e6:.1f}M parameters (vocabulary {vocab})"


def cmd_build_ops(args: argparse.Namespace) -> int:
    """Compile DeepSpeed's JIT ops once, at install time."""
    from sabiscale.train.engine import build_ops

    for name in build_ops():
        print(f"built DeepSpeed op: {name}")
    return 0


def _add_checkpoint_and_data_commands(sub) -> None:
    """eval, export, tokenizer report, shards verify/index."""
    ev = sub.add_parser("eval", help="held-out metrics of a checkpoint (perplexity, bits/byte, chrF, BLEU, F1)")
    ev.add_argument("checkpoint", help="checkpoints/step_XXXXXXXX (or checkpoints/, to take `latest`)")
    ev.add_argument("--data", default=None, help="JSONL root in the task layout, <task>/<lang>.jsonl (default: the run's data)")
    ev.add_argument("--split", choices=["dev", "val", "all"], default="dev",
                    help="dev: official dev records; val: the run's held-out hash split; all: everything")
    ev.add_argument("--max-per-file", type=int, default=60,
                    help="records per file, spread evenly over it (default 60: about a minute on 2 CPU cores)")
    ev.add_argument("--generate", type=int, default=12, help="examples decoded per task and language (0 = none)")
    ev.add_argument("--full", action="store_true", help="every record, and 200 decoded per task and language")
    ev.add_argument("--out", default=None, help="report JSON (default: eval_<split>.json in the checkpoint)")
    ev.add_argument("--harness", action="store_true",
                    help="run lm-evaluation-harness on an exported model directory (given instead of a checkpoint) "
                         "with sabiscale's tag-format tasks over the dev records of --data")
    ev.set_defaults(func=cmd_eval)
    ex = sub.add_parser("export", help="consolidate a checkpoint into a Hugging Face model directory")
    ex.add_argument("checkpoint", help="checkpoints/step_XXXXXXXX (or checkpoints/, to take `latest`)")
    ex.add_argument("out", help="a new directory for the Hugging Face model (never overwritten)")
    ex.add_argument("--register", metavar="NAME", default=None,
                    help="also log it to the run that trained it and register it as a version of model NAME "
                         "in the MLflow Model Registry")
    ex.set_defaults(func=cmd_export)
    tokenizer = sub.add_parser("tokenizer", help="inspect a tokenizer").add_subparsers(dest="tokenizer_command",
                                                                                       required=True)
    report = tokenizer.add_parser("report", help="fertility, bytes/token and byte-fallback share per language")
    report.add_argument("recipe", help="YAML recipe (its data and tokenizer)")
    report.add_argument("overrides", nargs="*", help="key=value overrides")
    report.add_argument("--tokenizer", default=None, help="a tokenizer.json (default: the recipe's run)")
    report.add_argument("--data", default=None, help="JSONL root (default: the recipe's data)")
    report.set_defaults(func=cmd_tokenizer_report)
    tracking = sub.add_parser("tracking", help="MLflow tracking of runs").add_subparsers(dest="tracking_command",
                                                                                       required=True)
    sync = tracking.add_parser("sync", help="send what a run logged while its tracking store was unreachable")
    sync.add_argument("run_dir", help="the run's output_dir (or a tracking_journal*.jsonl file)")
    sync.add_argument("--uri", help="the store to send to, for a run never created (default: the one the run used)")
    sync.set_defaults(func=cmd_tracking_sync)
    shards = sub.add_parser("shards", help="inspect written shards").add_subparsers(dest="shards_command", required=True)
    verify = shards.add_parser("verify", help="check every shard against manifest.json (sha256, counts, dtypes, shapes)")
    verify.add_argument("dir", help="a shards directory (with manifest.json)")
    verify.set_defaults(func=cmd_shards_verify)
    index = shards.add_parser("index", help="add the per-sample index to shards of an earlier sabiscale (format 1 -> 2)")
    index.add_argument("dir", help="a shards directory (with manifest.json)")
    index.set_defaults(func=cmd_shards_index)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sabiscale", description=__doc__.split("\n\nThis is the edge")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # The deepspeed launcher passes --local_rank=N before the subcommand; LOCAL_RANK carries it too.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error, also of input errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, needs_recipe in (("prepare", cmd_prepare, True), ("train", cmd_train, True)):
        p = sub.add_parser(name, help=func.__doc__ or name)
        p.add_argument("recipe", nargs="?" if not needs_recipe else None, help="YAML recipe (launch/recipes/)")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=50")
        p.set_defaults(func=func)
        if name == "prepare":
            p.add_argument("--skip-bad", action="store_true",
                           help="skip bad input records instead of stopping; each is listed in <shards>/skipped.jsonl")
        if name == "train":
            p.add_argument("--resume", action="store_true",
                           help="continue from the newest checkpoint in output_dir (an error if there is none); "
                                "without it, training resumes anyway when a checkpoint exists")
    demo = sub.add_parser("demo", help="run every stage on the embedded demo corpus")
    demo.add_argument("--out", default=None, help="output directory (default: runs/demo)")
    demo.add_argument("overrides", nargs="*", help="key=value overrides of the demo recipe")
    demo.set_defaults(func=cmd_demo)
    _add_checkpoint_and_data_commands(sub)
    score = sub.add_parser("score", help="reference losses of every answer token into new shards (Rho-1)")
    score.add_argument("--reference", required=True, help="the reference model: a checkpoint (or checkpoints/ for the newest)")
    score.add_argument("--shards", required=True, help="shards directory to score (with manifest.json)")
    score.add_argument("--out", required=True, help="new directory for the scored shards (rerun to resume)")
    score.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    score.set_defaults(func=cmd_score)
    plan = sub.add_parser("plan", help="memory each DeepSpeed profile needs for a recipe; the cheapest that fits")
    plan.add_argument("recipe", help="YAML recipe (its model, micro-batch and sequence length)")
    plan.add_argument("overrides", nargs="*", help="key=value overrides")
    plan.add_argument("--gpu-memory", default="24GiB", help="memory of one GPU (default 24GiB)")
    plan.add_argument("--host-memory", default=None, help="host memory per node (default: not checked)")
    plan.add_argument("--gpus-per-node", type=int, default=1)
    plan.add_argument("--nodes", type=int, default=1)
    plan.add_argument("--largest", action="store_true", help="also the largest model that fits, per profile")
    plan.add_argument("--slurm", action="store_true",
                      help="also the sbatch resources per node for the recommendation (launch/submit.sh uses them)")
    plan.set_defaults(func=cmd_plan)
    for plugin in entry_points(group="sabiscale.commands"):
        plugin.load()(sub)  # e.g. `sabiscale analyze`, from the sabiscale_analysis package
    tasks = sub.add_parser("tasks", help="how to prompt each task: template and a worked example")
    tasks.add_argument("recipe", nargs="?", default=None, help="a recipe (its tasks, incl. declared ones); default: built-ins")
    tasks.add_argument("overrides", nargs="*", help="key=value overrides")
    tasks.set_defaults(func=cmd_tasks)
    gen = sub.add_parser("generate", help="continue a prompt with a checkpoint (see `sabiscale tasks` for prompts)")
    gen.add_argument("checkpoint", help="checkpoints/step_XXXXXXXX (or checkpoints/, to take `latest`)")
    gen.add_argument("prompt", help="e.g. \"<translate> Good morning <yor>\"")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.set_defaults(func=cmd_generate)
    ops = sub.add_parser("build-ops", help="compile DeepSpeed's CPU Adam and comm ops (run by make install)")
    ops.set_defaults(func=cmd_build_ops)
    return parser


def use_environment_toolchain() -> None:
    """DeepSpeed's JIT ops compile against this environment's torch and headers: keep their cache
    per environment, and build them always with this environment's ninja. Two ninja versions
    (say Debian's 1.11 and PyPI's 1.13) disagree on their build log and rebuild every op (~2 min)
    each time the other one ran."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env_bin = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != env_bin:
        os.environ["PATH"] = env_bin + os.pathsep + os.environ.get("PATH", "")


def quiet_libraries() -> None:
    """sabiscale's own lines stay visible: MLflow's store INFO lines, DeepSpeed's accelerator
    guess (it is told instead) and torch's deprecation notices from inside DeepSpeed are off."""
    import warnings

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"


class _DropNotices(logging.Filter):
    """DeepSpeed lines that say nothing to a sabiscale user."""

    NOTICES = ("Attempting to get learning rate from scheduler before it has started",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.NOTICES)


def fail_fast_tracking() -> None:
    """MLflow's HTTP client retries a dead server for minutes by default; training must not wait
    that long per metric (the tracker keeps metrics and retries on its own schedule)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def main(argv: list[str] | None = None, hooks=()) -> int:
    """hooks: train/hooks.py instruments for the training commands (tests, benchmarks)."""
    use_environment_toolchain()
    fail_fast_tracking()
    quiet_libraries()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow flags (`prepare RECIPE --skip-bad data.seq_len=512`)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
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


if __name__ == "__main__":
    sys.exit(main())
