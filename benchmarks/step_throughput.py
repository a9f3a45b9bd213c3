"""Standard workload: sabiscale's training step against the peer, measured alternately in one run.

Workload: the ../shared/data mix in SabiYarn task format, a 16k byte-level BPE, a Llama model
(hidden 256, 4 layers, 4 heads, MLP 688, untied head), micro-batch 8, fp32 on the CPU, AdamW.
- ours: `sabiscale.train.train` as users run it (packed 512-token sequences, head only on
  supervised tokens, DeepSpeed ZeRO-2 with the optimizer offloaded).
- peer: HF `Trainer` on the same model, examples and tokenizer, one example per row with
  labels -100 on the prompt and dynamically padded batches (DataCollatorForSeq2Seq), as Axolotl
  and LLaMA-Factory users run it.

Each role runs in its own process (peak RSS is per process), alternating peer, ours, peer, ours...
Per optimizer step it reports supervised tokens/s, all tokens/s, padding share, MFU against the
fastest fp32 matmul measured before and after the rounds, and step-transient memory per token (peak RSS
during the timed steps minus RSS just before the first timed step, divided by non-padding tokens
per step); the results file holds medians over rounds, the ratios ours / peer of those medians,
and the median of the rounds' own ratios (each pairs two runs minutes apart, which cancels drift).

    make bench                                                       # 5 rounds, ~7 minutes here
    .venv/bin/python benchmarks/step_throughput.py --profile zero2   # without optimizer offload
    .venv/bin/python benchmarks/step_throughput.py --rounds 1 --steps 4   # smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
RECIPE = ROOT / "launch" / "recipes" / "shared_data.yaml"
WORKLOAD = ["output_dir=runs/bench", "data.dir=runs/bench", "data.seq_len=512", "train.micro_batch_size=8", "train.grad_accum_steps=1",
            "tokenizer.vocab_size=16384", "model.hidden_size=256", "model.num_layers=4", "model.num_heads=4",
            "model.intermediate_size=688", "model.tie_embeddings=false", "optim.warmup_steps=1",
            "train.eval_batches=1", "train.eval_every=0", "tracking.enabled=false"]


class RssSampler:
    """Samples this process's RSS every few milliseconds on a thread, with monotonic timestamps."""

    def __init__(self, interval: float = 0.002) -> None:
        self.samples: list[tuple[float, int]] = []
        self._proc, self._interval, self._stop = psutil.Process(), interval, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self._proc.memory_info().rss))
            time.sleep(self._interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def transient(self, start: float, end: float) -> int:
        before = [rss for t, rss in self.samples if t <= start]
        during = [rss for t, rss in self.samples if start <= t <= end]
        return max(during) - (before[-1] if before else during[0])


def _config(profile: str = "zero2_offload", extra: list[str] = ()):
    from sabiscale.config import load_config, resolve_paths

    fixed = [f"data.jsonl_root={ROOT.parent / 'shared' / 'data'}", f"engine.ds_config=ds_configs/{profile}.json"]
    return resolve_paths(load_config(RECIPE, WORKLOAD + fixed + list(extra)), os.environ)


def _summarize(times, counts, flops, sampler, warmup, kept_bytes: int = 0):
    """times: [(start, end)], counts: [(tokens, real tokens, supervised)], flops: [(needed, executed)];
    kept_bytes: step memory kept across steps (counted as transient, since only the step uses it)."""
    times, counts, flops = times[warmup:], counts[warmup:], flops[warmup:]
    seconds = sum(e - s for s, e in times)
    tokens = sum(c[0] for c in counts)
    real = sum(c[1] for c in counts)
    supervised = sum(c[2] for c in counts)
    transient = sampler.transient(times[0][0], times[-1][1]) + kept_bytes
    return {"steps": len(times), "seconds_per_step": seconds / len(times),
            "supervised_tokens_per_s": supervised / seconds, "tokens_per_s": tokens / seconds,
            "padding_share": 1 - real / tokens, "needed_flops_per_s": sum(f[0] for f in flops) / seconds,
            "executed_flops_per_s": sum(f[1] for f in flops) / seconds,
            "transient_bytes_per_token": transient / (real / len(times))}


def run_ours(steps: int, warmup: int, profile: str, extra: list[str] = ()) -> dict:
    from sabiscale.train.engine import ensure_launcher_env, init_distributed
    from sabiscale.prep.tokenizer import load_tokenizer
    from sabiscale.train.hooks import StepRecorder
    from sabiscale.train.loop import train

    cfg = _config(profile, list(extra))
    cfg.train.max_steps = steps + warmup
    shutil.rmtree(cfg.checkpoint_dir, ignore_errors=True)  # the benchmark's own run directory: always start fresh
    ensure_launcher_env()
    world = init_distributed()
    steps = StepRecorder()
    with RssSampler() as sampler:
        train(cfg, world, [steps])
    times = [(r.start, r.end) for r in steps.records]
    counts = [(*r.local_tokens, r.local_targets) for r in steps.records]
    # the fp32 CPU head keeps one (rows, V) logits block across steps (loss/head.py::SupervisedHead)
    rows = min(cfg.loss.chunk_size, max(c[2] for c in counts))
    kept = rows * len(load_tokenizer(cfg.tokenizer_path)) * 4
    return _summarize(times, counts, [r.local_flops for r in steps.records], sampler, warmup, kept)


def run_peer(steps: int, warmup: int, profile: str) -> dict:
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from sabiscale.prep.corpus import load_corpus
    from sabiscale.model.build import build_model
    from sabiscale.track.flops import step_cost
    from sabiscale.prep.prepare import split_examples
    from sabiscale.prep.tokenizer import encode_examples, load_tokenizer

    cfg = _config()
    tok = load_tokenizer(cfg.tokenizer_path)
    train_examples, _ = split_examples(cfg, load_corpus(cfg, Path(cfg.data.jsonl_root)))
    rows = []
    for ids, mask in encode_examples(tok, train_examples):
        ids, mask = ids[:512].astype("int64"), mask[:512].astype(bool)
        labels = ids.copy()
        labels[~mask] = -100
        rows.append({"input_ids": ids.tolist(), "attention_mask": [1] * len(ids), "labels": labels.tolist()})
    model = build_model(cfg.model, len(tok), 512, tok.pad_token_id, tok.eos_token_id, cfg.seed)
    cost = step_cost(model)
    times, counts, flops = [], [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.monotonic()

        def on_step_end(self, args, state, control, **kw):
            times.append((self.t0, time.monotonic()))

    collator = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)

    def counting_collator(features):
        batch = collator(features)
        lengths = batch["attention_mask"].sum(dim=1)
        supervised = int((batch["labels"][:, 1:] != -100).sum())
        counts.append((batch["input_ids"].numel(), int(lengths.sum()), supervised))
        # needed: as for sabiscale (one document per row). Executed: body and head on every
        # padded position; sdpa with a padding mask scores full rows x rows squares
        rows, width = batch["input_ids"].shape
        executed = (cost.body + cost.head) * rows * width + cost.attention * rows * width * width
        flops.append((cost.needed(lengths, supervised), executed))
        return batch

    o = cfg.optim
    args = TrainingArguments(output_dir=str(cfg.output_dir / "peer"), per_device_train_batch_size=8,
                             max_steps=steps + warmup, learning_rate=o.lr, weight_decay=o.weight_decay,
                             adam_beta1=o.beta1, adam_beta2=o.beta2, adam_epsilon=o.eps, warmup_steps=1,
                             max_grad_norm=o.grad_clip, optim="adamw_torch", use_cpu=True, report_to=[],
                             save_strategy="no", logging_strategy="no", dataloader_num_workers=0, seed=cfg.seed)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=counting_collator,
                      callbacks=[Timer()])
    with RssSampler() as sampler:
        trainer.train()
    return _summarize(times, counts[:len(times)], flops[:len(times)], sampler, warmup)


