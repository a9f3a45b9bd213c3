"""What the loop measures: the named sums of a step, per-task and per-language token losses (sums
and counts, reduced across ranks), device peak FLOP/s for MFU and memory in use. FLOP counts are
in track/flops.py; the history the plots are drawn from is in track/plots.py."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from typing import Any

import psutil
import torch

from sabiscale.data.batch import Batch, Vocab
from sabiscale.loss.objective import TokenLosses


@dataclass
class StepSums:
    """What one optimizer step adds up over its micro-batches: 0-dim float64 tensors on the device
    while the step runs, plain floats once `all_reduced` has summed them over every rank in one call."""

    targets: Any          # supervised targets the loss counted (the divisor of train/loss)
    loss: Any             # weighted sum of the counted targets' losses
    answer_loss: Any      # sum of the losses of counted targets that are answer tokens
    answer_tokens: Any    # how many counted targets are answer tokens
    needed_flops: Any     # FLOPs the step needs (track/flops.py), for MFU
    # kinds that rank candidates (selective): candidates, and the kept and rejected ones with their excess losses
    candidates: Any
    selected: Any
    excess_selected: Any
    excess_rejected: Any
    rejected: Any
    stop_requests: Any = 0.0  # ranks that received a stop signal (train/preemption.py)

    @classmethod
    def zeros(cls, device: torch.device) -> "StepSums":
        return cls(*(torch.zeros((), dtype=torch.float64, device=device) for _ in fields(cls)))

    def add(self, batch: Batch, out: TokenLosses, needed_flops: float) -> None:
        answer = batch.loss_mask[:, 1:][out.selected]  # which counted targets are answer tokens
        self.loss += out.loss_sum.detach().double()
        self.answer_loss += out.per_token[answer].sum().double()
        self.answer_tokens += answer.sum()
        self.needed_flops += needed_flops
        if out.excess is not None:
            keep = out.selected[out.candidates]  # which candidates won, in candidate order
            excess = out.excess.double()
            self.candidates += len(excess)
            self.selected += keep.sum()
            self.excess_selected += excess[keep].sum()
            self.excess_rejected += excess[~keep].sum()
            self.rejected += (~keep).sum()

    def all_reduced(self, all_reduce) -> "StepSums":
        total = all_reduce(torch.stack([getattr(self, f.name) for f in fields(self)]))
        return StepSums(*total.cpu().tolist())  # one copy to the host, not one sync per field

    def finite(self) -> bool:
        return all(math.isfinite(float(getattr(self, f.name))) for f in fields(self))


def selection_metrics(sums: StepSums) -> dict[str, float]:
    """Per step, from the rank-reduced sums: selected fraction and mean excess loss of selected vs
    rejected tokens."""
    return {"select/selected_fraction": sums.selected / max(sums.candidates, 1.0),
            "select/excess_selected": sums.excess_selected / max(sums.selected, 1.0),
            "select/excess_rejected": sums.excess_rejected / max(sums.rejected, 1.0),
            "select/candidates": sums.candidates}


class TokenStats:
    """Sums of unweighted token losses and token counts per task and per language."""

    def __init__(self, vocab: Vocab, device: torch.device) -> None:
        self.vocab = vocab
        # [loss sum, count, candidates]; candidates only differ from count under the selective loss
        self.task = torch.zeros(3, len(vocab.tasks), dtype=torch.float64, device=device)
        self.lang = torch.zeros(3, len(vocab.langs), dtype=torch.float64, device=device)

    def add(self, batch: Batch, out: TokenLosses) -> None:
        losses = out.per_token.to(torch.float64)
        candidates = out.candidates if out.candidates is not None else out.selected
        for table, ids in ((self.task, batch.task_ids), (self.lang, batch.lang_ids)):
            idx = ids[:, 1:][out.selected]
            keep = idx >= 0
            table[0].index_add_(0, idx[keep], losses[keep])
            table[1].index_add_(0, idx[keep], torch.ones_like(losses[keep]))
            ranked = ids[:, 1:][candidates]
            ranked = ranked[ranked >= 0]
            table[2].index_add_(0, ranked, torch.ones_like(ranked, dtype=torch.float64))

    def metrics(self, prefix: str, all_reduce, selective: bool = False) -> dict[str, float]:
        """Reduced over ranks: `{prefix}/loss/task/<t>`, `{prefix}/supervised_tokens/task/<t>`, same for
        lang; with `selective`, also `{prefix}/selection_rate/task/<t>` (selected / candidate tokens)."""
        out: dict[str, float] = {}
        for kind, table, names in (("task", self.task, self.vocab.tasks), ("lang", self.lang, self.vocab.langs)):
            total = all_reduce(table.clone())
            for i, name in enumerate(names):
                if total[1, i] > 0:
                    out[f"{prefix}/loss/{kind}/{name}"] = float(total[0, i] / total[1, i])
                    out[f"{prefix}/supervised_tokens/{kind}/{name}"] = float(total[1, i])
                if selective and total[2, i] > 0:
                    out[f"{prefix}/selection_rate/{kind}/{name}"] = float(total[1, i] / total[2, i])
        return out

    def reset(self) -> None:
        self.task.zero_()
        self.lang.zero_()

    def window(self, all_reduce) -> dict[str, dict[str, list[float]]]:
        """The sums since the last log line, reduced over ranks and keyed by name (a collective):
        saved in a checkpoint, so the first log line after a resume averages the same steps as an
        uninterrupted run's, on any number of ranks."""
        out = {}
        for kind, table, names in (("task", self.task, self.vocab.tasks), ("lang", self.lang, self.vocab.langs)):
            total = all_reduce(table.clone()).cpu()
            out[kind] = {name: total[:, i].tolist() for i, name in enumerate(names)}
        return out

    def restore(self, window: dict[str, dict[str, list[float]]], rank: int) -> None:
        """Continue a saved window: rank 0 holds its sums, the other ranks start from zero (the
        metrics sum over ranks)."""
        self.reset()
        if rank != 0:
            return
        for kind, table, names in (("task", self.task, self.vocab.tasks), ("lang", self.lang, self.vocab.langs)):
            for i, name in enumerate(names):
                if name in window.get(kind, {}):
                    table[:, i] = torch.tensor(window[kind][name], dtype=torch.float64)


