"""What the training loop needs, built once: inputs checked, the objective inside the DeepSpeed
engine, the resume point loaded, the data streams, the tracker, the probe and the FLOP model."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sabiscale.config import PROJECT_ROOT, RunConfig, resolve_batch, resolve_warmup
from sabiscale.data.batch import Batch, Vocab
from sabiscale.data.loader import BatchStream, check_resumable, make_loader
from sabiscale.data.schedule import MixPlan, plan_schedule, realised_mix
from sabiscale.shards.format import split_shards
from sabiscale.errors import UserError
from sabiscale.hashing import sha256_file
from sabiscale.loss.kinds import LossKind, make_loss_kind
from sabiscale.loss.objective import TokenLossObjective
from sabiscale.model import layer as layer_ops
from sabiscale.model.build import build_model, count_parameters
from sabiscale.prep.tokenizer import load_tokenizer, token_byte_lengths
from sabiscale.track.flops import StepCost, spec_peak, step_cost
from sabiscale.track.metrics import TokenStats, measure_matmul_peak
from sabiscale.track.plots import PlotHistory
from sabiscale.track.tracking import Tracker, make_tracker
from sabiscale.train.checkpoint import UNIVERSAL_SUFFIX, restore_rng, step_tag
from sabiscale.train.diagnostics import ProfileWindow, StepWatchdog, parse_window, start_memory_history
from sabiscale.train.exports import BackgroundExport
from sabiscale.train.device import choose_loader_workers
from sabiscale.train.plan import choose_profile
from sabiscale.train.engine import (World, engine_dtype, initialize, load_ds_config, load_universal,
                                    model_construction, resolve_compile, resolve_precision)
from sabiscale.train.inputs import check_inputs
from sabiscale.train.hooks import Hooks, SampleTrace, TrainHook
from sabiscale.train.preemption import StopRequest
from sabiscale.train.resume import (find_resume_point, load_engine_state, precision_to_resume, universal_checkpoint,
                                    warm_start)

log = logging.getLogger("sabiscale.train")


@dataclass
class Run:
    cfg: RunConfig        # resolved: accumulation for this world size, the MLflow run of a resumed run
    world: World
    manifest: dict
    vocab: Vocab
    kind: LossKind
    engine: Any           # DeepSpeed engine around the TokenLossObjective
    precision: str        # fp32, bf16 or fp16, as train/device.py chose it
    loader: BatchStream
    val_batches: list[Batch]
    reference: Any        # the online reference model of a selective run, else None
    tracker: Tracker
    probe: Any            # ProbeRecorder when train.probe_every is set, else None
    cost: StepCost
    peak_flops: float     # per device, the denominator of MFU
    start_step: int
    tokens_seen: int
    flops_seen: float     # FLOPs the steps so far needed (track/flops.py): runs compared at equal compute match on it
    hooks: Hooks
    stats: TokenStats
    history: PlotHistory = field(default_factory=PlotHistory)
    stop: StopRequest = field(default_factory=StopRequest)  # a stop signal (preemption) was received
    manifest_sha256: str = ""  # recorded in every checkpoint
    token_bytes: torch.Tensor | None = None  # (vocab,) UTF-8 bytes per token id, for the eval's bits per byte
    exports: BackgroundExport | None = None  # train.export_every (does something on rank 0 only)
    watchdog: StepWatchdog | None = None      # train.watchdog_factor (a thread; off at 0)
    profile: ProfileWindow | None = None      # train.profile_steps


def build_run(cfg: RunConfig, world: World, hooks: list[TrainHook] = ()) -> Run:
    cfg = resolve_batch(cfg, world.world_size)
    cfg, note = resolve_warmup(cfg)
    if note:
        log.info(note)
    manifest = check_inputs(cfg)
    vocab = Vocab.from_manifest(manifest)
    kind = make_loss_kind(cfg.loss)
    resumed = find_resume_point(cfg, world, manifest)
    cfg = resolve_profile(cfg, world, resumed)
    precision = precision_to_resume(cfg.engine.precision, resolve_precision(cfg.engine.precision, cfg.model.hidden_size),
                                    resumed)
    ds_config = load_ds_config(cfg, world.world_size, precision)
    source = resume_source(cfg, resumed, world)
    if source is not None and source.name.endswith(UNIVERSAL_SUFFIX):
        ds_config = load_universal(ds_config)
    if cfg.train.oom_snapshot:
        start_memory_history(world.device)
    with model_construction(ds_config) as gathered:
        objective = build_objective(cfg, vocab, kind, gathered)
        if cfg.train.init_from is not None and resumed is None:
            warm_start(objective.lm, cfg, manifest, gathered, world.rank)
    engine = initialize(objective, ds_config, cfg.optim)
    if resumed is not None:
        cfg = continue_from(resumed, source, engine, cfg)
    loader, val_batches = data_streams(cfg, world, manifest, vocab, resumed)
    reference = online_reference(cfg, kind, manifest, world)
    tracker = make_tracker(cfg, world.rank, resuming=resumed is not None)
    tracker.log_json(ds_config, "config/deepspeed.json")
    tracker.log_json(manifest, "data/manifest.json")
    log_realised_mix(cfg, loader, tracker, world.rank)
    lm = engine.module.lm
    parameters = count_parameters(lm)
    tracker.log_metrics({"model/parameters": parameters}, step=0)
    log.info("model: %.2fM parameters, precision %s, world size %d, ZeRO stage %s", parameters / 1e6,
             precision, world.world_size, ds_config["zero_optimization"]["stage"])
    trace = [SampleTrace(cfg.output_dir, world.rank)] if cfg.train.trace_samples else []
    stats = TokenStats(vocab, world.device)
    if resumed is not None and "token_window" in resumed:
        stats.restore(resumed["token_window"], world.rank)
    return Run(cfg=cfg, world=world, manifest=manifest, vocab=vocab, kind=kind, engine=engine, precision=precision,
               loader=loader, val_batches=val_batches, reference=reference, tracker=tracker,
               probe=make_probe(cfg, manifest, vocab, world.rank, tracker), cost=step_cost(lm),
               peak_flops=mfu_denominator(cfg, world, precision, tracker),
               start_step=resumed["step"] if resumed else 0, tokens_seen=resumed["tokens_seen"] if resumed else 0,
               flops_seen=float(resumed.get("flops_seen", 0.0)) if resumed else 0.0,
               hooks=Hooks([*trace, *hooks]), stats=stats,
               history=PlotHistory(cfg.output_dir / "plots" / "history.jsonl" if world.rank == 0 else None,
                                   resumed["step"] if resumed else 0),
               manifest_sha256=sha256_file(cfg.shards_dir / "manifest.json"),
               token_bytes=torch.from_numpy(token_byte_lengths(load_tokenizer(cfg.tokenizer_path))).to(world.device),
               exports=BackgroundExport(cfg.output_dir / "exports.log", tracker,
                                        enabled=bool(cfg.train.export_every) and world.rank == 0),
               watchdog=StepWatchdog(cfg.train.watchdog_factor, cfg.train.watchdog_min_seconds, cfg.output_dir,
                                     world.rank, tracker),
               profile=ProfileWindow(parse_window(cfg.train.profile_steps), cfg.output_dir, world.rank, tracker))


def build_objective(cfg: RunConfig, vocab: Vocab, kind: LossKind, gathered=None) -> TokenLossObjective:
    tok = load_tokenizer(cfg.tokenizer_path)
    lm = build_model(cfg.model, len(tok), cfg.data.seq_len, tok.pad_token_id, tok.eos_token_id, cfg.seed, gathered)
    weights = [cfg.loss.task_weights.get(task, 1.0) for task in vocab.tasks] if cfg.loss.task_weights else None
    kernels = layer_kernels(cfg.train.compile, cfg.train.fused_projections, zero3=gathered is not None)
    objective = TokenLossObjective(lm, kind, cfg.loss.chunk_size, tok.pad_token_id, weights, kernels=kernels)
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(lm)
    return objective


def layer_kernels(compile_setting: str, fused: bool, zero3: bool = False):
    """How the decoder layers run (model/layer.py): transformers' modules, fused, or fused and
    compiled (train.compile, decided by the device for auto)."""
    if not fused:
        if compile_setting == "on":
            raise UserError("train.compile=on needs train.fused_projections=true (the compiled kernels are the fused ones)")
        return None
    if zero3:
        log.info("ZeRO-3: the decoder layers run as transformers' modules, unfused and not compiled (each "
                 "parameter is whole only inside its own module's call)")
        return None
    if resolve_compile(compile_setting):
        log.info("train.compile: the decoder layers compile at their first call (the first step takes longer)")
        return layer_ops.compiled_kernels()
    return layer_ops.EAGER


def enable_activation_checkpointing(lm) -> None:
    """Non-reentrant recomputation per decoder layer (transformers renamed the method in 5.x)."""
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def mfu_denominator(cfg: RunConfig, world: World, precision: str, tracker) -> float:
    """train.peak_flops_per_s if set; on a GPU of the data-sheet table its spec peak (the measured
    matmul peak is logged beside it); else the measured peak of this device and precision."""
    if cfg.train.peak_flops_per_s:
        return cfg.train.peak_flops_per_s
    measured = measure_matmul_peak(world.device, engine_dtype(precision))
    if world.device.type != "cuda":
        return measured
    spec = spec_peak(torch.cuda.get_device_name(world.device), precision)
    tracker.log_metrics({"device/measured_peak_flops": measured, "device/spec_peak_flops": spec or measured}, step=0)
    return spec or measured


def resume_source(cfg: RunConfig, resumed: dict | None, world: World) -> Path | None:
    """The checkpoint directory DeepSpeed loads: the resume point itself, or its universal
    conversion when it was written by another number of ranks."""
    if resumed is None:
        return None
    tag_dir = cfg.checkpoint_dir / step_tag(resumed["step"])
    if resumed["world_size"] == world.world_size:
        return tag_dir
    log.info("the checkpoint was written by %d ranks and this run has %d: resuming through DeepSpeed's universal "
             "checkpoint", resumed["world_size"], world.world_size)
    return universal_checkpoint(tag_dir, world)


def continue_from(resumed: dict, source: Path, engine, cfg: RunConfig) -> RunConfig:
    """Load the engine state and RNG of the resume point; keep logging into the run that wrote it."""
    load_engine_state(engine, source)
    restore_rng(resumed["rng"])
    if cfg.tracking.run_id is None:
        cfg = cfg.model_copy(deep=True)
        cfg.tracking.run_id = resumed["mlflow_run_id"]
    log.info("resuming from %s at step %d", cfg.checkpoint_dir / step_tag(resumed["step"]), resumed["step"])
    return cfg


def resolve_profile(cfg: RunConfig, world: World, resumed: dict | None) -> RunConfig:
    """engine.ds_config=auto made a path: a resumed run's own profile (its checkpoint's layout),
    else the one the planner picks for this device (train/plan.py::choose_profile); logged."""
    if cfg.engine.ds_config != "auto":
        return cfg
    cfg = cfg.model_copy(deep=True)
    recorded = (resumed or {}).get("config", {}).get("engine", {}).get("ds_config")
    if recorded not in (None, "auto"):
        cfg.engine.ds_config, why = Path(recorded), "the profile the run was started with (its checkpoints' layout)"
    else:
        on_gpu = world.device.type == "cuda"
        gpu_bytes = torch.cuda.get_device_properties(world.device).total_memory if on_gpu else 0.0
        vocab = len(load_tokenizer(cfg.tokenizer_path)) if on_gpu else 0
        cfg.engine.ds_config, why = choose_profile(cfg, vocab, world.device.type, gpu_bytes, world.world_size,
                                                   max(1, torch.cuda.device_count()) if on_gpu else 1,
                                                   PROJECT_ROOT / "ds_configs")
    log.info("engine.ds_config=auto: %s (%s)", cfg.engine.ds_config.name, why)
    return cfg


def cores_per_rank(on_gpu: bool) -> int:
    """This process's cores over the ranks of its node (one per GPU there)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores // max(1, torch.cuda.device_count() if on_gpu else 1)