def orchestrate(args) -> None:
    from sabiscale.prep.prepare import prepare

    cfg = _config()
    if not (cfg.shards_dir / "manifest.json").is_file():
        print("preparing the standard workload (tokenizer + shards) ...", flush=True)
        prepare(cfg)
    from sabiscale.track.metrics import measure_matmul_peak

    peak = measure_matmul_peak(torch.device("cpu"))
    print(f"measured fp32 matmul peak: {peak / 1e9:.0f} GFLOP/s", flush=True)
    rounds: dict[str, list[dict]] = {"peer": [], "ours": []}
    for r in range(args.rounds):
        for role in ("peer", "ours"):
            proc = subprocess.run([sys.executable, __file__, "--role", role, "--steps", str(args.steps),
                                   "--warmup", str(args.warmup), "--profile", args.profile], capture_output=True, text=True, cwd=ROOT,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if proc.returncode != 0:
                sys.exit(f"{role} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            rounds[role].append(result)
            print(f"round {r + 1} {role}: {result['supervised_tokens_per_s']:.0f} supervised tokens/s, "
                  f"{result['needed_flops_per_s'] / 1e9:.0f} GFLOP/s needed", flush=True)
    # the peak again at the end: the faster of the two is the machine's, not a slow moment's
    peak = max(peak, measure_matmul_peak(torch.device("cpu")))
    for result in rounds["peer"] + rounds["ours"]:
        result["mfu"] = result["needed_flops_per_s"] / peak
        result["executed_mfu"] = result["executed_flops_per_s"] / peak
    write_results(rounds, peak, args)


def write_results(rounds: dict, peak: float, args) -> None:
    keys = ["supervised_tokens_per_s", "tokens_per_s", "padding_share", "mfu", "executed_mfu",
            "transient_bytes_per_token", "seconds_per_step"]
    median = {role: {k: statistics.median(r[k] for r in results) for k in keys} for role, results in rounds.items()}
    ratio = {k: median["ours"][k] / median["peer"][k] if median["peer"][k] else float("nan") for k in keys}
    # each round's ratio pairs two runs minutes apart, so it cancels the machine's slower drift
    paired = {k: [o[k] / p[k] if p[k] else float("nan") for p, o in zip(rounds["peer"], rounds["ours"])] for k in keys}
    paired_median = {k: statistics.median(v) for k, v in paired.items()}
    command = (f".venv/bin/python benchmarks/step_throughput.py --rounds {args.rounds} --steps {args.steps} "
               f"--warmup {args.warmup} --profile {args.profile}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"step_throughput_{args.profile}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(
        {"command": command, "date": time.strftime("%Y-%m-%d"), "peak_flops_per_s": peak, "rounds": rounds,
         "median": median, "ratio_ours_to_peer": ratio, "ratio_per_round": paired,
         "median_of_round_ratios": paired_median}, indent=2) + "\n")
    fmt = {"supervised_tokens_per_s": "{:.0f}", "tokens_per_s": "{:.0f}", "padding_share": "{:.1%}",
           "mfu": "{:.1%}", "executed_mfu": "{:.1%}", "transient_bytes_per_token": "{:.0f}", "seconds_per_step": "{:.2f}"}
    lines = [f"# Step throughput: sabiscale vs HF Trainer (peer)\n",
             f"Command: `{command}`  ", f"Date: {time.strftime('%Y-%m-%d')}, 2-core CPU, fp32; "
             f"measured fp32 matmul peak {peak / 1e9:.0f} GFLOP/s (fastest product, before and after the rounds); medians of {args.rounds} alternating rounds, "
             f"{args.steps} timed steps each after {args.warmup} warm-up steps; sabiscale on DeepSpeed "
             f"profile ds_configs/{args.profile}.json.\n",
             "| per optimizer step | peer | sabiscale | ratio of medians | median of round ratios |",
             "|---|---:|---:|---:|---:|"]
    for k in keys:
        lines.append(f"| {k} | {fmt[k].format(median['peer'][k])} | {fmt[k].format(median['ours'][k])} | "
                     f"{ratio[k]:.2f} | {paired_median[k]:.2f} |")
    lines += ["", "mfu counts only the FLOPs the step needs (sabiscale/track/flops.py::StepCost: 6 per weight per token "
              "on every non-padding token, the last layer's attention output projection and MLP and the head "
              "only on supervised tokens, attention only between tokens of one document); executed_mfu counts "
              "what each computes (the peer: body and head on every padded position, attention on full padded "
              "squares; sabiscale: the body on its little padding too, attention on length buckets padded to "
              "their longest document).",
              "Round by round, supervised tokens/s: " + "; ".join(
                  f"{p['supervised_tokens_per_s']:.0f} vs {o['supervised_tokens_per_s']:.0f} = {r:.2f}x"
                  for p, o, r in zip(rounds["peer"], rounds["ours"], paired["supervised_tokens_per_s"]))
              + " (peer vs sabiscale).",
              "transient_bytes_per_token: peak RSS during the timed steps minus RSS before the first, per "
              "non-padding token of a step; for sabiscale plus the logits block its fp32 CPU head keeps "
              "between steps."]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["ours", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", default="zero2_offload", help="DeepSpeed profile of ds_configs/ for sabiscale")
    args = parser.parse_args()
    from sabiscale.__main__ import use_environment_toolchain

    use_environment_toolchain()
    if args.role:
        result = (run_ours if args.role == "ours" else run_peer)(args.steps, args.warmup, args.profile)
        print(json.dumps(result))
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
