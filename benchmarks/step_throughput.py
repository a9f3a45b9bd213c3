"""Standard workload: sabiscale's training step against the peer, measured alternately in one run.

Workload: the ../shared/data mix in SabiYarn task format, a 16k byte-level BPE, a Llama model
(hidden 256, 4 layers, 4 heads, MLP 688, untied head), micro-batch 8, AdamW, in the precision
sabiscale's engine.precision=auto picks for this machine's CPU (bf16 where it has native bf16,
fp32 otherwise; --precision overrides it) for every role: the Trainer peers then run bf16
autocast (`bf16=True`), as a careful user there would.
- ours: `sabiscale.train.train` as users run it (packed 512-token sequences, head only on
  supervised tokens, DeepSpeed ZeRO-2 with the optimizer offloaded).
- peer: HF `Trainer` on the same model, examples and tokenizer, one example per row with
  labels -100 on the prompt and dynamically padded batches (DataCollatorForSeq2Seq), as Axolotl
  and LLaMA-Factory users run it;
- peer_flat: the same Trainer padding-free (`DataCollatorWithFlattening`: the examples of a step
  concatenated in one row, positions restarting per example, which transformers' sdpa path turns
  into per-example attention; what TRL's `padding_free` and Axolotl's sample packing do), with
  as many examples per step as fill sabiscale's tokens per step; its exactness against the padded
  batch is checked before it is timed.
Both Trainer peers use the Trainer's fused AdamW (`adamw_torch_fused`).

Each role runs in its own process (peak RSS is per process), alternating peer, peer_flat, ours, ...
Per optimizer step it reports supervised tokens/s, all tokens/s, padding share, MFU against the
fastest matmul in that precision measured before and after the rounds, and step-transient memory per token (peak RSS
during the timed steps minus RSS just before the first timed step, divided by non-padding tokens
per step); the results file holds medians over rounds, the ratios ours / peer of those medians,
the median of the rounds' own ratios (each pairs runs minutes apart, which cancels drift), and
the headline: per round, ours against the stronger of the two peers in that round, median and
range over the rounds.

    make bench                                                       # 5 rounds, ~7 minutes here
    .venv/bin/python benchmarks/step_throughput.py --profile zero2   # without optimizer offload
    .venv/bin/python benchmarks/step_throughput.py --rounds 1 --steps 4   # smoke run
    .venv/bin/python benchmarks/step_throughput.py --precision fp32     # fp32 also where bf16 is native

Results: benchmarks/results/step_throughput_<profile>.md (fp32) or ..._<profile>_bf16.md, with _<tag> after --tag
(results differ by CPU: the header names it).
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

# the CPU's model name and its native bf16 unit, which decides the bf16 rows (results differ by CPU)
from sabiscale.train.device import describe_cpu as cpu_description

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


def workload_precision(requested: str) -> str:
    """What engine.precision=`requested` resolves to for the standard workload on this machine."""
    from sabiscale.train.engine import resolve_precision

    return resolve_precision(requested, 256)


def _config(profile: str = "zero2_offload", extra: list[str] = (), precision: str = "fp32"):
    from sabiscale.config import load_config, resolve_paths

    fixed = [f"data.jsonl_root={ROOT.parent / 'shared' / 'data'}", f"engine.ds_config=ds_configs/{profile}.json",
             f"engine.precision={precision}"]
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


def run_ours(steps: int, warmup: int, profile: str, precision: str, extra: list[str] = ()) -> dict:
    from sabiscale.train.engine import ensure_launcher_env, init_distributed
    from sabiscale.prep.tokenizer import load_tokenizer
    from sabiscale.train.hooks import StepRecorder
    from sabiscale.train.loop import train

    cfg = _config(profile, list(extra), precision)
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
    kept = rows * len(load_tokenizer(cfg.tokenizer_path)) * 4 if precision == "fp32" else 0
    result = _summarize(times, counts, [r.local_flops for r in steps.records], sampler, warmup, kept)
    # the first step holds torch.compile's compilation when it is on (warm-up, never timed)
    return {**result, "first_step_seconds": times[0][1] - times[0][0]}


def peer_rows(cfg, tok) -> list[dict]:
    """The training examples one per row: ids, and labels -100 on the prompt."""
    from sabiscale.prep.corpus import load_corpus
    from sabiscale.prep.prepare import split_examples
    from sabiscale.prep.tokenizer import encode_examples

    train_examples, _ = split_examples(cfg, load_corpus(cfg, Path(cfg.data.jsonl_root)))
    rows = []
    for ids, mask in encode_examples(tok, train_examples):
        ids, mask = ids[:512].astype("int64"), mask[:512].astype(bool)
        labels = ids.copy()
        labels[~mask] = -100
        rows.append({"input_ids": ids.tolist(), "attention_mask": [1] * len(ids), "labels": labels.tolist()})
    return rows


@torch.no_grad()
def check_flat_exact(model, rows: list[dict], tok) -> float:
    """The padding-free batch's loss against the padded batch's, on the same examples: equal up to
    float error when attention stays inside each example (relative difference returned)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    model.eval()
    padded = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)(rows)
    flat = DataCollatorWithFlattening()([{k: r[k] for k in ("input_ids", "labels")} for r in rows])
    a = model(**padded, use_cache=False).loss
    b = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"], labels=flat["labels"], use_cache=False).loss
    model.train()
    return float(abs(a - b) / abs(a))


