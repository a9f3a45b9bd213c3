"""The output head, paid only where the loss reads: a fused linear + cross-entropy over the
supervised positions, chunk by chunk.

HF-style training builds (B, T, V) logits and hides prompt tokens with labels=-100. Here the
objective (loss/objective.py) hands the head only the final hidden states of the positions whose
next token counts, and the output projection plus cross-entropy run only there, chunk by chunk
with the gradients computed on the spot (FusedLinearCrossEntropy), so at most (chunk, V) logits
are alive at once and no B x T x V tensor exists. The head is called as a module, so under ZeRO-3
DeepSpeed gathers its weight as for any forward. With reference losses (the selective kind) the
head first ranks the candidates by excess loss and trains the top share only.

Liger-Kernel's fused linear cross-entropy (Triton, GPUs only) is not used, by design: this head
must return every token's loss (per task x language statistics, the selective ranking, the
loss trajectories) and weigh each token (loss.prompt_weight, loss.task_weights). Liger gives
per-token losses only with reduction="none", whose backward runs its forward again (a fourth
GEMM over the vocabulary where this head runs three), and it reads its token count to the host
(`.item()`) on every call, which the host-sync test holds training steps free of. What it would
save, its one-kernel softmax and gradient, this head approaches by folding the division and the
token weight into one pass (logits_gradient; benchmarks/results/head_passes.md).
"""
from __future__ import annotations

import torch


def selected_count(candidates: int, ratio: float) -> int:
    """How many of a micro-batch's candidates the selective loss keeps (round half up)."""
    return int(candidates * ratio + 0.5)


def top_excess(excess: torch.Tensor, ratio: float, noise: torch.Tensor | None = None) -> torch.Tensor:
    """(C,) bool: the `selected_count` candidates with the highest excess loss (plus `noise`, for
    a sampled selection). Ties go to the earlier token (stable sort), so a selection never
    depends on the sort kernel."""
    keep = torch.zeros_like(excess, dtype=torch.bool)
    order = torch.sort(excess if noise is None else excess + noise, descending=True, stable=True).indices
    keep[order[:selected_count(len(excess), ratio)]] = True
    return keep


@torch.no_grad()
def chunked_token_losses(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int, workspace: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses, log-sum-exp) per target without gradient, one (chunk, V) logits block at a time.
    The log-sum-exp is kept so the fused pass over the selected tokens need not recompute it."""
    losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(losses)
    for start in range(0, hidden.shape[0], chunk):
        logits = logits_block(hidden[start:start + chunk], weight, workspace)
        t = targets[start:start + chunk]
        target_logit = logits.gather(1, t[:, None]).squeeze(1)
        lse[start:start + chunk] = exp_in_place(logits)[1]
        losses[start:start + chunk] = lse[start:start + chunk] - target_logit
    return losses, lse


def logits_block(hidden: torch.Tensor, weight: torch.Tensor, workspace: torch.Tensor | None) -> torch.Tensor:
    """(rows, V) fp32 logits of one chunk, written into `workspace` (at least rows x V) if given."""
    if workspace is None or hidden.dtype != torch.float32:
        return (hidden @ weight.T).float()
    return torch.mm(hidden, weight.T, out=workspace[:hidden.shape[0]])


def exp_in_place(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(exp(logits - row max) written over `logits`, log-sum-exp, row sums): the softmax before
    its division, which logits_gradient folds into its one scaling pass. torch.logsumexp would
    allocate a temporary as large as the logits and cost about as much as the head's matmul on a
    CPU; this reuses the block in place."""
    row_max = logits.amax(dim=-1, keepdim=True)
    exp = logits.sub_(row_max).exp_()
    total = exp.sum(dim=-1)
    return exp, row_max.squeeze(1) + total.log(), total


def logits_gradient(block: torch.Tensor, total: torch.Tensor | None, targets: torch.Tensor,
                    token_weights: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """d loss / d logits = (softmax - one_hot(target)) x token weight, in `dtype`, from `block` =
    exp(logits - max) with row sums `total` (or softmax rows when `total` is None), in place.
    Written as (block - one_hot x total) x (weight / total): the division and the token weight are
    one pass over the (chunk, V) block instead of two."""
    rows = torch.arange(len(targets), device=targets.device)
    block[rows, targets] -= total if total is not None else 1.0
    if total is None and token_weights is None:
        scale = None
    elif total is None:
        scale = token_weights
    else:
        scale = total.reciprocal() if token_weights is None else token_weights / total
    if scale is not None:
        block.mul_(scale[:, None])
    # a separate cast: torch.mul(..., out=<bf16 block>) measured 15% slower on the CPU than both passes
    # (benchmarks/results/head_passes.md)
    return block if dtype == block.dtype else block.to(dtype)


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Weighted sum of cross-entropy(hidden @ weight.T, targets), chunk by chunk.

    The gradients are computed in the forward pass, while each chunk's logits exist, so only one
    (chunk, V) block is ever alive and the head's matmuls run exactly three times per token (logits,
    d hidden, d weight), with no recomputation. The upstream gradient is a scalar, so backward only
    scales what forward stored. Returns (weighted sum, per-token losses); the latter is detached.
    A ranking pass (selective loss) may hand over what it computed: `lse_known`, each row's
    log-sum-exp, or `known` = (exp(logits - max) rows, losses, row sums) of all rows when they fit in one block, which
    skips the logits matmul and the softmax altogether.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, chunk: int, lse_known=None, known=None, workspace=None,
                needs_grad: bool = True):
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_grad else None
        if known is not None:
            chunk = max(1, hidden.shape[0])  # one block, already computed
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            if known is not None:
                block, losses_known, total = known  # exp(logits - max) rows and their sums
                losses.copy_(losses_known)
            else:
                logits = logits_block(h, weight, workspace)  # (chunk, V)
                target_logit = logits.gather(1, t[:, None]).squeeze(1)
                if lse_known is None:
                    block, lse, total = exp_in_place(logits)
                else:
                    lse, total = lse_known[start:start + chunk], None
                    block = logits.sub_(lse[:, None]).exp_() if needs_grad else None  # softmax rows
                losses[start:start + chunk] = lse - target_logit
            if needs_grad:
                w = token_weights[start:start + chunk] if token_weights is not None else None
                d_logits = logits_gradient(block, total, t, w, weight.dtype)
                grad_hidden[start:start + chunk] = d_logits @ weight
                if weight.dtype == torch.float32:
                    grad_weight.addmm_(d_logits.T, h.float())
                else:  # a GEMM in the compute dtype (fp32 accumulation inside it), summed over chunks in fp32
                    grad_weight.add_(d_logits.T @ h.to(weight.dtype))
        weighted = losses * token_weights if token_weights is not None else losses
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(losses)
        return weighted.sum(), losses

    @staticmethod
    def backward(ctx, grad_sum, grad_losses):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_sum.to(grad_hidden.dtype), (grad_weight * grad_sum).to(ctx.weight_dtype),
                None, None, None, None, None, None, None)


