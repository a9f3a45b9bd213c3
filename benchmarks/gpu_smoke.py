"""GPU smoke test: what a first run on a real GPU must get right, in a few minutes, with a clear
pass/fail table. Run it on the GPU machine (or in CI there):

    .venv/bin/python benchmarks/gpu_smoke.py                 # every row; GPU-only rows skip on a CPU
    .venv/bin/python benchmarks/gpu_smoke.py --cpu           # also run the GPU rows on the CPU (checks the script)
    deepspeed --num_gpus 2 benchmarks/gpu_smoke.py           # the same under 2 ranks (rank 0 prints the table)

Rows: the device and the decisions taken for it (precision from compute capability, Adam
implementation, the packed-attention kernel); every DeepSpeed profile x optimizer for a few steps (loss finite
and falling, no CUDA compilation needed); what a first user hits next: gradient accumulation,
activation checkpointing, fp16 with loss scaling, a resume on the same and on another number of
ranks, the real `sabiscale train` path with MLflow on; packed attention against the block-diagonal masked
reference in the compute dtype; held-out eval on the device; export and generation in plain
transformers; throughput (tokens/s, MFU against the GPU's data-sheet peak) of the smoke model and
of SabiYarn-size layers (hidden 768, 12 layers, 16 x 1024 tokens per micro-batch).
Every rank works in one directory (rank 0 makes it and prepares the data once) and the ranks
pass each row together. `--dry-run` lists the rows. The table is printed and written to --out
(markdown). Exit status 1 if a row failed.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from sabiscale.train.plan import profiles

ROOT = Path(__file__).resolve().parent.parent
PROFILES = profiles(ROOT / "ds_configs")  # the same list `sabiscale plan` reads
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")


class Table:
    def __init__(self, world=None, dry_run: bool = False) -> None:
        self.rows: list[tuple[str, str, str, float]] = []
        self.world, self.dry_run = world, dry_run

    def run(self, name: str, check, skip: str | None = None) -> object:
        if self.dry_run:
            self.rows.append((name, "LISTED", skip or "", 0.0))
            return None
        if skip:
            self.rows.append((name, "SKIP", skip, 0.0))
            return None
        try:
            return self._timed(name, check)
        finally:
            lock_step(self.world)

    def _timed(self, name: str, check) -> object:
        t0 = time.monotonic()
        try:
            detail = check()
            self.rows.append((name, "PASS", str(detail or ""), time.monotonic() - t0))
            return detail
        except Exception as err:  # noqa: BLE001 - every failure becomes a row, the rest still runs
            traceback.print_exc()
            self.rows.append((name, "FAIL", f"{type(err).__name__}: {str(err).splitlines()[0][:160]}",
                              time.monotonic() - t0))
            return None

    def markdown(self) -> str:
        lines = ["| check | result | detail | seconds |", "|---|---|---|---:|"]
        lines += [f"| {n} | {r} | {d.replace('|', '/')} | {s:.1f} |" for n, r, d, s in self.rows]
        return "\n".join(lines)

    @property
    def failed(self) -> bool:
        return any(r == "FAIL" for _, r, _, _ in self.rows)


def device_row(world) -> str:
    from sabiscale.model.attention import varlen_kernel
    from sabiscale.train.device import fused_adam_prebuilt
    from sabiscale.train.engine import resolve_precision

    device = world.device
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    precision = resolve_precision("auto", HIDDEN)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    kernel = varlen_kernel(device, dtype)
    return (f"{name}, capability {capability}, torch {torch.__version__} (CUDA {torch.version.cuda}); precision "
            f"{precision}; FusedAdam prebuilt: {fused_adam_prebuilt()}; packed attention: "
            f"{kernel.name if kernel else 'sdpa per length bucket'}")


HIDDEN = 64  # the smoke's tiny model


def lock_step(world) -> None:
    """Every rank finishes a row before any starts the next (a row that failed on one rank must
    not leave the others in a collective of the next)."""
    import torch.distributed as dist

    if world is not None and world.world_size > 1 and dist.is_initialized():
        dist.barrier()


def shared_workdir(world) -> Path:
    """One directory for every rank: rank 0 makes it, the others learn its path."""
    import torch.distributed as dist

    path = [tempfile.mkdtemp(prefix="gpu_smoke-") if world.rank == 0 else None]
    if world.world_size > 1 and dist.is_initialized():
        dist.broadcast_object_list(path, src=0)
    return Path(path[0])


def prepared_demo(out: Path):
    from sabiscale.prep.prepare import prepare

    cfg = prepared_demo_config(out)
    prepare(cfg)
    return cfg


RECIPE = ROOT / "launch/recipes/demo.yaml"


def demo_overrides(out: Path) -> list[str]:
    return [f"output_dir={out}", "data.demo_examples_per_task=150", "data.seq_len=128", "data.sequences_per_shard=32",
            "tokenizer.vocab_size=600", f"model.hidden_size={HIDDEN}", "model.num_layers=2", "model.num_heads=2",
            "model.intermediate_size=128", "train.micro_batch_size=4", "train.max_steps=6",
            "optim.warmup_steps=1", "train.eval_batches=1", "tracking.enabled=false"]


def prepared_demo_config(out: Path):
    from sabiscale.config import load_config, resolve_paths

    return resolve_paths(load_config(RECIPE, demo_overrides(out)), {})


def run_dir(base, world, where: Path):
    """A run directory beside the prepared data (made by rank 0; every rank then trains in it)."""
    if world.rank == 0:
        where.mkdir(parents=True, exist_ok=True)
        for part in ("tokenizer", "shards"):
            if not (where / part).exists():
                (where / part).symlink_to(base.output_dir / part)
    lock_step(world)
    cfg = base.model_copy(deep=True)
    cfg.output_dir = where
    return cfg


def train_row(base, world, profile: str, optimizer: str, where: Path, **overrides):
    """A few steps of one profile and optimizer; `overrides` set "section.key" fields."""
    from sabiscale.train.loop import train

    def check():
        cfg = run_dir(base, world, where)
        cfg.engine.ds_config = ROOT / "ds_configs" / f"{profile}.json"
        cfg.optim.kind = optimizer
        for key, value in overrides.items():
            section, field = key.split("__")
            setattr(getattr(cfg, section), field, value)
        result = train(cfg, world)
        losses = result.train_losses
        assert all(map(torch.isfinite, torch.tensor(losses))), f"non-finite losses {losses}"
        assert losses[-1] < losses[0], f"loss did not fall: {losses[0]:.3f} -> {losses[-1]:.3f}"
        return f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    return check


def resume_row(base, world, where: Path):
    """Train 6 steps, then the same run to 8: it continues from the checkpoint of step 6."""
    from sabiscale.train.loop import train

    def check():
        cfg = run_dir(base, world, where)
        cfg.engine.ds_config = ROOT / "ds_configs" / "zero2.json"
        first = train(cfg, world)
        cfg.train.max_steps = 8
        second = train(cfg, world)
        assert len(second.train_losses) == 2, f"resumed run trained {len(second.train_losses)} steps, not 2"
        return f"steps 1-6 then 7-8 from {first.checkpoint.name}; loss {second.train_losses[-1]:.3f}"
    return check


def elastic_ranks(world) -> int | None:
    """The other number of ranks a resume is tried on: 1 from a launch of several, else 2 where
    two devices (or CPU ranks) are there; None where there are not."""
    if world is None:
        return 1
    if world.world_size > 1:
        return 1
    return 2 if world.device.type == "cpu" or torch.cuda.device_count() >= 2 else None


def elastic_resume_row(base, world, where: Path):
    """Train 6 steps on this launch's ranks, then continue to 8 on another number of ranks (a
    `sabiscale train` child, through DeepSpeed's universal checkpoint); rank 0 runs the child
    while the others wait at the row's barrier."""
    import os
    import subprocess

    from sabiscale.train.engine import free_port
    from sabiscale.train.loop import train

    def check():
        cfg = run_dir(base, world, where)
        cfg.engine.ds_config = ROOT / "ds_configs" / "zero2.json"
        train(cfg, world)
        if world.rank != 0:
            return ""
        ranks = elastic_ranks(world)
        args = ["train", str(RECIPE), *demo_overrides(where), "train.max_steps=8", f"engine.ds_config={cfg.engine.ds_config}"]
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                            "CROSS_RANK", "CROSS_SIZE")}
        if ranks == 1:
            if world.device.type == "cuda":
                env["CUDA_VISIBLE_DEVICES"] = str(torch.cuda.current_device())
            command = [sys.executable, "-m", "sabiscale", *args]
        else:
            command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
                       str(free_port()), "--module", "sabiscale", *args]
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"the resume on {ranks} rank(s) failed: {output[-600:]}"
        assert "universal checkpoint" in output, "the resume did not go through DeepSpeed's universal checkpoint"
        assert (where / "checkpoints" / "step_00000008").is_dir(), "no checkpoint of step 8"
        return f"{world.world_size} rank(s) to step 6, then {ranks} to step 8 (universal checkpoint)"
    return check