def run_ours_compiled(steps: int, warmup: int, profile: str, precision: str) -> dict:
    return run_ours(steps, warmup, profile, precision, ["train.compile=on"])


def run_peer_flat(steps: int, warmup: int, profile: str, precision: str) -> dict:
    return run_peer(steps, warmup, profile, precision, flat=True)


def run_peer(steps: int, warmup: int, profile: str, precision: str, flat: bool = False) -> dict:
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments

    from sabiscale.model.build import build_model
    from sabiscale.prep.tokenizer import load_tokenizer
    from sabiscale.track.flops import step_cost

    cfg = _config()
    tok = load_tokenizer(cfg.tokenizer_path)
    rows = peer_rows(cfg, tok)
    model = build_model(cfg.model, len(tok), 512, tok.pad_token_id, tok.eos_token_id, cfg.seed)
    batch_size = 8
    exactness = None
    if flat:  # as many examples per step as fill sabiscale's 8 x 512 tokens
        batch_size = max(1, round(8 * 512 / statistics.mean(len(r["input_ids"]) for r in rows)))
        exactness = check_flat_exact(model, rows[:6], tok)
        if exactness > 1e-4:
            sys.exit(f"the padding-free peer is not exact here: loss differs by {exactness:.2e} from the padded batch's")
    cost = step_cost(model)
    times, counts, flops = [], [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.monotonic()

        def on_step_end(self, args, state, control, **kw):
            times.append((self.t0, time.monotonic()))

    collator = DataCollatorWithFlattening() if flat else DataCollatorForSeq2Seq(tok, padding="longest",
                                                                                 label_pad_token_id=-100)

    def counting_collator(features):
        lengths = torch.tensor([len(f["input_ids"]) for f in features])
        batch = collator([{k: f[k] for k in ("input_ids", "labels")} for f in features] if flat else features)
        supervised = sum(sum(label != -100 for label in f["labels"][1:]) for f in features)
        counts.append((batch["input_ids"].numel(), int(lengths.sum()), supervised))
        # needed: as for sabiscale (one document per example). Executed: body and head on every
        # position of the batch; sdpa scores full rows x rows squares (padded), or per example (flat)
        rows, width = batch["input_ids"].shape
        attention = int((lengths ** 2).sum()) if flat else rows * width * width
        executed = (cost.body + cost.head) * rows * width + cost.attention * attention
        flops.append((cost.needed(lengths, supervised), executed))
        return batch

    o = cfg.optim
    args = TrainingArguments(output_dir=str(cfg.output_dir / "peer"), per_device_train_batch_size=batch_size,
                             max_steps=steps + warmup, learning_rate=o.lr, weight_decay=o.weight_decay,
                             adam_beta1=o.beta1, adam_beta2=o.beta2, adam_epsilon=o.eps, warmup_steps=1,
                             max_grad_norm=o.grad_clip, optim="adamw_torch_fused", use_cpu=True, report_to=[],
                             bf16=precision == "bf16",
                             save_strategy="no", logging_strategy="no", dataloader_num_workers=0, seed=cfg.seed)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=counting_collator,
                      callbacks=[Timer()])
    with RssSampler() as sampler:
        trainer.train()
    result = _summarize(times, counts[:len(times)], flops[:len(times)], sampler, warmup)
    return {**result, "examples_per_step": batch_size, "flat_loss_rel_diff": exactness,
            "mixed_precision": trainer.accelerator.mixed_precision}  # "bf16": autocast was on


