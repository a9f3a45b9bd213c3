"""Run under `deepspeed --num_gpus N`: build a model the way training does for ZeRO-3 and print,
per rank, one JSON line: parameters held by this rank, elements left in the ordinary .data, the
model's total, and whether the gathered weights equal a model built whole."""
import json
import sys
from pathlib import Path

import deepspeed
import torch

from sabiscale.config import load_config
from sabiscale.model.build import build_model
from sabiscale.train.engine import ensure_launcher_env, fill_ds_config, init_distributed, model_construction

ensure_launcher_env()
world = init_distributed()
cfg = load_config(None, ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=128"])
profile = Path([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0])
whole = build_model(cfg.model, 600, 128, 0, 1, cfg.seed)
ds_config = fill_ds_config(json.loads(profile.read_text()), cfg, world.world_size, "fp32", str(profile))
with model_construction(ds_config) as gathered:
    part = build_model(cfg.model, 600, 128, 0, 1, cfg.seed, gathered)
identical = True
for a, b in zip(whole.parameters(), part.parameters()):
    with deepspeed.zero.GatheredParameters([b]):
        identical &= torch.equal(a, b.data)
print(json.dumps({"rank": world.rank, "held": sum(p.ds_tensor.numel() for p in part.parameters()),
                  "data": sum(p.numel() for p in part.parameters()),
                  "total": sum(p.ds_numel for p in part.parameters()), "identical": bool(identical)}), flush=True)
# a clean end: without it a rank's gloo threads can outlive the interpreter's teardown
# ("terminate called without an active exception", exit status 250, seen once in the full suite)
torch.distributed.barrier()
torch.distributed.destroy_process_group()