def tracked_train_row(base, world, where: Path):
    """The `sabiscale train` path with MLflow on (a store in the run directory)."""
    from sabiscale.train.loop import train

    def check():
        cfg = run_dir(base, world, where)
        cfg.engine.ds_config = ROOT / "ds_configs" / "zero2.json"
        cfg.tracking.enabled = True
        result = train(cfg, world)
        if world.rank != 0:
            return "rank 0 tracks the run"  # only rank 0's row is printed
        assert result.run_id and result.tracking_uri, "no MLflow run was created"
        # the store's scheme only: its path is this machine's temporary directory
        return f"MLflow run {result.run_id} in the run directory's {result.tracking_uri.split(':', 1)[0]} store"
    return check


def throughput_row(base, world, where: Path, steps: int = 30):
    """Tokens/s and MFU of the smoke model over `steps` (the first 5 not timed)."""
    from sabiscale.train.hooks import StepRecorder
    from sabiscale.train.loop import train

    def check():
        cfg = run_dir(base, world, where)
        cfg.engine.ds_config = ROOT / "ds_configs" / "zero1.json"
        cfg.train.max_steps, cfg.train.eval_every = steps, 0
        recorder = StepRecorder()
        train(cfg, world, [recorder])
        timed = recorder.records[5:]
        seconds = sum(r.end - r.start for r in timed)
        tokens = sum(b.num_tokens for r in timed for b in r.micro) * world.world_size
        flops = sum(r.local_flops[0] for r in timed) * world.world_size
        from sabiscale.track.flops import spec_peak
        from sabiscale.train.engine import resolve_precision

        name = torch.cuda.get_device_name(world.device) if world.device.type == "cuda" else "CPU"
        peak = spec_peak(name, resolve_precision("auto", HIDDEN))
        mfu = f", MFU {flops / seconds / (peak * world.world_size):.1%} of the {name} data-sheet peak" if peak else ""
        return f"{tokens / seconds:,.0f} tokens/s{mfu} (tiny model: launch-bound, not a throughput figure)"
    return check