def orchestrate(args) -> None:
    from sabiscale.prep.prepare import prepare

    cfg = _config()
    if not (cfg.shards_dir / "manifest.json").is_file():
        print("preparing the standard workload (tokenizer + shards) ...", flush=True)
        prepare(cfg)
    from sabiscale.track.metrics import measure_matmul_peak

    precision = workload_precision(args.precision)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    peak = measure_matmul_peak(torch.device("cpu"), dtype)
    print(f"precision {precision}; measured matmul peak: {peak / 1e9:.0f} GFLOP/s", flush=True)
    roles = ("peer", "peer_flat", "ours") + (("ours_compiled",) if args.compiled else ())
    rounds: dict[str, list[dict]] = {role: [] for role in roles}
    for r in range(args.rounds):
        for role in roles:
            proc = subprocess.run([sys.executable, __file__, "--role", role, "--steps", str(args.steps),
                                   "--warmup", str(args.warmup), "--profile", args.profile, "--precision", precision],
                                  capture_output=True, text=True, cwd=ROOT,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if proc.returncode != 0:
                sys.exit(f"{role} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            rounds[role].append(result)
            print(f"round {r + 1} {role}: {result['supervised_tokens_per_s']:.0f} supervised tokens/s, "
                  f"{result['needed_flops_per_s'] / 1e9:.0f} GFLOP/s needed", flush=True)
    # the peak again at the end: the faster of the two is the machine's, not a slow moment's
    peak = max(peak, measure_matmul_peak(torch.device("cpu"), dtype))
    for result in (r for results in rounds.values() for r in results):
        result["mfu"] = result["needed_flops_per_s"] / peak
        result["executed_mfu"] = result["executed_flops_per_s"] / peak
    cold = cold_compile_seconds(precision) if args.compiled else None
    write_results(rounds, peak, args, precision, cold)


def cold_compile_seconds(precision: str) -> float:
    """What train.compile costs a first run on a machine: process wall time of a 3-step run with
    compile on minus one with it off, each with an empty inductor cache (the rounds' compiled runs
    reuse the cache that the first one fills, as a user's later runs do)."""
    import tempfile

    walls = {}
    for role in ("ours", "ours_compiled"):
        with tempfile.TemporaryDirectory() as cache:
            start = time.monotonic()
            proc = subprocess.run([sys.executable, __file__, "--role", role, "--steps", "2", "--warmup", "1",
                                   "--precision", precision],
                                  capture_output=True, text=True, cwd=ROOT,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "TORCHINDUCTOR_CACHE_DIR": cache})
            walls[role] = time.monotonic() - start
        if proc.returncode != 0:
            sys.exit(f"{role} failed:\n{proc.stderr[-3000:]}")
    return walls["ours_compiled"] - walls["ours"]


def add_cold_compile(args) -> None:
    """--cold-compile-only: measure the cold compilation cost and re-render the existing results."""
    precision = workload_precision(args.precision)
    saved = json.loads((RESULTS / f"{results_stem(args.profile, precision, args.tag)}.json").read_text())
    saved_args = argparse.Namespace(**{**vars(args), **saved["args"]}) if "args" in saved else args
    write_results(saved["rounds"], saved["peak_flops_per_s"], saved_args, precision, cold_compile_seconds(precision),
                  saved["date"], saved.get("cpu"))


def results_stem(profile: str, precision: str, tag: str = "") -> str:
    return f"step_throughput_{profile}" + ("" if precision == "fp32" else f"_{precision}") + (f"_{tag}" if tag else "")


def git_commit() -> str:
    """The short commit the results were measured at (every results file names it)."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def write_results(rounds: dict, peak: float, args, precision: str, cold_compile: float | None = None,
                  date: str | None = None, cpu: str | None = None) -> None:
    """cpu: the measured machine's description when results are re-rendered (default: this one's)."""
    cpu = cpu or cpu_description()
    keys = ["supervised_tokens_per_s", "tokens_per_s", "padding_share", "mfu", "executed_mfu",
            "transient_bytes_per_token", "seconds_per_step"]
    roles = list(rounds)
    median = {role: {k: statistics.median(r[k] for r in results) for k in keys} for role, results in rounds.items()}
    # each round's ratio pairs runs minutes apart, so it cancels the machine's slower drift; the
    # headline takes, in each round, the stronger peer of that round
    key = "supervised_tokens_per_s"
    best = [max(p, f, key=lambda r: r[key]) for p, f in zip(rounds["peer"], rounds["peer_flat"])]
    vs_best = [o[key] / b[key] for o, b in zip(rounds["ours"], best)]
    paired = {peer: {k: [o[k] / p[k] if p[k] else float("nan") for p, o in zip(rounds[peer], rounds["ours"])] for k in keys}
              for peer in ("peer", "peer_flat")}
    paired_median = {peer: {k: statistics.median(v) for k, v in ratios.items()} for peer, ratios in paired.items()}
    command = (f".venv/bin/python benchmarks/step_throughput.py --rounds {args.rounds} --steps {args.steps} "
               f"--warmup {args.warmup} --profile {args.profile} --precision {precision}"
               + ("" if args.compiled else " --no-compiled") + (f" --tag {args.tag}" if args.tag else ""))
    date = date or time.strftime("%Y-%m-%d")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = results_stem(args.profile, precision, args.tag)
    headline = {"median": statistics.median(vs_best), "min": min(vs_best), "max": max(vs_best), "per_round": vs_best}
    (RESULTS / f"{stem}.json").write_text(json.dumps(
        {"command": command, "date": date, "cpu": cpu, "precision": precision,
         "peak_flops_per_s": peak, "rounds": rounds,
         "args": {k: getattr(args, k) for k in ("rounds", "steps", "warmup", "profile", "compiled", "tag")},
         "cold_compile_seconds": cold_compile,
         "median": median, "ratio_per_round": paired, "median_of_round_ratios": paired_median,
         "ours_vs_best_peer_supervised_tokens_per_s": headline}, indent=2) + "\n")
    fmt = {"supervised_tokens_per_s": "{:.0f}", "tokens_per_s": "{:.0f}", "padding_share": "{:.1%}",
           "mfu": "{:.1%}", "executed_mfu": "{:.1%}", "transient_bytes_per_token": "{:.0f}", "seconds_per_step": "{:.2f}"}
    flat_diff = max(r["flat_loss_rel_diff"] for r in rounds["peer_flat"])
    lines = ["# Step throughput: sabiscale vs HF Trainer peers (padded and padding-free)\n",
             f"Command: `{command}`  ", f"Date: {date}, 2 cores of {cpu}, {precision} for every role"
             f"{' (the Trainer peers: bf16 autocast)' if precision == 'bf16' else ''}; "
             f"measured {precision} matmul peak {peak / 1e9:.0f} GFLOP/s (fastest product, before and after the rounds); medians of {args.rounds} alternating rounds, "
             f"{args.steps} timed steps each after {args.warmup} warm-up steps; sabiscale on DeepSpeed "
             f"profile ds_configs/{args.profile}.json; both Trainer peers with fused AdamW; the padding-free peer with "
             f"{rounds['peer_flat'][0]['examples_per_step']} examples per step (its loss equals the padded batch's to "
             f"{flat_diff:.1e} relative).\n",
             f"**Headline: sabiscale's supervised tokens/s against the stronger peer of each round: median "
             f"{headline['median']:.2f}x (range {headline['min']:.2f}x-{headline['max']:.2f}x over {args.rounds} rounds).**\n",
             "| per optimizer step | " + " | ".join(roles) + " | ours / peer (median of round ratios) | ours / peer_flat |",
             "|---|" + "---:|" * (len(roles) + 2)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(fmt[k].format(median[r][k]) for r in roles)
                     + f" | {paired_median['peer'][k]:.2f} | {paired_median['peer_flat'][k]:.2f} |")
    lines += ["", "mfu counts only the FLOPs the step needs (sabiscale/track/flops.py::StepCost: 6 per weight per token "
              "on every non-padding token, the last layer's attention output projection and MLP and the head "
              "only on supervised tokens, attention only between tokens of one document); executed_mfu counts "
              "what each computes (the padded peer: body and head on every padded position, attention on full padded "
              "squares; the padding-free peer: body and head on every token, attention per example; sabiscale: the "
              "body on its little padding too, attention on length buckets padded to their longest document).",
              "Round by round, supervised tokens/s (peer, peer_flat, sabiscale): " + "; ".join(
                  f"{p[key]:.0f}, {f[key]:.0f}, {o[key]:.0f} = {r:.2f}x the best"
                  for p, f, o, r in zip(rounds["peer"], rounds["peer_flat"], rounds["ours"], vs_best)) + ".",
              "transient_bytes_per_token: peak RSS during the timed steps minus RSS before the first, per "
              "non-padding token of a step; for sabiscale plus the logits block its fp32 CPU head keeps "
              "between steps (in fp32 runs)."]
    if "ours_compiled" in rounds:
        lines += ["", compile_summary(rounds, best, cold_compile)]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def compile_summary(rounds: dict, best: list[dict], cold: float | None) -> str:
    """train.compile=on against sabiscale's default in the same rounds: the step-time gain, the
    compilation's cost (cold: a first run with an empty inductor cache; warm: the rounds' first
    steps), and after how many steps it has paid for itself."""
    key = "supervised_tokens_per_s"
    gain = [c[key] / o[key] for o, c in zip(rounds["ours"], rounds["ours_compiled"])]
    vs_best = [c[key] / b[key] for c, b in zip(rounds["ours_compiled"], best)]
    warm = statistics.median(c["first_step_seconds"] - o["first_step_seconds"]
                             for o, c in zip(rounds["ours"], rounds["ours_compiled"]))
    saved = statistics.median(o["seconds_per_step"] - c["seconds_per_step"]
                              for o, c in zip(rounds["ours"], rounds["ours_compiled"]))
    cost = cold if cold is not None else warm
    pays = (f"it pays for itself after about {cost / saved:.0f} steps" if saved > 0 else "it does not pay here")
    cold_text = f"{cold:.0f} s on a cold inductor cache (a first run on a machine), " if cold is not None else ""
    return (f"**train.compile=on** (ours_compiled): {statistics.median(gain):.2f}x sabiscale's default supervised "
            f"tokens/s (median of round ratios, range {min(gain):.2f}-{max(gain):.2f}), {statistics.median(vs_best):.2f}x "
            f"the stronger peer. Compilation costs {cold_text}{warm:.1f} s with the cache warm (the rounds' first "
            f"steps); at {saved:.2f} s saved per step {pays}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["ours", "ours_compiled", "peer", "peer_flat"], help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True,
                        help="also time sabiscale with train.compile=on (role ours_compiled)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tag", default="", help="suffix of the results files, e.g. a CPU family (amx)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", default="zero2_offload", help="DeepSpeed profile of ds_configs/ for sabiscale")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="of every role; auto: what sabiscale picks for the workload on this machine")
    parser.add_argument("--cold-compile-only", action="store_true",
                        help="only measure train.compile's cold compilation and add it to the existing results")
    args = parser.parse_args()
    from sabiscale.runtime import use_environment_toolchain

    use_environment_toolchain()
    if args.role:
        run = {"ours": run_ours, "ours_compiled": run_ours_compiled, "peer": run_peer, "peer_flat": run_peer_flat}[args.role]
        result = run(args.steps, args.warmup, args.profile, workload_precision(args.precision))
        print(json.dumps(result))
    elif args.cold_compile_only:
        add_cold_compile(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
