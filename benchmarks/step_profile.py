"""Where one training step's time goes: torch.profiler over a few steps of the standard workload
(benchmarks/step_throughput.py's model and data), before and after the fused and compiled layers.

Phases come from the labels the loop puts around its work (sabiscale/data, /forward, /backward,
/optimizer_step: DeepSpeed's gradient hooks run inside backward, its CPU Adam and the copies
back inside optimizer_step). Operator categories come from the self time of every operator in
the profiled steps: matmuls, attention (sdpa's kernels), element-wise and other tensor
operators; whatever the profiler sees outside any operator (Python, DeepSpeed's C++ CPU Adam,
the loader's decoding) is the rest of the phase.

    .venv/bin/python benchmarks/step_profile.py            # ~3 minutes here; on a quiet machine
    .venv/bin/python benchmarks/step_profile.py --steps 2  # a quick look

Writes benchmarks/results/step_profile.{md,json} (step_profile_<tag>.* with --tag; the header names the CPU).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import step_throughput as bench  # the standard workload (a sibling: run this as a script)
from sabiscale.train.hooks import TrainHook

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SETTINGS = {
    "before: transformers' modules, eager": ["train.fused_projections=false", "train.compile=off"],
    "after: fused projections, compiled": ["train.fused_projections=true", "train.compile=on"],
    # what engine.precision=auto picks for this model on a CPU with native bf16 (AVX512-BF16, AMX)
    "bf16 (auto where the CPU has native bf16), fused, eager": ["engine.precision=bf16", "train.compile=off"],
}
PHASES = ["sabiscale/data", "sabiscale/forward", "sabiscale/backward", "sabiscale/optimizer_step"]
MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmm_", "aten::_mm", "mkldnn")
ATTENTION = ("scaled_dot_product", "flash_attention", "_efficient_attention")


def category(name: str) -> str | None:
    if name.startswith("sabiscale/") or name.startswith("ProfilerStep"):
        return None  # labels, not operators
    if any(m in name for m in ATTENTION):
        return "attention (sdpa kernels)"
    if name.startswith(MATMUL) or "linear" in name and "mkldnn" in name:
        return "matmuls"
    if name.startswith("aten::") or name.startswith("Torch-Compiled") or name.startswith("CompiledFunction"):
        return "element-wise and other tensor operators"
    return "other operators"


class Profile(TrainHook):
    """A train hook that profiles steps [first, first + steps) and keeps the profiler."""

    def __init__(self, first: int, steps: int) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.first, self.last = first, first + steps - 1
        self.prof = profile(activities=[ProfilerActivity.CPU])
        self.wall = 0.0

    def after_step(self, record):
        if record.step == self.first - 1:
            self.prof.__enter__()
        elif self.first <= record.step <= self.last:
            self.wall += record.end - record.start
            if record.step == self.last:
                self.prof.__exit__(None, None, None)


def profile_one(setting: str, first: int, steps: int) -> dict:
    from sabiscale.train.engine import ensure_launcher_env, init_distributed
    from sabiscale.train.loop import train

    cfg = bench._config("zero2_offload", SETTINGS[setting])
    cfg.train.max_steps = first + steps
    ensure_launcher_env()
    world = init_distributed()
    hook = Profile(first, steps)
    shutil.rmtree(cfg.checkpoint_dir, ignore_errors=True)
    train(cfg, world, [hook])
    phases = {name: 0.0 for name in PHASES}
    ops: dict[str, float] = {}
    for event in hook.prof.key_averages():
        if event.key in phases:
            phases[event.key] += event.cpu_time_total / 1e6
        kind = category(event.key)
        if kind is not None:
            ops[kind] = ops.get(kind, 0.0) + event.self_cpu_time_total / 1e6
    per_step = lambda d: {k: v / steps for k, v in d.items()}  # noqa: E731
    return {"seconds_per_step": hook.wall / steps, "phases": per_step(phases), "operators": per_step(ops)}


def gemm_ceiling(dtype: torch.dtype, tokens: int = 8 * 512, supervised: int = 2048) -> dict:
    """The matmuls of one step of the standard workload alone (each linear layer's forward product
    and its two backward products, at their real shapes: 4 layers over every token, the head over
    the supervised ones), timed one by one, fastest of 5: what share of the 2048^3 peak they reach
    at these shapes bounds MFU even if everything else took no time."""
    from sabiscale.track.metrics import measure_matmul_peak

    layer = [(256, 768), (256, 256), (256, 1376), (688, 256)]  # (in, out): q/k/v, o, gate/up, down
    linears = [(tokens, k, n) for k, n in layer] * 4 + [(supervised, 256, 16384)]
    flops, seconds = 0.0, 0.0
    for m, k, n in linears:
        x, w, dy = (torch.randn(*shape, dtype=dtype) for shape in ((m, k), (n, k), (m, n)))
        for product in (lambda: x @ w.T, lambda: dy @ w, lambda: dy.T @ x):  # forward, dX, dW
            product()
            fastest = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                product()
                fastest = min(fastest, time.perf_counter() - t0)
            flops += 2 * m * k * n
            seconds += fastest
    peak = measure_matmul_peak(torch.device("cpu"), dtype)
    return {"gemm_flops_per_s": flops / seconds, "peak_flops_per_s": peak, "share_of_peak": flops / seconds / peak,
            "gemm_seconds": seconds}


def results_name(tag: str | None) -> str:
    return f"step_profile_{tag}" if tag else "step_profile"


def write(results: dict, command: str, tag: str | None = None) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    names = list(results)
    lines = ["# Where a training step's time goes\n", f"Command: `{command}`  ",
             f"Date: {time.strftime('%Y-%m-%d')}, 2-core {bench.cpu_description()}, fp32 unless the setting says bf16, the standard workload of "
             "benchmarks/step_throughput.py (11.6M Llama, micro-batch 8 x 512, ZeRO-2 with CPU Adam). "
             "Seconds per step, mean over the profiled steps (the profiler itself adds a little).\n",
             "| seconds per step | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    row = lambda label, get: lines.append(f"| {label} | " + " | ".join(get(results[n]) for n in names) + " |")  # noqa: E731
    row("whole step (wall)", lambda r: f"{r['seconds_per_step']:.3f}")
    for phase in PHASES:
        row(f"phase {phase}", lambda r, p=phase: f"{r['phases'][p]:.3f}")
    kinds = sorted({k for r in results.values() for k in r["operators"]})
    for kind in kinds:
        row(f"operators: {kind}", lambda r, k=kind: f"{r['operators'].get(k, 0.0):.3f}")
    lines += ["", "Phases are wall time inside the loop's labels; operator rows are the operators' own (self) "
              "time summed over every phase, so they do not add up to the wall: time outside any operator (Python, "
              "DeepSpeed's C++ CPU Adam, the loader's decoding) is the difference."]
    ceiling = {name: gemm_ceiling(dtype) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    lines += ["", "**The matmul ceiling.** The step's matmuls alone, at their real shapes (hidden 256: inner dimensions "
              "256 and 688), timed one by one, against the 2048^3 product's peak; MFU cannot exceed this share even "
              "with every other operator free:", "",
              "| precision | the step's matmuls, GFLOP/s | 2048^3 peak, GFLOP/s | share of peak (MFU ceiling) | their time per step, s |",
              "|---|---:|---:|---:|---:|"]
    for name, c in ceiling.items():
        lines.append(f"| {name} | {c['gemm_flops_per_s'] / 1e9:.0f} | {c['peak_flops_per_s'] / 1e9:.0f} | "
                     f"{c['share_of_peak']:.0%} | {c['gemm_seconds']:.3f} |")
    (RESULTS / f"{results_name(tag)}.json").write_text(json.dumps(
        {"command": command, "date": time.strftime("%Y-%m-%d"), "cpu": bench.cpu_description(), "settings": results,
         "gemm_ceiling": ceiling}, indent=2) + "\n")
    (RESULTS / f"{results_name(tag)}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=list(SETTINGS), help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=4, help="first profiled step (the ones before warm up)")
    parser.add_argument("--steps", type=int, default=5, help="steps profiled")
    parser.add_argument("--keep-measured", action="store_true",
                        help="reuse the settings already in results/step_profile.json, profile only the others")
    parser.add_argument("--tag", help="name the results step_profile_<tag> (results differ by CPU family)")
    args = parser.parse_args()
    from sabiscale.runtime import use_environment_toolchain

    use_environment_toolchain()
    if args.setting:
        print(json.dumps(profile_one(args.setting, args.first, args.steps)))
        return
    from sabiscale.prep.prepare import prepare

    if not (bench._config().shards_dir / "manifest.json").is_file():
        prepare(bench._config())  # the same prepared workload as step_throughput.py
    saved = RESULTS / f"{results_name(args.tag)}.json"
    results = json.loads(saved.read_text())["settings"] if args.keep_measured and saved.is_file() else {}
    for setting in (s for s in SETTINGS if s not in results):  # each in its own process: compiled code and allocator state do not carry over
        proc = subprocess.run([sys.executable, __file__, "--setting", setting, "--first", str(args.first),
                               "--steps", str(args.steps)], capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(f"{setting} failed:\n{proc.stderr[-3000:]}")
        results[setting] = json.loads(proc.stdout.strip().splitlines()[-1])
    write({s: results[s] for s in SETTINGS}, f".venv/bin/python benchmarks/step_profile.py --first {args.first} "
          f"--steps {args.steps}" + (f" --tag {args.tag}" if args.tag else "")
          + (" --keep-measured (the other settings: an earlier run)" if args.keep_measured else ""), args.tag)


if __name__ == "__main__":
    main()
