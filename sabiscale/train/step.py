"""One optimizer step: forward, backward and update over the step's micro-batches, with the
loss divided once by the global count of supervised targets. Its phases are labelled for any
torch profiler trace (sabiscale/forward, /backward, /optimizer_step; benchmarks/step_profile.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.profiler import record_function

from sabiscale.data.batch import Batch
from sabiscale.loss.kinds import draw_seed
from sabiscale.track.flops import batch_flops
from sabiscale.track.metrics import StepSums
from sabiscale.train.engine import all_reduce_sum


@dataclass
class StepOutput:
    sums: StepSums                    # reduced over all ranks
    local_targets: int                # supervised targets this rank counted
    local_flops: tuple[float, float]  # this rank's (needed, executed) FLOPs


def train_step(run, micro: list[Batch], step: int) -> StepOutput:
    """run: sabiscale.train.run.Run. The sums come back reduced over all ranks in one call."""
    engine, world, objective = run.engine, run.world, run.engine.module
    # The global count of targets is known before any backward: count with the kind's own rule
    # (no model call needed) and reduce once.
    counts = [objective.count_targets(b.input_ids, b.position_ids, b.loss_mask, b.task_ids) for b in micro]
    n_local = int(torch.stack(counts).sum())
    n_global = all_reduce_sum(torch.tensor(float(n_local), dtype=torch.float64, device=world.device)).clamp(min=1)
    # DeepSpeed divides by the accumulation steps and averages over ranks; undo both so the
    # gradient is sum(token losses) / global supervised count, whatever the split.
    scale = len(micro) * world.world_size / n_global
    local = StepSums.zeros(world.device)
    executed = 0.0
    for batch in micro:
        if run.reference is not None:
            batch.ref_loss = run.reference.score(batch)
        with record_function("sabiscale/forward"):
            out = engine(batch.input_ids, batch.position_ids, batch.loss_mask, batch.task_ids, batch.ref_loss,
                         draw_seed=draw_seed(run.cfg.seed, batch.index))
        run.hooks.after_forward(step, out)
        with record_function("sabiscale/backward"):
            engine.backward(out.loss_sum * scale)
        run.hooks.after_backward(step)
        with record_function("sabiscale/optimizer_step"):
            # called after every micro-batch, as DeepSpeed expects: it updates the parameters (and
            # the LR schedule) only at the accumulation boundary, the step's last micro-batch
            engine.step()
        needed, batch_executed = batch_flops(run.cost, batch.position_ids, batch.task_ids >= 0, int(out.count))
        executed += batch_executed
        local.add(batch, out, needed)
        run.stats.add(batch, out)
    local.targets += n_local
    local.stop_requests += float(run.stop.requested)
    return StepOutput(local.all_reduced(all_reduce_sum), n_local, (float(local.needed_flops), executed))
