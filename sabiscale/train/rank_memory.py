"""`sabiscale plan --ranks N`: what one rank of N holds under ZeRO-1/2/3, measured on the real
engine build, beside what the planner (train/plan.py) says.

Each profile is built in its own child process (DeepSpeed keeps its process group for the life of
a process) that joins torch's fake process group as rank 0 of N: collectives move nothing, but
DeepSpeed partitions exactly as it would on N ranks. The child builds the recipe's model through
sabiscale's own path (model_construction, TokenLossObjective, initialize with the profile's JSON
filled as for training), runs one forward/backward/step on random tokens, and reports the bytes of
the tensors it holds at rest: parameters (each rank's ZeRO-3 partition, else the whole model),
reduced gradient partitions after backward, fp32 master weights, optimizer moments after the step.
Transient peaks inside backward (gradients before their bucket is reduced, communication
buckets) are not seen at rest: the planner counts them and the measurement cannot. The CPU
computes in fp32, so compute-dtype terms are 4 bytes per parameter here (2 on a GPU in bf16).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# term -> the planner's keys that hold it (device or host; offload only moves it)
PLANNED = {
    "parameters": ("parameters",),
    "gradients": ("gradients",),  # under optimizer offload: the fp32 gradient partition (planned_terms)
    "fp32 master weights": ("optimizer: fp32 master weights",),
    "optimizer moments": ("optimizer: moments (fp32)", "optimizer: moments (8-bit)"),
}
PROFILES = ("zero1", "zero2", "zero3_offload")


def tensor_bytes(value) -> int:
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def measure_in_child(cfg_dict: dict, profile: str, ds_dir: Path, ranks: int, vocab: int) -> dict:
    """Runs in the child: build, one step, bytes per term (rank 0 of `ranks`)."""
    from sabiscale.config import build_config
    from sabiscale.loss.objective import TokenLossObjective
    from sabiscale.model.build import build_model
    from sabiscale.train.engine import init_fake_world, initialize, load_ds_config, model_construction

    cfg = build_config(cfg_dict, origin="plan --ranks")
    cfg.engine.ds_config = ds_dir / f"{profile}.json"
    cfg.train.grad_accum_steps, cfg.train.global_batch_size, cfg.train.micro_batch_size = 1, None, 1
    init_fake_world(ranks)
    ds_config = load_ds_config(cfg, ranks, "fp32")
    with model_construction(ds_config) as gathered:
        lm = build_model(cfg.model, vocab, cfg.data.seq_len, 0, 1, cfg.seed, gathered)
    objective = TokenLossObjective(lm, "clm", cfg.loss.chunk_size, 0)
    engine = initialize(objective, ds_config, cfg.optim)
    optimizer = engine.optimizer
    stage = int(ds_config["zero_optimization"]["stage"])
    if stage == 3:
        params = sum(tensor_bytes(p.ds_tensor) for p in lm.parameters())
        master = tensor_bytes(optimizer.fp32_partitioned_groups_flat)
    else:
        params = sum(tensor_bytes(p) for p in lm.parameters())
        master = tensor_bytes(optimizer.single_partition_of_fp32_groups)
    seq = min(cfg.data.seq_len, 64)
    ids = torch.randint(2, vocab, (1, seq))
    out = engine(ids, torch.arange(seq).unsqueeze(0), torch.ones(1, seq, dtype=torch.bool), torch.zeros(1, seq, dtype=torch.long))
    engine.backward(out.loss_sum)
    # reduced partitions (ZeRO-1/2 averaged_gradients; under ZeRO-3 offload the fp32 partition's
    # .grad on the host), plus any whole gradient left on a parameter
    flat = optimizer.fp32_partitioned_groups_flat if stage == 3 else optimizer.single_partition_of_fp32_groups
    gradients = (tensor_bytes(getattr(optimizer, "averaged_gradients", None)) + tensor_bytes([t.grad for t in flat])
                 + sum(tensor_bytes(p.grad) for p in lm.parameters() if p.grad is not None))
    engine.step()
    inner = getattr(optimizer, "optimizer", optimizer)
    moments = sum(tensor_bytes({k: v for k, v in state.items() if k != "step"}) for state in inner.state.values())
    return {"profile": profile, "stage": stage, "ranks": ranks, "parameters": params, "gradients": gradients,
            "fp32 master weights": master, "optimizer moments": moments}


def planned_terms(cfg, profile: str, ds_dir: Path, ranks: int, vocab: int) -> dict:
    from sabiscale.train.plan import ModelShape, load_profile, model_state_bytes, zero_settings

    z = zero_settings(load_profile(profile, ds_dir))
    device, host = model_state_bytes(ModelShape.from_config(cfg, vocab), z, cfg.optim.kind.removeprefix("paged_"),
                                     ranks, 4, optimizer_on_host=True)
    both = {**host, **device}
    terms = {term: sum(both.get(k, 0.0) for k in keys) for term, keys in PLANNED.items()}
    if z["offload_optimizer"]:  # at rest the reduced gradients are the host's fp32 partition; the device bucket is transient
        terms["gradients"] = both["optimizer: fp32 gradient partition"]
    return terms


def measure_ranks(cfg, ranks: int, vocab: int, ds_dir: Path, profiles=PROFILES) -> list[dict]:
    """One row per profile: measured and planned bytes per term, for one rank of `ranks`."""
    from sabiscale.config import config_to_dict

    rows = []
    with tempfile.TemporaryDirectory() as work:
        spec = Path(work) / "cfg.json"
        spec.write_text(json.dumps(config_to_dict(cfg)), encoding="utf-8")
        for profile in profiles:
            proc = subprocess.run([sys.executable, "-m", "sabiscale.train.rank_memory", str(spec), profile, str(ds_dir),
                                   str(ranks), str(vocab)], capture_output=True, text=True,
                                  env={**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(ranks),
                                       "CUDA_VISIBLE_DEVICES": ""})
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
                raise RuntimeError(f"measuring {profile} at {ranks} ranks failed (exit {proc.returncode}):\n{tail}")
            measured = json.loads(lines[-1])
            rows.append({**measured, "planned": planned_terms(cfg, profile, ds_dir, ranks, vocab)})
    return rows


def format_rows(rows: list[dict]) -> str:
    mib = 2**20
    lines = ["| profile | ranks | term | measured MiB / rank | planned MiB / rank | measured / planned |",
             "|---|---:|---|---:|---:|---:|"]
    for row in rows:
        for term in PLANNED:
            got, want = row[term], row["planned"][term]
            ratio = f"{got / want:.2f}" if want else "-"
            lines.append(f"| {row['profile']} | {row['ranks']} | {term} | {got / mib:.2f} | {want / mib:.2f} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":  # the child of measure_ranks
    spec_path, profile_name, ds_path, world, vocab_size = sys.argv[1:6]
    result = measure_in_child(json.loads(Path(spec_path).read_text(encoding="utf-8")), profile_name, Path(ds_path),
                              int(world), int(vocab_size))
    print(json.dumps(result), flush=True)