def data_streams(cfg: RunConfig, world: World, manifest: dict, vocab: Vocab,
                 resumed: dict | None) -> tuple[BatchStream, list[Batch]]:
    """This rank's training stream (from the saved position when resuming: a seek, no replay) and
    its validation micro-batches. Every shard is checked against the manifest before the first read."""
    micro_bs = cfg.train.micro_batch_size
    train_shards = split_shards(cfg.shards_dir, manifest, "train")
    plan = mix_plan(cfg, world, manifest)
    if resumed is not None:
        check_resumable(resumed["loader"], micro_bs, cfg.seed, True, train_shards, plan)
    on_gpu = world.device.type == "cuda"
    workers = choose_loader_workers(cfg.data.loader_workers, world.device.type, cores_per_rank(on_gpu))
    loader = make_loader(train_shards, vocab, micro_bs, world.rank, world.world_size, cfg.seed, True,
                         workers, start=resumed["loader"]["position"] if resumed else 0, pin_memory=on_gpu and workers > 0,
                         plan=plan)
    # one fixed global eval set, split over the ranks: the eval loss does not depend on their number
    val_loader = make_loader(split_shards(cfg.shards_dir, manifest, "val"), vocab, micro_bs, 0, 1, cfg.seed, False)
    val_batches = [next(val_loader) for _ in range(cfg.train.eval_batches)]
    return loader, eval_share(val_batches, world.rank, world.world_size)


