"""`sabiscale plan`: how much GPU and host memory each DeepSpeed profile needs for a recipe's
model, and the cheapest profile that fits.

Per profile (ds_configs/*.json: ZeRO stage, optimizer/parameter offload, bucket sizes) and
optimizer (DeepSpeed AdamW or bitsandbytes 8-bit AdamW), per device (one GPU of N):
- parameters in the compute dtype (bf16/fp16 on GPUs, fp32 on the CPU), split over ranks by ZeRO-3;
- gradients in the compute dtype, split by ZeRO-2/3 (under optimizer offload only the reduce
  bucket stays on the device);
- optimizer: fp32 master weights, fp32 gradient partition, moments (8 bytes per parameter for
  AdamW, 2 for 8-bit AdamW), split over ranks from ZeRO-1 on, on the host under optimizer offload
  - the same 16 (AdamW) bytes per parameter DeepSpeed's own estimators count;
- DeepSpeed's communication buckets (reduce / all-gather bucket sizes from the JSON);
- activations saved for backward, per layer and token, from the Llama layer's actual saved
  tensors (norm inputs and outputs, q/k/v, attention output, the SwiGLU MLP's four I-sized
  tensors), or only each layer's input with activation checkpointing plus one layer recomputed;
- the fused layers' concatenated q/k/v and gate/up weights, kept for backward (below ZeRO-3);
- under ZeRO-3, the parameters gathered at the peak: the whole model while twice its size is within
  stage3_max_reuse_distance (DeepSpeed's default 1e9), plus prefetching up to stage3_max_live_parameters;
- the fused loss head's buffers (fp32 weight gradient, one chunk of logits, hidden-state grads);
- what DeepSpeed's estimators leave out: under ZeRO-1/2 optimizer offload a compute-dtype
  staging copy of the parameters on the host and a largest-parameter gradient buffer each side;
  with 8-bit AdamW stepping on the CPU, bitsandbytes' fp32 temporaries (its CPU update
  dequantizes a whole tensor at once, and ZeRO's partition is one tensor);
- a margin: 10% + 1 GiB on a GPU (CUDA context, allocator fragmentation), 10% on the host.
Every term is in `Plan.device` / `Plan.host`, so the printout says where memory goes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sabiscale.config import RunConfig
from sabiscale.errors import UserError

GiB = 2**30


def profiles(ds_dir: Path) -> tuple[str, ...]:
    """The DeepSpeed profiles shipped in ds_dir (ds_configs/), cheapest (fastest) first: their
    names sort so (zero1 < zero2 < zero2_offload < zero3_offload); a new profile is one new file."""
    return tuple(sorted(p.stem for p in Path(ds_dir).glob("*.json")))

OPTIMIZERS = ("adamw", "adamw8bit")


@dataclass(frozen=True)
class ModelShape:
    params: int
    largest_layer: int  # parameters of the biggest single module (ZeRO-3 gathers one at a time)
    hidden: int
    kv_hidden: int
    intermediate: int
    layers: int
    vocab: int

    @classmethod
    def from_config(cls, cfg: RunConfig, vocab: int) -> "ModelShape":
        """Exact parameter count from the transformers model built on the meta device (no memory)."""
        import torch
        from transformers import LlamaForCausalLM

        from sabiscale.model.build import llama_config

        with torch.device("meta"):
            lm = LlamaForCausalLM(llama_config(cfg.model, vocab, cfg.data.seq_len, 0, 1))
        params = sum(p.numel() for p in lm.parameters())
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in lm.modules())
        m = cfg.model
        kv = (m.num_kv_heads or m.num_heads) * (m.hidden_size // m.num_heads)
        return cls(params, largest, m.hidden_size, kv, m.intermediate_size, m.num_layers, vocab)


@dataclass
class Plan:
    profile: str
    optimizer: str
    activation_checkpointing: bool
    device: dict[str, float] = field(default_factory=dict)  # bytes per GPU (or the CPU process)
    host: dict[str, float] = field(default_factory=dict)    # bytes per node on the host
    # bytes per node on the host while the model is built, before the engine takes it over: every
    # rank builds the whole fp32 model below ZeRO-3; under ZeRO-3 (zero.Init) one gathered parameter
    build_host: float = 0.0
    offload_optimizer: bool = False

    @property
    def host_peak(self) -> float:
        return max(self.host_total, self.build_host)

    @property
    def device_total(self) -> float:
        return sum(self.device.values())

    @property
    def host_total(self) -> float:
        return sum(self.host.values())


def zero_settings(ds_config: dict) -> dict:
    zero = ds_config.get("zero_optimization", {})
    return {"stage": int(zero.get("stage", 0)),
            "offload_optimizer": zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None),
            "offload_param": zero.get("offload_param", {}).get("device", "none") not in ("none", None),
            "reduce_bucket": float(zero.get("reduce_bucket_size", 5e8)),
            "allgather_bucket": float(zero.get("allgather_bucket_size", 5e8)),
            "prefetch_bucket": float(zero.get("stage3_prefetch_bucket_size", 5e7)),
            # DeepSpeed's defaults: prefetching stops at max_live gathered elements, and a gathered
            # parameter used again within max_reuse elements of the trace is kept gathered
            "max_live": float(zero.get("stage3_max_live_parameters", 1e9)),
            "max_reuse": float(zero.get("stage3_max_reuse_distance", 1e9))}


def zero3_gathered(shape: "ModelShape", z: dict) -> float:
    """Elements ZeRO-3 holds gathered on a device at the peak. A parameter's next use after its
    forward is its backward, about twice the parameters of the layers above it away in the trace;
    within stage3_max_reuse_distance it is not released, so below max_reuse / 2 parameters the
    whole model stays gathered from the last forward layer to its backward (DeepSpeed's
    estimators count one layer). Prefetching adds at most a bucket, and only below max_live."""
    kept = shape.params if 2 * shape.params <= z["max_reuse"] else min(shape.params, z["max_reuse"] / 2 + shape.largest_layer)
    prefetch = min(z["prefetch_bucket"], max(0.0, z["max_live"] - kept))
    return min(shape.params, max(kept, shape.largest_layer) + prefetch)


def model_state_bytes(shape: ModelShape, z: dict, optimizer: str, ranks: int, dtype_bytes: int,
                      optimizer_on_host: bool = False) -> tuple[dict, dict]:
    """(device, host) bytes of parameters, gradients, optimizer states and DeepSpeed buffers.
    `optimizer_on_host`: the optimizer step runs on the CPU (offload, or a CPU-only run)."""
    p, b = shape.params, dtype_bytes
    device: dict[str, float] = {}
    host: dict[str, float] = {}
    # parameters
    if z["stage"] >= 3:
        gathered = b * zero3_gathered(shape, z)  # working set gathered for compute
        (host if z["offload_param"] else device)["parameters"] = b * p / ranks
        device["parameters (gathered working set)"] = gathered
    else:
        device["parameters"] = b * p
    # gradients in the compute dtype
    grads = b * p if z["stage"] <= 1 else b * p / ranks
    if z["stage"] == 1 and not z["offload_optimizer"] and b == 2:
        # bf16 on ZeRO-1 runs DeepSpeed's BF16_Optimizer (pinned, train/engine.py), which
        # accumulates the whole model's gradients in fp32 (fp16 on older GPUs holds 2 bytes: conservative there)
        grads = 4 * p
    if z["offload_optimizer"]:
        device["gradient buckets"] = b * min(p, z["reduce_bucket"])
    else:
        device["gradients"] = grads
    # optimizer: fp32 master copy + fp32 gradient partition + moments, split from ZeRO-1 on
    split = ranks if z["stage"] >= 1 else 1
    moments = 8 if optimizer == "adamw" else 2 + 8 / 256  # 8-bit: uint8 m and v + fp32 absmax per 256-block
    where = host if z["offload_optimizer"] else device
    where["optimizer: fp32 master weights"] = 4 * p / split
    where["optimizer: fp32 gradient partition"] = 4 * p / split
    where[f"optimizer: moments ({'fp32' if optimizer == 'adamw' else '8-bit'})"] = moments * p / split
    if 1 <= z["stage"] <= 2 and not z["offload_optimizer"]:
        device["communication buckets"] = b * min(p, z["reduce_bucket"]) + b * min(p, z["allgather_bucket"])
    if z["stage"] <= 2 and z["offload_optimizer"]:
        # DeepSpeed's ZeRO-1/2 offload keeps a compute-dtype copy of the partition on the host (to
        # send updated weights back) and one largest-parameter gradient buffer on each side;
        # its estimators leave these out
        host["offload: parameter staging copy"] = b * p / split
        host["offload: gradient staging buffer"] = b * shape.largest_layer
        device["offload: gradient staging buffer"] = b * shape.largest_layer
    if optimizer != "adamw" and optimizer_on_host:
        # bitsandbytes' CPU 8-bit update works on whole tensors, and ZeRO hands it one flat
        # partition: it dequantizes both moments to fp32 (8 B/param), copies the gradient (4) and
        # builds the denominator through two temporaries (8) before requantizing
        host["optimizer step: bitsandbytes CPU fp32 temporaries"] = 20 * p / split
    return device, host


def activation_bytes(shape: ModelShape, tokens: int, supervised: int, seq_len: int, micro_batch: int,
                     dtype_bytes: int, checkpointing: bool, chunk: int, fused: bool = True) -> dict:
    """Bytes held for backward during one micro-batch, and the loss head's buffers. `fused`: the
    layers run fused (model/layer.py, train.fused_projections below ZeRO-3), whose q/k/v and
    gate/up weights are concatenated copies that each layer's matmul keeps for backward. No
    attention mask is counted: packed attention never builds one (model/attention.py)."""
    b, h = dtype_bytes, shape.hidden
    # saved per token by one decoder layer: norm input, normalized and output (x2 norms), q/k/v,
    # attention output, SwiGLU gate/up/act/product
    per_layer = (8 * h + 2 * shape.kv_hidden + 4 * shape.intermediate) * b * tokens
    if b < 4:  # RMSNorm computes in fp32: each of the two norms keeps an fp32 copy of its input
        per_layer += 2 * 4 * h * tokens
    out = {}
    if checkpointing:
        out["activations (layer inputs, checkpointed)"] = shape.layers * h * b * tokens
        out["activations (one layer recomputed)"] = per_layer
    else:
        out["activations"] = shape.layers * per_layer
    out["activation gradients (backward working set)"] = per_layer
    if fused:
        copies = h * (h + 2 * shape.kv_hidden) + 2 * h * shape.intermediate
        out["fused projections: concatenated weights kept for backward"] = (1 if checkpointing else shape.layers) * copies * b
    out["embeddings and final norm"] = 4 * h * b * tokens
    out["loss head: fp32 weight gradient"] = 4 * shape.vocab * h
    out["loss head: one chunk of logits"] = min(chunk, supervised) * shape.vocab * (4 + 4 + b)
    out["loss head: hidden states and their gradients"] = 2 * supervised * h * b
    return out


def plan_profile(cfg: RunConfig, shape: ModelShape, profile: str, ds_config: dict, optimizer: str,
                 checkpointing: bool, ranks: int, gpus_per_node: int, on_gpu: bool = True) -> Plan:
    dtype_bytes = 2 if on_gpu else 4
    z = zero_settings(ds_config)
    device, host = model_state_bytes(shape, z, optimizer, ranks, dtype_bytes,
                                     optimizer_on_host=z["offload_optimizer"] or not on_gpu)
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    device.update(activation_bytes(shape, tokens, tokens, cfg.data.seq_len, cfg.train.micro_batch_size, dtype_bytes,
                                   checkpointing, cfg.loss.chunk_size, fused=cfg.train.fused_projections and z["stage"] < 3))
    plan = Plan(profile, optimizer, checkpointing, offload_optimizer=z["offload_optimizer"])
    plan.build_host = 4 * (shape.largest_layer if z["stage"] >= 3 else shape.params) * gpus_per_node
    # the host holds what each of its GPUs offloads
    plan.host = {k: v * gpus_per_node for k, v in host.items()}
    if not on_gpu:  # one CPU process: "device" and host are the same memory
        plan.host = {**plan.host, **{f"{k}": v for k, v in device.items()}}
        plan.device = {}
        plan.host["margin (10%)"] = 0.1 * sum(plan.host.values())
        return plan
    plan.device = device
    plan.device["margin (CUDA context, fragmentation)"] = GiB + 0.1 * sum(device.values())
    if plan.host:
        plan.host["margin (10%, pinned buffers)"] = 0.1 * sum(plan.host.values())
    return plan


def load_profile(name: str, ds_dir: Path) -> dict:
    return json.loads((ds_dir / f"{name}.json").read_text(encoding="utf-8"))


def plan_all(cfg: RunConfig, vocab: int, gpu_bytes: float, host_bytes: float | None, ranks: int,
             gpus_per_node: int, ds_dir: Path) -> tuple[list[Plan], Plan | None]:
    """Every profile x optimizer x checkpointing, and the cheapest that fits (in profiles() order,
    AdamW before 8-bit, no checkpointing before checkpointing), or None."""
    shape = ModelShape.from_config(cfg, vocab)
    plans = [plan_profile(cfg, shape, profile, load_profile(profile, ds_dir), opt, ckpt, ranks, gpus_per_node)
             for profile in profiles(ds_dir) for ckpt in (False, True) for opt in OPTIMIZERS]

    def fits(p: Plan) -> bool:
        return p.device_total <= gpu_bytes and (host_bytes is None or p.host_peak <= host_bytes)

    return plans, next((p for p in plans if fits(p)), None)


def largest_fitting_model(cfg: RunConfig, vocab: int, profile: str, ds_dir: Path, optimizer: str, checkpointing: bool,
                          gpu_bytes: float, ranks: int = 1) -> tuple[int, RunConfig, Plan | None]:
    """The biggest model of the recipe's shape family (hidden grows with depth as in common
    Llama sizes: head dim 64, MLP 8/3 hidden) that fits `gpu_bytes` on this profile."""
    best: tuple[int, RunConfig, Plan | None] = (0, cfg, None)
    for hidden, layers in ((512, 8), (768, 12), (1024, 16), (1024, 24), (1536, 24), (2048, 24), (2048, 32),
                           (2560, 32), (3072, 32), (4096, 32), (5120, 40), (6144, 48), (8192, 80)):
        trial = cfg.model_copy(deep=True)
        trial.model.hidden_size, trial.model.num_layers = hidden, layers
        trial.model.num_heads, trial.model.num_kv_heads = hidden // 64, None
        trial.model.intermediate_size = int(8 * hidden / 3 / 64 + 0.999) * 64
        shape = ModelShape.from_config(trial, vocab)
        plan = plan_profile(trial, shape, profile, load_profile(profile, ds_dir), optimizer, checkpointing, ranks, 1)
        if plan.device_total <= gpu_bytes:
            best = (shape.params, trial, plan)
    return best


def parse_size(text: str) -> float:
    """'24GiB', '24GB', '24G', '16000MiB' -> bytes."""
    units = {"gib": GiB, "gb": 1e9, "g": GiB, "mib": 2**20, "mb": 1e6, "m": 2**20, "tib": 2**40, "tb": 1e12}
    t = text.strip().lower()
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit):
            return float(t[: -len(unit)]) * units[unit]
    return float(t)


def format_plans(plans: list[Plan], best: Plan | None, gpu_bytes: float, host_bytes: float | None) -> str:
    lines = [f"{'profile':<15}{'optimizer':<11}{'act. ckpt':<11}{'GPU GiB':>9}{'host GiB':>10}  fits"]
    for p in plans:
        ok = p.device_total <= gpu_bytes and (host_bytes is None or p.host_peak <= host_bytes)
        lines.append(f"{p.profile:<15}{p.optimizer:<11}{'yes' if p.activation_checkpointing else 'no':<11}"
                     f"{p.device_total / GiB:>9.2f}{p.host_total / GiB:>10.2f}  {'yes' if ok else 'no'}")
    if best is None:
        lines.append("\nNothing fits: lower train.micro_batch_size or data.seq_len, use more GPUs (ZeRO splits the "
                     "states over them), or choose a smaller model.")
        return "\n".join(lines)
    lines += ["", f"recommended: engine.ds_config=ds_configs/{best.profile}.json optim.kind={best.optimizer}"
              f"{' train.activation_checkpointing=true' if best.activation_checkpointing else ''}", "",
              f"where the GPU memory goes ({best.device_total / GiB:.2f} GiB):"]
    lines += [f"  {k:<48}{v / GiB:>8.3f} GiB" for k, v in best.device.items()]
    if best.host:
        lines += [f"host memory ({best.host_total / GiB:.2f} GiB per node):"]
        lines += [f"  {k:<48}{v / GiB:>8.3f} GiB" for k, v in best.host.items()]
    lines.append(f"host memory while the model is built: {best.build_host / GiB:.2f} GiB per node")
    return "\n".join(lines)


# Per rank: the Python process with torch, CUDA's host side, DeepSpeed and the data loader (a
# measured CPU run of the default recipe holds ~1.5 GiB besides its model states; CUDA adds ~1-2).
RANK_HOST_OVERHEAD = 4 * GiB
CORES_PER_RANK = 2                # the training process and its data reading
OFFLOAD_ADAM_CORES_PER_RANK = 4   # DeepSpeedCPUAdam's threads when the optimizer runs on the host


def slurm_resources(plan: Plan, gpus_per_node: int, loader_workers: int) -> tuple[int, int]:
    """(--cpus-per-task, --mem in GiB) for the one launcher task per node that runs every rank of it."""
    cores = gpus_per_node * (CORES_PER_RANK + loader_workers
                             + (OFFLOAD_ADAM_CORES_PER_RANK if plan.offload_optimizer else 0))
    memory = plan.host_peak + RANK_HOST_OVERHEAD * gpus_per_node
    return cores, int(-(-memory // GiB))


CPU_PROFILE = "zero2_offload"  # what the CPU benchmarks and the golden curve run


def choose_profile(cfg: RunConfig, vocab: int, device_type: str, gpu_bytes: float, ranks: int, gpus_per_node: int,
                   ds_dir: Path) -> tuple[Path, str]:
    """engine.ds_config=auto: (the profile's JSON, why), the cheapest that `sabiscale plan` finds
    to fit one GPU for the recipe's model, optimizer and activation checkpointing."""
    if device_type != "cuda":
        return ds_dir / f"{CPU_PROFILE}.json", "the CPU runs the profile its benchmarks were measured with"
    optimizer = cfg.optim.kind.removeprefix("paged_")
    plans, _ = plan_all(cfg, vocab, gpu_bytes, None, ranks, gpus_per_node, ds_dir)
    mine = [p for p in plans if p.optimizer == optimizer and p.activation_checkpointing == cfg.train.activation_checkpointing]
    for plan in mine:
        if plan.device_total <= gpu_bytes:
            return ds_dir / f"{plan.profile}.json", (f"the cheapest profile that fits: {plan.device_total / GiB:.1f} of "
                                                     f"{gpu_bytes / GiB:.1f} GiB per GPU (sabiscale plan)")
    smallest = min(mine, key=lambda p: p.device_total)
    raise UserError(f"engine.ds_config=auto: no DeepSpeed profile fits this model on a {gpu_bytes / GiB:.1f} GiB GPU "
                    f"with optim.kind={cfg.optim.kind} and train.activation_checkpointing="
                    f"{str(cfg.train.activation_checkpointing).lower()} (the smallest, {smallest.profile}, needs "
                    f"{smallest.device_total / GiB:.1f} GiB); `sabiscale plan RECIPE` shows which settings fit")
