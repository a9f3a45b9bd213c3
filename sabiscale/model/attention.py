"""Attention over packed documents that computes only inside each document.

sdpa with a block-diagonal mask (transformers' default for packed sequences) scores every query
against all T keys of its row and then masks most of them away: with ~60-token documents in
512-token rows, >85% of that work is thrown away, and on a CPU it is a large share of the step.
A varlen kernel avoids it: on a CUDA GPU of sm80 on, in fp16/bf16, flash-attn's
flash_attn_varlen_func where it is installed, else torch's own varlen_attn (torch.nn.attention.varlen,
the same flash kernels inside torch). It takes the documents' `cu_seqlens`, made from the
restarting position_ids once per micro-batch (document_plan) and shared by every layer.
Everywhere else (CPU, fp32, older GPUs) this does the same with plain sdpa:

1. document spans come from the restarting `position_ids` (a document starts at position 0);
2. documents are sorted by length and grouped into buckets; each bucket is padded to its longest
   document (padding keys sit after every real query, so causal attention never sees them);
3. one causal sdpa call per bucket; the outputs are put back in token order.

Tokens move into buckets and back by one permutation (padding slots read an arbitrary real
token: they sit after every real query, and their outputs are dropped). A permutation's backward
is the inverse permutation, so both directions are plain gathers; autograd's default backward of
indexing would be an accumulating scatter, several times slower on a CPU. Exact: same outputs
and gradients as the masked dense computation (tests/test_attention.py). Used when the caller says the batch is packed
(`packed_documents=True`, with position_ids and no cache); any other call (generation with a
cache, padded batches) is plain sdpa with transformers' mask.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "sabiscale_documents"
log = logging.getLogger("sabiscale.attention")
# A bucket closes when padding it to its longest document would waste more than this share of
# its attention work; fewer, fuller buckets mean fewer kernel calls.
MAX_PADDING_WASTE = 0.25
MIN_BUCKET_DOCUMENTS = 4


def document_spans(position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, length) of every document in the flattened (B*T) batch."""
    batch, length = position_ids.shape
    starts = position_ids == 0
    starts[:, 0] = True  # a row always starts a document
    flat_starts = torch.nonzero(starts.reshape(-1)).squeeze(1)
    ends = torch.cat([flat_starts[1:], flat_starts.new_tensor([batch * length])])
    return flat_starts, ends - flat_starts


