"""The training commands: `train`, `demo` (every stage on the embedded corpus), `plan`, `build-ops`."""
from __future__ import annotations

import argparse
import logging
import os
import time

from sabiscale.config import PROJECT_ROOT, RunConfig, load_config, resolve_paths
from sabiscale.lock import DirectoryLock
from sabiscale.runtime import DropNotices, add_recipe_arguments, global_rank, recipe_config, setup_logging
from sabiscale.track.tracking import run_page

DEMO_RECIPE = PROJECT_ROOT / "launch" / "recipes" / "demo.yaml"


def run_training(cfg: RunConfig, hooks=()):
    """Check the machine and the prepared data, join the process group, train."""
    from sabiscale.train.device import check_accelerator

    check_accelerator(cfg.engine.device)
    check_prepared(cfg)
    if cfg.engine.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # read by DeepSpeed when it is first imported, just below
    from sabiscale.train.engine import ensure_launcher_env, init_distributed
    from sabiscale.train.loop import train

    logging.getLogger("DeepSpeed").addFilter(DropNotices())
    ensure_launcher_env()
    world = init_distributed(cfg.engine.collective_timeout_minutes)
    setup_logging(world.rank)
    return train(cfg, world, hooks), world


def check_prepared(cfg: RunConfig) -> None:
    """Missing or mismatched shards and tokenizer are named before DeepSpeed starts (seconds, not 20)."""
    from sabiscale.shards.format import split_shards
    from sabiscale.train.inputs import check_inputs

    manifest = check_inputs(cfg)
    split_shards(cfg.shards_dir, manifest, "train")


