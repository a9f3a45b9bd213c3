"""The only module that imports deepspeed: start the process group, fill the DeepSpeed JSON's
"auto" keys from the run config, pick precision by device, and build the engine.

Keys sabiscale owns (batch sizes, accumulation, learning rate and schedule, precision, clipping)
are "auto" in ds_configs/*.json and filled here, in one place. A concrete value in the JSON that
disagrees with the run config is an error rather than a silent override.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from sabiscale.errors import UserError
from sabiscale.config import OptimConfig, RunConfig
from sabiscale.train.device import (choose_compile, choose_precision, cpu_bf16_unit, fused_adam_prebuilt,
                                    resolve_adam)


class EngineConfigError(UserError):
    pass


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def free_port() -> int:
    """A TCP port nothing listens on now (for a rendezvous or a test server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_launcher_env(environ: dict = os.environ) -> None:
    """Let a plain `sabiscale train` run as a one-rank world, and `srun -n N sabiscale train` as N
    ranks. Without a launcher DeepSpeed would fall back to MPI discovery; the launchers (deepspeed,
    torchrun, launch/node.sh) set these themselves."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return
    if int(environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in environ:
        environ.update(slurm_rendezvous(environ))
        return
    environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    environ.setdefault("MASTER_ADDR", "127.0.0.1")
    environ.setdefault("MASTER_PORT", str(free_port()))


def slurm_rendezvous(environ: dict) -> dict[str, str]:
    """One rank per Slurm task of `srun -n N ...`: rank and world size from Slurm, the master on the
    first node of the job (its NodeAddr), a port from the job id (as launch/slurm.sbatch does)."""
    master = environ.get("MASTER_ADDR") or first_node_address(environ.get("SLURM_JOB_NODELIST", ""))
    visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    # a task Slurm bound to one GPU (--gpus-per-task=1) sees it as device 0, whatever its local id
    local = 0 if len(visible) == 1 else int(environ.get("SLURM_LOCALID", "0"))
    return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ["SLURM_NTASKS"], "LOCAL_RANK": str(local),
            "MASTER_ADDR": master,
            "MASTER_PORT": environ.get("MASTER_PORT") or str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000)}


def first_node_address(nodelist: str) -> str:
    import subprocess

    try:
        first = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               check=True, timeout=30).stdout.split()[0]
        shown = subprocess.run(["scontrol", "show", "node", first], capture_output=True, text=True, timeout=30).stdout
    except (OSError, IndexError, subprocess.SubprocessError) as err:
        raise UserError(f"`srun` started several sabiscale tasks but their master address cannot be found "
                        f"({err}); set MASTER_ADDR (and MASTER_PORT), or submit launch/slurm.sbatch") from None
    address = next((f.split("=", 1)[1] for f in shown.split() if f.startswith("NodeAddr=")), first)
    return address


def init_distributed(timeout_minutes: float = 60.0) -> World:
    """Join (or create) the process group; `timeout_minutes` bounds every collective's wait."""
    accel = get_accelerator()
    if not dist.is_initialized():
        try:
            deepspeed.init_distributed(dist_backend=accel.communication_backend_name(),
                                       timeout=timedelta(minutes=timeout_minutes))
        except dist.DistNetworkError as err:
            if "EADDRINUSE" not in str(err) and "address already in use" not in str(err):
                raise
            port = os.environ.get("MASTER_PORT", "?")
            raise UserError(f"the rendezvous port {port} (MASTER_PORT) is in use on {os.environ.get('MASTER_ADDR', '?')}: "
                            "another run, or processes left by one, listen there. Pick another (`deepspeed "
                            "--master_port N`, or MASTER_PORT=N), or end the leftover processes") from None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accel.device_name() != "cpu":
        accel.set_device(local_rank)
        device = torch.device(accel.device_name(), local_rank)
    else:
        device = torch.device("cpu")
    return World(dist.get_rank(), local_rank, dist.get_world_size(), device)


def init_fake_world(ranks: int, rank: int = 0) -> World:
    """This process as rank `rank` of `ranks` in torch's fake process group: collectives return at
    once and move nothing, so the engine builds exactly the partitions that rank would hold
    (`sabiscale plan --ranks N`; the values computed are meaningless, the sizes are not)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=ranks)
    deepspeed.init_distributed()  # adopts the initialized group
    return World(rank, 0, ranks, torch.device("cpu"))


def resolve_precision(requested: str, hidden_size: int) -> str:
    """auto: decided by the device and the model's width (train/device.py): bf16 on GPUs with
    native bf16 (compute capability 8.0 on), fp16 with loss scaling on older ones; on the CPU bf16
    where it has native bf16 and the model is wide enough to gain from it, fp32 otherwise."""
    accel = get_accelerator()
    device_type = accel.device_name()
    capability = torch.cuda.get_device_capability() if device_type == "cuda" else None
    auto = requested == "auto"
    unit = cpu_bf16_unit() if auto and device_type == "cpu" else None
    bf16 = auto and device_type not in ("cpu", "cuda") and accel.is_bf16_supported()
    return choose_precision(requested, device_type, capability, bf16, hidden_size, unit)


def resolve_compile(requested: str) -> bool:
    """train.compile=auto decided by the device (train/device.py)."""
    device_type = get_accelerator().device_name()
    capability = torch.cuda.get_device_capability() if device_type == "cuda" else None
    return choose_compile(requested, device_type, capability)


def engine_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _owned_values(cfg: RunConfig, world_size: int, precision: str) -> dict[str, object]:
    """Dotted DeepSpeed keys -> the value the run config gives them."""
    t, o = cfg.train, cfg.optim
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        "gradient_clipping": o.grad_clip,
        "optimizer.params.lr": o.lr,
        "optimizer.params.betas": [o.beta1, o.beta2],
        "optimizer.params.eps": o.eps,
        "optimizer.params.weight_decay": o.weight_decay,
        "scheduler.params.total_num_steps": t.max_steps,
        "scheduler.params.warmup_num_steps": o.warmup_steps,
        # linear warmup from lr/warmup_steps, so the first step is not wasted at lr 0
        "scheduler.params.warmup_min_ratio": 1.0 / o.warmup_steps,
        "scheduler.params.cos_min_ratio": o.min_lr_ratio,
        "bf16.enabled": precision == "bf16",
        "fp16.enabled": precision == "fp16",
        # summing micro-batch gradients in bf16 loses the small ones; DeepSpeed accumulates in fp32 when told
        "data_types.grad_accum_dtype": "fp32" if precision == "bf16" and t.grad_accum_steps > 1 else None,
    }


def fill_ds_config(raw: dict, cfg: RunConfig, world_size: int, precision: str, origin: str) -> dict:
    """Fill "auto" and absent owned keys; collect every conflict and raise them together."""
    filled = copy.deepcopy(raw)
    problems = []
    owned = _owned_values(cfg, world_size, precision)
    if precision == "bf16" and bf16_optimizer_profile(raw):
        # DeepSpeed wraps ZeRO-1 + bf16 in its BF16_Optimizer exactly when gradients accumulate in
        # fp32, and its checkpoints differ from the ZeRO optimizer's: were that tied to
        # accumulation > 1, an elastic resume (global batch fixed, accumulation following the
        # ranks) would change the wrapper under the checkpoint. One wrapper per profile instead.
        owned["data_types.grad_accum_dtype"] = "fp32"
    for dotted, value in owned.items():
        *parents, leaf = dotted.split(".")
        node = filled
        for part in parents:
            node = node.setdefault(part, {}) if value is not None else node.get(part, {})
        current = node.get(leaf, "auto")
        if value is None:  # nothing to set: the JSON's own value (or DeepSpeed's default) stands
            if current == "auto":
                node.pop(leaf, None)
            continue
        if current == "auto":
            node[leaf] = value
        elif current != value and not (isinstance(value, float) and current == value):
            problems.append(f"  - {dotted} is {current!r} in the JSON but the run config gives {value!r}; "
                            f"set it to \"auto\" there and change the recipe instead")
    if problems:
        raise EngineConfigError(f"{origin}: values owned by the run config disagree:\n" + "\n".join(problems))
    return filled


def bf16_optimizer_profile(raw: dict) -> bool:
    """ZeRO-1 without offload: where DeepSpeed's BF16_Optimizer is (pinned) in charge under bf16."""
    zero = raw.get("zero_optimization", {})
    offload = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    return int(zero.get("stage", 0)) == 1 and not offload


def fill_device_defaults(filled: dict, device_type: str) -> dict:
    """"auto" keys whose best value depends on the device, not on the run config (an explicit
    value in the JSON stands). overlap_comm: on GPUs, reduce gradient buckets on their own CUDA
    stream while backward goes on (DeepSpeed's recommendation; its cost, extra bucket memory, is
    within the planner's communication-bucket term); on the CPU there is no stream to overlap on."""
    zero = filled.get("zero_optimization", {})
    if zero.get("overlap_comm") == "auto":
        zero["overlap_comm"] = device_type == "cuda"
    return filled


def load_ds_config(cfg: RunConfig, world_size: int, precision: str) -> dict:
    if cfg.engine.ds_config == "auto":  # build_run resolves it (train/run.py::resolve_profile) before the engine
        raise EngineConfigError("engine.ds_config=auto has not been resolved to a profile yet (train/run.py::resolve_profile)")
    path = Path(cfg.engine.ds_config)
    if not path.is_file():
        raise EngineConfigError(f"engine.ds_config {path} does not exist (profiles live in ds_configs/)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EngineConfigError(f"{path}: not valid JSON: {err}") from None
    filled = fill_device_defaults(fill_ds_config(raw, cfg, world_size, precision, str(path)),
                                  get_accelerator().device_name())
    if cfg.optim.kind != "adamw":
        return client_optimizer_config(filled, cfg.optim.kind)
    return resolve_adam(filled, fused_adam_prebuilt(), get_accelerator().device_name())


@contextlib.contextmanager
def model_construction(ds_config: dict):
    """Where the model is built; yields how to make one parameter whole for its initialization
    (None: parameters are whole). Under ZeRO-3 each rank builds only its partition (transformers'
    zero.Init path, switched on by an HfDeepSpeedConfig for the duration) and rank 0 initializes one
    gathered parameter at a time, so a model larger than one GPU, or than a rank's share of host
    memory, can start. Other stages build the whole model: DeepSpeed replicates it anyway."""
    if int(ds_config.get("zero_optimization", {}).get("stage", 0)) != 3:
        yield None
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    active = HfDeepSpeedConfig(ds_config)  # transformers keeps only a weak reference: hold it here
    try:
        yield lambda param: deepspeed.zero.GatheredParameters([param], modifier_rank=0)
    finally:
        unset_hf_deepspeed_config()
        del active


def initialize(objective: torch.nn.Module, ds_config: dict, optim: OptimConfig):
    """Build the DeepSpeed engine. The LR schedule comes from the JSON; the optimizer too for
    optim.kind=adamw, otherwise it is bitsandbytes' 8-bit AdamW handed over as a client optimizer."""
    params = [p for p in objective.parameters() if p.requires_grad]
    if optim.kind == "adamw":
        engine, _, _, _ = deepspeed.initialize(model=objective, model_parameters=params, config=ds_config)
        return engine
    optimizer = eight_bit_adamw(params, optim)
    engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer, config=ds_config)
    return engine


def client_optimizer_config(ds_config: dict, kind: str) -> dict:
    """The DeepSpeed JSON adjusted for a bitsandbytes client optimizer, or an error saying why the
    combination is refused."""
    zero = ds_config.get("zero_optimization", {})
    offloaded = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    if kind == "paged_adamw8bit" and offloaded:
        raise EngineConfigError(
            "optim.kind=paged_adamw8bit with optimizer offload: offload already keeps the optimizer states in host "
            "memory, so there is nothing to page; use optim.kind=adamw8bit (8-bit states on the host) or a profile "
            "without offload_optimizer")
    out = copy.deepcopy(ds_config)
    out.pop("optimizer", None)  # the JSON's optimizer block describes DeepSpeed's own AdamW
    out["zero_allow_untested_optimizer"] = True
    if offloaded:
        # otherwise DeepSpeed insists on its own CPU Adam for offloaded states
        out["zero_force_ds_cpu_optimizer"] = False
    return out


def eight_bit_adamw(params, optim) -> torch.optim.Optimizer:
    import bitsandbytes as bnb

    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[optim.kind]
    return cls(params, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, weight_decay=optim.weight_decay)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over all ranks (gloo on CPU, NCCL on GPUs)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def build_ops() -> list[str]:
    """JIT-compile the ops a run needs on this machine into the torch extensions cache:
    CPU Adam (optimizer offload) everywhere, the shared-memory comm op on the CPU accelerator."""
    accel = get_accelerator()
    names = ["CPUAdamBuilder"] + (["ShareMemCommBuilder"] if accel.device_name() == "cpu" else [])
    for name in names:
        accel.create_op_builder(name).load()
    return names


def convert_to_universal(tag_dir: Path, out_dir: Path) -> None:
    """DeepSpeed's universal checkpoint (every parameter and optimizer state whole, per parameter)
    of a checkpoint written by any number of ranks, which any number of ranks can load."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    workers = max(1, min(8, os.cpu_count() or 1))  # rank 0 converts while the others wait in a collective
    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(out_dir), num_extract_workers=workers,
                              num_merge_workers=workers, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # the version marker a Megatron client would have saved
    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines are not the user's business
        ds_to_universal(args)


def load_universal(ds_config: dict) -> dict:
    """The DeepSpeed config that loads a universal checkpoint (at engine creation)."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def consolidated_state_dict(checkpoint_dir: Path, tag: str) -> dict:
    """fp32 state dict of the whole model from the ZeRO partitions of every rank.

    DeepSpeed's loader unpickles its own checkpoint files (torch.load without weights_only, since
    they hold optimizer and config objects): load checkpoints only from sources you trust."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)


def lazy_state_dict(checkpoint_dir: Path, tag: str) -> dict:
    """The same, lazily: for a ZeRO-3 checkpoint each value is a DeepSpeed GatheredTensor over
    memory-mapped partition files that becomes a tensor by `.contiguous()`, one at a time
    (ZeRO-1/2 checkpoints hold one flat fp32 vector, merged whole). The same trust as above."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag, lazy_mode=True)