def length_buckets(lengths: list[int]) -> list[list[int]]:
    """Document indices grouped longest first; a group closes when adding the next document
    would push its padding waste (1 - useful work / padded work) past MAX_PADDING_WASTE."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    useful = 0
    for i in order:
        if len(current) >= MIN_BUCKET_DOCUMENTS:
            longest = lengths[current[0]]
            waste = 1 - (useful + lengths[i] ** 2) / ((len(current) + 1) * longest ** 2)
            if waste > MAX_PADDING_WASTE:
                groups.append(current)
                current, useful = [], 0
        current.append(i)
        useful += lengths[i] ** 2
    if current:
        groups.append(current)
    return groups


class Reindex(torch.autograd.Function):
    """`x[index]` whose backward is `grad[inverse]`: exact when every row of x that matters is
    read exactly once. With `zero_row`, `inverse` may point one past the end of grad: rows of x
    that are never read get a zero gradient there."""

    @staticmethod
    def forward(ctx, x, index, inverse, zero_row: bool):
        ctx.save_for_backward(inverse)
        ctx.zero_row = zero_row
        return x[index]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        if ctx.zero_row:
            grad = torch.cat([grad, grad.new_zeros(1, *grad.shape[1:])])
        return grad[inverse], None, None, None


@dataclass(frozen=True)
class BucketPlan:
    gather: torch.Tensor    # (R,) flat token read by each bucket row (padding rows read token 0)
    back: torch.Tensor      # (N,) for each flat token, its row in the concatenated buckets
    unread: torch.Tensor    # (R,) for each bucket row, its flat token, or N for padding rows
    shapes: list[tuple[int, int]]  # (documents, padded length) per bucket


def bucket_plan(position_ids: torch.Tensor) -> BucketPlan:
    tokens = position_ids.numel()
    starts, lengths = document_spans(position_ids)
    lengths_list = lengths.tolist()
    gathers, shapes = [], []
    for group in length_buckets(lengths_list):
        longest = lengths_list[group[0]]
        offsets = torch.arange(longest, device=position_ids.device)
        index = starts[group, None] + offsets[None, :]
        padding = offsets[None, :] >= lengths[group, None]
        gathers.append(index.masked_fill(padding, tokens).reshape(-1))
        shapes.append((len(group), longest))
    unread = torch.cat(gathers)
    real = unread < tokens
    back = torch.empty(tokens, dtype=torch.long, device=position_ids.device)
    back[unread[real]] = torch.nonzero(real).squeeze(1)
    return BucketPlan(unread.masked_fill(~real, 0), back, unread, shapes)


def document_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, position_ids: torch.Tensor,
                       scaling: float | None, plan: BucketPlan | None = None) -> torch.Tensor:
    """Causal attention inside each document: (B, H, T, D) inputs -> (B, T, H, D) output. `plan`:
    the batch's bucket_plan when the caller made it once for all layers."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    dtype = query.dtype
    if query.device.type == "cpu" and dtype != torch.float32:
        # the CPU's sdpa kernels have no fast bf16 path: measured 1.8x slower than fp32 (forward +
        # backward); the casts cost far less than that
        query, key, value = query.float(), key.float(), value.float()
    plan = plan if plan is not None else bucket_plan(position_ids.expand(batch, -1))
    sizes = [n * longest for n, longest in plan.shapes]

    def bucketed(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        flat = x.transpose(1, 2).reshape(batch * length, x.shape[1], dim)
        return Reindex.apply(flat, plan.gather, plan.back, False).split(sizes)

    outputs = []
    for q, k, v, (n, longest) in zip(bucketed(query), bucketed(key), bucketed(value), plan.shapes):
        as_heads = lambda x: x.view(n, longest, x.shape[1], dim).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(as_heads(q), as_heads(k), as_heads(v), is_causal=True, scale=scaling,
                                             enable_gqa=kv_heads != heads)
        outputs.append(out.transpose(1, 2).reshape(n * longest, heads, dim))
    return Reindex.apply(torch.cat(outputs), plan.back, plan.unread, True).view(batch, length, heads, dim).to(dtype)


def varlen_metadata(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens, max_seqlen) of the documents of a packed (B, T) batch, for a varlen kernel over
    the flattened B*T tokens: int32 document boundaries (D + 1 of them) and the longest document.
    Every row starts a document, so none spans two rows."""
    starts, lengths = document_spans(position_ids)
    ends = torch.tensor([position_ids.numel()], dtype=starts.dtype, device=starts.device)
    return torch.cat([starts, ends]).to(torch.int32), int(lengths.max())


def flash_applies(device_type: str, dtype: torch.dtype, capability: tuple[int, int] | None) -> bool:
    """The flash varlen kernels (flash-attn 2's and torch's) run on CUDA GPUs from sm80 on, in fp16
    or bf16 only."""
    return (device_type == "cuda" and dtype in (torch.float16, torch.bfloat16) and capability is not None
            and tuple(capability) >= (8, 0))


@dataclass(frozen=True)
class VarlenKernel:
    """A varlen attention kernel behind one call: (T, H, D) q and (T, H_kv, D) k, v of the flattened
    batch, causal inside each document of cu_seqlens -> (T, H, D)."""
    name: str
    fn: object

    def __call__(self, q, k, v, cu_seqlens, max_seqlen: int, scale: float | None) -> torch.Tensor:
        if self.name == "flash-attn":
            return self.fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=0.0, softmax_scale=scale,
                           causal=True)
        # torch's varlen_attn has no causal flag: a window of (-1, 0) is causal attention
        return self.fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale, window_size=(-1, 0),
                       enable_gqa=k.shape[1] != q.shape[1])


@lru_cache(maxsize=1)
def installed_varlen_kernel() -> VarlenKernel | None:
    """flash-attn's varlen kernel where it is installed and loads, else torch's varlen_attn where
    this torch has it, else None (one log line says which)."""
    try:
        from flash_attn import flash_attn_varlen_func
        return VarlenKernel("flash-attn", flash_attn_varlen_func)
    except Exception as err:  # noqa: BLE001 - any broken install falls back the same way
        reason = f"{type(err).__name__}: {err}"
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        log.info("flash-attn is not usable (%s) and this torch has no varlen_attn: packed attention runs sdpa "
                 "per length bucket", reason)
        return None
    log.info("flash-attn is not usable (%s): packed attention runs torch's varlen_attn", reason)
    return VarlenKernel("torch varlen_attn", varlen_attn)


def varlen_kernel(device: torch.device, dtype: torch.dtype) -> VarlenKernel | None:
    """The varlen kernel for this device and compute dtype, or None: sdpa per length bucket."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return installed_varlen_kernel() if flash_applies(device.type, dtype, capability) else None


@dataclass(frozen=True)
class VarlenPlan:
    kernel: VarlenKernel
    cu_seqlens: torch.Tensor  # (D + 1,) int32
    max_seqlen: int


def document_plan(position_ids: torch.Tensor, dtype: torch.dtype) -> VarlenPlan | BucketPlan:
    """How every layer of one micro-batch attends inside its documents, made once for all layers:
    a varlen kernel's cu_seqlens where one runs, else the sdpa length buckets."""
    kernel = varlen_kernel(position_ids.device, dtype)
    if kernel is not None:
        return VarlenPlan(kernel, *varlen_metadata(position_ids))
    return bucket_plan(position_ids)


def varlen_document_attention(plan: VarlenPlan, query, key, value, scaling) -> torch.Tensor:
    """Causal attention inside each document with a varlen kernel: (B, H, T, D) -> (B, T, H, D)."""
    batch, heads, length, dim = query.shape
    flat = lambda x: x.transpose(1, 2).reshape(batch * length, x.shape[1], dim)  # noqa: E731
    out = plan.kernel(flat(query), flat(key), flat(value), plan.cu_seqlens, plan.max_seqlen, scaling)
    return out.view(batch, length, heads, dim)


def packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, packed_documents: bool = False, position_ids=None,
                             document_plan: VarlenPlan | BucketPlan | None = None, **kwargs):
    """transformers attention interface: per-document attention for packed batches (a varlen
    kernel where one runs, else sdpa per length bucket), plain sdpa otherwise. `document_plan`:
    the micro-batch's document_plan, made once for all layers (else made here)."""
    if packed_documents and position_ids is not None and query.shape[2] == key.shape[2] and not dropout:
        plan = document_plan if document_plan is not None else document_plan_of(position_ids, query)
        if isinstance(plan, VarlenPlan):
            return varlen_document_attention(plan, query, key, value, scaling), None
        return document_attention(query, key, value, position_ids, scaling, plan), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  position_ids=position_ids, **kwargs)


def document_plan_of(position_ids: torch.Tensor, query: torch.Tensor) -> VarlenPlan | BucketPlan:
    return document_plan(position_ids.expand(query.shape[0], -1), query.dtype)


AttentionInterface.register(NAME, packed_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