def cmd_train(args: argparse.Namespace) -> int:
    """Train on the recipe's shards (continues from the newest checkpoint of its run directory)."""
    cfg = recipe_config(args)
    with DirectoryLock(cfg.output_dir, "train", take=global_rank() == 0):
        result, world = run_training(cfg, args.hooks)
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
    """Every stage on the embedded demo corpus, into a new run directory."""
    from sabiscale.prep.prepare import prepare

    overrides = [f"output_dir={args.out}", *args.overrides] if args.out else args.overrides
    cfg = resolve_paths(load_config(DEMO_RECIPE, overrides), os.environ)
    if cfg.output_dir.exists() and any(cfg.output_dir.iterdir()):
        # a demo always starts from scratch, and never over an earlier one
        cfg.output_dir = cfg.output_dir.with_name(f"{cfg.output_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    setup_logging(0)
    logging.getLogger("sabiscale").info("demo: preparing data in %s", cfg.output_dir)
    with DirectoryLock(cfg.output_dir, "demo", take=global_rank() == 0):
        prepared = prepare(cfg)
        result, world = run_training(cfg, args.hooks)
    if world.rank == 0:
        print(demo_summary(cfg, prepared, result))
    return 0


def demo_summary(cfg: RunConfig, prepared, result) -> str:
    losses = result.eval_answer_loss
    first, last = losses[min(losses)], losses[max(losses)]
    store = result.tracking_uri or ""
    return "\n".join([
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
    ])


def cmd_plan(args: argparse.Namespace) -> int:
    """GPU and host memory per DeepSpeed profile for the recipe's model; the cheapest that fits."""
    from sabiscale.train.plan import GiB, format_plans, parse_size, plan_all, slurm_resources

    cfg = recipe_config(args)
    vocab = planned_vocab(cfg)
    gpu, host = parse_size(args.gpu_memory), parse_size(args.host_memory) if args.host_memory else None
    ranks = args.gpus_per_node * args.nodes
    plans, best = plan_all(cfg, vocab, gpu, host, ranks, args.gpus_per_node, PROJECT_ROOT / "ds_configs")
    print(f"{cfg.name}: {params_line(cfg, vocab)}; micro-batch {cfg.train.micro_batch_size} x "
          f"{cfg.data.seq_len} tokens; {ranks} GPU(s) of {gpu / GiB:.1f} GiB\n")
    print(format_plans(plans, best, gpu, host))
    if args.slurm and best is not None:
        from sabiscale.train.device import choose_loader_workers

        workers = choose_loader_workers(cfg.data.loader_workers, "cuda", 2 + 2)  # what auto gives a GPU rank with cores to spare
        cpus, mem = slurm_resources(best, args.gpus_per_node, workers)
        print(f"\nslurm: --nodes={args.nodes} --gpus-per-node={args.gpus_per_node} --cpus-per-task={cpus} --mem={mem}G")
    if args.largest:
        print_largest(cfg, vocab, gpu)
    if args.ranks:
        from sabiscale.train.rank_memory import format_rows, measure_ranks

        print(f"\nmeasured on the real engine build, as one rank of {args.ranks} (torch's fake process group; "
              "bytes held at rest after one step, fp32 on the CPU):")
        print(format_rows(measure_ranks(cfg, args.ranks, vocab, PROJECT_ROOT / "ds_configs")))
    return 0 if best is not None else 1


def print_largest(cfg: RunConfig, vocab: int, gpu: int) -> None:
    from sabiscale.train.plan import GiB, largest_fitting_model, profiles

    print(f"\nlargest model of this shape family that fits one {gpu / GiB:.0f} GiB GPU "
          f"(micro-batch {cfg.train.micro_batch_size} x {cfg.data.seq_len}):")
    for profile in profiles(PROJECT_ROOT / "ds_configs"):
        for opt in ("adamw", "adamw8bit"):
            params, trial, fit = largest_fitting_model(cfg, vocab, profile, PROJECT_ROOT / "ds_configs", opt, True, gpu)
            m = trial.model
            print(f"  {profile:<15}{opt:<11}{params / 1e6:>9.0f}M parameters"
                  + (f" (hidden {m.hidden_size}, {m.num_layers} layers, activation checkpointing; "
                     f"host memory {fit.host_total / GiB:.0f} GiB)" if fit else ""))


def planned_vocab(cfg: RunConfig) -> int:
    from sabiscale.prep.tokenizer import load_tokenizer

    if cfg.tokenizer_path.is_file():
        return len(load_tokenizer(cfg.tokenizer_path))
    return cfg.tokenizer.vocab_size


def params_line(cfg: RunConfig, vocab: int) -> str:
    from sabiscale.train.plan import ModelShape

    return f"{ModelShape.from_config(cfg, vocab).params / 1e6:.1f}M parameters (vocabulary {vocab})"


def cmd_build_ops(args: argparse.Namespace) -> int:
    """Compile DeepSpeed's JIT ops once, at install time."""
    from sabiscale.train.engine import build_ops

    for name in build_ops():
        print(f"built DeepSpeed op: {name}")
    return 0


def register(sub) -> None:
    train = sub.add_parser("train", help=cmd_train.__doc__)
    add_recipe_arguments(train)
    train.add_argument("--resume", action="store_true",
                       help="continue from the newest checkpoint in output_dir (an error if there is none); "
                            "without it, training resumes anyway when a checkpoint exists")
    train.set_defaults(func=cmd_train)
    demo = sub.add_parser("demo", help="run every stage on the embedded demo corpus")
    demo.add_argument("--out", default=None, help="output directory (default: runs/demo)")
    demo.add_argument("overrides", nargs="*", help="key=value overrides of the demo recipe")
    demo.set_defaults(func=cmd_demo)
    plan = sub.add_parser("plan", help="memory each DeepSpeed profile needs for a recipe; the cheapest that fits")
    add_recipe_arguments(plan)
    plan.add_argument("--gpu-memory", default="24GiB", help="memory of one GPU (default 24GiB)")
    plan.add_argument("--host-memory", default=None, help="host memory per node (default: not checked)")
    plan.add_argument("--gpus-per-node", type=int, default=1)
    plan.add_argument("--nodes", type=int, default=1)
    plan.add_argument("--largest", action="store_true", help="also the largest model that fits, per profile")
    plan.add_argument("--ranks", type=int, default=0, metavar="N",
                      help="also build the engine as one rank of N for ZeRO-1/2/3 (no hardware needed) and print "
                           "the measured per-rank parameter, gradient and optimizer bytes beside the planned ones")
    plan.add_argument("--slurm", action="store_true",
                      help="also the sbatch resources per node for the recommendation (launch/submit.sh uses them)")
    plan.set_defaults(func=cmd_plan)
    ops = sub.add_parser("build-ops", help="compile DeepSpeed's CPU Adam and comm ops (run by make install)")
    ops.set_defaults(func=cmd_build_ops)