class SupervisedHead(torch.nn.Linear):
    """The LM's output projection, callable two ways: `head(x)` gives logits as before (generation,
    export); `head(x, targets=...)` gives the fused loss without materializing logits. Calling it
    as a module keeps DeepSpeed ZeRO-3's parameter gathering working."""

    # On a CPU, a (chunk, V) block allocated afresh each step is memory newly mapped from the OS
    # (glibc maps blocks this large directly and unmaps them on free), and its page faults cost
    # ~20% of the logits matmul; so fp32 CPU runs keep one block for the run's lifetime (chunk x V
    # x 4 bytes; not in the state dict). GPU caching allocators already reuse memory.
    _workspace: torch.Tensor | None = None

    def workspace(self, rows: int) -> torch.Tensor | None:
        if self.weight.device.type != "cpu" or self.weight.dtype != torch.float32 or rows == 0:
            return None
        if self._workspace is None or self._workspace.shape[0] < rows:
            self._workspace = torch.empty(rows, self.out_features)
        return self._workspace

    def forward(self, hidden, targets=None, token_weights=None, chunk: int = 2048, reference=None, ratio=None,
                noise=None):
        """With `reference` (C,) losses: rank the C candidates by excess loss without gradient,
        then run the fused loss on the top `ratio` only; returns (sum, losses, keep, excess). With
        `noise` (C,), the ranking is by excess + noise (a sampled selection); the excess returned
        is the excess. One module call, so ZeRO-3 gathers the weight once for both passes."""
        if targets is None:
            return super().forward(hidden)
        workspace = self.workspace(min(chunk, hidden.shape[0]))
        # under torch.no_grad (eval, probes, scoring) no gradient is wanted: skip the two GEMMs and
        # the V x H buffer the fused pass would otherwise fill
        grad = torch.is_grad_enabled() and (hidden.requires_grad or self.weight.requires_grad)
        if reference is None:
            return FusedLinearCrossEntropy.apply(hidden, self.weight, targets, token_weights, chunk, None, None,
                                                 workspace, grad)
        weights = token_weights
        if hidden.shape[0] <= chunk:
            # one block: rank with the softmax rows the gradient needs, then keep only the winners'
            # rows (at most 1 + ratio blocks alive), so the selected tokens cost no second matmul
            with torch.no_grad():
                logits = logits_block(hidden.detach(), self.weight.detach(), workspace)
                target_logit = logits.gather(1, targets[:, None]).squeeze(1)
                block, lse, total = exp_in_place(logits)
                current = lse - target_logit
                excess = current - reference
                keep = top_excess(excess, ratio, noise)
                # unnormalized, as the masked path has them: at ratio 1 the gradient is the masked one bit for bit
                known = (block[keep], current[keep], total[keep])
                del logits, block
            return (*FusedLinearCrossEntropy.apply(hidden[keep], self.weight, targets[keep],
                                                   weights[keep] if weights is not None else None, chunk, None, known,
                                                   None, grad),
                    keep, excess)
        current, lse = chunked_token_losses(hidden.detach(), self.weight.detach(), targets, chunk, workspace)
        excess = current - reference
        keep = top_excess(excess, ratio, noise)
        # reusing the ranking's log-sum-exp changes the last bits of the softmax; at ratio 1 the
        # result must be the masked loss exactly, so it is recomputed there
        lse_known = lse[keep] if ratio < 1 else None
        loss_sum, losses = FusedLinearCrossEntropy.apply(hidden[keep], self.weight, targets[keep],
                                                         weights[keep] if weights is not None else None, chunk,
                                                         lse_known, None, workspace, grad)
        return loss_sum, losses, keep, excess


def install_supervised_head(lm: torch.nn.Module) -> torch.nn.Module:
    """Swap lm.lm_head for a SupervisedHead sharing the same weight Parameter (ties stay tied;
    state_dict keys and save_pretrained output are unchanged)."""
    old = lm.lm_head
    if not isinstance(old, SupervisedHead):
        head = SupervisedHead(old.in_features, old.out_features, bias=False, device="meta")
        head.weight = old.weight
        lm.lm_head = head
    return lm