# SabiYarn-size layers (hidden 768, 12 layers, 12 heads; ~85M parameters without the embeddings)
SABIYARN_SIZE = ["model.hidden_size=768", "model.num_layers=12", "model.num_heads=12", "model.intermediate_size=2048"]


def sabiyarn_size_row(world, where: Path):
    """Tokens/s and MFU of SabiYarn-size layers at 1024 tokens x 16 sequences per micro-batch, 30
    steps (the first 5 not timed), ZeRO-1, the data prepared in the row's directory. On a CPU
    (--cpu) 3 steps of 1 x 128: it checks the row, it measures nothing."""
    from sabiscale.config import load_config, resolve_paths
    from sabiscale.prep.prepare import prepare
    from sabiscale.track.flops import spec_peak
    from sabiscale.train.engine import resolve_precision
    from sabiscale.train.hooks import StepRecorder
    from sabiscale.train.loop import train

    def check():
        on_gpu = world.device.type == "cuda"
        steps, micro, seq, layers = (30, 16, 1024, 12) if on_gpu else (3, 1, 128, 1)
        overrides = [f"output_dir={where}", "data.demo_examples_per_task=150", f"data.seq_len={seq}",
                     "tokenizer.vocab_size=2048", *SABIYARN_SIZE, f"model.num_layers={layers}", f"train.micro_batch_size={micro}",
                     f"train.max_steps={steps}", "train.eval_every=0", "train.eval_batches=1", "train.checkpoint_every=0",
                     "optim.warmup_steps=1", "tracking.enabled=false", "engine.ds_config=ds_configs/zero1.json"]
        cfg = resolve_paths(load_config(RECIPE, overrides), {})
        if world.rank == 0:
            prepare(cfg)
        lock_step(world)
        recorder = StepRecorder()
        train(cfg, world, [recorder])
        timed = recorder.records[min(5, steps - 1):]
        seconds = sum(r.end - r.start for r in timed)
        tokens = sum(b.num_tokens for r in timed for b in r.micro) * world.world_size
        flops = sum(r.local_flops[0] for r in timed) * world.world_size
        name = torch.cuda.get_device_name(world.device) if on_gpu else "CPU"
        peak = spec_peak(name, resolve_precision("auto", 768))
        mfu = f", MFU {flops / seconds / (peak * world.world_size):.1%} of the {name} data-sheet peak" if peak else ""
        note = "" if on_gpu else " (CPU: checks the row only)"
        return f"{tokens / seconds:,.0f} tokens/s{mfu}, micro-batch {micro} x {seq}{note}"
    return check