class TaskLanguageStats:
    """Answer-token losses, tokens and the UTF-8 bytes those tokens stand for, per task x language:
    the eval's answer loss and bits per byte for every pair (bits per byte compares runs whatever
    their tokenizers)."""

    def __init__(self, vocab: Vocab, token_bytes: torch.Tensor, device: torch.device) -> None:
        self.vocab = vocab
        self.token_bytes = token_bytes  # on `device` (built once per run)
        self.table = torch.zeros(3, len(vocab.tasks) * len(vocab.langs), dtype=torch.float64, device=device)

    def add(self, batch: Batch, out: TokenLosses) -> None:
        task = batch.task_ids[:, 1:][out.selected]
        lang = batch.lang_ids[:, 1:][out.selected]
        keep = (task >= 0) & (lang >= 0)
        pair = (task * len(self.vocab.langs) + lang)[keep]
        targets = batch.input_ids[:, 1:][out.selected][keep]
        self.table[0].index_add_(0, pair, out.per_token.to(torch.float64)[keep])
        self.table[1].index_add_(0, pair, torch.ones_like(pair, dtype=torch.float64))
        self.table[2].index_add_(0, pair, self.token_bytes[targets].to(torch.float64))

    def metrics(self, all_reduce) -> dict[str, float]:
        """`eval_<task>/<lang>/answer_loss` and `.../bits_per_byte` (one MLflow chart group per
        task), and the overall `eval/bits_per_byte`; reduced over ranks."""
        total = all_reduce(self.table.clone()).cpu()
        out = {}
        for i, task in enumerate(self.vocab.tasks):
            for j, lang in enumerate(self.vocab.langs):
                nats, tokens, nbytes = total[:, i * len(self.vocab.langs) + j].tolist()
                if tokens > 0:
                    out[f"eval_{task}/{lang}/answer_loss"] = nats / tokens
                    if nbytes > 0:
                        out[f"eval_{task}/{lang}/bits_per_byte"] = nats / math.log(2) / nbytes
        nats, _, nbytes = total.sum(dim=1).tolist()
        if nbytes > 0:
            out["eval/bits_per_byte"] = nats / math.log(2) / nbytes
        return out


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048,
                        repeats: int = 8, product_seconds: float = 0.05) -> float:
    """Achievable matmul FLOP/s of this device and dtype, the denominator of MFU (~1 s)."""
    if device.type == "cuda":
        return _cuda_matmul_peak(device, dtype, size * 2, repeats * 4)
    a, b = operands_worth_timing(device, dtype, size, product_seconds)
    # the fastest of `repeats` timed products: on a shared machine an average also measures the
    # neighbours (seen: a mean of 79 GFLOP/s in one run against ~160 in most)
    fastest = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        fastest = min(fastest, time.perf_counter() - t0)
    return 2 * a.shape[0] ** 3 / fastest


def operands_worth_timing(device: torch.device, dtype: torch.dtype, size: int,
                          product_seconds: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Square operands doubled from 256 until one product takes `product_seconds` or they reach
    `size`. A CPU without native bf16 multiplies bf16 at ~1 GFLOP/s (seen: AVX2-only EPYC), where
    one 2048 product takes 14 s and the probe at each evaluation stalled a test run for minutes;
    a fast device still reaches `size`, where its peak is."""
    n = min(256, size)
    while True:
        a, b = random_operands(device, dtype, n)
        a @ b  # warm-up: first-call allocations and kernel selection are not the device's speed
        t0 = time.perf_counter()
        a @ b
        if time.perf_counter() - t0 >= product_seconds or n >= size:
            return a, b
        n = min(2 * n, size)


def random_operands(device: torch.device, dtype: torch.dtype, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From a generator of their own: the peak is measured again during training, and drawing
    from the global one there would shift the run's random stream."""
    gen = torch.Generator(device=device).manual_seed(0)
    return (torch.randn(size, size, device=device, dtype=dtype, generator=gen),
            torch.randn(size, size, device=device, dtype=dtype, generator=gen))


def _cuda_matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """GPU: one product is too short to time from the host (launch overhead, clocks still ramping
    up would make MFU read high); warm up, then time a loop of products with CUDA events."""
    a, b = random_operands(device, dtype, size)
    for _ in range(10):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    return 2 * size**3 * repeats / (start.elapsed_time(end) / 1000)


def memory_in_use(device: torch.device) -> float:
    """Bytes: peak allocated on a GPU, resident set size of this process on the CPU."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return float(psutil.Process().memory_info().rss)