def mix_plan(cfg: RunConfig, world: World, manifest: dict) -> MixPlan | None:
    """data.mix.schedule over the manifest's sources; phases start at optimizer steps, so at
    step x (sequences per step over all ranks) samples of the global stream."""
    if not cfg.data.mix.schedule:
        return None
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world.world_size
    return plan_schedule(cfg.data.mix, manifest["splits"]["train"], per_step, str(cfg.shards_dir / "manifest.json"))


def log_realised_mix(cfg: RunConfig, loader: BatchStream, tracker, rank: int) -> None:
    """The realised mix of each phase up to the last step: in the run directory, in MLflow (as a
    JSON artifact, and a metric per source at each phase's first step, so the chart steps with it)."""
    plan = loader.dataset.plan
    if plan is None or rank != 0:
        return
    report = realised_mix(plan, loader.dataset.order, cfg.train.max_steps * plan.samples_per_step)
    (cfg.output_dir / "mix_schedule.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    tracker.log_json({"phases": report}, "data/mix_schedule.json")
    for phase in report:
        tracker.log_metrics({f"mix/{name}": entry["realised_share"] for name, entry in phase["sources"].items()},
                            step=phase["start_step"])
        log.info("data mix phase %d from step %d (%s shares): %s", phase["phase"], phase["start_step"], phase["unit"],
                 ", ".join(f"{name} {e['realised_share']:.3f} (target {e['target_share']:.3f})"
                           for name, e in phase["sources"].items()))


def eval_share(batches: list[Batch], rank: int, world_size: int) -> list[Batch]:
    """This rank's share of the global eval set (every world_size-th micro-batch). ZeRO-3 gathers
    parameters inside every forward, so each rank runs as many forwards as the others: a rank
    with a smaller share repeats a micro-batch with no target counted (it adds nothing)."""
    mine = batches[rank::world_size]
    each = -(-len(batches) // world_size)
    filler = dataclasses.replace(batches[0], loss_mask=torch.zeros_like(batches[0].loss_mask))
    return mine + [filler] * (each - len(mine))


def make_probe(cfg: RunConfig, manifest: dict, vocab: Vocab, rank: int, tracker):
    """The fixed probe set: the first validation micro-batches, read alike on every rank."""
    if not cfg.train.probe_every:
        return None
    from sabiscale.track.probe import ProbeRecorder

    stream = make_loader(split_shards(cfg.shards_dir, manifest, "val"), vocab, cfg.train.micro_batch_size, 0, 1,
                         cfg.seed, False)
    return ProbeRecorder([next(stream) for _ in range(cfg.train.probe_batches)], vocab, cfg.output_dir / "probe",
                         rank, tracker)


def online_reference(cfg: RunConfig, kind: LossKind, manifest: dict, world: World):
    """The frozen reference model that scores each micro-batch at training time, when the kind reads
    reference losses and the recipe asks for them online (one more forward per micro-batch)."""
    if not kind.reads_reference or cfg.loss.reference != "online":
        return None
    from sabiscale.train.reference import Reference

    reference = Reference(Path(cfg.loss.reference_checkpoint), world.device, cfg.loss.chunk_size)
    reference.check_tokenizer(manifest, cfg.shards_dir)
    log.info("online reference model: %s (step %d)", reference.tag_dir, reference.meta["step"])
    return reference