def attention_row(device: torch.device, dtype: torch.dtype):
    def check():
        import torch.nn.functional as F

        from sabiscale.model.attention import packed_attention_forward, varlen_kernel

        torch.manual_seed(0)
        rows = [[1, 5, 17, 3, 38], [64], [30, 30, 1, 1, 2], [7] * 9 + [1]]
        pos = torch.tensor([[p for n in row for p in range(n)] for row in rows], device=device)
        q, k, v = (torch.randn(4, 4, 64, 32, device=device, dtype=dtype) for _ in range(3))
        ours, _ = packed_attention_forward(None, q, k, v, None, scaling=32 ** -0.5, packed_documents=True,
                                           position_ids=pos)
        doc = torch.cumsum((pos == 0).long(), 1)
        mask = (doc[:, :, None] == doc[:, None, :]) & torch.ones(64, 64, dtype=torch.bool, device=device).tril()
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask[:, None],
                                             scale=32 ** -0.5).transpose(1, 2)
        error = float((ours.float() - ref).abs().max())
        assert error < (2e-2 if dtype != torch.float32 else 1e-4), f"max error {error}"
        kernel = varlen_kernel(device, dtype)
        return f"{dtype}, {kernel.name if kernel else 'sdpa per length bucket'}, max abs error {error:.2e}"
    return check


def eval_export_rows(table: Table, checkpoint: Path | None, out: Path, device: torch.device) -> None:
    from sabiscale.evaluate.heldout import teacher_forced
    from sabiscale.tasks import Example
    from sabiscale.publish.export import export_hf
    from sabiscale.train.checkpoint import load_trained_lm

    skip = None if checkpoint is not None else "no checkpoint (the training rows did not run)"

    def evaluate():
        lm, tok, _ = load_trained_lm(checkpoint)
        lm = lm.to(device)
        examples = [Example("sentiment", "eng", "<sentiment> <eng> good day <label>", " positive", "gpu_smoke")] * 4
        scores = teacher_forced(lm, tok, examples)
        return f"on {lm.device}: " + ", ".join(f"{k} ppl {v['perplexity']:.1f}" for k, v in scores.items())

    def export():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hf = export_hf(checkpoint, out / "hf")
        model = AutoModelForCausalLM.from_pretrained(str(hf)).to(device)
        tok = AutoTokenizer.from_pretrained(str(hf))
        ids = tok("<sentiment> <eng> good day <label>", return_tensors="pt", add_special_tokens=False).to(device)
        generated = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        return f"generated {generated.shape[1] - ids['input_ids'].shape[1]} tokens with plain transformers"

    table.run("eval on the device", evaluate, skip)
    table.run("export + generate (transformers)", export, skip)


def add_rows(table: Table, base, world, args, gpu_only: str | None, tmp: Path | None) -> None:
    """Every training row, then (rank 0) eval and export of the first checkpoint."""
    checkpoint = None
    where = (lambda name: tmp / name) if tmp is not None else (lambda name: None)
    for profile in args.profiles:
        for optimizer in args.optimizers:
            skip = gpu_only
            if optimizer == "paged_adamw8bit" and profile.endswith("offload"):
                skip = "refused by design: optimizer offload already keeps the states on the host"
            done = table.run(f"train {profile} + {optimizer}", train_row(base, world, profile, optimizer,
                                                                         where(f"{profile}-{optimizer}"))
                             if skip is None else None, skip)
            if done and checkpoint is None:
                checkpoint = where(f"{profile}-{optimizer}") / "checkpoints"
    extra = (("train zero2 + adamw, gradient accumulation 2",
              lambda: train_row(base, world, "zero2", "adamw", where("accum"), train__grad_accum_steps=2), gpu_only),
             ("train zero2 + adamw, activation checkpointing",
              lambda: train_row(base, world, "zero2", "adamw", where("ckpt"), train__activation_checkpointing=True),
              gpu_only),
             ("train zero2 + adamw, fp16 with loss scaling",
              lambda: train_row(base, world, "zero2", "adamw", where("fp16"), engine__precision="fp16"),
              gpu_only or (None if world is None or world.device.type == "cuda" else "fp16 needs a CUDA GPU")),
             ("resume on the same number of ranks", lambda: resume_row(base, world, where("resume")), gpu_only),
             ("resume on another number of ranks", lambda: elastic_resume_row(base, world, where("elastic")),
              gpu_only or (None if elastic_ranks(world) else "one GPU: a 1-rank checkpoint needs 2 devices to resume on 2")),
             ("sabiscale train with MLflow on", lambda: tracked_train_row(base, world, where("tracked")), gpu_only),
             ("throughput of the smoke model", lambda: throughput_row(base, world, where("speed")), gpu_only),
             ("throughput of SabiYarn-size layers (hidden 768 x 12)", lambda: sabiyarn_size_row(world, where("sabiyarn")),
              gpu_only))
    for name, make, skip in extra:
        table.run(name, make() if skip is None and not table.dry_run else None, skip)
    if world is None or world.rank == 0:  # rank 0's rows: no barrier between them
        ranks, table.world = table.world, None
        eval_export_rows(table, checkpoint, tmp, world.device if world is not None else None)
        table.world = ranks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run the GPU rows on the CPU too (checks the script)")
    parser.add_argument("--profiles", nargs="*", default=list(PROFILES))
    parser.add_argument("--optimizers", nargs="*", default=list(OPTIMIZERS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_smoke.md"))
    parser.add_argument("--dry-run", action="store_true", help="list the rows without running them")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dry_run:
        table = Table(dry_run=True)
        table.run("device and decisions", None)
        table.run("packed attention vs masked reference", None)
        add_rows(table, None, None, args, None, None)
        print(table.markdown())
        return 0

    from sabiscale.runtime import use_environment_toolchain
    from sabiscale.train.engine import ensure_launcher_env, init_distributed, resolve_precision

    use_environment_toolchain()
    ensure_launcher_env()
    world = init_distributed()
    on_gpu = world.device.type == "cuda"
    gpu_only = None if on_gpu or args.cpu else "no CUDA GPU here (a dry run; --cpu runs it on the CPU)"
    table = Table(world)
    table.run("device and decisions", lambda: device_row(world))
    precision = resolve_precision("auto", HIDDEN)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    table.run(f"packed attention vs masked reference ({precision})", attention_row(world.device, dtype))
    tmp = shared_workdir(world)
    try:
        base = None
        if gpu_only is None and world.rank == 0:
            base = prepared_demo(tmp / "data")
        lock_step(world)
        if gpu_only is None and base is None:
            base = prepared_demo_config(tmp / "data")
        add_rows(table, base, world, args, gpu_only, tmp)
    finally:
        lock_step(world)
        if world.rank == 0:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    if world.rank == 0:
        text = f"# GPU smoke test\n\nCommand: `{' '.join(sys.argv)}`  \nDate: {time.strftime('%Y-%m-%d')}\n\n{table.markdown()}\n"
        print(text)
        Path(args.out).write_text(text, encoding="utf-8")
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
